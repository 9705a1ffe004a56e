"""What the driver does once, before any rank starts: environment checks, run dir. (The typed,
validated config comes from `ftcluster.compose.to_job`.)"""
from __future__ import annotations

import os
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf

from ftcluster.compose import redact
from ftcluster.config import ConfigError, JobConfig, LocalLauncherConfig, RayLauncherConfig


def visible_gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001 - a broken CUDA install counts as no GPU here
        return 0


def local_world_size(launcher: LocalLauncherConfig) -> int:
    n = launcher.nproc_per_node
    if n == "auto":
        return max(1, visible_gpus())
    return int(n)


def check_environment(job: JobConfig) -> None:
    """Checks that need this host (not just the config), still before any process starts."""
    if isinstance(job.launcher, LocalLauncherConfig):
        gpus = visible_gpus()
        n = local_world_size(job.launcher)
        if gpus and n > gpus:
            raise ConfigError(f"launcher.nproc_per_node: {n} ranks but only {gpus} visible GPUs on this host")
        if job.parallel.cpu_offload and job.parallel.backend == "fsdp2" and not gpus:  # ZeRO offload runs on CPU ranks
            raise ConfigError("parallel.cpu_offload: needs GPUs (FSDP2 offloads from an accelerator; on a CPU-only "
                              "host the parameters already live in host memory)")
    if isinstance(job.launcher, RayLauncherConfig):
        check_ray_environment(job, job.launcher)


def check_ray_environment(job: JobConfig, launcher: RayLauncherConfig) -> None:
    """launcher=ray: what can be checked before connecting to the cluster (which the launcher
    does next, resolving `auto` against the cluster's resources)."""
    if os.environ.get("RAY_TRAIN_V2_ENABLED", "1").strip().lower() in ("0", "false", "no"):
        raise ConfigError("launcher: 'ray' needs Ray Train V2; unset RAY_TRAIN_V2_ENABLED=0")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")  # read when ray.train is first imported
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
        gpus = visible_gpus()
        if n > gpus:
            raise ConfigError(f"launcher.num_workers: {n} workers x 1 GPU but this host has {gpus} visible GPUs "
                              "(launcher.address=local)")


def prepare_run_dir(job: JobConfig, cfg: DictConfig) -> Path:
    """Resolve run.dir once (absolute), create it, save the resolved config (secrets redacted)."""
    run_dir = Path(os.path.expanduser(job.run.dir)).resolve()
    ckpt = run_dir / "checkpoints"
    if job.resume == "never" and ckpt.is_dir() and any(p.name.startswith("step_") for p in ckpt.iterdir()):
        raise ConfigError(f"resume: 'never' but {ckpt} already holds checkpoints; use another run.dir or resume=auto")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "logs").mkdir(exist_ok=True)
    container = OmegaConf.to_container(cfg, resolve=True)
    container.pop("hydra", None)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(redact(container), sort_keys=False))
    return run_dir
