"""The fused LoRA linear (`peft.fused`, ftcluster/model/fused_lora.py) against peft's own forward:
the same outputs and gradients for a plain and an NF4 base, float64 gradcheck, every step-aside
case, the whole tiny model (loss and every gradient), config refusals naming the key, and a real
2-rank FSDP2 run through the CLI whose losses match the unfused run."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from conftest import compose_job, live_adapter_module, lm_batch, losses, one_gloo_rank_engine, train_ok
from ftcluster.compose import register_configs
from ftcluster.config import ConfigError
from ftcluster.model import build_module
from ftcluster.model.fused_lora import FusedLoraLinear, FusedLoRAFn, apply_fused_lora
from ftcluster.quant import NF4Linear, quantize_nf4

register_configs()
torch.set_num_threads(1)


def lora_linear(*, bias: bool, dtype: torch.dtype = torch.float64, nf4: bool = False, seed: int = 0,
                dropout: float = 0.0) -> nn.Module:
    """One peft LoRA linear (64 -> 96, r 8, alpha 16) with non-zero B, so the update matters."""
    from peft import LoraConfig
    from peft.tuners.lora.layer import Linear as LoraLinear

    torch.manual_seed(seed)
    cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout)
    layer = LoraLinear(nn.Linear(64, 96, bias=bias), "default", cfg, r=8, lora_alpha=16, lora_dropout=dropout)
    layer.base_layer.requires_grad_(False)  # as get_peft_model freezes the base
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.1)
    if nf4:
        base = layer.base_layer
        q = NF4Linear(in_features=64, out_features=96, bias=bias, storage_dtype=torch.float32)
        q.nf4.data = quantize_nf4(base.weight.float(), storage_dtype=torch.float32)
        if bias:
            q.bias.data = base.bias.data.float()
        layer.base_layer = q
    return layer.to(dtype) if not nf4 else layer


def forward_backward(layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    x = x.clone().requires_grad_(True)
    y = layer(x)
    (y * torch.linspace(-1, 1, y.shape[-1], dtype=y.dtype)).sum().backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.requires_grad}
    layer.zero_grad()
    return y.detach(), grads, x.grad


@pytest.mark.parametrize("bias", [False, True])
def test_fused_equals_peft_forward_and_gradients_float64(bias: bool) -> None:
    layer = lora_linear(bias=bias)
    x = torch.randn(3, 5, 64, dtype=torch.float64)
    y0, g0, dx0 = forward_backward(layer, x)
    assert apply_fused_lora(layer) == 1 and type(layer) is FusedLoraLinear
    y1, g1, dx1 = forward_backward(layer, x)
    assert torch.allclose(y1, y0, rtol=0, atol=1e-12)
    assert set(g1) == {"lora_A.default.weight", "lora_B.default.weight"} == set(g0)
    for n in g0:
        assert torch.allclose(g1[n], g0[n], rtol=0, atol=1e-12), n
    assert torch.allclose(dx1, dx0, rtol=0, atol=1e-12)


def test_gradcheck_of_the_fused_node_with_a_bias() -> None:
    torch.manual_seed(1)
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 6, dtype=torch.float64)
    b = torch.randn(5, dtype=torch.float64)
    a = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    bb = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, a, bb: FusedLoRAFn.apply(x, w, b, a, bb, 0.7, None), (x, a, bb))


def test_input_without_grad_skips_dx_and_adapter_grads_equal_peft() -> None:
    """Layer 0's input under LoRA (frozen embedding) needs no gradient: the fused backward skips dx
    and still gives peft's adapter gradients."""
    x = torch.randn(7, 64, dtype=torch.float64)
    grads = []
    for fused in (False, True):
        layer = lora_linear(bias=False)
        if fused:
            apply_fused_lora(layer)
        y = layer(x)
        assert y.requires_grad
        (y * torch.linspace(-1, 1, y.shape[-1], dtype=y.dtype)).sum().backward()
        grads.append({n: p.grad for n, p in layer.named_parameters() if p.requires_grad})
    assert set(grads[0]) == set(grads[1]) == {"lora_A.default.weight", "lora_B.default.weight"}
    for n in grads[0]:
        assert grads[0][n].abs().sum() > 0 and torch.allclose(grads[1][n], grads[0][n], rtol=0, atol=1e-12), n


