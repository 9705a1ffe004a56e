"""`peft.fp8_base` (ftcluster/fp8.py): the frozen base stored in e4m3 with per-row scales, its two
GEMMs through torch._scaled_mm (CPU torch has them, so this runs the real FP8 path, not a stand-in).
Checked here: the byte layout and its views, the layer's output and input gradient against the
de-quantised weight and against the original bf16 weight (e4m3's error bound), the fused LoRA node
on an FP8 base against peft's own forward on it, config rules, and through the real CLI: the
embedded model's losses with an FP8 base within 1% of the bf16 base's, on one rank and on two
gloo ranks with the FP8 state sharded by FSDP2."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from conftest import compose_job, explain, losses, run_cli
from ftcluster.fp8 import FP8Layout, FP8Linear, dequantize_fp8, fp8_parts, quantize_fp8


def _weight(out_f: int = 96, in_f: int = 160, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) * 0.02
    w[3] *= 40.0  # one row with a much larger range: per-row scales keep the others precise
    return w


def test_layout_views_and_quantisation_error() -> None:
    w = _weight()
    lay = FP8Layout(out_features=96, in_features=160)
    flat = quantize_fp8(w, storage_dtype=torch.bfloat16)
    assert flat.dtype == torch.bfloat16 and flat.numel() * 2 == lay.nbytes == 4 * (96 + 160) + 2 * 96 * 160
    q, s, qt, st = fp8_parts(flat, lay)
    assert q.shape == (96, 160) and qt.shape == (160, 96) and s.shape == (1, 96) and st.shape == (1, 160)
    assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float32
    # Each row's largest magnitude maps to e4m3's 448; the transposed copy has its own column scales.
    torch.testing.assert_close(s[0], w.abs().amax(dim=1) / 448.0)
    torch.testing.assert_close(st[0], w.abs().amax(dim=0) / 448.0)
    deq = dequantize_fp8(flat, lay, dtype=torch.float32)
    rel = ((deq - w).abs() / w.abs().clamp(min=1e-8))
    big = w.abs() > w.abs().amax(dim=1, keepdim=True) / 64  # normal e4m3 range of each row
    assert rel[big].max() <= 2 ** -4 + 1e-6  # round to nearest with a 3-bit mantissa
    deq_t = (qt.float() * st.t()).t()
    assert ((deq_t - w).abs()[big] / w.abs()[big]).max() <= 2 ** -4 + 1e-6


def test_fp8_linear_matches_its_dequantised_weight_and_stays_near_bf16() -> None:
    w = _weight()
    layer = FP8Linear(in_features=160, out_features=96, bias=True, storage_dtype=torch.bfloat16)
    layer.fp8.data.copy_(quantize_fp8(w, storage_dtype=torch.bfloat16))
    layer.bias.data.normal_()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 24, 160, generator=g).to(torch.bfloat16).requires_grad_(True)
    gy = torch.randn(2, 24, 96, generator=g).to(torch.bfloat16)
    y = layer(x)
    y.backward(gy)
    assert y.dtype == torch.bfloat16 and x.grad.dtype == torch.bfloat16 and layer.fp8.grad is None
    # Against the original weight in fp32: the FP8 error (weights and activations both in e4m3).
    xr = x.detach().float().requires_grad_(True)
    yr = xr @ w.t() + layer.bias.float()
    yr.backward(gy.float())
    err = (y.float() - yr).norm() / yr.norm()
    gerr = (x.grad.float() - xr.grad).norm() / xr.grad.norm()
    assert err < 0.05 and gerr < 0.05, (err, gerr)
    # And a bf16 GEMM of the same (de-quantised) weight is closer still: what differs is only the
    # activations' e4m3 rounding, so a broken scale (a factor off) would fail both checks.
    lay = layer.layout
    ydq = x.detach().float() @ dequantize_fp8(layer.fp8, lay, dtype=torch.float32).t() + layer.bias.float()
    assert (y.float() - ydq).norm() / ydq.norm() < 0.04


def _lora(base: nn.Module, *, seed: int):  # type: ignore[no-untyped-def]
    from peft import LoraConfig
    from peft.tuners.lora.layer import Linear as LoraLinear

    lin = LoraLinear(base, "default", LoraConfig(r=8, lora_alpha=16), r=8, lora_alpha=16)
    torch.manual_seed(seed)
    with torch.no_grad():
        lin.lora_A["default"].weight.normal_(0, 0.05)
        lin.lora_B["default"].weight.normal_(0, 0.05)
    return lin.to(torch.bfloat16)


def test_fused_lora_on_an_fp8_base_matches_pefts_forward() -> None:
    from ftcluster.model.fused_lora import FusedLoraLinear

    flat = quantize_fp8(_weight(), storage_dtype=torch.bfloat16)
    mods = []
    for fused in (False, True):
        base = FP8Linear(in_features=160, out_features=96, bias=False, storage_dtype=torch.bfloat16)
        base.fp8.data.copy_(flat)
        m = _lora(base, seed=3)
        if fused:
            m.__class__ = FusedLoraLinear
        mods.append(m)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(40, 160, generator=g).to(torch.bfloat16)
    gy = torch.randn(40, 96, generator=g).to(torch.bfloat16)
    outs = []
    for m in mods:
        xx = x.clone().requires_grad_(True)
        y = m(xx)
        y.backward(gy)
        outs.append((y, xx.grad, m.lora_A["default"].weight.grad, m.lora_B["default"].weight.grad))
    for a, b in zip(*outs):
        assert (a.float() - b.float()).norm() <= 1e-2 * b.float().norm(), (a - b).abs().max()
    assert outs[1][2].abs().sum() > 0 and outs[1][3].abs().sum() > 0


@pytest.mark.parametrize(("overrides", "says"), [
    (("peft=none", "peft.fp8_base=true"), "only with peft=lora or longlora"),
    (("peft=qlora", "peft.fp8_base=true"), "only with peft=lora or longlora"),
    (("peft=lora", "peft.fp8_base=true", "parallel=zero2"), "only with parallel=fsdp2"),
    (("peft=lora", "peft.fp8_base=true", "checkpoint.adapter_only=false"), "rebuilt from model.path or the seed"),
])
def test_config_rules_name_the_key(overrides: tuple[str, ...], says: str) -> None:
    from ftcluster.config import ConfigError

    with pytest.raises(ConfigError, match=rf"^peft.fp8_base: .*{says}"):
        compose_job(*overrides)


def test_a_fp8_job_builds_fp8_layers_and_export_builds_the_original() -> None:
    from ftcluster.export import build_skeleton
    from ftcluster.model import build_module

    job = compose_job("peft=lora", "peft.fp8_base=true")
    built = build_module(job)
    fp8 = [m for m in built.module.modules() if isinstance(m, FP8Linear)]
    assert len(fp8) == 4 * 7  # every projection of the 4 decoder layers
    assert built.counts.total == build_module(compose_job("peft=lora")).counts.total  # logical sizes, not bytes
    skeleton, _ = build_skeleton(job)
    assert not any(isinstance(m, FP8Linear) for m in skeleton.modules())


BASE = ("peft=lora", "train.max_steps=6", "train.log_every=1", "checkpoint.enabled=false", "eval.every_steps=0",
        "eval.at_start=false", "data.eval_path=null", "train.global_batch_size=8", "train.micro_batch_size=4")


@pytest.mark.slow
def test_embedded_model_trains_with_an_fp8_base_within_one_percent_of_bf16(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Accuracy check on a trained (not random) model: the embedded pretrained tiny model on its
    sample chat data, bf16 compute. Steps 1-6 of the FP8 base (fused node, one rank; peft's forward
    on FP8Linear, two gloo ranks with the FP8 state sharded by FSDP2) against the bf16 base."""
    runs = {
        "bf16": ("train.dtype=bf16", "peft.fused=false"),
        "fp8_fused": ("train.dtype=bf16", "peft.fp8_base=true", "peft.fused=true"),
        "fp8_2ranks": ("train.dtype=bf16", "peft.fp8_base=true", "peft.fused=false", "launcher.nproc_per_node=2",
                       "parallel.shard_frozen=true"),
    }
    got = {}
    for name, extra in runs.items():
        p = run_cli("train", f"run.dir={tmp_path / name}", *BASE, *extra, cwd=tmp_path)
        assert p.returncode == 0, explain(p)
        got[name] = losses(tmp_path / name)
    ref = got["bf16"]
    assert len(ref) == 6 and all(math.isfinite(v) for v in ref.values())
    for name in ("fp8_fused", "fp8_2ranks"):
        rel = max(abs(got[name][s] - ref[s]) / ref[s] for s in ref)
        assert 0 < rel < 0.01, (name, rel, got[name], ref)


