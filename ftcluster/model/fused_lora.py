"""Fused LoRA linear (`peft.fused=true`): the base projection and the low-rank update in one
autograd node, the update accumulated into the base output by the same GEMM.

peft's `lora.Linear.forward` computes `base(x) + lora_B(lora_A(dropout(x))) * scaling`: besides
the two GEMMs of the base and the two thin ones of the adapter, it writes three (tokens x out)
tensors per projection and reads them back (the adapter output, its scaled copy, the sum), and
its backward writes the scaled gradient and sums two (tokens x in) input gradients. Here (the
design of Unsloth's `LoRA_W`/`matmul_lora` and LoRAFusion's fused forward, written for our NF4
base and our sharding):

    forward   y  = x W^T (+ bias);  xa = x A^T  (tokens x r);  y += s * xa B^T   (addmm epilogue)
    backward  gb = g B  (tokens x r);  dB = s * g^T xa;  dA = s * gb^T x;
              dx = g W;  dx += s * gb A                                           (addmm epilogue)

so no (tokens x out) tensor exists beside y and no (tokens x in) one beside dx. Saved for
backward: x and xa (x is what peft's base and lora_A save anyway; xa is lora_B's input), and the
weights themselves (parameters, no copy). The NF4 base (ftcluster/quant.py) is de-quantised in
forward and again in backward, as `NF4Linear` does; nothing de-quantised is kept. An FP8 base
(`peft.fp8_base`, ftcluster/fp8.py) runs its two GEMMs in FP8 from its two stored copies.

Why our own and not Unsloth's kernels: Unsloth's fused LoRA patches its own model classes and
bitsandbytes `Params4bit` (whose quant state FSDP2 loses, see quant.py); this is plain torch,
about a hundred lines. Tested (tests/test_fused_lora.py, CPU) unsharded and under FSDP2 on one and
two gloo ranks; not yet tested under ZeRO-1/2, activation checkpointing or torch.compile, nor
timed on a GPU (bench/fused_lora_check.py, bench/perf.sh).

When the fused node does not apply it steps aside to peft's own forward (same module, same
parameters), and says why once per reason: adapters disabled (DPO's reference pass) or merged,
several or no active adapters, a LoRA variant (DoRA), dropout, a base that is not a plain or NF4
linear, a trainable base, or dtypes that differ (peft then computes
the adapter in the adapter's dtype, which we keep). Under ZeRO-3 it is refused at compose:
DeepSpeed gathers a parameter when its own module runs, and the fused node reads lora_A/lora_B
without calling them.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.nn as nn

from ftcluster.fp8 import FP8Layout, FP8Linear, fp8_forward, fp8_input_grad
from ftcluster.quant import NF4Layout, NF4Linear, dequantize_nf4

log = logging.getLogger(__name__)
_said: set[str] = set()


def _say_once(reason: str) -> None:
    if reason not in _said:
        _said.add(reason)
        log.info("peft.fused: peft's own LoRA forward where %s", reason)


def _base_weight(weight: torch.Tensor, layout: Optional[NF4Layout], dtype: torch.dtype) -> torch.Tensor:
    return weight if layout is None else dequantize_nf4(weight, layout, dtype=dtype)


def _base_forward(x: torch.Tensor, x2: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                  layout: Optional[NF4Layout | FP8Layout]) -> torch.Tensor:
    """x2 W^T (+ bias), x2 the (tokens x in) view of the input x: one GEMM, in FP8 for an FP8 base
    (ftcluster/fp8.py)."""
    if isinstance(layout, FP8Layout):
        y = fp8_forward(x2, weight, layout, key=x)
        return y.add_(bias) if bias is not None else y
    w = _base_weight(weight, layout, x2.dtype)
    return torch.addmm(bias, x2, w.t()) if bias is not None else x2 @ w.t()


def _base_input_grad(g: torch.Tensor, weight: torch.Tensor, layout: Optional[NF4Layout | FP8Layout]) -> torch.Tensor:
    """g W."""
    if isinstance(layout, FP8Layout):
        return fp8_input_grad(g, weight, layout)
    return g @ _base_weight(weight, layout, g.dtype)


class FusedLoRAFn(torch.autograd.Function):
    """y = x W^T + b + s (x A^T) B^T as one node (see the module docstring). `weight` is the base's
    (out, in) weight, or an NF4Linear's / FP8Linear's flat quantised state with its `layout`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],  # type: ignore[override]
                lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float,
                layout: Optional[NF4Layout]) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        xa = x2 @ lora_a.t()
        y = _base_forward(x, x2, weight, bias, layout)
        y.addmm_(xa, lora_b.t(), alpha=scale)
        ctx.save_for_backward(x, weight, lora_a, lora_b, xa)
        ctx.scale, ctx.layout = scale, layout
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        x, weight, lora_a, lora_b, xa = ctx.saved_tensors
        s = ctx.scale
        g = grad.reshape(-1, grad.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        gb = g @ lora_b  # (tokens, r)
        # beta=0: the uninitialised `input` of addmm is ignored, the scale rides in the GEMM epilogue.
        d_b = torch.addmm(torch.empty_like(lora_b), g.t(), xa, beta=0, alpha=s) if ctx.needs_input_grad[4] else None
        d_a = torch.addmm(torch.empty_like(lora_a), gb.t(), x2, beta=0, alpha=s) if ctx.needs_input_grad[3] else None
        dx = None
        if ctx.needs_input_grad[0]:
            dx = _base_input_grad(g, weight, ctx.layout)
            dx.addmm_(gb, lora_a, alpha=s)
            dx = dx.view(x.shape)
        return dx, None, None, d_a, d_b, None, None


def _lora_linear_class() -> type:
    from peft.tuners.lora.layer import Linear

    return Linear


class FusedLoraLinear(_lora_linear_class()):  # type: ignore[misc]
    """peft's `lora.Linear` with the fused forward. Instances become this class in place
    (`apply_fused_lora`), so names, parameters, state dicts, merging and export are peft's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Only `x`: the decoder calls each projection with its input alone (peft's extra forward
        # arguments, such as a mixed-adapter batch's adapter_names, are not used in training).
        plan = self._fused_plan(x)
        if isinstance(plan, str):
            _say_once(plan)
            return super().forward(x)
        weight, bias, layout, a, b, scale = plan
        return FusedLoRAFn.apply(x, weight, bias, a, b, scale, layout)

    def _fused_plan(self, x: torch.Tensor):  # type: ignore[no-untyped-def]
        """The fused node's inputs, or the reason peft's forward runs instead."""
        if self.disable_adapters or self.merged:
            return "adapters are disabled or merged"
        active = [n for n in self.active_adapters if n in self.lora_A.keys()]
        if len(active) != 1:
            return "not exactly one adapter is active"
        name = active[0]
        if name in getattr(self, "lora_variant", {}) or self.use_dora.get(name, False):
            return "a LoRA variant (DoRA) is used"
        if not isinstance(self.lora_dropout[name], nn.Identity) and self.training:
            return "peft.dropout > 0"
        lin_a, lin_b = self.lora_A[name], self.lora_B[name]
        if lin_a.bias is not None or lin_b.bias is not None:
            return "the adapter has a bias"
        base = self.base_layer
        if type(base) is nn.Linear:
            weight, layout = base.weight, None
        elif isinstance(base, NF4Linear):
            weight, layout = base.nf4, base.layout
        elif isinstance(base, FP8Linear):
            weight, layout = base.fp8, base.layout
        else:
            return f"the base layer is a {type(base).__name__}"
        bias = base.bias
        if weight.requires_grad or (bias is not None and bias.requires_grad):
            return "the base layer trains"
        dt = x.dtype
        if lin_a.weight.dtype != dt or lin_b.weight.dtype != dt or (layout is None and weight.dtype != dt):
            return "the input, base and adapter dtypes differ"
        if bias is not None and bias.dtype != dt:
            bias = bias.to(dt)
        return weight, bias, layout, lin_a.weight, lin_b.weight, float(self.scaling[name])


def apply_fused_lora(model: nn.Module) -> int:
    """Turn every peft `lora.Linear` (exactly that class: bitsandbytes or other variants are
    left alone) into a FusedLoraLinear, in place. After the PEFT transform and QLoRA's NF4
    swap (the base layers are final), before sharding. Returns the count; 0 is an error."""
    cls = _lora_linear_class()
    count = 0
    for m in model.modules():
        if type(m) is cls:
            m.__class__ = FusedLoraLinear
            count += 1
    if count == 0:
        raise ValueError("peft.fused=true: no LoRA linear layer found to fuse")
    return count
