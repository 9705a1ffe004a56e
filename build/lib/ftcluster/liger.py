"""Optional Liger kernels (`model.liger=true`; GPU only, `pip install liger-kernel`).

Liger's Triton kernels for RMSNorm, SwiGLU and RoPE replace transformers' eager versions of them,
and its fused linear cross-entropy replaces our chunked output-projection + loss. Liger applies
the first three by swapping classes/functions in transformers' modeling module of the family
(its only mechanism before a model exists), so it is called before the model is built and
affects every model of that family built in this process; a training process builds one.
Parameter names and shapes are unchanged (materialisation and checkpoints are the same).
"""
from __future__ import annotations

import torch

_HINT = "model.liger=true needs the liger-kernel package and a CUDA GPU (pip install liger-kernel)"


def apply_liger_kernels(hf_config) -> None:  # type: ignore[no-untyped-def]
    """Swap in Liger's RMSNorm, SwiGLU MLP and RoPE for `hf_config.model_type` (llama, qwen2, ...).
    The loss stays ours (CausalLMWithLoss): Liger's own cross-entropy patches are left off."""
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except ImportError as e:
        raise RuntimeError(f"{_HINT}: {e}") from None
    fn = MODEL_TYPE_TO_APPLY_LIGER_FN.get(hf_config.model_type)
    if fn is None:
        raise ValueError(f"model.liger: Liger has no kernels for model type {hf_config.model_type!r}")
    fn(rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False)


def fused_linear_ce_sum(h: torch.Tensor, weight: torch.Tensor, y: torch.Tensor, *, ignore_index: int) -> torch.Tensor:
    """Sum of token cross-entropies of logits h @ weight.T against y (fp32 scalar), fused by Liger:
    logits exist one chunk at a time and gradients are computed in the forward pass."""
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except ImportError as e:
        raise RuntimeError(f"{_HINT}: {e}") from None
    loss = liger_fused_linear_cross_entropy(h, weight, y, ignore_index=ignore_index, reduction="sum")
    return loss.float()