def test_nf4_base_fused_equals_peft_over_the_nf4_linear() -> None:
    layer = lora_linear(bias=True, nf4=True)
    x = torch.randn(2, 9, 64)
    y0, g0, dx0 = forward_backward(layer, x)
    apply_fused_lora(layer)
    y1, g1, dx1 = forward_backward(layer, x)
    assert torch.allclose(y1, y0, rtol=1e-5, atol=1e-5)
    for n in g0:
        assert torch.allclose(g1[n], g0[n], rtol=1e-4, atol=1e-5), n
    assert torch.allclose(dx1, dx0, rtol=1e-5, atol=1e-5)


def test_steps_aside_to_peft_when_adapters_are_disabled_or_dropout_is_on() -> None:
    layer = lora_linear(bias=False)
    apply_fused_lora(layer)
    x = torch.randn(4, 64, dtype=torch.float64)
    base = layer.base_layer(x)
    layer.enable_adapters(False)
    assert torch.equal(layer(x), base)  # DPO's reference pass: the base alone
    layer.enable_adapters(True)
    assert not torch.allclose(layer(x), base)
    drop = lora_linear(bias=False, dropout=0.5)
    apply_fused_lora(drop)
    drop.train()
    torch.manual_seed(3)
    y_train = drop(x)
    drop.eval()  # dropout is off in eval: the fused node runs
    assert not torch.allclose(y_train, drop(x))


def tiny_job(*overrides: str):  # type: ignore[no-untyped-def]
    return compose_job("peft=lora", "train.dtype=fp32", *overrides)


@pytest.mark.parametrize("peft", ["lora", "qlora"])
def test_whole_model_loss_and_every_gradient_match_the_unfused_build(peft: str) -> None:
    ids = torch.randint(6, 1000, (2, 32), generator=torch.Generator().manual_seed(0))
    out = {}
    for fused in (False, True):
        j = tiny_job(f"peft={peft}", f"peft.fused={str(fused).lower()}")
        module = live_adapter_module(j)
        fused_count = sum(type(m) is FusedLoraLinear for m in module.modules())
        assert (fused_count > 0) == fused, fused_count
        loss = module(lm_batch(ids))
        loss.backward()
        out[fused] = (loss.item(), {n: p.grad.clone() for n, p in module.named_parameters() if p.requires_grad},
                      set(module.state_dict()))
    (l0, g0, k0), (l1, g1, k1) = out[False], out[True]
    assert k0 == k1  # same checkpoint/export names
    assert abs(l1 - l0) <= 1e-5 * abs(l0), (l0, l1)
    assert set(g0) == set(g1)
    for n in g0:  # fp32 sums in another order: within 1e-5 of the tensor's largest entry
        err, scale = (g1[n] - g0[n]).abs().max().item(), g0[n].abs().max().item()
        assert scale > 0 and err <= 1e-5 * scale, (n, err, scale)