def test_projections_sharing_an_input_share_its_quantisation_but_never_a_stale_one() -> None:
    """q, k and v read one input: it is quantised once (ftcluster/fp8.py _LastInput); an in-place
    change of that input, or another tensor, is quantised afresh."""
    import ftcluster.fp8 as fp8

    layers = []
    for seed in (0, 1):
        lay = FP8Linear(in_features=160, out_features=96, bias=False, storage_dtype=torch.bfloat16)
        lay.fp8.data.copy_(quantize_fp8(_weight(seed=seed), storage_dtype=torch.bfloat16))
        layers.append(lay)
    x = torch.randn(8, 160).to(torch.bfloat16)
    calls = []
    real = fp8._rows_e4m3
    fp8._rows_e4m3 = lambda t: calls.append(t.shape) or real(t)  # type: ignore[assignment]
    try:
        with torch.no_grad():
            a, b = layers[0](x), layers[1](x)
            assert len(calls) == 1  # the second projection reused the first one's quantised input
            x.mul_(2.0)  # same tensor, new version
            a2 = layers[0](x)
            assert len(calls) == 2
            torch.testing.assert_close(a2, 2 * a, rtol=2e-2, atol=1e-3)
            fresh = layers[1](x.clone())  # another tensor with equal values
            assert len(calls) == 3
            torch.testing.assert_close(fresh, 2 * b, rtol=2e-2, atol=1e-3)
    finally:
        fp8._rows_e4m3 = real  # type: ignore[assignment]
