"""The `ftcluster` command: `ftcluster train [overrides]`, `ftcluster export ...`, `ftcluster generate ...`,
`ftcluster report ...`.

`train` is a Hydra application (so `--help`, `--cfg job`, `-m` sweeps and override grammar are
Hydra's own). The driver composes and validates the config, resolves the run directory once, and
hands both to the launcher; ranks never run Hydra.
"""
from __future__ import annotations

import sys
from pathlib import Path

USAGE = """usage: ftcluster <command> [args]

commands:
  train     fine-tune a model: ftcluster train [group=option ...] [key=value ...]
            (ftcluster train --help lists the config groups and every key)
  sweep     hyperparameter search with Ray Tune (random, grid, optuna; ASHA early stopping), same overrides
            as train plus Hydra sweep syntax: ftcluster sweep optim.lr='tag(log,interval(1e-5,1e-3))' ...
            (results.md, results.csv and curves.png in the sweep dir)
  plan      per-rank GPU/host memory of a job and the layout auto would choose, no GPU needed:
            ftcluster plan [overrides] [--world-size N | --nodes N[,M..] --gpus-per-node G] [--gpu-gib X[,Y]] [--json]
  export    write a checkpoint as a Hugging Face PEFT adapter or (--merge) a merged model:
            ftcluster export <checkpoint or run dir> <out dir> [--best] [--merge] [--dtype bf16] [--max-shard-size 5GB]
  generate  answer prompts with a run's newest checkpoint (or --best) or an export, in a few seconds:
            ftcluster generate <run dir, checkpoint, export or adapter> --prompt "..." [--prompt ...] [--max-new-tokens 64]
  report    summarise a run dir (finished or still running): summary.json, a PNG of loss and throughput,
            a table: ftcluster report <run dir> [--out PNG]

Run `ftcluster train` with no arguments to fine-tune the embedded tiny model on the sample data.
`ftcluster --version` prints the installed version.
"""
VERBOSE_FLAGS = ("--verbose", "-v")
"""`ftcluster train --verbose` is `log.level=debug`: third-party output on the console too."""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd in ("--version", "-V"):
        print(f"ftcluster {_version()}")
        return 0
    if cmd == "train":
        return train_command(rest)
    if cmd == "sweep":
        from ftcluster.sweep import sweep_command

        return sweep_command(rest)
    if cmd == "plan":
        from ftcluster.plan_cli import plan_command

        return plan_command(rest)
    if cmd == "export":
        from ftcluster.export import export_command

        return export_command(rest)
    if cmd == "generate":
        from ftcluster.generate_cli import generate_command

        return generate_command(rest)
    if cmd == "report":
        from ftcluster.report import report_command

        return report_command(rest)
    print(f"ftcluster: unknown command {cmd!r}\n\n{USAGE}", file=sys.stderr)
    return 2


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ftcluster")
    except PackageNotFoundError:
        return "unknown (not installed)"


def train_command(overrides: list[str]) -> int:
    """Exit codes: 0 done (or nothing to do), 2 a usage, config or data error found before any
    process started (Hydra's own override and compose errors included), 1 a training failure,
    130/143 stopped by Ctrl-C / SIGTERM after a checkpoint."""
    import hydra

    from ftcluster.compose import conf_dir, register_configs
    from ftcluster.console import DriverLog

    if any(a in ("--help", "-h") for a in overrides):
        from ftcluster.help import train_help

        print(train_help(conf_dir()))
        return 0
    if "--version" in overrides:
        print(f"ftcluster {_version()}")
        return 0
    overrides = ["log.level=debug" if a in VERBOSE_FLAGS else a for a in overrides]
    level = "debug" if "log.level=debug" in overrides else "info"
    register_configs()
    result = {"code": 0, "entered": False}
    driver_log = DriverLog(level=level)

    @hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="config")
    def _train(cfg) -> int:  # type: ignore[no-untyped-def]
        result["entered"] = True
        point = _sweep_point_run_dir(cfg)
        if point is not None:
            result["multirun_dir"], result["slurm"] = point, cfg.launcher.kind == "slurm"
        code = drive(cfg, driver_log=driver_log)
        result["code"] = max(result["code"], code)
        return code

    # Hydra parses sys.argv itself; present it the train subcommand's arguments.
    saved = sys.argv
    sys.argv = ["ftcluster train", *overrides]
    try:
        _train()
    except SystemExit as e:
        # Hydra prints its own usage and compose errors (an unknown key, a bad override) and exits 1;
        # they are usage errors like ours: exit 2. An error after our code started keeps Hydra's code.
        if e.code in (0, None) or result["entered"]:
            raise
        return 2
    finally:
        sys.argv = saved
        driver_log.close()
    if "multirun_dir" in result:  # every point ran (or, for Slurm, was submitted): the table, as a sweep's
        _multirun_report(Path(result["multirun_dir"]), submitted=result.get("slurm", False))
    return result["code"]


