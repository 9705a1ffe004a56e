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
    check_peft_targets(job)


def check_peft_targets(job: JobConfig) -> None:
    """Every `peft.target_modules` entry names a module of the model (checked on the meta device:
    no memory, well under a second for the tiny model), so a typo fails here, naming the modules
    that exist, instead of as peft's error on every rank. `all-linear` is peft's own keyword."""
    p = job.peft
    if p.method == "none" or list(p.target_modules) == ["all-linear"]:
        return
    from torch import nn

    from ftcluster.model import build_hf_config
    from ftcluster.model.build import build_meta_model

    model = build_meta_model(job.model, build_hf_config(job.model))
    names = [n for n, m in model.named_modules() if n]
    # peft's matching for a list of names: the module's full name, or its name ending in ".<entry>".
    missing = [t for t in p.target_modules if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ConfigError(f"peft.target_modules: {', '.join(map(repr, missing))} match no module of the model; "
                          f"its linear modules are {', '.join(linear)} (or use all-linear)")


def run_dir_of(job: JobConfig) -> Path:
    """run.dir, absolute (resolved once, from the cwd the driver started in)."""
    return Path(os.path.expanduser(job.run.dir)).resolve()


def prepare_run_dir(job: JobConfig, cfg: DictConfig) -> Path:
    """Resolve run.dir once (absolute), create it, save the resolved config (secrets redacted)."""
    run_dir = run_dir_of(job)
    ckpt = run_dir / "checkpoints"
    if job.resume == "never" and ckpt.is_dir() and any(p.name.startswith("step_") for p in ckpt.iterdir()):
        raise ConfigError(f"resume: 'never' but {ckpt} already holds checkpoints; use another run.dir or resume=auto")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "logs").mkdir(exist_ok=True)
    container = OmegaConf.to_container(cfg, resolve=True)
    container.pop("hydra", None)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(redact(container), sort_keys=False))
    return run_dir
