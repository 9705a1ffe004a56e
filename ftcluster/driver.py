"""What the driver does once, before any rank starts: environment checks, run dir. (The typed,
validated config comes from `ftcluster.compose.to_job`.)"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from ftcluster.compose import redact
from ftcluster.config import ConfigError, JobConfig


def check_environment(job: JobConfig) -> None:
    """Checks that need this host (not just the config), still before any process starts: the
    launcher's own (`ftcluster.launch.check`)."""
    from ftcluster.launch import check

    check(job)
    check_layout(job)
    check_data_head(job)
    check_tokenizer(job)
    check_peft_targets(job)


def check_layout(job: JobConfig) -> None:
    """The layout (ftcluster/layout.py) is resolved here as the ranks will resolve it, wherever the
    driver knows the ranks' world size and device: a batch that does not split over the ranks, or a
    plan that fits no GPU memory (train.memory_budget_gib, or the local GPUs' free memory), fails
    now, naming the key and saying what would fit, instead of after the model is built. Where it is
    not known here (a Ray cluster's workers), the ranks plan at start with their own free memory."""
    from ftcluster.layout import resolve_layout

    where = _rank_devices(job)
    if where is None:
        return
    world, nodes, on_gpu = where
    budget = job.train.memory_budget_gib if job.train.memory_budget_gib is not None else (
        _local_free_gib() if on_gpu and job.launcher.kind == "local" else None)
    if on_gpu and budget is None:
        return  # slurm without a budget: the GPUs are on the compute nodes; they plan at start
    resolve_layout(job, world_size=world, nodes=nodes, device_type="cuda" if on_gpu else "cpu", free_gib=budget)


def _rank_devices(job: JobConfig) -> tuple[int, int, bool] | None:
    """(world size, nodes, ranks on GPUs) as the launcher will start them; None where unknown."""
    from ftcluster.launch import hosts

    launcher = job.launcher
    if launcher.kind == "local":
        return hosts.local_world_size(launcher), 1, hosts.visible_gpus() > 0
    if launcher.kind == "slurm":
        per_node = launcher.gpus_per_node or 1
        return launcher.nodes * per_node, launcher.nodes, launcher.gpus_per_node > 0
    return None


def _local_free_gib() -> float | None:
    """The smallest free memory over this host's visible GPUs, from nvidia-smi (asking torch would
    create a CUDA context in the driver, which holds GPU memory for the whole run)."""
    import shutil
    import subprocess

    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index,memory.free", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    keep = None if not visible else {v.strip() for v in visible.split(",")}
    free = [float(mib) / 1024 for idx, mib in (line.split(",") for line in out.strip().splitlines())
            if keep is None or idx.strip() in keep]
    return min(free) if free else None


HEAD_ROWS = 5
"""Rows of each data file the driver parses before launch (the ranks read the rest)."""


def check_data_head(job: JobConfig) -> None:
    """Before any rank starts: the first rows of every JSON Lines file of data.path and
    data.eval_path parse and hold the format's fields (DataError naming `file:line`, numbered
    from 1 as the ranks do). A malformed row further down is still found, by the ranks."""
    if job.data.format == "synthetic":
        return
    import itertools

    from ftcluster.data.formats import required_fields
    from ftcluster.data.sources import _is_json_lines, json_lines, resolve

    fields = required_fields(job.data)
    for key in ("path", "eval_path"):
        value = getattr(job.data, key)
        if not value:
            continue
        source = resolve(value)
        for f in source.files if source.loader == "json" else ():
            if not _is_json_lines(f):
                continue
            for lineno, row in itertools.islice(json_lines(f), HEAD_ROWS):
                missing = [f"data.{k} {col!r}" for col, k in fields if col not in row]
                if missing:
                    from ftcluster.data.errors import DataError

                    raise DataError(f"{f}:{lineno}: no field {', '.join(missing)} (data.format={job.data.format}); "
                                    f"the row has {', '.join(map(repr, row)) or 'no fields'}")


