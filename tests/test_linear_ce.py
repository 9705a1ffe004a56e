"""The sync-free fused linear cross-entropy's chunk loop (ftcluster/liger.py, the default loss head
on a GPU with Liger). Liger's Triton row kernel cannot run on a CPU: a torch stand-in with the same
contract (each row's loss; logits overwritten by d loss / d logits, zero rows where ignored) is
given instead, so what is tested here is ours: chunking, the buffer reuse, the gradients of h and W
accumulated in forward and scaled by the upstream gradient in backward. The kernel itself is
checked against torch on the GPU by bench/linear_ce_check.py."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ftcluster.liger import chunk_tokens, linear_ce_sum

IGNORE = -100


def torch_rows(logits: torch.Tensor, y: torch.Tensor, loss_rows: torch.Tensor, ignore_index: int, grad: bool) -> None:
    """Stand-in for Liger's liger_cross_entropy_kernel (reduction="sum"), in fp32 like it."""
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp32 like the kernel; fp64 stays
    keep = y != ignore_index
    tgt = torch.where(keep, y, 0)
    lse = torch.logsumexp(z, dim=-1)
    loss_rows.copy_(torch.where(keep, lse - z.gather(1, tgt[:, None])[:, 0], 0.0))
    if grad:
        g = torch.softmax(z, dim=-1)
        g[torch.arange(len(y)), tgt] -= 1.0
        logits.copy_(g * keep[:, None])


def _case(n: int, *, dtype: torch.dtype, w_grad: bool):
    g = torch.Generator().manual_seed(n)
    h = torch.randn(n, 16, generator=g, dtype=torch.float32).to(dtype).requires_grad_(True)
    w = (torch.randn(200, 16, generator=g) * 0.3).to(dtype).requires_grad_(w_grad)
    y = torch.randint(0, 200, (n,), generator=g)
    y[::3] = IGNORE
    return h, w, y


@pytest.mark.parametrize("n", [1, 37, 64])
@pytest.mark.parametrize("w_grad", [False, True])
def test_loss_and_gradients_match_torch(n: int, w_grad: bool) -> None:
    assert chunk_tokens(37, vocab=200, hidden=16) == 4  # 37 rows go through ten chunks, the last short
    h, w, y = _case(n, dtype=torch.float64, w_grad=w_grad)
    scale = torch.tensor(0.37, dtype=torch.float32)  # the loop's token weighting: upstream grad != 1
    loss = linear_ce_sum(h, w, y, ignore_index=IGNORE, rows=torch_rows)
    (loss * scale).backward()
    h2, w2 = h.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(w_grad)
    ref = F.cross_entropy(h2 @ w2.t(), y, ignore_index=IGNORE, reduction="sum")
    (ref * scale).backward()
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(h.grad, h2.grad, rtol=1e-6, atol=1e-9)
    if w_grad:
        torch.testing.assert_close(w.grad, w2.grad, rtol=1e-6, atol=1e-9)
    else:
        assert w.grad is None


def test_bf16_inputs_and_all_ignored_rows() -> None:
    h, w, y = _case(37, dtype=torch.bfloat16, w_grad=False)
    loss = linear_ce_sum(h, w, y, ignore_index=IGNORE, rows=torch_rows)
    loss.backward()
    ref = F.cross_entropy((h.detach().float() @ w.float().t()), y, ignore_index=IGNORE, reduction="sum")
    torch.testing.assert_close(loss, ref, rtol=2e-2, atol=1e-2)
    assert h.grad.dtype == torch.bfloat16 and h.grad[::3].abs().sum() == 0  # ignored rows get no gradient
    h.grad = None
    y[:] = IGNORE
    loss = linear_ce_sum(h, w, y, ignore_index=IGNORE, rows=torch_rows)
    loss.backward()
    assert loss.item() == 0.0 and h.grad.abs().sum() == 0


def test_no_grad_forward_leaves_nothing_to_scale() -> None:
    h, w, y = _case(37, dtype=torch.float64, w_grad=True)
    calls = []

    def rows(logits, y, loss_rows, ignore_index, grad):  # type: ignore[no-untyped-def]
        calls.append(grad)
        torch_rows(logits, y, loss_rows, ignore_index, grad)

    with torch.no_grad():
        loss = linear_ce_sum(h, w, y, ignore_index=IGNORE, rows=rows)
    ref = F.cross_entropy(h @ w.t(), y, ignore_index=IGNORE, reduction="sum")
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-6, atol=1e-6)
    assert calls and not any(calls)  # evaluation asks the kernel for no gradient
