"""launcher=slurm: render an sbatch script from `slurm/<mode>.sbatch`, submit it, say where
everything goes, return. The job itself runs `ftcluster.launch.slurm_job` inside the allocation.

    <run.dir>/
      config.yaml                 the resolved config (written by the driver)
      slurm/submit-<n>/           one per submission, kept
        job.sbatch                the rendered script (`sbatch job.sbatch` resubmits it by hand)
        config.yaml               the resolved config this job runs (never composed again)
        job_id                    Slurm's job id
        slurm-<jobid>.out         the batch script's output, every run of a requeued job appended
        preempt-request.<id>.<r>  written by the USR1 trap of run r; preempt-saved.<id>.<r>: the
                                  step whose checkpoint then committed (the script requeues on it)
      slurm/dry-run/              launcher.dry_run=true: rendered, not submitted
      logs/rank<r>.log|.out|.error, metrics.jsonl, checkpoints/   (as with every launcher)

Template placeholders (`{{name}}`): sbatch (the #SBATCH lines from the config), run_dir,
submit_dir, python, max_requeues, env (export lines), setup, and per mode rdzv_port (torchrun)
or gpus_per_node, ray_port, ray_wait_s (ray). Values are shell-quoted.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ftcluster.config import ConfigError, JobConfig, SlurmLauncherConfig

TEMPLATES = {"ray": "ray.sbatch", "torchrun": "torchrun.sbatch"}
TEMPLATES_ENV = "FTCLUSTER_SLURM_TEMPLATES"
_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")
ACTIVE_STATES = ("PENDING", "RUNNING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD", "RESIZING", "SUSPENDED",
                 "CONFIGURING", "COMPLETING", "SIGNALING", "STAGE_OUT", "STOPPED")


class SubmitError(RuntimeError):
    """sbatch is missing or refused the job."""


def template_dir() -> Path:
    """`slurm/` of the source tree, or `ftcluster/slurm_templates` of an installed package."""
    if os.environ.get(TEMPLATES_ENV):
        return Path(os.environ[TEMPLATES_ENV])
    repo = Path(__file__).resolve().parents[2] / "slurm"
    if (repo / TEMPLATES["ray"]).is_file():
        return repo
    from importlib.resources import files

    return Path(str(files("ftcluster.slurm_templates")))


@dataclass(frozen=True, kw_only=True)
class Submission:
    dir: Path
    script: Path
    job_id: str | None


def sbatch_options(job: JobConfig, *, submit_dir: Path, workdir: Path) -> list[str]:
    """The job's sbatch options from the config (the templates add --ntasks-per-node=1, --requeue
    and --open-mode=append themselves)."""
    c: SlurmLauncherConfig = job.launcher
    opts = [f"--job-name={c.job_name or 'ftc-' + job.run.name}", f"--nodes={c.nodes}"]
    if c.gpus_per_node:
        opts.append(f"--gpus-per-node={c.gpus_per_node}")
    if c.cpus_per_task is not None:
        opts.append(f"--cpus-per-task={c.cpus_per_task}")
    if c.mem is not None:
        opts.append(f"--mem={c.mem}")
    for key in ("partition", "account", "qos", "time", "constraint"):
        if getattr(c, key) is not None:
            opts.append(f"--{key}={getattr(c, key)}")
    if c.exclusive:
        opts.append("--exclusive")
    if c.signal_grace_s:
        opts.append(f"--signal=B:USR1@{c.signal_grace_s}")
    # stdout and stderr together; a requeued run appends (--open-mode=append) to the same file.
    opts.append(f"--output={submit_dir}/slurm-%j.out")
    # Relative paths in the config mean what they meant where `ftcluster train` ran.
    opts.append(f"--chdir={workdir}")
    for line in c.sbatch_extra:
        opts.append(line[len("#SBATCH"):].strip() if line.startswith("#SBATCH") else line.strip())
    return opts


def render(job: JobConfig, *, run_dir: Path, submit_dir: Path, workdir: Path) -> str:
    """The sbatch script for `job` (pure: no files, no Slurm)."""
    c: SlurmLauncherConfig = job.launcher
    for what, path in (("run.dir", run_dir), ("the working directory", workdir)):
        # Slurm reads #SBATCH values unquoted and expands % in --output.
        if re.search(r"[\s%'\"\\$`]", str(path)):
            raise ConfigError(f"{'run.dir' if what == 'run.dir' else 'launcher'}: {what} {path} contains whitespace, "
                              "quotes, '$', '`' or '%', which sbatch options cannot carry; use a plainer path")
    values = {
        "sbatch": "\n".join(f"#SBATCH {o}" for o in sbatch_options(job, submit_dir=submit_dir, workdir=workdir)),
        "run_dir": shlex.quote(str(run_dir)),
        "submit_dir": shlex.quote(str(submit_dir)),
        "python": shlex.quote(c.python or sys.executable),
        "max_requeues": str(c.max_requeues),
        "env": "\n".join(f"export {k}={shlex.quote(str(v))}" for k, v in c.env.items()) or "# (none)",
        "setup": c.setup.strip() or "# (none)",
        "rdzv_port": str(c.rdzv_port),
        "gpus_per_node": str(c.gpus_per_node),
        "ray_port": str(c.ray_port),
        "ray_wait_s": str(c.ray_wait_s),
    }
    template = (template_dir() / TEMPLATES[c.mode]).read_text()
    missing = sorted({m for m in _PLACEHOLDER.findall(template) if m not in values})
    if missing:
        raise RuntimeError(f"template {TEMPLATES[c.mode]} has unknown placeholders {missing}")
    # One pass over the template: values (a user's setup lines) are never scanned for placeholders.
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


def check(job: JobConfig) -> None:
    """What submission needs from this host, before the run dir exists: mode=ray needs Ray here too
    (the job's driver imports it; sbatch would only fail once the allocation started)."""
    c: SlurmLauncherConfig = job.launcher
    if c.mode == "ray":
        import importlib.util

        if importlib.util.find_spec("ray") is None:
            raise ConfigError("launcher.mode: 'ray' needs Ray installed (pip install 'ray[train]'), or use launcher.mode=torchrun")


def launch_slurm(job: JobConfig, run_dir: Path) -> int:
    c: SlurmLauncherConfig = job.launcher
    config_text = (run_dir / "config.yaml").read_text()
    if "<redacted>" in config_text:
        raise ConfigError("launcher: the resolved config holds a secret (saved as <redacted>), which the job could not "
                          "use; pass secrets through the environment you submit from instead")
    slurm_dir = run_dir / "slurm"
    workdir = Path.cwd()
    if c.dry_run:
        submit_dir = slurm_dir / "dry-run"
        submit_dir.mkdir(parents=True, exist_ok=True)
    else:
        _refuse_if_active(slurm_dir)
        submit_dir = _new_submit_dir(slurm_dir)
    script = render(job, run_dir=run_dir, submit_dir=submit_dir, workdir=workdir)
    (submit_dir / "config.yaml").write_text(config_text)
    script_path = submit_dir / "job.sbatch"
    script_path.write_text(script)
    script_path.chmod(0o755)
    shape = f"mode={c.mode}, {c.nodes} node(s) x " + (f"{c.gpus_per_node} GPU(s)" if c.gpus_per_node else "1 CPU rank")
    if c.dry_run:
        print(script, end="" if script.endswith("\n") else "\n")
        print(f"ftcluster: dry run ({shape}): rendered {script_path} and the resolved config beside it; nothing "
              f"submitted. Submit it with: sbatch {script_path}", flush=True)
        return 0
    try:
        job_id = submit(script_path)
    except SubmitError as e:
        print(f"ftcluster: {e}\n  the rendered script is {script_path}", file=sys.stderr)
        return 1
    (submit_dir / "job_id").write_text(job_id + "\n")
    out = submit_dir / f"slurm-{job_id}.out"
    print(f"ftcluster: submitted Slurm job {job_id} ({shape}); it runs in the background\n"
          f"  script      {script_path} (runs {submit_dir / 'config.yaml'})\n"
          f"  job output  {out}\n"
          f"  rank logs   {run_dir / 'logs'}/rank<r>.log (errors: rank<r>.error)\n"
          f"  metrics     {run_dir / 'metrics.jsonl'}\n"
          f"  checkpoints {run_dir / 'checkpoints'}\n"
          f"  watch:  squeue -j {job_id}; tail -f {out}\n"
          f"  stop:   scancel --signal=USR1 --batch {job_id} (checkpoint, then requeue), or scancel {job_id}",
          flush=True)
    return 0


def submit(script: Path) -> str:
    """`sbatch --parsable script` -> the job id."""
    if shutil.which("sbatch") is None:
        raise SubmitError("sbatch is not on PATH: submit from a Slurm login node (or use launcher.dry_run=true)")
    p = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True, timeout=120)
    if p.returncode != 0:
        raise SubmitError(f"sbatch refused the job (exit {p.returncode}): {p.stderr.strip() or p.stdout.strip()}")
    job_id = p.stdout.strip().splitlines()[-1].split(";")[0] if p.stdout.strip() else ""
    if not job_id.isdigit():
        raise SubmitError(f"sbatch printed no job id: {p.stdout!r} {p.stderr!r}")
    return job_id


