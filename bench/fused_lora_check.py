"""Issue 18: the fused LoRA linear (peft.fused, ftcluster/model/fused_lora.py) against peft's
forward, per projection of the Llama-3.1-8B shape (q/o 4096->4096, k/v 4096->1024, gate/up
4096->14336, down 14336->4096), LoRA r16 alpha 32, bf16, 16,384 tokens (mb 4 x 4096): forward +
backward time (CUDA events, median of 20 after 5 warm-up), peak memory of the step, and the
largest output/gradient difference. On one GPU:
    python3 bench/fused_lora_check.py > $OUT/fused_lora_check.json
CPU smoke test (tiny sizes, checks the script runs): python3 bench/fused_lora_check.py --cpu
"""
from __future__ import annotations

import argparse
import json
import statistics

import torch
import torch.nn as nn

from ftcluster.model.fused_lora import apply_fused_lora

SHAPES = {"q_proj": (4096, 4096), "k_proj": (4096, 1024), "gate_proj": (4096, 14336), "down_proj": (14336, 4096)}


def layer(din: int, dout: int, device: str, dtype: torch.dtype) -> nn.Module:
    from peft.tuners.lora.layer import Linear as LoraLinear

    torch.manual_seed(0)
    from peft import LoraConfig

    lin = LoraLinear(nn.Linear(din, dout, bias=False), "default", LoraConfig(r=16, lora_alpha=32), r=16,
                     lora_alpha=32).to(device=device, dtype=dtype)
    lin.base_layer.requires_grad_(False)
    with torch.no_grad():
        lin.lora_B["default"].weight.normal_(0, 0.02)
    return lin


def step(lin: nn.Module, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    xx = x.detach().requires_grad_(True)
    y = lin(xx)
    y.backward(g)
    ga = lin.lora_A["default"].weight.grad.clone()
    lin.zero_grad(set_to_none=True)
    return y.detach(), ga, xx.grad


def timed(lin: nn.Module, x: torch.Tensor, g: torch.Tensor, cuda: bool, reps: int) -> tuple[float, float]:
    times = []
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    for i in range(5 + reps):
        if cuda:
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
        step(lin, x, g)
        if cuda:
            e.record()
            torch.cuda.synchronize()
            if i >= 5:
                times.append(s.elapsed_time(e))
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else 0.0
    return (statistics.median(times) if times else 0.0), peak


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cpu", action="store_true")
    ap.add_argument("--tokens", type=int, default=16384)
    a = ap.parse_args()
    cuda = not a.cpu and torch.cuda.is_available()
    dev, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    tokens, shapes = (a.tokens, SHAPES) if cuda else (64, {k: (v[0] // 64, v[1] // 64) for k, v in SHAPES.items()})
    rows = []
    for name, (din, dout) in shapes.items():
        x = torch.randn(tokens, din, device=dev, dtype=dtype)
        g = torch.randn(tokens, dout, device=dev, dtype=dtype)
        ref = layer(din, dout, dev, dtype)
        fused = layer(din, dout, dev, dtype)
        apply_fused_lora(fused)
        (y0, a0, d0), (y1, a1, d1) = step(ref, x, g), step(fused, x, g)
        t0, m0 = timed(ref, x, g, cuda, 0 if not cuda else 20)
        t1, m1 = timed(fused, x, g, cuda, 0 if not cuda else 20)
        rel = lambda u, v: ((u.float() - v.float()).abs().max() / v.float().abs().max()).item()  # noqa: E731
        rows.append({"proj": name, "in": din, "out": dout, "tokens": tokens, "peft_ms": t0, "fused_ms": t1,
                     "speedup": t0 / t1 if t1 else None, "peft_peak_mib": m0, "fused_peak_mib": m1,
                     "rel_err_y": rel(y1, y0), "rel_err_dA": rel(a1, a0), "rel_err_dx": rel(d1, d0)})
        print(json.dumps(rows[-1]), flush=True)
    if cuda:
        print(json.dumps({"device": torch.cuda.get_device_name(), "dtype": str(dtype)}))


if __name__ == "__main__":
    main()
