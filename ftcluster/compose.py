"""From YAML and overrides to a validated JobConfig: Hydra registration, composition, the checks
that look outside the config, saved-config reload and secret redaction.

`ftcluster/config.py` is the schema (pure; imports nothing from ftcluster). This module is the one
door to it from Hydra: `register_configs` stores the schemas in Hydra's ConfigStore (variant
schemas — launchers, parallel backends — outside any group so `--help` lists only the options),
`to_job` turns a composed DictConfig into the typed tree and runs every check before any process
starts, `compose_job` composes without a CLI (tests, sweeps), and `load_saved_job` re-reads the
resolved config.yaml a run saved.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ftcluster.config import (
    LAUNCHER_SCHEMAS,
    OBJECTIVE_SCHEMAS,
    PARALLEL_SCHEMAS,
    RESUME_KEYWORDS,
    ConfigError,
    JobConfig,
    ModelConfig,
    check_context_extension,
    is_secret_name,
    objective_schema,
    parallel_schema,
)

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
"""Files shipped in the package (the tiny model, its tokenizer, sample data): `${asset:NAME}`."""
CONF_DIR_ENV = "FTCLUSTER_CONF_DIR"
"""Environment variable naming another directory of YAML groups (a source tree's `conf/`)."""


# --- Hydra registration -------------------------------------------------------------------------

def _asset_path(name: str) -> str:
    """OmegaConf resolver `${asset:NAME}`: absolute path of a file shipped in ftcluster/assets."""
    p = ASSETS_DIR / name
    if not p.exists():
        raise ConfigError(f"asset {name!r} is not shipped in {ASSETS_DIR}")
    return str(p)


def register_configs() -> None:
    """Register schemas with Hydra's ConfigStore and our resolvers. Idempotent."""
    from hydra.core.config_store import ConfigStore

    if not OmegaConf.has_resolver("asset"):
        OmegaConf.register_new_resolver("asset", _asset_path)
    cs = ConfigStore.instance()
    cs.store(name="job_schema", node=JobConfig)
    # Variant schemas are stored outside any group so `--help` does not list them as options;
    # each variant's YAML starts from its schema (`defaults: [/launcher_local_schema@_here_]`).
    for name, node in LAUNCHER_SCHEMAS.items():
        cs.store(name=f"launcher_{name}_schema", node=node)
    for name, node in PARALLEL_SCHEMAS.items():
        cs.store(name=f"parallel_{name}_schema", node=node)
    for name, node in OBJECTIVE_SCHEMAS.items():
        cs.store(name=f"objective_{name}_schema", node=node)


def conf_dir() -> Path:
    """Directory of the shipped YAML groups: `ftcluster/conf` inside the installed package (mapped
    from the repo's top-level `conf/`), or the repo's `conf/` when running from a source tree."""
    if os.environ.get(CONF_DIR_ENV):
        return Path(os.environ[CONF_DIR_ENV])
    try:
        from importlib.resources import files

        p = Path(str(files("ftcluster.conf")))
        if (p / "config.yaml").is_file():
            return p
    except (ModuleNotFoundError, TypeError):
        pass
    return Path(__file__).resolve().parent.parent / "conf"


# --- composed config -> validated JobConfig ----------------------------------------------------

def _omegaconf_error(e: OmegaConfBaseException) -> ConfigError:
    """OmegaConf's error as ours, naming the key. OmegaConf wraps errors raised while building
    dataclasses; ours come out unchanged."""
    cause = e.__cause__ or e.__context__
    if isinstance(cause, ConfigError):
        return cause
    key = getattr(e, "full_key", None)
    return ConfigError(f"{key or '<config>'}: {getattr(e, 'msg', str(e))}")


def to_job(cfg: DictConfig, *, driver_checks: bool = True) -> JobConfig:
    """Composed Hydra config -> validated JobConfig (ConfigError names the key). `driver_checks`:
    also the checks that look outside the config (`check_job_paths`, the backend's `check_job`);
    off only for a config that outlived its run (see `load_saved_job`)."""
    _refuse_unknown_keys(cfg)
    try:
        job = OmegaConf.to_object(cfg)
    except ConfigError:
        raise
    except OmegaConfBaseException as e:
        raise _omegaconf_error(e) from None
    assert isinstance(job, JobConfig)
    check_finite(job)
    job.validate()
    if driver_checks:
        check_job_paths(job)
        from ftcluster.parallel import check_job  # the backend's own checks (DeepSpeed's config model)

        check_job(job)
    return job


def _refuse_unknown_keys(node: DictConfig, prefix: str = "") -> None:
    """Hydra's `+key=value` adds a key even to a schema node (and `OmegaConf.to_object` would drop
    it silently): refuse keys a schema does not have, e.g. `+parallel.stage3_foo=1` or a ZeRO key
    under `parallel=fsdp2`. Free-form dict fields (`deepspeed_overrides`, `launcher.env`) are open."""
    schema = OmegaConf.get_type(node)
    fields = getattr(schema, "__dataclass_fields__", None)
    for key in node.keys():
        if not prefix and key == "hydra":
            continue
        if fields is not None and key not in fields:
            raise ConfigError(f"{prefix}{key}: not a key of {schema.__name__}; "
                              f"its keys: {', '.join(fields)}")
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_missing() and not child._is_none():
            _refuse_unknown_keys(child, f"{prefix}{key}.")


def check_finite(obj: Any, key: str = "") -> None:
    """Every float in the tree (typed fields and free-form mappings alike) is finite: `optim.lr=inf`
    would pass `> 0`, and a NaN compares false with everything, so no range check can be trusted
    to catch them. Raises ConfigError naming the key."""
    import dataclasses
    import math

    if isinstance(obj, float) and not math.isfinite(obj):
        raise ConfigError(f"{key or '<config>'}: must be a finite number; got {obj}")
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            check_finite(getattr(obj, f.name), f"{key}{'.' if key else ''}{f.name}")
    elif isinstance(obj, dict):
        for k, v in obj.items():
            check_finite(v, f"{key}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            check_finite(v, f"{key}[{i}]")


def check_data_paths(job: JobConfig) -> None:
    """`data.path` (and `data.eval_path` when the schema has it and it is set) names files that
    exist: each comma-separated item is an existing file or folder, or a glob matching a file.
    What the files hold is checked by the data pipeline (ftcluster/data), on the ranks."""
    import glob

    if job.data.format == "synthetic":
        return
    named = [(f"data.{key}", getattr(job.data, key, None)) for key in ("path", "eval_path")]
    named += [(f"data.sources[{i}].path", s.path) for i, s in enumerate(getattr(job.data, "sources", None) or [])]
    for key, value in named:
        if not value:
            continue
        for item in (p.strip() for p in str(value).split(",")):
            if not item:
                continue
            item = os.path.expanduser(item)
            if any(c in item for c in "*?["):
                if not any(os.path.isfile(f) for f in glob.glob(item, recursive=True)):
                    raise ConfigError(f"{key}: pattern {item!r} matches no file")
            elif not os.path.exists(item):
                raise ConfigError(f"{key}: no such file or directory: {item}")


def _looks_local(path: str) -> bool:
    return path.startswith(("/", ".", "~")) or os.path.exists(path)


def check_job_paths(job: JobConfig) -> None:
    """The checks that read the filesystem, on the driver before any process starts: the model
    and tokenizer directories exist, the model's context against `model.extend_context_to`, and
    an explicit `resume` path is a committed checkpoint. Raises ConfigError naming the key."""
    check_model_paths(job.model)
    check_data_paths(job)
    if job.resume not in RESUME_KEYWORDS:
        p = Path(job.resume)
        if not (p.is_dir() and (p / "meta.json").is_file()):
            raise ConfigError(f"resume: must be auto, never, or a committed checkpoint directory; {job.resume!r} "
                              "is none of these")
    if job.eval.prompts_path is not None:
        if not Path(job.eval.prompts_path).is_file():
            raise ConfigError(f"eval.prompts_path: no such file: {job.eval.prompts_path}")
        from ftcluster.data.errors import DataError
        from ftcluster.evaluation.prompts import check_prompts_file

        try:
            check_prompts_file(job.eval.prompts_path)
        except DataError as e:
            raise ConfigError(f"eval.prompts_path: {e}") from None


def check_model_paths(m: ModelConfig) -> None:
    """`model.path` is a local Hugging Face directory whose config.json allows
    `model.extend_context_to`; `model.tokenizer` exists."""
    if m.path is not None:
        if not _looks_local(m.path):
            raise ConfigError(f"model.path: must be a local directory, not a hub id; got {m.path!r}")
        p = Path(m.path)
        if not p.is_dir():
            raise ConfigError(f"model.path: no such directory: {m.path}")
        if not (p / "config.json").is_file():
            raise ConfigError(f"model.path: {m.path} has no config.json (expected a Hugging Face model directory)")
        _check_model_context(m, p / "config.json")
    if m.tokenizer is not None and not Path(m.tokenizer).is_dir():
        raise ConfigError(f"model.tokenizer: no such directory: {m.tokenizer}")


def _check_model_context(m: ModelConfig, config_json: Path) -> None:
    if m.extend_context_to is None:
        return
    from ftcluster.rope import current_max_positions

    check_context_extension(m.extend_context_to, current=current_max_positions(json.loads(config_json.read_text())))


# --- composing without the CLI, and reloading what a run saved -------------------------------------

def compose_config(*overrides: str) -> DictConfig:
    """The composed (unvalidated) DictConfig the CLI would build from these overrides (Hydra
    compose, no process, no run dir). Unknown keys and wrong types raise ConfigError naming the key."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException

    register_configs()
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            return compose("config", overrides=list(overrides))
    except HydraException as e:
        cause = e.__cause__ or e.__context__
        if isinstance(cause, OmegaConfBaseException):
            raise _omegaconf_error(cause) from e
        raise ConfigError(f"<overrides>: {e}") from e


def compose_job(*overrides: str) -> JobConfig:
    """The validated JobConfig the CLI would build from these overrides (`compose_config`, then
    `to_job`): every check runs, nothing starts."""
    return to_job(compose_config(*overrides))


def load_saved_job(path: Path, *, driver_checks: bool = True) -> JobConfig:
    """A resolved config.yaml a run saved (`driver.prepare_run_dir`, copied into each checkpoint)
    -> the JobConfig it was made from. The variant groups (`launcher`, `parallel`) are re-typed with
    the schema their `kind`/`backend` names (and `objective`), so unknown keys and wrong types fail as at compose.
    `driver_checks=True` runs every check `to_job` runs (the Slurm job re-reading its config);
    False only the pure `validate()`, for a config that outlived its run (export: the resume
    checkpoint may be rotated away; the export checks what it reads itself)."""
    data = yaml.safe_load(Path(path).read_text()) if Path(path).is_file() else None
    if not isinstance(data, dict) or not isinstance(data.get("launcher"), dict):
        raise ConfigError(f"{path}: not a resolved ftcluster config")
    _upgrade_saved(data)
    launcher, parallel = data.pop("launcher"), data.pop("parallel", None) or {}
    objective = data.pop("objective", None) or {"kind": "sft"}  # saved before objectives were a group: SFT
    schema = LAUNCHER_SCHEMAS.get(str(launcher.get("kind")))
    if schema is None:
        raise ConfigError(f"launcher.kind: unknown launcher {launcher.get('kind')!r} in {path}")
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(JobConfig), data)
        cfg.launcher = OmegaConf.merge(OmegaConf.structured(schema), launcher)
        cfg.parallel = OmegaConf.merge(OmegaConf.structured(parallel_schema(str(parallel.get("backend")))), parallel)
        cfg.objective = OmegaConf.merge(OmegaConf.structured(objective_schema(str(objective.get("kind")))), objective)
    except OmegaConfBaseException as e:
        raise _omegaconf_error(e) from None
    return to_job(cfg, driver_checks=driver_checks)


def _upgrade_saved(data: dict[str, Any]) -> None:
    """A config saved before the parallel split and the S2 keys' move still loads: one `parallel`
    section carried both backends' keys (the other backend's are dropped: they were its defaults,
    unused), and the S2-Attn keys `group_size[_ratio]` moved from `peft` to `model.s2_group_size[_ratio]`."""
    parallel, peft, model = data.get("parallel"), data.get("peft"), data.get("model")
    if isinstance(parallel, dict) and parallel.get("backend") is not None:
        schema = parallel_schema(str(parallel["backend"]))
        others = {f for s in PARALLEL_SCHEMAS.values() if s is not schema for f in s.__dataclass_fields__}
        for key in others - set(schema.__dataclass_fields__):
            parallel.pop(key, None)
    if isinstance(peft, dict) and isinstance(model, dict):
        for old in ("group_size_ratio", "group_size"):
            if old in peft:
                model.setdefault(f"s2_{old}", peft.pop(old))


def redact(obj: Any) -> Any:
    """Copy of a plain (dict/list) config with values of secret-looking keys replaced."""
    if isinstance(obj, dict):
        return {k: ("<redacted>" if is_secret_name(str(k)) and v not in (None, "") else redact(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact(v) for v in obj]
    return obj