def check_tokenizer(job: JobConfig) -> None:
    """The tokenizer directory holds a tokenizer that loads, and a chat template when data.format=messages
    needs one (and data.chat_template gives none): named here, not on every rank after spawning.
    Read from its files (tokenizer.json through the `tokenizers` library, tokenizer_config.json,
    chat_template.jinja) rather than through transformers, whose import costs seconds of every launch."""
    if job.data.format == "synthetic":
        return
    path = Path(job.model.tokenizer or job.model.path)
    key = "model.tokenizer" if job.model.tokenizer else "model.path"
    config: dict = {}
    try:
        if (path / "tokenizer_config.json").is_file():
            import json

            config = json.loads((path / "tokenizer_config.json").read_text())
        if (path / "tokenizer.json").is_file():
            from tokenizers import Tokenizer

            Tokenizer.from_file(str(path / "tokenizer.json"))
        elif not config:
            raise ValueError("no tokenizer.json or tokenizer_config.json")
    except (OSError, ValueError, Exception) as e:  # noqa: BLE001 - tokenizers raises its own Exception type
        first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        raise ConfigError(f"{key}: cannot load a tokenizer from {path}: {first}") from None
    has_template = bool(config.get("chat_template")) or any(
        (path / f).is_file() for f in ("chat_template.jinja", "chat_template.json"))
    if job.data.format == "messages" and job.data.chat_template is None and not has_template:
        raise ConfigError(f"data.chat_template: the tokenizer in {path} has no chat template and data.format=messages "
                          "needs one; set data.chat_template to a Jinja template, or use data.format="
                          "prompt_completion, alpaca or text")


def check_peft_targets(job: JobConfig) -> None:
    """Every `peft.target_modules` entry names a module of the model (checked on the meta device:
    no memory, well under a second for the tiny model), so a typo fails here, naming the modules
    that exist, instead of as peft's error on every rank. `all-linear` is peft's own keyword."""
    p = job.peft
    if p.method == "none" or list(p.target_modules) == ["all-linear"]:
        return
    import dataclasses

    from torch import nn

    from ftcluster.model import build_module

    # The base model without adapters (with them, peft itself would fail on the missing name).
    model = build_module(dataclasses.replace(job, peft=dataclasses.replace(p, method="none"))).hf_model
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


# --- resume with a changed config (issue 15, item 6) --------------------------------------------

FROZEN_ON_RESUME = (
    # The model: weights, shape, tokenizer (token ids) and attention/RoPE all define what the saved
    # parameters and optimizer state mean. (A moved model.path is refused too: we cannot tell a
    # move from another model.)
    "model.",
    # PEFT shape: the saved adapters and their optimizer state have these shapes and names.
    # (peft.dropout is training noise and may change.)
    "peft.method", "peft.rank", "peft.alpha", "peft.target_modules", "peft.trainable_modules",
    # The seed defines the data order and per-rank RNG streams the saved data position counts in.
    "seed",
    # The data files and everything that decides which samples exist and their order: the saved
    # data position is an index into that order (max_seq_len and overlength change tokenisation,
    # drops and so the sample list; the fields and template change the samples themselves).
    "data.path", "data.format", "data.split", "data.max_seq_len", "data.overlength", "data.shuffle",
    "data.chat_template", "data.messages_field", "data.prompt_field", "data.completion_field",
    "data.instruction_field", "data.input_field", "data.output_field", "data.text_field",
    "data.synthetic_samples", "data.max_row_chars",
    # The checkpoint's layout: an FSDP2 checkpoint is not a DeepSpeed one (world size may change:
    # loading reshards), and one without the frozen base cannot become one with it.
    "parallel.backend", "checkpoint.adapter_only",
)
"""Keys (exact, or a prefix ending in '.') whose change would make the resumed run continue a
different run; refused on resume. Everything else (lr, schedule, batch split, cadences,
max_steps, logger, launcher and world size, debug hooks) may change and is recorded."""
NOT_RECORDED = ("resume", "run.dir")
"""Keys that name where a segment starts from, not how it trains."""


