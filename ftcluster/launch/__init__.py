"""Launchers decide WHERE the ranks run (this host, a Ray cluster, a Slurm allocation), never how
to train: each ends up calling `ftcluster.train.train(job, run_dir)` on every rank."""
from __future__ import annotations

from pathlib import Path

from ftcluster.config import JobConfig, LocalLauncherConfig, RayLauncherConfig, SlurmLauncherConfig


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