def _multirun_report(multirun_dir: Path, *, submitted: bool) -> None:
    from ftcluster.report import ReportError, print_sweep, write_sweep_report

    if submitted:
        print(f"ftcluster: once the jobs have finished: ftcluster report {multirun_dir}", flush=True)
        return
    try:
        print_sweep(multirun_dir, write_sweep_report(multirun_dir))
    except ReportError as e:
        print(f"ftcluster: could not write the multirun table: {e}", file=sys.stderr)


def _sweep_point_run_dir(cfg) -> str | None:  # type: ignore[no-untyped-def]
    """Multirun (`-m`): every sweep point gets its own run dir, `<hydra.sweep.dir>/<hydra.sweep.subdir>`,
    i.e. `<run.dir>/<n>` (conf/config.yaml), set here before validation, with its overrides in
    trial.json for the multirun's results table. Returns the multirun dir; None for a single run."""
    import json

    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return None
    cfg.run.dir = hc.runtime.output_dir  # absolute; Hydra has created it
    params = dict(o.split("=", 1) for o in hc.overrides.task if "=" in o)
    (Path(cfg.run.dir) / "trial.json").write_text(json.dumps({"trial": str(hc.job.num), "params": params}) + "\n")
    print(f"ftcluster: sweep point {hc.job.num} ({' '.join(hc.overrides.task) or 'no overrides'}): "
          f"run dir {cfg.run.dir}", flush=True)
    return str(Path(cfg.run.dir).parent)


def drive(cfg, *, driver_log=None) -> int:  # type: ignore[no-untyped-def]
    """Validate a composed config, prepare the run dir, launch. Returns the exit code."""
    from ftcluster.compose import to_job
    from ftcluster.config import ConfigError
    from ftcluster.console import quiet_environment
    from ftcluster.data.errors import DataError  # light: the data package loads torch/datasets lazily
    from ftcluster.driver import (check_environment, check_resume_config, nothing_to_do, prepare_run_dir,
                                  record_resume, run_dir_of)
    from ftcluster.launch import launch
    from ftcluster.launch.lock import RunDirLock

    try:
        job = to_job(cfg)
        quiet_environment(job.log.level)
        check_environment(job)
        # One run per run dir: locked before anything is written there, held until the launcher
        # returns (a Slurm job entry takes it over for the job's duration: launch/lock.py).
        with RunDirLock(run_dir_of(job)):
            # A resume is checked against its checkpoint's config before config.yaml is rewritten.
            segment = check_resume_config(job, run_dir_of(job))
            # The same command again after the run finished (resume=auto); an explicit checkpoint
            # (resume=<dir>) is loaded as asked, e.g. to evaluate it on another world size.
            if segment is not None and job.resume == "auto" and segment.step >= job.train.max_steps:
                print(nothing_to_do(job, segment), flush=True)
                return 0
            if segment is not None:
                record_resume(run_dir_of(job), segment)
            run_dir = prepare_run_dir(job, cfg)
            if driver_log is not None:
                driver_log.attach(run_dir)
            # Launchers check what only they can see (the Ray cluster's resources, a Slurm job still
            # using the run dir) and raise ConfigError for it too: the same message, the same exit code.
            return launch(job, Path(run_dir))
    except ConfigError as e:
        print(f"ftcluster: config error: {e}", file=sys.stderr)
        return 2
    except DataError as e:  # found by the driver's checks, before any rank started
        print(f"ftcluster: data error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