@dataclass(kw_only=True)
class ResumeSegment:
    """A resume that would continue from a committed checkpoint: where, and what changed."""
    checkpoint: Path
    step: int
    changed: dict[str, list]


def _flat(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict) and obj:
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: obj}


def _is_frozen(key: str) -> bool:
    return any(key.startswith(f) if f.endswith(".") else key == f or key.startswith(f + ".") for f in FROZEN_ON_RESUME)


def resume_source(job: JobConfig, run_dir: Path) -> Path | None:
    """The committed checkpoint the ranks would resume from (`CheckpointManager.resolve`'s rule)."""
    from ftcluster.checkpoint import committed_checkpoints

    if job.resume == "never":
        return None
    if job.resume == "auto":
        c = committed_checkpoints(run_dir) if (run_dir / "checkpoints").is_dir() else []
        return c[-1] if c else None
    return Path(job.resume)


def check_resume_config(job: JobConfig, run_dir: Path) -> ResumeSegment | None:
    """Before any process starts and before config.yaml is rewritten: compare this config with
    the config of the checkpoint the run would resume from. Frozen keys that differ are refused
    (ConfigError naming each key with both values); the others are returned for the record."""
    from ftcluster.compose import load_saved_job

    source = resume_source(job, run_dir)
    if source is None:
        return None
    saved = source / "config.yaml"
    old = _flat(redact(OmegaConf.to_container(OmegaConf.structured(load_saved_job(saved, driver_checks=False)))))
    new = _flat(redact(OmegaConf.to_container(OmegaConf.structured(job))))
    diff = {k: [old.get(k), new.get(k)] for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k) and k not in NOT_RECORDED}
    refused = {k: v for k, v in diff.items() if _is_frozen(k)}
    if refused:
        lines = "; ".join(f"{k}: {v[0]!r} in the checkpoint, {v[1]!r} now" for k, v in refused.items())
        raise ConfigError(f"{next(iter(refused))}: cannot change on resume from {source} ({lines}); keep the "
                          "checkpoint's values, or start a new run (another run.dir, or resume=never)")
    import json as _json

    step = int(_json.loads((source / "meta.json").read_text()).get("step", 0)) if (source / "meta.json").is_file() else 0
    return ResumeSegment(checkpoint=source, step=step, changed=diff)


def record_resume(run_dir: Path, segment: ResumeSegment) -> None:
    """Keep the previous segment's config in config_history/<n>-step_<N>.yaml (config.yaml is
    about to hold this segment's) and list the changes in a config_change event in metrics.jsonl
    (rank 0 owns that file during a run; the driver writes before any rank starts)."""
    import json as _json

    previous = run_dir / "config.yaml"
    if previous.is_file():
        hist = run_dir / "config_history"
        hist.mkdir(exist_ok=True)
        n = len(list(hist.glob("*-step_*.yaml"))) + 1
        (hist / f"{n}-step_{segment.step}.yaml").write_text(previous.read_text())
    if segment.changed:
        with open(run_dir / "metrics.jsonl", "a") as f:
            f.write(_json.dumps({"event": "config_change", "step": segment.step, "changed": segment.changed,
                                 "checkpoint": str(segment.checkpoint)}) + "\n")


def nothing_to_do(job: JobConfig, segment: ResumeSegment) -> str:
    """What the driver says, instead of launching, when the checkpoint it would resume from has
    already reached train.max_steps (a second `ftcluster train` of a finished run)."""
    import shlex

    run_dir = run_dir_of(job)
    return (f"ftcluster: nothing to do: {run_dir} is at step {segment.step} and train.max_steps={job.train.max_steps} "
            f"(checkpoint {segment.checkpoint}).\n"
            f"  train further: the same command with train.max_steps={segment.step + job.train.max_steps}; "
            f"a fresh run: resume=never run.name=other\n"
            f"  summary: ftcluster report {shlex.quote(str(run_dir))}; "
            f"export: ftcluster export {shlex.quote(str(segment.checkpoint))} {shlex.quote(str(run_dir / 'export'))}")
