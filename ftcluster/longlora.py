"""LongLoRA (Chen et al., 2023) as a model transform plus a trainable-parameter filter.

`peft=longlora` is three things, none of them a trainer branch:

1. LoRA adapters (`apply_peft`, as for `peft=lora`).
2. LongLoRA+: `peft.trainable_modules` (default `embed_tokens` and every norm) train in full.
   We set `requires_grad` on those base parameters after `get_peft_model` rather than using
   peft's `modules_to_save`: that would add a second copy of the embedding table (plus renamed
   parameters for materialisation and checkpoints), and FSDP2 shards plain parameters as they
   are. The parallel engine keeps every trainable parameter as an fp32 master weight and casts
   only frozen ones to the compute dtype, so these stay fp32 with fp32 optimizer state.
3. S2-Attn in training: `conf/peft/longlora.yaml` sets `model.attn_implementation=s2_attn`;
   `build_meta_model` registers it with transformers' AttentionInterface (on every rank, before
   the model is built) and `apply_s2_group_size` writes the group size into the HF config, where
   `ftcluster.attention.s2_attention_forward` reads it per call. In `eval()` mode that function
   is transformers' SDPA: evaluation and generation use full attention. `hf_config_for_export`
   gives the config an exported model must carry (no `s2_attn`, no S2 keys).

Packing: the data pipeline does not pack (each sample is its own right-padded row), so S2 groups
never straddle samples. If packing is added, it must keep groups inside samples or be rejected
with S2-Attn; the attention function already rejects masks carrying packing/padding information.
Sequence lengths need not be multiples of the group size: the last group is just shorter.
"""
from __future__ import annotations

import copy
import logging

import torch.nn as nn

from ftcluster.attention import DEFAULT_S2_GROUP_SIZE_RATIO
from ftcluster.config import S2_ATTN, ModelConfig

log = logging.getLogger(__name__)

S2_CONFIG_KEYS = ("s2_group_size", "s2_group_size_ratio")


def matches_suffix(name: str, suffix: str) -> bool:
    """True when dotted module name `name` ends with `suffix` as whole components."""
    return name == suffix or name.endswith("." + suffix)


def apply_trainable_modules(model: nn.Module, suffixes: list[str]) -> list[str]:
    """Make the own parameters of every module matching one of `suffixes` trainable (LongLoRA+).
    Returns the names of the parameters switched on. Raises ValueError naming
    `peft.trainable_modules` for an entry that matches no module (a typo must not silently train
    less than asked)."""
    switched: list[str] = []
    for suffix in suffixes:
        hits = [(n, m) for n, m in model.named_modules() if matches_suffix(n, suffix)]
        if not hits:
            raise ValueError(f"peft.trainable_modules: {suffix!r} matches no module of {type(model).__name__}")
        for mname, module in hits:
            for pname, p in module.named_parameters(recurse=True):
                if ".lora_" in f".{pname}":
                    continue  # adapters train anyway
                p.requires_grad_(True)
                switched.append(f"{mname}.{pname}")
    return switched


def apply_s2_group_size(hf_config, model: ModelConfig) -> None:  # type: ignore[no-untyped-def]
    """Write the S2-Attn group size into the HF config the attention layers share (read per call
    by `s2_group_size_for`): absolute `model.s2_group_size` if set, else `model.s2_group_size_ratio`."""
    hf_config.s2_group_size = model.s2_group_size
    hf_config.s2_group_size_ratio = model.s2_group_size_ratio if model.s2_group_size is None else None
    what = (f"{model.s2_group_size} tokens" if model.s2_group_size is not None
            else f"{model.s2_group_size_ratio:g} x sequence length (LongLoRA default {DEFAULT_S2_GROUP_SIZE_RATIO:g})")
    log.info("S2-Attn in training, group size %s; evaluation uses full attention", what)


def hf_config_for_export(hf_config, attn_implementation: str = "sdpa"):  # type: ignore[no-untyped-def]
    """A copy of a trained model's config fit for export and serving: full attention
    (`attn_implementation`, default sdpa) instead of `s2_attn`, and no S2 group-size keys.
    RoPE scaling (context extension) is kept: the model was trained with it."""
    out = copy.deepcopy(hf_config)
    for key in S2_CONFIG_KEYS:
        if hasattr(out, key):
            delattr(out, key)
    if getattr(out, "_attn_implementation", None) == S2_ATTN:
        out._attn_implementation = attn_implementation
    return out


def attended_span(hf_config, seq_len: int) -> int:  # type: ignore[no-untyped-def]
    """Keys each query can attend, for the MFU model-FLOPs count (DESIGN.md, S_attn): the S2
    group size in training with S2-Attn, the sequence length otherwise."""
    if getattr(hf_config, "_attn_implementation", None) != S2_ATTN:
        return seq_len
    from ftcluster.attention import s2_group_size_for

    return min(seq_len, s2_group_size_for(hf_config, seq_len))
