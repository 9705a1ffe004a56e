"""`ftcluster generate RUN_DIR_OR_EXPORT --prompt "..."`: try a checkpoint or an export in a few seconds.

What it loads, by what the path holds:
  * a run directory (its newest committed checkpoint, or with `--best` the one best.json names) or
    a committed checkpoint directory: the weights are read with export's streaming reader
    (`export.iter_hf_tensors`, adapters merged; checkpoint pickles load with weights_only and an
    allowlist) into the model the run's saved config describes; the tokenizer and chat template
    are the run's (`model.tokenizer` / `model.path`, `data.chat_template`);
  * an exported merged or full model (`config.json`): transformers, safetensors only;
  * an exported PEFT adapter (`adapter_config.json`): its base (`base_model_name_or_path`, a local
    directory) from safetensors, the adapter with peft (safetensors).
Nothing runs the model directory's own code (`trust_remote_code` stays off) and nothing is
downloaded. Each prompt is one user turn rendered with the chat template exactly as training
renders the text before an answer (`evaluation.prompts.render_prompt`), then decoded greedily
(`model.build.greedy_generate`, through `evaluation.generate.generate_samples`).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


class GenerateError(ValueError):
    """The path cannot be loaded as asked; the message names it and says why."""


@dataclass(kw_only=True)
class Loaded:
    model: Any
    tokenizer: Any
    chat_template: str | None
    """data.chat_template of the run (None: the tokenizer's own)."""
    what: str
    """What was loaded, for the first line of output."""


class _LocalEngine:
    """The one method of the Engine protocol generate_samples calls, on a plain unsharded model."""

    def __init__(self, model: Any) -> None:
        self.model = model

    def generate(self, ids: torch.Tensor, mask: torch.Tensor, *, max_new_tokens: int, eos_token_id: int | None,
                 pad_token_id: int) -> torch.Tensor:
        from ftcluster.model.build import greedy_generate

        with torch.no_grad():
            return greedy_generate(self.model, input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                   eos_token_id=eos_token_id, pad_token_id=pad_token_id, synced_gpus=False)


def _tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=False, local_files_only=True)
    except (OSError, ValueError) as e:
        raise GenerateError(f"{path}: no tokenizer could be loaded there ({e})") from None