@pytest.mark.parametrize("shard_frozen", ["true", "false"])
def test_under_fsdp2_bf16_every_lora_linear_runs_the_fused_node(shard_frozen: str, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """FSDP2 on one gloo process with bf16 compute (the GPU recipe), the frozen base inside FSDP
    (sharded, gathered in bf16) or outside it: the dtypes line up, so every LoRA linear takes
    the fused node on every call and none steps aside; the step trains the adapters."""
    from ftcluster.model import fused_lora

    calls, asides = [], []
    real_apply = fused_lora.FusedLoRAFn.apply
    monkeypatch.setattr(fused_lora.FusedLoRAFn, "apply", lambda *a: calls.append(1) or real_apply(*a))
    monkeypatch.setattr(fused_lora, "_say_once", asides.append)
    j = compose_job("peft=lora", "peft.fused=true", "train.dtype=bf16", f"parallel.shard_frozen={shard_frozen}")
    built = build_module(j)
    module = built.module
    n_lora = sum(type(m) is FusedLoraLinear for m in module.modules())
    with one_gloo_rank_engine(j, built) as engine:
        b_before = {n: p.full_tensor().clone() for n, p in module.named_parameters() if "lora_B" in n}
        module.train()
        ids = torch.randint(6, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
        loss = engine.forward(lm_batch(ids))
        engine.backward(loss / ids.numel(), last_micro=True)
        assert torch.isfinite(engine.clip_grad_norm(1.0))
        engine.step(lr=1e-2, skip=torch.tensor(False))
        assert asides == [] and len(calls) == n_lora > 0, (asides, len(calls), n_lora)
        moved = [n for n, p in module.named_parameters() if "lora_B" in n and not torch.equal(p.full_tensor(), b_before[n])]
        assert len(moved) == len(b_before)


@pytest.mark.parametrize("overrides", [
    ("peft=none", "peft.fused=true"),
    ("peft=lora", "peft.fused=true", "peft.dropout=0.1"),
    ("peft=lora", "peft.fused=true", "parallel=zero3"),
])
def test_contradictions_fail_at_compose_naming_peft_fused(overrides: tuple[str, ...]) -> None:
    with pytest.raises(ConfigError, match=r"peft\.fused"):
        compose_job(*overrides)


def test_apply_without_lora_layers_is_an_error() -> None:
    with pytest.raises(ValueError, match="peft.fused"):
        apply_fused_lora(nn.Sequential(nn.Linear(2, 2)))


@pytest.mark.slow
def test_two_rank_fsdp2_cli_run_fused_matches_unfused(workdir) -> None:  # type: ignore[no-untyped-def]
    """The real `ftcluster train` on 2 gloo ranks (FSDP2, bf16 master/compute as a GPU run), fused
    and not: the same losses within bf16 rounding over 6 steps."""
    common = ("peft=lora", "launcher.nproc_per_node=2", "train.max_steps=6", "checkpoint.enabled=false",
              "eval.every_steps=0", "eval.at_start=false", "logger=none")
    runs = {}
    for fused in ("false", "true"):
        run = workdir / f"fused_{fused}"
        train_ok(*common, f"peft.fused={fused}", run=run, cwd=workdir)
        runs[fused] = losses(run)
    assert sorted(runs["true"]) == sorted(runs["false"]) == list(range(1, 7))
    for step, l0 in runs["false"].items():
        assert abs(runs["true"][step] - l0) <= 0.01 * l0, (step, l0, runs["true"][step])


@pytest.mark.parametrize("mode", ["full", "offload"])
def test_fused_under_activation_checkpointing_matches_peft_gradients(mode: str) -> None:
    """The auto layout pairs the fused node with checkpointing when memory is short: the recompute
    re-runs the fused forward inside the checkpoint; every gradient equals the unfused,
    uncheckpointed build's (fp32)."""
    ids = torch.randint(6, 1000, (2, 32), generator=torch.Generator().manual_seed(1))
    out = {}
    for fused, ac in ((False, "none"), (True, mode)):
        j = tiny_job(f"peft.fused={str(fused).lower()}", f"train.activation_checkpointing={ac}")
        module = live_adapter_module(j)
        assert (sum(type(m) is FusedLoraLinear for m in module.modules()) > 0) == fused
        module.train()
        loss = module(lm_batch(ids))
        loss.backward()
        out[fused] = (loss.item(), {n: p.grad.clone() for n, p in module.named_parameters() if p.requires_grad})
    (l0, g0), (l1, g1) = out[False], out[True]
    assert abs(l1 - l0) <= 1e-5 * abs(l0), (l0, l1)
    assert set(g0) == set(g1)
    for n in g0:
        err, scale = (g1[n] - g0[n]).abs().max().item(), g0[n].abs().max().item()
        assert scale > 0 and err <= 1e-5 * scale, (n, err, scale)
