"""What the driver does once, before any rank starts: typed config, environment checks, run dir."""
from __future__ import annotations

import os
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ftcluster.config import ConfigError, JobConfig, redact


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
    job.validate()
    from ftcluster.parallel import check_job  # the backend's own checks (DeepSpeed's config model)

    check_job(job)
    return job


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
