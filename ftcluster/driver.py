"""What the driver does once, before any rank starts: environment checks, run dir. (The typed,
validated config comes from `ftcluster.compose.to_job`.)"""
from __future__ import annotations

import os
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf

from ftcluster.compose import redact
from ftcluster.config import ConfigError, JobConfig


def check_environment(job: JobConfig) -> None:
    """Checks that need this host (not just the config), still before any process starts: the
    launcher's own (`ftcluster.launch.check`)."""
    from ftcluster.launch import check

    check(job)


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