def _hf_dir(path: Path) -> Any:
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(str(path), trust_remote_code=False, local_files_only=True,
                                                    use_safetensors=True, dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise GenerateError(f"{path}: not a loadable Hugging Face model ({e})") from None


def load_export(path: Path) -> Loaded:
    """An export: a PEFT adapter dir (adapter_config.json) or a whole model dir (config.json)."""
    if (path / "adapter_config.json").is_file():
        from peft import PeftModel

        base = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path") or ""
        if not Path(base).is_dir():
            raise GenerateError(f"{path / 'adapter_config.json'}: base_model_name_or_path {base!r} is not a local "
                                "directory")
        model = PeftModel.from_pretrained(_hf_dir(Path(base)), str(path), is_trainable=False)
        tok_dir = path if (path / "tokenizer_config.json").is_file() else Path(base)
        return Loaded(model=model, tokenizer=_tokenizer(str(tok_dir)), chat_template=None,
                      what=f"PEFT adapter {path} on {base}")
    return Loaded(model=_hf_dir(path), tokenizer=_tokenizer(str(path)), chat_template=None, what=f"model {path}")


def load_checkpoint(path: Path, *, best: bool) -> Loaded:
    """A run dir's newest (or best) committed checkpoint, or a checkpoint dir, merged in memory."""
    from transformers import AutoModelForCausalLM

    from ftcluster.checkpoint import BEST_FILE, best_checkpoint
    from ftcluster.export import ExportError, iter_hf_tensors, load_source
    from ftcluster.model.build import build_hf_config

    if best:
        found = best_checkpoint(path)
        if found is None:
            raise GenerateError(f"--best: {path / BEST_FILE} names no committed checkpoint (was the run trained with "
                                "checkpoint.keep_best=true and held-out data?)")
        path = found
    try:
        source = load_source(path)
        job = source.job
        tok_path = job.model.tokenizer or job.model.path
        if not tok_path:
            raise GenerateError(f"{source.checkpoint}: the run set neither model.tokenizer nor model.path, so there is "
                                "no tokenizer to prompt it with")
        model = AutoModelForCausalLM.from_config(build_hf_config(job.model), dtype=torch.float32)
        weights = dict(iter_hf_tensors(source.checkpoint, merge=True))
    except ExportError as e:
        raise GenerateError(str(e)) from None
    missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    if unexpected or set(missing) - tied:
        raise GenerateError(f"{source.checkpoint}: weights do not fit the run's model (missing {sorted(missing)[:3]}, "
                            f"unexpected {sorted(unexpected)[:3]})")
    return Loaded(model=model, tokenizer=_tokenizer(tok_path), chat_template=job.data.chat_template,
                  what=f"checkpoint {source.checkpoint} (step {source.meta.get('step')}, peft {job.peft.method})")


def load(path: Path, *, best: bool) -> Loaded:
    if not path.exists():
        raise GenerateError(f"{path}: no such file or directory")
    if not best and ((path / "adapter_config.json").is_file() or (path / "config.json").is_file()):
        return load_export(path)
    if (path / "meta.json").is_file() or (path / "checkpoints").is_dir() or best:
        return load_checkpoint(path, best=best)
    raise GenerateError(f"{path}: neither a run directory (checkpoints/), a checkpoint (meta.json), an exported model "
                        "(config.json) nor a PEFT adapter (adapter_config.json)")


def answer(loaded: Loaded, *, prompts: list[str], max_new_tokens: int) -> list[str]:
    """Greedy completions of `prompts`, each as one user turn, in one left-padded batch."""
    from ftcluster.config import DataConfig
    from ftcluster.evaluation.generate import generate_samples
    from ftcluster.evaluation.prompts import Prompt

    loaded.model.eval()
    data_cfg = DataConfig(format="messages", chat_template=loaded.chat_template)
    samples = generate_samples(_LocalEngine(loaded.model), tokenizer=loaded.tokenizer,
                               prompts=[Prompt(text=p) for p in prompts], data_cfg=data_cfg,
                               max_new_tokens=max_new_tokens, device=torch.device("cpu"))
    return [s["completion"] for s in samples]


def generate_command(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="ftcluster generate", description=(
        "Answer prompts with a run's checkpoint or an export, greedily, on the CPU, with the chat template. PATH is a "
        "run directory (its newest committed checkpoint), a checkpoint directory, an exported model or a PEFT adapter."))
    p.add_argument("path", type=Path)
    p.add_argument("--prompt", action="append", required=True, help="a user message; repeat for several prompts")
    p.add_argument("--max-new-tokens", type=int, default=64, help="longest answer in tokens (default 64)")
    p.add_argument("--best", action="store_true", help="PATH is a run directory: use the checkpoint best.json names")
    args = p.parse_args(argv)
    if args.max_new_tokens < 1:
        p.error(f"--max-new-tokens: must be >= 1; got {args.max_new_tokens}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" bars: noise for a command that prints answers
    # bitsandbytes (imported by the checkpoint reader for QLoRA runs) warns about an optional CPU kernel package.
    warnings.filterwarnings("ignore", message="Failed to load CPU gemm_4bit_forward")
    try:
        loaded = load(args.path, best=args.best)
    except GenerateError as e:
        print(f"ftcluster generate: {e}", file=sys.stderr)
        return 2
    print(f"ftcluster generate: {loaded.what}")
    for prompt, completion in zip(args.prompt, answer(loaded, prompts=args.prompt, max_new_tokens=args.max_new_tokens)):
        print(f"> {prompt}\n{completion}")
    return 0
