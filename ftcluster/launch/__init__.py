"""Launchers decide WHERE the ranks run (this host, a Ray cluster, a Slurm allocation), never how
to train: each ends up calling `ftcluster.train.train(job, run_dir)` on every rank.

    check(job)            the launcher's own checks of this host / environment, before the run dir
    launch(job, run_dir)  run (or, for Slurm, submit) the job; the process exit code

Modules: `hosts` (this host's GPUs), `runner` (what the launchers share: the rank entry, torch
elastic's runner, error files), `local`, `ray/`, `slurm` (submission) and `slurm_job` (inside the
allocation). Nothing here imports the driver: the driver hands over a validated JobConfig and the
resolved run dir.
"""
from __future__ import annotations

from pathlib import Path

from ftcluster.config import JobConfig, LocalLauncherConfig, RayLauncherConfig, SlurmLauncherConfig


def check(job: JobConfig) -> None:
    """The pre-launch checks of the launcher the config names (ConfigError naming the key). They
    need the host or the installed packages, not just the config; nothing is started or written."""
    if isinstance(job.launcher, LocalLauncherConfig):
        from ftcluster.launch import local

        local.check(job)
    elif isinstance(job.launcher, RayLauncherConfig):
        from ftcluster.launch import ray

        ray.check(job)
    elif isinstance(job.launcher, SlurmLauncherConfig):
        from ftcluster.launch import slurm

        slurm.check(job)
    else:
        raise TypeError(f"launcher: unsupported launcher config {type(job.launcher).__name__}")


def launch(job: JobConfig, run_dir: Path) -> int:
    """Run the job with the launcher its config names; return the process exit code."""
    if isinstance(job.launcher, LocalLauncherConfig):
        from ftcluster.launch.local import launch_local

        return launch_local(job, run_dir)
    if isinstance(job.launcher, RayLauncherConfig):
        from ftcluster.launch.ray import launch_ray

        return launch_ray(job, run_dir)
    if isinstance(job.launcher, SlurmLauncherConfig):
        from ftcluster.launch.slurm import launch_slurm

        return launch_slurm(job, run_dir)  # submits and returns; the job runs ftcluster.launch.slurm_job
    raise TypeError(f"launcher: unsupported launcher config {type(job.launcher).__name__}")
