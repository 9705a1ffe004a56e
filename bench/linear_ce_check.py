"""Issue 18: our sync-free fused linear cross-entropy (ftcluster/liger.py fused_linear_ce_sum, the
default loss head on a GPU with Liger) against Liger's own `liger_fused_linear_cross_entropy` and a
chunked torch fp32 reference, at the 8B shape (16,384 tokens = mb 4 x 4096, hidden 4096, vocab
128,256, a quarter of the targets ignored, upstream gradient 0.37 as the loop's token weighting):
forward + backward time (CUDA events, median of 10 after 3 warm-up), peak memory, the largest
loss and hidden-gradient differences, and whether a step runs under
torch.cuda.set_sync_debug_mode("error"). One GPU:
    python3 bench/linear_ce_check.py > $OUT/linear_ce_check.json
"""
from __future__ import annotations

import json
import statistics

import torch
import torch.nn.functional as F

from ftcluster.liger import fused_linear_ce_sum

N, H, V, IGNORE = 16384, 4096, 128256, -100


def ours(h, w, y):  # type: ignore[no-untyped-def]
    return fused_linear_ce_sum(h, w, y, ignore_index=IGNORE)


def liger(h, w, y):  # type: ignore[no-untyped-def]
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    return liger_fused_linear_cross_entropy(h, w, y, ignore_index=IGNORE, reduction="sum").float()


def reference(h, w, y):  # type: ignore[no-untyped-def]
    total = h.new_zeros((), dtype=torch.float32)
    for s in range(0, h.shape[0], 1024):
        total = total + F.cross_entropy((h[s:s + 1024] @ w.t()).float(), y[s:s + 1024], ignore_index=IGNORE, reduction="sum")
    return total


def run(fn, h, w, y, scale):  # type: ignore[no-untyped-def]
    hh = h.detach().requires_grad_(True)
    loss = fn(hh, w, y)
    (loss * scale).backward()
    return loss.detach(), hh.grad


def main() -> None:
    torch.manual_seed(0)
    dev = "cuda"
    h = torch.randn(N, H, device=dev, dtype=torch.bfloat16)
    w = (torch.randn(V, H, device=dev) * 0.02).to(torch.bfloat16)
    y = torch.randint(0, V, (N,), device=dev)
    y[torch.rand(N, device=dev) < 0.25] = IGNORE
    scale = torch.tensor(0.37, device=dev)
    ref_loss, ref_grad = run(reference, h, w, y, scale)
    out: dict = {"tokens": N, "hidden": H, "vocab": V}
    for name, fn in (("ours", ours), ("liger", liger), ("torch_chunked_fp32", reference)):
        for _ in range(3):
            run(fn, h, w, y, scale)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        times = []
        for _ in range(10):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            loss, grad = run(fn, h, w, y, scale)
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
        syncs = "none"
        torch.cuda.set_sync_debug_mode("error")
        try:
            run(fn, h, w, y, scale)
        except RuntimeError as e:
            syncs = str(e).splitlines()[0][:160]
        finally:
            torch.cuda.set_sync_debug_mode("default")
        out[name] = {"ms_fwd_bwd": round(statistics.median(times), 2),
                     "peak_gib_above_inputs": round((torch.cuda.max_memory_allocated() - base) / 2**30, 3),
                     "loss_rel_err": float(((loss - ref_loss).abs() / ref_loss.abs()).item()),
                     "grad_max_abs_err": float((grad.float() - ref_grad.float()).abs().max().item()),
                     "grad_max_abs": float(ref_grad.float().abs().max().item()),
                     "host_sync": syncs}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
