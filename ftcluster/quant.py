"""QLoRA's frozen base: NF4 linears whose whole quantised state is one flat tensor FSDP2 shards.

`peft=qlora` replaces every frozen `nn.Linear` inside the decoder layers (the base layer under
each LoRA adapter, and any linear without one) by an `NF4Linear`: bitsandbytes NF4, blocksize 64,
double quantisation (the per-block absmax quantised to 8 bits in blocks of 256, with an fp32
offset), de-quantised to the compute dtype in forward and again in backward.

Why not bitsandbytes' `Linear4bit`/`Params4bit`: FSDP2's `fully_shard` turns every parameter into
a plain sharded tensor parameter and all-gathers plain tensors, so a `Params4bit`'s `quant_state` (absmax,
offset, nested state) is lost after the all-gather (the known FSDP2 + QLoRA failure), and that
state would not shard anyway. Here the packed 4-bit codes, the 8-bit absmax, the nested fp32
absmax and the offset are bytes of ONE 1-D parameter, typed as the compute dtype
(`bnb_4bit_quant_storage=bfloat16` in transformers' terms; float32 for `train.dtype=fp32`).
FSDP2 shards it on dim 0 like any frozen weight, all-gathers it per layer in the same dtype (no
cast: its dtype is already the mixed-precision param dtype; all-gathers and copies keep bits
exactly), and `forward` reinterprets the gathered bytes (`Tensor.view(dtype)`) and
de-quantises. So everything of the NF4 base shards: 0.5 byte per weight plus ~1/64 byte of
absmax, divided by the world size.

Quantisation happens as weights load (`materialize`): each rank takes ONE linear's full weight at
a time (read from safetensors or generated from the seed, on the device), quantises it, keeps its
slice of the flat tensor and drops the rest, so the full-precision model never exists. Every rank
quantises the whole tensor because double quantisation's offset is the mean absmax of the
whole tensor: slicing first would change the result with the world size. Export re-runs the same
`quantize_nf4` to obtain the de-quantised base a merge goes into.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

NF4_PARAM = "nf4"
"""Name of an NF4Linear's flat quantised-state parameter (stands in for `weight`)."""
FP8_PARAM = "fp8"
"""Name of an FP8Linear's (ftcluster/fp8.py) flat state parameter."""
BLOCKSIZE = 64
NESTED_BLOCKSIZE = 256


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def _align(n: int, a: int) -> int:
    return _ceil(n, a) * a


@dataclass(frozen=True, kw_only=True)
class NF4Layout:
    """Byte layout of one quantised weight (out_features x in_features), row-major like bitsandbytes:
    [packed 4-bit codes | uint8 absmax per 64-block | fp32 nested absmax per 256 blocks, fp32 offset],
    each part 4-byte aligned, the total padded to 4 bytes (a whole number of bf16 or fp32 elements)."""
    out_features: int
    in_features: int

    @property
    def numel(self) -> int:
        return self.out_features * self.in_features

    @property
    def n_blocks(self) -> int:
        return _ceil(self.numel, BLOCKSIZE)

    @property
    def n_nested(self) -> int:
        return _ceil(self.n_blocks, NESTED_BLOCKSIZE)

    @property
    def codes(self) -> tuple[int, int]:
        return 0, _ceil(self.numel, 2)

    @property
    def absmax(self) -> tuple[int, int]:
        start = _align(self.codes[1], 4)
        return start, start + self.n_blocks

    @property
    def stats(self) -> tuple[int, int]:
        start = _align(self.absmax[1], 4)
        return start, start + 4 * (self.n_nested + 1)

    @property
    def nbytes(self) -> int:
        return _align(self.stats[1], 4)

    def storage_numel(self, dtype: torch.dtype) -> int:
        return self.nbytes // dtype.itemsize


_CODES: dict[tuple[str, torch.device], torch.Tensor] = {}


