"""`peft.fp8_base=true`: the frozen base linears of a LoRA run stored in float8 (e4m3) and their two
GEMMs run in FP8: the forward projection y = x W^T and the input gradient dx = g W.

Each frozen decoder linear becomes an `FP8Linear` whose whole state is one flat parameter (as
QLoRA's NF4Linear, ftcluster/quant.py, and for the same reason: FSDP2 shards and all-gathers it
byte-exactly at any world size): W in e4m3 with one fp32 scale per output row, and W^T in e4m3 with
one fp32 scale per input column. Two copies because an FP8 GEMM on Hopper takes its second operand
column-major and scales only along the non-reduced dimensions: the forward reduces over `in` (rows
of W, scaled per `out`), the input gradient over `out` (rows of W^T, scaled per `in`). Two bytes
per weight, the same as bf16: FP8 here buys speed (Hopper's FP8 tensor cores run at twice the bf16
rate), not memory.

Activations (x in forward, g in backward) are quantised per token (row) to e4m3 on the fly with
their own amax scale; the LoRA update, the adapters' gradients and everything outside these two
GEMMs stay in the compute dtype. This is the "rowwise" recipe torchao's float8 training uses
(`Float8LinearConfig.from_recipe_name("rowwise")`); torchao is not used because its Float8Linear
is built for trained weights (it recasts the weight every step, keeps the high-precision copy and
computes dW), while a frozen base needs none of that. GEMMs go through `torch._scaled_mm`.

Accuracy: each weight carries e4m3's 3-bit mantissa (relative rounding up to 6%, averaging out over
a dot product). Checked in tests/test_fp8.py (output error against bf16, and the embedded model's
loss on its sample data within 1% of the bf16 base). One H200, 8B LoRA at 4k (bench/fp8_perf.sh):
1.26x the bf16 default's tokens/s, 20-step losses within 1.1e-3 relative of the bf16 path's.
Export merges the adapters into the original (not the FP8) base weights: FP8 is how training
computed with them, not a new model.

Hardware: rowwise-scaled FP8 GEMMs need compute capability 8.9+ (Ada, Hopper, Blackwell) or a CPU
build of torch that has them; elsewhere the layer de-quantises to the compute dtype and runs a
normal GEMM (the same values, no speed-up), said once.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn as nn

from ftcluster.quant import FP8_PARAM, FrozenQuantLinear, replace_frozen_linears

log = logging.getLogger(__name__)

E4M3 = torch.float8_e4m3fn
E4M3_MAX = float(torch.finfo(E4M3).max)  # 448
_said: set[str] = set()


@dataclass(frozen=True, kw_only=True)
class FP8Layout:
    """Byte layout of one FP8 weight (out_features x in_features):
    [fp32 scale per out row | fp32 scale per in column | W e4m3 (out x in) | W^T e4m3 (in x out)];
    the scales first so that every part starts 4-byte aligned (16-byte when out + in is a multiple
    of 4, which the FP8 GEMM's dimensions, multiples of 16, give)."""
    out_features: int
    in_features: int

    @property
    def numel(self) -> int:
        return self.out_features * self.in_features

    @property
    def nbytes(self) -> int:
        return 4 * (self.out_features + self.in_features) + 2 * self.numel

    def storage_numel(self, dtype: torch.dtype) -> int:
        size = torch.empty((), dtype=dtype).element_size()
        assert self.nbytes % size == 0
        return self.nbytes // size


def check_shape(*, in_features: int, out_features: int, where: str) -> None:
    if in_features % 16 or out_features % 16:
        raise ValueError(f"peft.fp8_base: {where} is {out_features} x {in_features}; FP8 GEMMs need both "
                         "dimensions to be multiples of 16 (set peft.fp8_base=false)")


def _rows_e4m3_eager(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """t (m x k) as e4m3 rows and fp32 scales (m x 1): t ~= q * scale, each row's amax -> 448."""
    amax = t.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12)
    scale = amax / E4M3_MAX
    return (t.float() / scale).to(E4M3), scale


_compiled: list = []


def _rows_e4m3(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """On CUDA, torch.compile fuses the row amax, the scaling and the cast into one pass or two over
    t (eager torch makes five, which at 16k tokens costs as much as the FP8 GEMM saves)."""
    if t.device.type != "cuda":
        return _rows_e4m3_eager(t)
    if not _compiled:
        _compiled.append(torch.compile(_rows_e4m3_eager, dynamic=None, fullgraph=True))
    return _compiled[0](t)


class _LastInput:
    """The q, k and v projections (and gate and up) read the same input tensor: quantise it once.
    Holds the last input itself (so its identity cannot be reused by another tensor) and its
    version counter (an in-place change invalidates it)."""

    def __init__(self) -> None:
        self.x: torch.Tensor | None = None
        self.version = -1
        self.q: tuple[torch.Tensor, torch.Tensor] | None = None

    def rows(self, a: torch.Tensor, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of `a`, a view of the layer input `key` (each projection reshapes it anew)."""
        if self.x is key and self.version == key._version and self.q is not None:
            return self.q
        self.q = _rows_e4m3(a)
        self.x, self.version = key, key._version
        return self.q

    def clear(self) -> None:
        self.x, self.q = None, None


_last_input = _LastInput()


def quantize_fp8(weight: torch.Tensor, *, storage_dtype: torch.dtype) -> torch.Tensor:
    """The flat FP8 state of one (out x in) weight, typed as `storage_dtype` (see FP8Layout)."""
    out_f, in_f = weight.shape
    layout = FP8Layout(out_features=out_f, in_features=in_f)
    w = weight.float()
    q, s = _rows_e4m3(w)
    qt, st = _rows_e4m3(w.t())
    flat = torch.empty(layout.nbytes, dtype=torch.uint8, device=weight.device)
    flat[: 4 * out_f].copy_(s.reshape(-1).view(torch.uint8))
    flat[4 * out_f: 4 * (out_f + in_f)].copy_(st.reshape(-1).view(torch.uint8))
    base = 4 * (out_f + in_f)
    flat[base: base + layout.numel].copy_(q.reshape(-1).view(torch.uint8))
    flat[base + layout.numel:].copy_(qt.contiguous().reshape(-1).view(torch.uint8))
    return flat.view(storage_dtype)


def _aligned(flat: torch.Tensor) -> torch.Tensor:
    """FP8 GEMMs need 16-byte aligned operands; the parts are aligned when the flat state is (the
    caching allocator and FSDP2's per-parameter buffers give that). A misaligned one (a view into
    some packed buffer) is copied, said once, rather than failing inside cuBLAS."""
    if flat.data_ptr() % 16 == 0:
        return flat
    if "misaligned" not in _said:
        _said.add("misaligned")
        log.warning("peft.fp8_base: an FP8 weight's storage is not 16-byte aligned; it is copied for each GEMM (slow)")
    return flat.clone()


def fp8_parts(flat: torch.Tensor, layout: FP8Layout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Views (no copy) of the flat state: W e4m3 (out x in), its scales (1 x out), W^T e4m3
    (in x out), its scales (1 x in)."""
    b = _aligned(flat).view(torch.uint8)
    o, i = layout.out_features, layout.in_features
    base = 4 * (o + i)
    s = b[: 4 * o].view(torch.float32).view(1, o)
    st = b[4 * o: base].view(torch.float32).view(1, i)
    q = b[base: base + layout.numel].view(E4M3).view(o, i)
    qt = b[base + layout.numel: base + 2 * layout.numel].view(E4M3).view(i, o)
    return q, s, qt, st


def dequantize_fp8(flat: torch.Tensor, layout: FP8Layout, *, dtype: torch.dtype) -> torch.Tensor:
    """The (out x in) weight the forward GEMM computes with, in `dtype`."""
    q, s, _, _ = fp8_parts(flat, layout)
    return (q.float() * s.t()).to(dtype)


def _scaled_mm_ok(device: torch.device) -> bool:
    key = (device.type, device.index)
    if key not in _ok:
        _ok[key] = _has_scaled_mm(device)
    return _ok[key]


_ok: dict = {}


def _has_scaled_mm(device: torch.device) -> bool:
    if device.type == "cuda":
        ok = torch.cuda.get_device_capability(device) >= (8, 9)
    else:
        ok = device.type == "cpu" and hasattr(torch, "_scaled_mm")
    if not ok and "fallback" not in _said:
        _said.add("fallback")
        log.warning("peft.fp8_base: this %s has no rowwise FP8 GEMM; the FP8 base is de-quantised to the compute "
                    "dtype for each GEMM instead (same values, no speed-up)", device.type)
    return ok


def _mm_rows(a: torch.Tensor, q: torch.Tensor, s: torch.Tensor, out_dtype: torch.dtype,
             *, key: torch.Tensor | None) -> torch.Tensor:
    """a (m x k, compute dtype) @ (q * s) where q is (k x n) e4m3, column-major, s (1 x n).
    `key`: the tensor a is a view of, when the previous call's input may be the same (forward)."""
    qa, sa = _last_input.rows(a, key) if key is not None else _rows_e4m3(a)
    return torch._scaled_mm(qa, q, scale_a=sa, scale_b=s, out_dtype=out_dtype)


def fp8_forward(x2: torch.Tensor, flat: torch.Tensor, layout: FP8Layout, *, key: torch.Tensor) -> torch.Tensor:
    """x2 (tokens x in) @ W^T -> (tokens x out), in x2's dtype. `key`: the layer's input tensor x2
    was reshaped from (the projections that share it share its quantisation)."""
    q, s, _, _ = fp8_parts(flat, layout)
    if not _scaled_mm_ok(x2.device):
        return x2 @ dequantize_fp8(flat, layout, dtype=x2.dtype).t()
    return _mm_rows(x2, q.t(), s, x2.dtype, key=key)


def fp8_input_grad(g: torch.Tensor, flat: torch.Tensor, layout: FP8Layout) -> torch.Tensor:
    """g (tokens x out) @ W -> (tokens x in), with W^T's own per-input-column scales."""
    _last_input.clear()  # forward is over (a checkpointed layer's recompute fills it again): let the input go
    _, _, qt, st = fp8_parts(flat, layout)
    if not _scaled_mm_ok(g.device):
        return g @ (qt.float() * st.t()).t().to(g.dtype)
    return _mm_rows(g, qt.t(), st, g.dtype, key=None)


class _FP8LinearFn(torch.autograd.Function):
    """y = x W^T with W frozen in FP8; only x gets a gradient. Saves nothing but the weight."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, flat: torch.Tensor, layout: FP8Layout) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(flat)
        ctx.layout = layout
        y = fp8_forward(x.reshape(-1, x.shape[-1]), flat, layout, key=x)
        return y.view(*x.shape[:-1], layout.out_features)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (flat,) = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        return fp8_input_grad(g, flat, ctx.layout).view(*grad.shape[:-1], ctx.layout.in_features), None, None


class FP8Linear(FrozenQuantLinear):
    """A frozen linear layer stored in FP8 (module docstring): the flat state `fp8`, never trained."""
    PARAM, LAYOUT, FN = FP8_PARAM, FP8Layout, _FP8LinearFn

    def quantize(self, weight: torch.Tensor, *, storage_dtype: torch.dtype) -> torch.Tensor:
        return quantize_fp8(weight, storage_dtype=storage_dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 e4m3 rowwise, bias={self.bias is not None}"


def apply_fp8(model: nn.Module, *, layer_classes: set[str], storage_dtype: torch.dtype) -> int:
    """Replace (in place, on the meta device) every frozen `nn.Linear` inside a decoder layer by an
    FP8Linear: after the PEFT transform (adapters are trainable and skipped), before the fused LoRA
    swap and sharding. Returns the count."""
    def make(child: nn.Linear, name: str) -> FP8Linear:
        check_shape(in_features=child.in_features, out_features=child.out_features, where=name)
        return FP8Linear(in_features=child.in_features, out_features=child.out_features, bias=child.bias is not None,
                         storage_dtype=storage_dtype, device=child.weight.device)

    count = replace_frozen_linears(model, layer_classes=layer_classes, make=make)
    if count == 0:
        raise ValueError("peft.fp8_base: no frozen linear layer found in the decoder layers")
    return count
