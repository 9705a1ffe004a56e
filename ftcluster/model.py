"""Model construction: meta-device skeleton, PEFT transform, loss head, and weight materialisation.

Order (each step's constraint in its docstring): build on meta -> apply PEFT -> activation
checkpointing -> wrap with the loss head -> parallelize (shard) -> materialise the local shards
(random init or slices read from safetensors). No rank ever holds a full copy of the model: each
allocates only its shards and reads only the tensor slices it owns.
"""
from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ftcluster.attention import register_s2_attention
from ftcluster.config import JobConfig, ModelConfig
from ftcluster.longlora import S2_ATTN, apply_s2_group_size, apply_trainable_modules
from ftcluster.rope import apply_rope_scaling

IGNORE_INDEX = -100


def build_hf_config(cfg: ModelConfig):  # type: ignore[no-untyped-def]
    """The transformers config: read from the local directory, or made from a shape."""
    from transformers import AutoConfig, LlamaConfig, Qwen2Config

    if cfg.path is not None:
        hf = AutoConfig.from_pretrained(cfg.path, trust_remote_code=cfg.trust_remote_code, local_files_only=True)
    else:
        cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[cfg.arch]
        extra = {"attention_bias": False} if cfg.arch == "llama" else {}
        hf = cls(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                 num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                 num_key_value_heads=cfg.num_kv_heads, max_position_embeddings=cfg.max_position_embeddings,
                 rope_theta=cfg.rope_theta, rms_norm_eps=cfg.rms_norm_eps,
                 tie_word_embeddings=cfg.tie_word_embeddings, **extra)
    hf.use_cache = False  # training never needs the KV cache
    apply_rope_scaling(hf, cfg)  # context extension (model.rope_scaling_*, model.extend_context_to)
    return hf


def build_meta_model(cfg: ModelConfig, hf_config) -> nn.Module:  # type: ignore[no-untyped-def]
    """The Hugging Face causal LM with every parameter on the meta device (no memory).
    Registers S2-Attn first when selected (transformers checks the name at construction), and
    applies Liger's kernels (module-level class swaps in transformers) when `cfg.liger`."""
    from transformers import AutoModelForCausalLM

    if cfg.attn_implementation == S2_ATTN:
        register_s2_attention(S2_ATTN)
    if cfg.liger:
        from ftcluster.liger import apply_liger_kernels

        apply_liger_kernels(hf_config)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(hf_config, attn_implementation=cfg.attn_implementation,
                                                trust_remote_code=cfg.trust_remote_code, dtype=torch.float32)


def decoder_layer_classes(hf_model: nn.Module) -> set[str]:
    """Which module classes are decoder layers: transformers records it per model family as
    `_no_split_modules`, so no family list lives here."""
    names = set(getattr(hf_model, "_no_split_modules", None) or [])
    if not names:
        raise ValueError(f"{type(hf_model).__name__} does not declare _no_split_modules; cannot find its decoder layers")
    return names


def decoder_layers(module: nn.Module, classes: set[str]) -> list[nn.Module]:
    return [m for m in module.modules() if type(m).__name__ in classes]


def apply_peft(hf_model: nn.Module, job: JobConfig) -> nn.Module:
    """PEFT is a model transform plus a trainable-parameter filter. Returns the module to train
    (a peft.PeftModel for adapters, the model itself for full fine-tuning). Base weights of an
    adapter run are frozen (and later stored in the compute dtype); `peft.trainable_modules`
    (LongLoRA+: embeddings, norms) train in full as fp32 master weights. With S2-Attn the group
    size goes into the HF config here (ftcluster/longlora.py)."""
    p = job.peft
    if hf_model.config._attn_implementation == S2_ATTN:
        apply_s2_group_size(hf_model.config, p)
    if p.method == "none":
        for prm in hf_model.parameters():
            prm.requires_grad_(True)
        return hf_model
    from peft import LoraConfig, get_peft_model

    targets: str | list[str] = "all-linear" if p.target_modules == ["all-linear"] else list(p.target_modules)
    lcfg = LoraConfig(r=p.rank, lora_alpha=p.alpha, lora_dropout=p.dropout, target_modules=targets,
                      bias="none", task_type="CAUSAL_LM")
    with torch.device("meta"):
        peft_model = get_peft_model(hf_model, lcfg)
    apply_trainable_modules(peft_model, list(p.trainable_modules))  # after get_peft_model froze the base
    return peft_model


