"""What the driver does once, before any rank starts: typed config, environment checks, run dir."""
from __future__ import annotations

import os
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ftcluster.config import ConfigError, JobConfig, LocalLauncherConfig, redact


def to_job(cfg: DictConfig) -> JobConfig:
    """Composed Hydra config -> validated JobConfig (ConfigError names the key)."""
    try:
        job = OmegaConf.to_object(cfg)
    except ConfigError:
        raise
    except OmegaConfBaseException as e:
        # OmegaConf wraps errors raised while building dataclasses; surface ours unchanged.
        cause = e.__cause__ or e.__context__
        if isinstance(cause, ConfigError):
            raise cause from None
        key = getattr(e, "full_key", None)
        raise ConfigError(f"{key or '<config>'}: {getattr(e, 'msg', str(e))}") from None
    assert isinstance(job, JobConfig)
    return job.validate()


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
