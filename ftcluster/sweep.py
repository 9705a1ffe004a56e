"""`ftcluster sweep [overrides]`: the same Hydra config and overrides as `train`; overrides in
Hydra's sweep syntax (`optim.lr='tag(log,interval(1e-5,1e-3))'`, `peft.rank='choice(8,16)'`,
`a=1,2`) form the search space, added to `sweep.params`. Every point the trials can take (the
whole grid, or each choice and both bounds of each interval) is typed and validated as at compose
before anything starts; then the sweep dir (run.dir) is prepared and handed to Ray Tune
(`launcher=ray`, the default here) or submitted as one Slurm allocation (`launcher=slurm`)."""
from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

from ftcluster.config import ConfigError, JobConfig, RayLauncherConfig, SlurmLauncherConfig


def split_overrides(overrides: list[str]) -> tuple[list[str], dict[str, str]]:
    """(plain overrides, {key: sweep expression}), told apart by Hydra's own override parser."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    plain, space = [], {}
    for line in overrides:
        try:
            override = parser.parse_override(line)
        except HydraException as e:
            raise ConfigError(f"<overrides>: {line!r}: {e}") from None
        if override.is_sweep_override():
            space[override.key_or_group] = line.split("=", 1)[1]
        else:
            plain.append(line)
    return plain, space


def compose_sweep(overrides: list[str]):  # type: ignore[no-untyped-def]
    """The composed config (launcher=ray unless a launcher is named) with the space in sweep.params,
    and the validated base JobConfig."""
    from ftcluster.compose import compose_config, to_job

    plain, space = split_overrides(overrides)
    if not any(o.lstrip("+~").startswith("launcher=") for o in plain):
        plain = ["launcher=ray", *plain]
    cfg = compose_config(*plain)
    cfg.sweep.params = {**cfg.sweep.params, **space}
    job = to_job(cfg)
    if not isinstance(job.launcher, (RayLauncherConfig, SlurmLauncherConfig)):
        raise ConfigError("launcher: a sweep's trials run through Ray Train; use launcher=ray (the default for "
                          "ftcluster sweep) or launcher=slurm")
    return cfg, job


def check_sweep_points(job: JobConfig, *, sweep_dir: Path) -> int:
    """Type and validate the trial config of every point the space can produce (as at compose);
    ConfigError names the key and the point. Returns how many were checked."""
    from ftcluster.launch.space import check_points, parse_space, trial_job

    points = check_points(parse_space(job.sweep.params))
    for point in points:
        trial_job(job, point=point, run_dir=str(sweep_dir / "trial_check"), name=f"{job.run.name}-check", seed=job.seed)
    return len(points)


def sweep_command(overrides: list[str]) -> int:
    from ftcluster.driver import check_environment, prepare_run_dir, run_dir_of
    from ftcluster.launch import tune
    from ftcluster.launch.lock import RunDirLock

    try:
        cfg, job = compose_sweep(overrides)
        check_environment(job)
        tune.check(job)
        sweep_dir = run_dir_of(job)
        n = check_sweep_points(job, sweep_dir=sweep_dir)
        s = job.sweep
        print(f"ftcluster: sweep {s.name or job.run.name}: {len(s.params)} key(s) "
              f"({', '.join(f'{k}={v}' for k, v in s.params.items())}), {n} point(s) checked; search {s.search}, "
              f"scheduler {s.scheduler}, {s.num_samples} sample(s), metric {s.metric}; sweep dir {sweep_dir}", flush=True)
        with RunDirLock(sweep_dir):
            prepare_run_dir(job, cfg)
            (sweep_dir / tune.SWEEP_FILE).write_text(json.dumps({
                "name": s.name or job.run.name, "params": dict(s.params), "metric": s.metric,
                "mode": "max" if s.higher_is_better else "min", "search": s.search, "scheduler": s.scheduler,
                "num_samples": s.num_samples, "command": "ftcluster sweep " + shlex.join(overrides)}, indent=1) + "\n")
            if isinstance(job.launcher, SlurmLauncherConfig):
                from ftcluster.launch.slurm import launch_slurm

                return launch_slurm(job, sweep_dir)  # the job runs the sweep (slurm_job: sweep.json marks it)
            return tune.run_sweep(job, sweep_dir)
    except ConfigError as e:
        print(f"ftcluster: config error: {e}", file=sys.stderr)
        return 2