def _code(kind: str, device: torch.device) -> torch.Tensor:
    import bitsandbytes.functional as BF

    key = (kind, device)
    if key not in _CODES:
        _CODES[key] = (BF.get_4bit_type("nf4", device=device) if kind == "nf4"
                       else BF.create_dynamic_map(signed=True).to(device))
    return _CODES[key]


@torch.no_grad()
def quantize_nf4(weight: torch.Tensor, *, storage_dtype: torch.dtype) -> torch.Tensor:
    """The flat quantised state of a full 2-D weight, as a 1-D tensor of `storage_dtype` on the
    weight's device. Quantises the fp32 value of the weight (the same bits whatever dtype it was
    stored in), so training, resume and export agree."""
    import bitsandbytes.functional as BF

    lay = NF4Layout(out_features=weight.shape[0], in_features=weight.shape[1])
    packed, st = BF.quantize_4bit(weight.detach().float().contiguous(), blocksize=BLOCKSIZE, compress_statistics=True,
                                  quant_type="nf4", quant_storage=torch.uint8)
    out = torch.zeros(lay.nbytes, dtype=torch.uint8, device=weight.device)
    a, b = lay.codes
    out[a:b] = packed.reshape(-1)
    a, b = lay.absmax
    out[a:b] = st.absmax.reshape(-1)
    a, b = lay.stats
    stats = torch.cat([st.state2.absmax.reshape(-1).float(), st.offset.reshape(1).float()])
    out[a:b] = stats.view(torch.uint8)
    return out.view(storage_dtype)


def dequantize_nf4(flat: torch.Tensor, layout: NF4Layout, *, dtype: torch.dtype) -> torch.Tensor:
    """The (out_features, in_features) weight in `dtype` from a full flat quantised state."""
    import bitsandbytes.functional as BF

    raw = flat.reshape(-1).view(torch.uint8)
    dev = raw.device
    a, b = layout.codes
    codes = raw[a:b]
    a, b = layout.absmax
    absmax = raw[a:b]
    a, b = layout.stats
    stats = raw[a:b].view(torch.float32)
    nested = BF.QuantState(absmax=stats[:-1], code=_code("dynamic", dev), blocksize=NESTED_BLOCKSIZE, dtype=torch.float32)
    qs = BF.QuantState(absmax=absmax, shape=torch.Size((layout.out_features, layout.in_features)),
                       code=_code("nf4", dev), blocksize=BLOCKSIZE, quant_type="nf4", dtype=dtype,
                       offset=stats[-1], state2=nested)
    return BF.dequantize_4bit(codes, qs)