def _new_submit_dir(slurm_dir: Path) -> Path:
    slurm_dir.mkdir(parents=True, exist_ok=True)
    for _ in range(100):
        taken = [int(p.name.split("-", 1)[1]) for p in slurm_dir.glob("submit-*") if p.name.split("-", 1)[1].isdigit()]
        path = slurm_dir / f"submit-{max(taken, default=0) + 1}"
        try:
            path.mkdir()  # exclusive: two submissions never share a directory
            return path
        except FileExistsError:
            time.sleep(0.01)
    raise RuntimeError(f"could not create a new submit-<n> directory in {slurm_dir}")


def _refuse_if_active(slurm_dir: Path) -> None:
    """Two jobs on one run dir would write the same checkpoints: refuse while an earlier one lives."""
    ids = [p.read_text().strip() for p in slurm_dir.glob("submit-*/job_id") if p.read_text().strip().isdigit()]
    if not ids or shutil.which("squeue") is None:
        return
    active = []
    for job_id in ids:  # one at a time: squeue rejects a whole list if one id is no longer known
        p = subprocess.run(["squeue", "-h", "-t", "all", "-j", job_id, "-o", "%i %T"],
                           capture_output=True, text=True, timeout=60)
        active += [ln.split() for ln in p.stdout.splitlines() if len(ln.split()) == 2 and ln.split()[1] in ACTIVE_STATES]
    if active:
        jobs = ", ".join(f"{i} ({s})" for i, s in active)
        raise ConfigError(f"run.dir: Slurm job {jobs} still uses {slurm_dir.parent}; wait for it or scancel it, "
                          "or use another run.dir")