class CausalLMWithLoss(nn.Module):
    """The trained module: the (PEFT-wrapped) model plus a chunked cross-entropy head.

    forward(input_ids, labels) returns the SUM of token losses over supervised positions (labels are
    already shifted; -100 is ignored), in fp32. The output projection and cross-entropy run in chunks
    of `chunk_size` tokens, each recomputed in backward, so fp32 logits never exist for the whole
    batch (at 128k vocab and 4k tokens that is 2 GiB per sample). Being one module, it is sharded as
    the FSDP root (embeddings, final norm and output head live in the root's parameter group).
    With `fused_linear_ce` (model.liger) Liger's fused linear cross-entropy does the same job in
    one kernel family (it too never holds full fp32 logits).
    """

    def __init__(self, *, model: nn.Module, hf_model: nn.Module, chunk_size: int, fused_linear_ce: bool = False) -> None:
        super().__init__()
        self.model = model  # registered once: peft model or the HF model itself
        self._hf = [hf_model]  # a list so the HF model is not registered twice under another name
        self.chunk_size = chunk_size
        self.fused_linear_ce = fused_linear_ce  # Liger's fused kernel (GPU, model.liger) instead of the chunks

    @property
    def hf_model(self) -> nn.Module:
        return self._hf[0]

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        hf = self.hf_model
        hidden = hf.get_decoder()(input_ids=input_ids, use_cache=False).last_hidden_state
        weight = hf.get_output_embeddings().weight
        h = hidden.reshape(-1, hidden.shape[-1])
        y = labels.reshape(-1)
        if self.fused_linear_ce:
            from ftcluster.liger import fused_linear_ce_sum

            return fused_linear_ce_sum(h, weight, y, ignore_index=IGNORE_INDEX)
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, h.shape[0], self.chunk_size):
            hc, yc = h[start:start + self.chunk_size], y[start:start + self.chunk_size]
            total = total + checkpoint(_chunk_ce_sum, hc, yc, weight, use_reentrant=False)
        return total