class _NF4LinearFn(torch.autograd.Function):
    """y = x @ W^T with W de-quantised on the fly. Saves only the (gathered) quantised bytes, not
    the de-quantised weight: backward de-quantises again, as bitsandbytes' MatMul4Bit does. The
    saved tensor is the module's unsharded parameter, which FSDP2 frees after forward and
    re-gathers before this layer's backward, exactly as for a plain linear's weight."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, flat: torch.Tensor, layout: NF4Layout) -> torch.Tensor:  # type: ignore[override]
        ctx.layout = layout
        ctx.save_for_backward(flat)
        return F.linear(x, dequantize_nf4(flat, layout, dtype=x.dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (flat,) = ctx.saved_tensors
        w = dequantize_nf4(flat, ctx.layout, dtype=grad.dtype)
        return grad @ w, None, None


class FrozenQuantLinear(nn.Module):
    """A frozen linear whose weight is one flat quantised state parameter (named `PARAM`, typed as
    the storage dtype, laid out by `LAYOUT`) and the original `bias`, if any (frozen, kept as is);
    `FN` computes x W^T and the input gradient from the state. NF4Linear here, FP8Linear in
    ftcluster/fp8.py."""
    PARAM: str
    LAYOUT: type
    FN: type

    def __init__(self, *, in_features: int, out_features: int, bias: bool, storage_dtype: torch.dtype,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.layout = self.LAYOUT(out_features=out_features, in_features=in_features)
        n = self.layout.storage_numel(storage_dtype)
        self.register_parameter(self.PARAM, nn.Parameter(torch.empty(n, dtype=storage_dtype, device=device),
                                                         requires_grad=False))
        self.bias = nn.Parameter(torch.empty(out_features, device=device), requires_grad=False) if bias else None

    def quantize(self, weight: torch.Tensor, *, storage_dtype: torch.dtype) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.FN.apply(x, getattr(self, self.PARAM), self.layout)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y


class NF4Linear(FrozenQuantLinear):
    """A frozen linear layer stored as NF4 (see the module docstring)."""
    PARAM, LAYOUT, FN = NF4_PARAM, NF4Layout, _NF4LinearFn

    def quantize(self, weight: torch.Tensor, *, storage_dtype: torch.dtype) -> torch.Tensor:
        return quantize_nf4(weight, storage_dtype=storage_dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, nf4, double_quant, bias={self.bias is not None}"


def apply_nf4(model: nn.Module, *, layer_classes: set[str], storage_dtype: torch.dtype) -> int:
    """Replace (in place, on the meta device) every frozen `nn.Linear` inside a decoder layer by an
    NF4Linear. Must run after the PEFT transform (so the adapters' own linears are trainable and
    skipped, and base layers are already wrapped) and before sharding. Returns the count."""
    count = replace_frozen_linears(model, layer_classes=layer_classes, make=lambda child, _name: NF4Linear(
        in_features=child.in_features, out_features=child.out_features, bias=child.bias is not None,
        storage_dtype=storage_dtype, device=child.weight.device))
    if count == 0:
        raise ValueError("peft.method=qlora: no frozen linear layer found in the decoder layers to quantise")
    return count


def replace_frozen_linears(model: nn.Module, *, layer_classes: set[str], make) -> int:  # type: ignore[no-untyped-def]
    """Replace every frozen `nn.Linear` inside a decoder layer (a module whose class name is in
    `layer_classes`) by `make(linear, child_name)`, in place; the NF4 and FP8 bases' one walk."""
    count = 0
    for layer in [m for m in model.modules() if type(m).__name__ in layer_classes]:
        for parent in list(layer.modules()):
            for cname, child in list(parent.named_children()):
                if type(child) is not nn.Linear or any(p.requires_grad for p in child.parameters()):
                    continue
                setattr(parent, cname, make(child, cname))
                count += 1
    return count


def is_nf4_param(name: str) -> bool:
    return name == NF4_PARAM or name.endswith("." + NF4_PARAM)


def is_quantized_param(name: str) -> bool:
    """The flat state of a quantised frozen linear: NF4 (QLoRA) or FP8 (peft.fp8_base, ftcluster/fp8.py)."""
    return is_nf4_param(name) or name == FP8_PARAM or name.endswith("." + FP8_PARAM)


def nf4_weight_name(name: str) -> str:
    """`...q_proj.base_layer.nf4` -> `...q_proj.base_layer.weight`: the name of the full-precision
    weight it quantises (seeded init and checkpoint lookups use it, so a QLoRA run's base is the
    LoRA run's base, quantised). The same for an FP8 state (`...base_layer.fp8`)."""
    return name.rsplit(".", 1)[0] + ".weight" if "." in name else "weight"


def nf4_module(root: nn.Module, name: str) -> NF4Linear:
    owner = root.get_submodule(name.rsplit(".", 1)[0]) if "." in name else root
    assert isinstance(owner, NF4Linear), name
    return owner


def quantized_module(root: nn.Module, name: str) -> FrozenQuantLinear:
    """The NF4Linear or FP8Linear owning a quantised state parameter."""
    owner = root.get_submodule(name.rsplit(".", 1)[0]) if "." in name else root
    assert isinstance(owner, FrozenQuantLinear), name
    return owner


def logical_numel(root: nn.Module, name: str, param: torch.Tensor) -> int:
    """Parameters a tensor stands for: out x in for an NF4 or FP8 state, numel otherwise."""
    return quantized_module(root, name).layout.numel if is_quantized_param(name) else param.numel()
