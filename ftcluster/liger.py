"""Optional Liger kernels (`model.liger=true`; GPU only, `pip install liger-kernel`).

Liger's Triton kernels for RMSNorm, SwiGLU and RoPE replace transformers' eager versions of them,
and its cross-entropy kernel, in our own sync-free chunk loop (fused_linear_ce_sum), replaces our
chunked output-projection + loss. Liger applies
the first three by swapping classes/functions in transformers' modeling module of the family
(its only mechanism before a model exists), so it is called before the model is built and
affects every model of that family built in this process; a training process builds one.
Parameter names and shapes are unchanged (materialisation and checkpoints are the same).
"""
from __future__ import annotations

import inspect
import logging

import torch

log = logging.getLogger(__name__)

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
    """Sum of token cross-entropies of logits h @ weight.T against y (fp32 scalar), fused: logits
    exist one chunk at a time and gradients are computed in the forward pass, by Liger's
    cross-entropy kernel. Without a host sync (see _LinearCESum); where the installed Liger's kernel
    does not take the arguments we pass, Liger's own function runs instead, which syncs (said once)."""
    rows = _liger_rows()
    if rows is None:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        return liger_fused_linear_cross_entropy(h, weight, y, ignore_index=ignore_index, reduction="sum").float()
    return linear_ce_sum(h, weight, y, ignore_index=ignore_index, rows=rows)


# Why our own loop around Liger's kernel rather than Liger's `LigerFusedLinearCrossEntropyFunction`:
# in liger-kernel 0.8.5 its forward counts the non-ignored targets with `.item()` (a host sync per
# micro-batch, needed only for reduction="mean") and its backward tests `torch.equal(grad_output, 1)`
# (another). With reduction="sum" neither number is needed; the kernel (softmax, loss and logits
# gradient of a row in one pass) is Liger's, unchanged.
_KERNEL_ARGS = ("X_ptr", "X_stride", "Y_ptr", "Y_stride", "weight_ptr", "loss_ptr", "z_loss_ptr", "loss_stride",
                "token_accuracy_ptr", "token_accuracy_stride", "predicted_tokens_ptr", "predicted_tokens_stride",
                "n_cols", "n_non_ignore", "sum_non_ignore_weight", "weight_sum", "ignore_index", "lse_square_scale",
                "label_smoothing", "reduction", "softcap", "RETURN_Z_LOSS", "RETURN_TOKEN_ACCURACY",
                "RETURN_PREDICTED_TOKENS", "BLOCK_SIZE", "HAS_WEIGHT", "HAS_SOFTCAPPING", "HAS_GRADIENTS")
_rows_fn: list = []


def _liger_rows():  # type: ignore[no-untyped-def]
    """Liger's row kernel as `rows(logits, y, loss_rows, ignore_index, grad)`, or None where the
    installed version's kernel has other parameters."""
    if _rows_fn:
        return _rows_fn[0]
    try:
        import triton
        from liger_kernel.ops.cross_entropy import liger_cross_entropy_kernel
    except ImportError as e:
        raise RuntimeError(f"{_HINT}: {e}") from None
    params = tuple(inspect.signature(liger_cross_entropy_kernel.fn).parameters)
    if set(params) != set(_KERNEL_ARGS):
        log.warning("model.liger: this liger-kernel's cross-entropy kernel takes %s; using Liger's own fused "
                    "linear cross-entropy, which syncs the host once per micro-batch", params)
        _rows_fn.append(None)
        return None

    def rows(logits: torch.Tensor, y: torch.Tensor, loss_rows: torch.Tensor, ignore_index: int, grad: bool) -> None:
        v = logits.shape[1]
        liger_cross_entropy_kernel[(logits.shape[0],)](
            X_ptr=logits, X_stride=logits.stride(-2), Y_ptr=y, Y_stride=y.stride(-1), weight_ptr=None,
            loss_ptr=loss_rows, z_loss_ptr=None, loss_stride=loss_rows.stride(-1), token_accuracy_ptr=None,
            token_accuracy_stride=0, predicted_tokens_ptr=None, predicted_tokens_stride=0, n_cols=v,
            n_non_ignore=1, sum_non_ignore_weight=1, weight_sum=0.0,  # read only for reduction="mean"
            ignore_index=ignore_index, lse_square_scale=0.0, label_smoothing=0.0, reduction="sum", softcap=None,
            RETURN_Z_LOSS=False, RETURN_TOKEN_ACCURACY=False, RETURN_PREDICTED_TOKENS=False, HAS_WEIGHT=False,
            HAS_SOFTCAPPING=False, HAS_GRADIENTS=grad, BLOCK_SIZE=min(32768, triton.next_power_of_2(v)), num_warps=32)

    _rows_fn.append(rows)
    return rows


def linear_ce_sum(h: torch.Tensor, weight: torch.Tensor, y: torch.Tensor, *, ignore_index: int, rows) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """The chunk loop of fused_linear_ce_sum with the row kernel given (`rows` fills each row's loss
    and, when asked, overwrites its logits with d loss / d logits; the CPU tests give a torch one)."""
    # Under no_grad the Function's needs_input_grad still follows requires_grad: ask explicitly, so
    # that evaluation computes no gradient.
    grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    return _LinearCESum.apply(h.contiguous(), weight, y.contiguous(), ignore_index, rows, grad)


def chunk_tokens(tokens: int, *, vocab: int, hidden: int) -> int:
    """Tokens per logits chunk: Liger's rule (a chunk's logits about the size of the hidden
    states, in a power of two), which ftcluster/plan.py counts."""
    inc = -(-vocab // hidden)
    return min(tokens, 1 << max(0, (-(-tokens // inc) - 1).bit_length()))


class _LinearCESum(torch.autograd.Function):
    """Forward does all the work: per chunk, logits = h W^T into one reused buffer, the row kernel
    turns them into the loss and its logits gradient in place, and the gradients of h (and of W when
    it trains) are accumulated. Backward scales them by the upstream gradient, a device scalar:
    nothing is read back to the host."""

    @staticmethod
    def forward(ctx, h, weight, y, ignore_index, rows, grad):  # type: ignore[no-untyped-def,override]
        n, v = h.shape[0], weight.shape[0]
        need_h, need_w = grad and ctx.needs_input_grad[0], grad and ctx.needs_input_grad[1]
        chunk = chunk_tokens(n, vocab=v, hidden=h.shape[1])
        loss_rows = torch.zeros(n, dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros_like(weight) if need_w else None
        buf = torch.empty((chunk, v), dtype=h.dtype, device=h.device)
        for s in range(0, n, chunk):
            e = min(s + chunk, n)
            logits = buf[: e - s]
            torch.mm(h[s:e], weight.t(), out=logits)
            rows(logits, y[s:e], loss_rows[s:e], ignore_index, need_h or need_w)
            if grad_h is not None:
                torch.mm(logits, weight, out=grad_h[s:e])
            if grad_w is not None:
                grad_w.addmm_(logits.t(), h[s:e])
        ctx.save_for_backward(grad_h, grad_w)
        return loss_rows.sum()

    @staticmethod
    def backward(ctx, grad):  # type: ignore[no-untyped-def,override]
        grad_h, grad_w = ctx.saved_tensors
        return (grad_h.mul_(grad) if grad_h is not None else None,
                grad_w.mul_(grad) if grad_w is not None else None, None, None, None, None)
