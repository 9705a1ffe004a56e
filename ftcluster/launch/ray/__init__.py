"""launcher=ray: the ranks are Ray Train workers (Ray Train V2 `TorchTrainer`) on a Ray cluster.

    driver (this process)                          every worker (one Ray actor per rank)
    ---------------------                          -------------------------------------
    connect to / start Ray; plan workers           Ray has joined the torch process group (gloo|nccl)
    write <run.dir>/ray_launch_id                  and set RANK/LOCAL_RANK/WORLD_SIZE/MASTER_*
    TorchTrainer(worker_main, {job, run_dir..}) -> pre-flight: gather host/rank/devices/versions,
      FailureConfig(max_failures)                    all check the same facts, fail naming a worker
      RunRecorder (controller callback)            train(job, run_dir, on_log=reporter)  (as local)
    fit(); summary, or the failing ranks           reporter thread: ray.train.report(step record)

Ray does the placing, the process group and the restarts; ftcluster does the training and the
checkpoints. Recovery: when a worker raises, dies or loses its node, Ray Train tears the worker group
down and starts a new one (up to `max_failures` times); train() there resumes from the newest
committed checkpoint in <run.dir>/checkpoints (resume=auto). We never hand checkpoints to Ray
(`ray.train.report` carries metrics only): our checkpoint manager owns commit and retention, and
Ray's storage_path only holds Ray Train's own bookkeeping. Both must be on a filesystem every node
sees (checked in pre-flight for the run dir).

The driver ships the resolved, validated JobConfig (a plain dataclass) and the absolute run dir to
the workers; they never run Hydra. Needs Ray Train V2 (the default in Ray 2.60, the version this was
written and tested against).

Modules: `plan` (the `auto` settings resolved against the cluster, the environment the workers
get), `launcher` (the driver: connect, fit, the summary), `worker` (each rank), `preflight` (what
the workers check together before training), `records` (what Ray Train saw, as files in the run
dir). This module imports no Ray: `check` must work where Ray is missing or too old.
"""
from __future__ import annotations

import os
from pathlib import Path

from ftcluster.config import ConfigError, JobConfig, RayLauncherConfig
from ftcluster.launch import hosts
from ftcluster.launch.ray.plan import RayPlan, forwarded_env, plan_workers
from ftcluster.launch.ray.preflight import PreflightError, check_preflight

__all__ = ["RAY_ENV_DEFAULTS", "PreflightError", "RayPlan", "check", "check_preflight", "forwarded_env",
           "launch_ray", "plan_workers"]

# Ray Train V2 settings the driver sets (Ray forwards RAY_TRAIN_* to the controller and workers).
RAY_ENV_DEFAULTS = {
    "RAY_TRAIN_V2_ENABLED": "1",
    # Ray's print patch routes print() through its logger and doubles every line on the console.
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    # Ray would chdir each worker into its own trial directory; relative paths in the config are
    # taken from the driver's working directory instead (see _enter_driver_cwd).
    "RAY_CHDIR_TO_TRIAL_DIR": "0",
}


def check(job: JobConfig) -> None:
    """What can be checked before connecting to the cluster (which `launch_ray` does next,
    resolving `auto` against the cluster's resources)."""
    launcher: RayLauncherConfig = job.launcher
    if os.environ.get("RAY_TRAIN_V2_ENABLED", "1").strip().lower() in ("0", "false", "no"):
        raise ConfigError("launcher: 'ray' needs Ray Train V2; unset RAY_TRAIN_V2_ENABLED=0")
    try:
        import ray
        import ray.train
    except ImportError:
        raise ConfigError("launcher: 'ray' needs Ray Train: pip install 'ray[train]'") from None
    if not all(hasattr(ray.train, n) for n in ("UserCallback", "WorkerGroupError", "get_context")):
        raise ConfigError(f"launcher: 'ray' needs Ray Train V2 (ray.train.UserCallback, WorkerGroupError); "
                          f"ray {ray.__version__} does not have it")
    if launcher.address == "local" and str(launcher.gpus_per_worker) == "1":
        n = 1 if launcher.num_workers == "auto" else int(launcher.num_workers)
        gpus = hosts.visible_gpus()
        if n > gpus:
            raise ConfigError(f"launcher.num_workers: {n} workers x 1 GPU but this host has {gpus} visible GPUs "
                              "(launcher.address=local)")


def launch_ray(job: JobConfig, run_dir: Path) -> int:
    """Run the job on the Ray cluster launcher.address names; return the exit code."""
    from ftcluster.launch.ray.launcher import launch  # imports Ray Train, after the defaults above

    return launch(job, run_dir)