def _chunk_ce_sum(h: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    logits = F.linear(h, w).float()
    return F.cross_entropy(logits, y, ignore_index=IGNORE_INDEX, reduction="sum")


# --- materialisation ------------------------------------------------------------------------------

PEFT_PREFIX = "base_model.model."


def hf_key(param_name: str) -> str:
    """Name of a parameter of CausalLMWithLoss in the Hugging Face checkpoint layout."""
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


def _local_slice(param: torch.Tensor) -> tuple[torch.Tensor, tuple[slice, ...], slice | None]:
    """(local tensor to write, rectangular block of the global tensor that covers it, and the range
    of the flattened block the local tensor holds, or None when it holds the whole block)."""
    from torch.distributed.tensor import DTensor

    if isinstance(param, DTensor):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
        return param.to_local(), tuple(slice(o, o + s) for o, s in zip(offset, shape)), None
    if getattr(param, "ds_tensor", None) is not None:
        return _zero3_slice(param)
    return param.data, tuple(slice(0, s) for s in param.shape), None


def _zero3_slice(param: torch.Tensor) -> tuple[torch.Tensor, tuple[slice, ...], slice | None]:
    """A DeepSpeed ZeRO-3 parameter: this rank holds `ds_tensor`, elements [start, end) of the
    flattened tensor (the last rank's partition is zero-padded). Read only the rows covering it."""
    import torch.distributed as dist

    part = param.ds_tensor.ds_numel
    start = part * dist.get_rank(group=param.ds_process_group)
    end = min(start + part, param.ds_numel)
    local = param.ds_tensor.view(-1)
    local.zero_()  # the padding of the last partition
    if start >= end:
        return local[:0], (), None
    shape = tuple(param.ds_shape)
    row = 1
    for s in shape[1:]:
        row *= s
    r0, r1 = start // row, -(-end // row)
    return local[: end - start], (slice(r0, r1),), slice(start - r0 * row, end - r0 * row)


@torch.no_grad()
def materialize(module: CausalLMWithLoss, *, cfg: ModelConfig, seed: int, device: torch.device) -> dict:
    """Allocate this rank's shards on `device` and fill them: base weights from the safetensors files
    of `cfg.path` (reading only the slices this rank owns) or from the seed; adapters from the seed.
    Returns counts for the log."""
    module.to_empty(device=device)
    hf_config = module.hf_model.config
    std = float(getattr(hf_config, "initializer_range", 0.02))
    reader = SafetensorsSlices(Path(cfg.path)) if cfg.init == "pretrained" else None
    loaded = initialised = 0
    for name, param in module.named_parameters():
        local, index, flat = _local_slice(param)
        if local.numel() == 0:
            continue
        key = hf_key(name)
        if reader is not None and not is_adapter_param(name):
            src = reader.read(key, index, tied_fallback=_tied_source(key, hf_config))
            src = src if flat is None else src.reshape(-1)[flat]
            local.copy_(src.to(device=device, dtype=local.dtype))
            loaded += 1
        else:
            shape = getattr(param, "ds_shape", param.shape)  # a ZeRO-3 parameter's own shape is empty
            full = _init_full(name, shape, seed=seed, std=std, device=device)
            src = full[index] if flat is None else full[index].reshape(-1)[flat]
            local.copy_(src.to(local.dtype))
            initialised += 1
    _reset_buffers(module, device)
    return {"loaded": loaded, "initialised": initialised}


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


class SafetensorsSlices:
    """Reads slices of tensors from a Hugging Face safetensors checkpoint (single file or sharded
    with model.safetensors.index.json) without loading whole tensors or files: safetensors maps the
    file and copies only the requested rows."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        index = directory / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        else:
            single = directory / "model.safetensors"
            if not single.is_file():
                raise FileNotFoundError(f"model.path: {directory} has no model.safetensors or model.safetensors.index.json "
                                        "(only safetensors checkpoints are loaded; convert .bin files first)")
            from safetensors import safe_open

            with safe_open(str(single), framework="pt") as f:
                weight_map = {k: single.name for k in f.keys()}
        self.weight_map: dict[str, str] = weight_map
        self._handles: dict[str, object] = {}

    def _handle(self, filename: str):  # type: ignore[no-untyped-def]
        if filename not in self._handles:
            from safetensors import safe_open

            self._handles[filename] = safe_open(str(self.directory / filename), framework="pt")
        return self._handles[filename]

    def read(self, key: str, index: tuple[slice, ...], *, tied_fallback: str | None = None) -> torch.Tensor:
        if key not in self.weight_map and tied_fallback is not None:
            key = tied_fallback
        if key not in self.weight_map:
            raise KeyError(f"model.path: {self.directory} has no tensor {key!r}")
        sl = self._handle(self.weight_map[key]).get_slice(key)
        return sl[index] if index else sl[:]

    def keys(self) -> Iterator[str]:
        return iter(self.weight_map)


@dataclass(kw_only=True)
class ParamCounts:
    total: int
    trainable: int
    embedding: int

    @property
    def frozen(self) -> int:
        return self.total - self.trainable


def count_params(module: nn.Module) -> ParamCounts:
    """Global (unsharded) parameter counts; the input embedding is counted separately (MFU excludes it)."""
    total = trainable = emb = 0
    for name, p in module.named_parameters():
        n = p.numel()  # DTensor.numel() is the global size
        total += n
        trainable += n if p.requires_grad else 0
        if "embed_tokens" in name:
            emb += n
    return ParamCounts(total=total, trainable=trainable, embedding=emb)
