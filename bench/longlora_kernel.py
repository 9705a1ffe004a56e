"""Attention alone, one layer's shape of Llama-3.1-8B (32 query heads, 8 K/V heads, head dim 128,
bf16, batch 1): forward + backward time of `s2_attention` (G = N/4) vs full causal SDPA, with
SDPA restricted to the flash backend so a silent fall-back to the math kernel (an N x N matrix)
shows up as an error instead of a slow or OOM run. Prints one JSON line per length.

usage: python3 bench/longlora_kernel.py [N ...]    (default 16384 32768 65536; CUDA only)
"""
from __future__ import annotations

import json
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ftcluster.attention import s2_attention


def bench(fn, q, k, v, reps: int = 5) -> float:  # type: ignore[no-untyped-def]
    for _ in range(2):
        fn(q, k, v).sum().backward()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn(q, k, v).sum().backward()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps / 1e3


def main(lengths: list[int]) -> None:
    for n in lengths:
        g = torch.Generator(device="cuda").manual_seed(0)
        # seq-major like HF's projections: [B, N, H, D] viewed as [B, H, N, D]
        q = torch.randn(1, n, 32, 128, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2).requires_grad_()
        k = torch.randn(1, n, 8, 128, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2).requires_grad_()
        v = torch.randn(1, n, 8, 128, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2).requires_grad_()
        row: dict = {"n": n, "group": n // 4}
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            for name, fn in (("full_s", lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)),
                             ("s2_s", lambda q, k, v: s2_attention(q, k, v, group_size=n // 4))):
                try:
                    torch.cuda.reset_peak_memory_stats()
                    row[name] = round(bench(fn, q, k, v), 5)
                    row[name.replace("_s", "_peak_gib")] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
                except Exception as e:  # noqa: BLE001 - a failure is a result
                    row[name] = f"{type(e).__name__}: {str(e)[:200]}"
        if isinstance(row.get("full_s"), float) and isinstance(row.get("s2_s"), float):
            row["speedup"] = round(row["full_s"] / row["s2_s"], 2)
        print(json.dumps(row), flush=True)
        del q, k, v
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [16384, 32768, 65536])
