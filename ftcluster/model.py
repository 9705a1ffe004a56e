"""Model construction: meta-device skeleton, PEFT transform, loss head, and weight materialisation.

Order (each step's constraint in its docstring): build on meta -> apply PEFT -> activation
checkpointing -> wrap with the loss head -> parallelize (shard) -> materialise the local shards
(random init or slices read from safetensors). No rank ever holds a full copy of the model: each
allocates only its shards and reads only the tensor slices it owns.
"""
from __future__ import annotations

import json
import os
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
from ftcluster.quant import is_nf4_param, logical_numel
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
    size goes into the HF config here (ftcluster/longlora.py). QLoRA also quantises the frozen
    decoder linears to NF4 here (still on the meta device; they are filled as weights load)."""
    p = job.peft
    if hf_model.config._attn_implementation == S2_ATTN:
        apply_s2_group_size(hf_model.config, job.model)
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
    if p.method == "qlora":
        # After the adapters exist (their linears are trainable and skipped) and before sharding:
        # the frozen decoder linears become NF4 (ftcluster/quant.py), stored in the compute dtype.
        from ftcluster.quant import apply_nf4

        storage = {"bf16": torch.bfloat16, "fp32": torch.float32}[job.train.dtype]
        apply_nf4(peft_model, layer_classes=decoder_layer_classes(hf_model), storage_dtype=storage)
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
        if is_nf4_param(name):  # QLoRA: one linear's full weight, quantised, this rank's slice kept
            local.copy_(nf4_full(module, name, reader=reader, seed=seed, std=std, device=device,
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
            shape = getattr(param, "ds_shape", param.shape)  # a ZeRO-3 parameter's own shape is empty
            full = _init_full(name, shape, seed=seed, std=std, device=device)
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


def nf4_full(module: nn.Module, name: str, *, reader: "SafetensorsSlices | None", seed: int, std: float,
             device: torch.device, storage_dtype: torch.dtype) -> torch.Tensor:
    """The full flat NF4 state of one quantised linear (ftcluster/quant.py), made on `device` from
    the full-precision weight it stands for (source_weight). Training and export both call this,
    so an export re-quantises exactly as training did. The full weight lives only for this call."""
    from ftcluster.quant import nf4_module, nf4_weight_name, quantize_nf4

    lin = nf4_module(module, name)
    w = source_weight(nf4_weight_name(name), torch.Size((lin.out_features, lin.in_features)), reader=reader,
                      hf_config=module.hf_model.config, seed=seed, std=std, device=device)
    return quantize_nf4(w, storage_dtype=storage_dtype)


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


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


class SafetensorsSlices:
    """Reads slices of tensors from a Hugging Face safetensors checkpoint (single file or sharded
    with model.safetensors.index.json) without loading whole tensors or files.

    A block of whole leading-dimension rows (what an FSDP2 Shard(0) shard or a full tensor needs)
    is read with plain positioned reads of exactly its bytes into a fresh tensor: no file mapping,
    so the pages read never count towards this process's resident memory (a memory-mapped read
    keeps every touched page resident and mapped: a rank would end up holding its shards twice).
    Other slices fall back to safetensors' own memory-mapped `get_slice`."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._handles: dict[str, object] = {}
        self._files: dict[str, object] = {}
        self._headers: dict[str, tuple[int, dict]] = {}
        index = directory / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        else:
            single = directory / "model.safetensors"
            if not single.is_file():
                raise FileNotFoundError(f"model.path: {directory} has no model.safetensors or model.safetensors.index.json "
                                        "(only safetensors checkpoints are loaded; convert .bin files first)")
            weight_map = {k: single.name for k in self._header(single.name)[1] if k != "__metadata__"}
        self.weight_map: dict[str, str] = weight_map

    def _handle(self, filename: str):  # type: ignore[no-untyped-def]
        if filename not in self._handles:
            from safetensors import safe_open

            self._handles[filename] = safe_open(str(self.directory / filename), framework="pt")
        return self._handles[filename]

    def close(self) -> None:
        """Close the open files (positioned reads) and drop safetensors' mapped handles."""
        for f in self._files.values():
            f.close()  # type: ignore[attr-defined]
        self._files.clear()
        self._handles.clear()

    def _file(self, filename: str):  # type: ignore[no-untyped-def]
        if filename not in self._files:
            self._files[filename] = open(self.directory / filename, "rb", buffering=0)
        return self._files[filename]

    def _header(self, filename: str) -> tuple[int, dict]:
        """(byte offset of the data section, the JSON header) of one safetensors file."""
        if filename not in self._headers:
            import struct

            with open(self.directory / filename, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                self._headers[filename] = (8 + n, json.loads(f.read(n)))
        return self._headers[filename]

    def shape(self, key: str) -> list[int]:
        return list(self._header(self.weight_map[key])[1][key]["shape"])

    def read(self, key: str, index: tuple[slice, ...], *, tied_fallback: str | None = None) -> torch.Tensor:
        """Tensor `key` restricted to `index` (one slice per leading dimension; () = the whole tensor)."""
        if key not in self.weight_map and tied_fallback is not None:
            key = tied_fallback
        if key not in self.weight_map:
            raise KeyError(f"model.path: {self.directory} has no tensor {key!r}")
        filename = self.weight_map[key]
        start, header = self._header(filename)
        info = header[key]
        dtype, shape = _ST_DTYPES.get(info["dtype"]), list(info["shape"])
        rows = _leading_rows(index, shape)
        if dtype is None or rows is None:
            sl = self._handle(filename).get_slice(key)
            return sl[index] if index else sl[:]
        r0, r1 = rows
        row_numel = 1
        for d in shape[1:]:
            row_numel *= d
        row_bytes = row_numel * dtype.itemsize
        out = torch.empty((r1 - r0) * row_bytes, dtype=torch.uint8)
        if out.numel():
            _pread_into(self._file(filename), out, start + info["data_offsets"][0] + r0 * row_bytes)
        return out.view(dtype).reshape([r1 - r0, *shape[1:]] if shape else [])

    def keys(self) -> Iterator[str]:
        return iter(self.weight_map)


def _leading_rows(index: tuple[slice, ...], shape: list[int]) -> tuple[int, int] | None:
    """(first, end) row when `index` selects whole rows of dimension 0 (and all of every other
    dimension), else None."""
    if not shape:
        return (0, 1) if not index else None
    if not index:
        return 0, shape[0]
    first = index[0]
    if first.step not in (None, 1):
        return None
    for sl, n in zip(index[1:], shape[1:]):
        if sl.step not in (None, 1) or (sl.start or 0) != 0 or (n if sl.stop is None else min(sl.stop, n)) != n:
            return None
    r0, r1, _ = first.indices(shape[0])
    return r0, max(r0, r1)


def _pread_into(f, out: torch.Tensor, offset: int) -> None:  # type: ignore[no-untyped-def]
    """Fill the uint8 tensor `out` with the file's bytes from `offset` (loops: one read returns at
    most ~2 GiB on Linux)."""
    view = memoryview(out.numpy()).cast("B")
    done = 0
    while done < len(view):
        n = os.preadv(f.fileno(), [view[done:]], offset + done)
        if n <= 0:
            raise OSError(f"unexpected end of file reading {getattr(f, 'name', f)} at byte {offset + done}")
        done += n


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
        n = logical_numel(module, name, p)  # DTensor.numel() is the global size; NF4: out x in
        total += n
        trainable += n if p.requires_grad else 0
        if "embed_tokens" in name:
            emb += n
    return ParamCounts(total=total, trainable=trainable, embedding=emb)
