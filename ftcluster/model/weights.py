"""Weight initialisation and loading, shared by training (`materialize`) and export (`source_weight`,
`quantized_full`): every weight's value depends only on the seed and its name, or on the model's
safetensors files, never on the world size or the backend.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from ftcluster.config import ModelConfig
from ftcluster.model.safetensors_slices import SafetensorsSlices
from ftcluster.quant import is_quantized_param


@dataclass(frozen=True, kw_only=True)
class LocalSlice:
    """The part of one parameter this rank holds, as the parallel engine describes it."""
    local: torch.Tensor
    """The tensor to write (this rank's storage)."""
    index: tuple[slice, ...]
    """The rectangular block of the global tensor that covers `local` (() = the whole tensor)."""
    flat: slice | None
    """The range of the flattened block that `local` holds, or None when it holds the whole block."""
    shape: torch.Size
    """The parameter's global (logical) shape."""


ShardView = Callable[[torch.Tensor], LocalSlice]
"""The engine's answer to "which part of this parameter is mine" (parallel/ implements it)."""


def whole_tensor(param: torch.Tensor) -> LocalSlice:
    """An unsharded parameter: all of it."""
    return LocalSlice(local=param.data, index=tuple(slice(0, s) for s in param.shape), flat=None, shape=param.shape)


PEFT_PREFIX = "base_model.model."


def hf_key(param_name: str) -> str:
    """Name of a parameter of the trained module (TrainModule) in the Hugging Face checkpoint layout."""
    name = param_name.removeprefix("model.")
    name = name.removeprefix(PEFT_PREFIX)
    return name.replace(".base_layer.", ".")


def is_adapter_param(param_name: str) -> bool:
    return ".lora_" in param_name


def _name_seed(seed: int, name: str) -> int:
    # Stable across processes and Python versions (unlike hash()).
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def _init_full(name: str, shape: torch.Size, *, seed: int, std: float, device: torch.device) -> torch.Tensor:
    """The full (unsharded) initial value of one parameter: the same for every world size and backend,
    because it depends on the seed and the parameter's name only. Rules follow transformers' own init."""
    g = torch.Generator(device=device).manual_seed(_name_seed(seed, name))
    if ".lora_B." in name:
        return torch.zeros(shape, device=device)
    if ".lora_A." in name:  # peft's default: kaiming_uniform(a=sqrt(5)) == U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        bound = 1.0 / (shape[1] ** 0.5)
        return torch.empty(shape, device=device).uniform_(-bound, bound, generator=g)
    if name.endswith("norm.weight") or "layernorm" in name or name.endswith("norm"):
        return torch.ones(shape, device=device)
    if name.endswith(".bias"):
        return torch.zeros(shape, device=device)
    return torch.empty(shape, device=device).normal_(0.0, std, generator=g)


@torch.no_grad()
def materialize(module: nn.Module, *, cfg: ModelConfig, seed: int, device: torch.device,
                shard_view: ShardView = whole_tensor) -> dict:
    """Allocate this rank's shards on `device` and fill them: base weights from the safetensors files
    of `cfg.path` (reading only the slices this rank owns) or from the seed; adapters from the seed.
    `shard_view` is the parallel engine's: which part of each parameter this rank holds (this
    module knows no backend). Returns counts for the log."""
    module.to_empty(device=device)
    hf_config = module.hf_model.config
    std = float(getattr(hf_config, "initializer_range", 0.02))
    reader = SafetensorsSlices(Path(cfg.path)) if cfg.init == "pretrained" else None
    loaded = initialised = 0
    for name, param in module.named_parameters():
        view = shard_view(param)
        local, index, flat = view.local, view.index, view.flat
        if local.numel() == 0:
            continue
        if is_quantized_param(name):  # QLoRA / FP8 base: one linear's full weight, quantised, this rank's slice kept
            local.copy_(quantized_full(module, name, reader=reader, seed=seed, std=std, device=device,
                                 storage_dtype=local.dtype)[index])
            loaded += reader is not None
            initialised += reader is None
            continue
        key = hf_key(name)
        if reader is not None and not is_adapter_param(name):
            src = reader.read(key, index, tied_fallback=_tied_source(key, hf_config))
            src = src if flat is None else src.reshape(-1)[flat]
            local.copy_(src.to(device=device, dtype=local.dtype))
            loaded += 1
        else:
            full = _init_full(name, view.shape, seed=seed, std=std, device=device)
            src = full[index] if flat is None else full[index].reshape(-1)[flat]
            local.copy_(src.to(local.dtype))
            initialised += 1
    if reader is not None:
        reader.close()
    _reset_buffers(module, device)
    return {"loaded": loaded, "initialised": initialised}


def source_weight(name: str, shape: torch.Size, *, reader: "SafetensorsSlices | None", hf_config, seed: int,  # type: ignore[no-untyped-def]
                  std: float, device: torch.device) -> torch.Tensor:
    """The whole value a base weight starts from, on `device`: read from the model's safetensors
    (in their dtype), or the seeded init of that name. Training's `materialize` reads only its
    slices instead; export and the NF4 path need whole weights and use this."""
    if reader is not None:
        key = hf_key(name)
        return reader.read(key, (), tied_fallback=_tied_source(key, hf_config)).to(device=device)
    return _init_full(name, shape, seed=seed, std=std, device=device)


def quantized_full(module: nn.Module, name: str, *, reader: "SafetensorsSlices | None", seed: int, std: float,
                   device: torch.device, storage_dtype: torch.dtype) -> torch.Tensor:
    """The full flat state of one quantised linear (NF4, ftcluster/quant.py, or FP8,
    ftcluster/fp8.py), made on `device` from the full-precision weight it stands for
    (source_weight). Training and export both call this, so an export re-quantises exactly as
    training did. The full weight lives only for this call."""
    from ftcluster.quant import nf4_weight_name, quantized_module

    lin = quantized_module(module, name)
    w = source_weight(nf4_weight_name(name), torch.Size((lin.out_features, lin.in_features)), reader=reader,
                      hf_config=module.hf_model.config, seed=seed, std=std, device=device)
    return lin.quantize(w, storage_dtype=storage_dtype)


def _tied_source(key: str, hf_config) -> str | None:  # type: ignore[no-untyped-def]
    if key == "lm_head.weight" and getattr(hf_config, "tie_word_embeddings", False):
        return "model.embed_tokens.weight"
    return None


def _reset_buffers(module: nn.Module, device: torch.device) -> None:
    """Non-persistent buffers (rotary inverse frequencies) are not in any checkpoint and were left
    uninitialised by to_empty: rebuild each owning module's buffers from a fresh instance of it."""
    for sub in module.modules():
        own = dict(sub.named_buffers(recurse=False))
        if not own or not hasattr(sub, "config"):
            continue
        fresh = type(sub)(config=sub.config)
        for bname, buf in fresh.named_buffers(recurse=False):
            if bname in own:
                own[bname].copy_(buf.to(device))


