"""train.mlp_tile_tokens (ftcluster/model/tiled_mlp.py): the tiled MLP gives the untiled model's
loss and every gradient (fp32; LoRA, fused LoRA, full fine-tune, under checkpointing), keeps only
the MLP's input for backward, leaves parameter names alone, is refused where untested, and a real
2-rank FSDP2 run trains to the untiled run's losses."""
from __future__ import annotations

import pytest
import torch

from conftest import compose_job, live_adapter_module, lm_batch, losses, train_ok
from ftcluster.compose import register_configs
from ftcluster.model import build_module, materialize
from ftcluster.model.tiled_mlp import TiledMLPFn

register_configs()
torch.set_num_threads(1)


def _loss_and_grads(*overrides: str) -> tuple[float, dict[str, torch.Tensor], list[str]]:
    job = compose_job("train.dtype=fp32", *overrides)
    module = live_adapter_module(job)
    module.train()
    ids = torch.randint(6, 1000, (2, 32), generator=torch.Generator().manual_seed(3))
    loss = module(lm_batch(ids))
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in module.named_parameters() if p.requires_grad}, \
        [n for n, _ in module.named_parameters()]


@pytest.mark.parametrize("overrides", [
    ("peft=lora",),
    ("peft=lora", "peft.fused=true"),
    ("peft=none",),                                              # the MLP's own weights train
    ("peft=lora", "train.activation_checkpointing=full"),
    ("peft=qlora", "train.activation_checkpointing=offload"),
], ids=["lora", "fused-lora", "full-ft", "lora-checkpointed", "qlora-offload"])
def test_tiled_equals_untiled_loss_and_every_gradient(overrides: tuple[str, ...]) -> None:
    """64 tokens in tiles of 7 (the last one short): same loss and gradients within fp32 rounding."""
    l0, g0, names0 = _loss_and_grads(*overrides)
    l1, g1, names1 = _loss_and_grads(*overrides, "train.mlp_tile_tokens=7")
    assert names1 == names0  # checkpoints and export see the same parameter names
    assert abs(l1 - l0) <= 1e-6 * abs(l0), (l0, l1)
    assert set(g1) == set(g0)
    for n in g0:
        err, scale = (g1[n] - g0[n]).abs().max().item(), g0[n].abs().max().item()
        assert scale > 0 and err <= 1e-5 * scale, (n, err, scale)


def _saved_bytes(fn, x: torch.Tensor) -> int:  # type: ignore[no-untyped-def]
    """Bytes autograd saves for backward while `fn(x)` runs (each storage once), parameters aside
    (the weights a linear saves are the parameters themselves, no copy)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if not isinstance(t, torch.nn.Parameter):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x)
    return sum(seen.values())


def test_the_tiled_mlp_keeps_only_its_input_for_backward() -> None:
    job = compose_job("train.dtype=fp32", "peft=lora")
    built = build_module(job)
    materialize(built.module, cfg=job.model, seed=job.seed, device=torch.device("cpu"))
    mlp = built.layers[0].mlp
    x = torch.randn(2, 64, built.hf_model.config.hidden_size, requires_grad=True)
    untiled = _saved_bytes(mlp, x)
    tiled = _saved_bytes(lambda t: TiledMLPFn.apply(t, mlp.forward, 8), x)
    inter = built.hf_model.config.intermediate_size
    assert untiled >= 3 * x.shape[0] * x.shape[1] * inter * 4  # gate, up and their product, fp32
    assert tiled == x.numel() * 4  # x alone


@pytest.mark.parametrize("override", ["parallel=zero2", "model.compile=true"])
def test_refused_where_untested_naming_the_key(override: str) -> None:
    with pytest.raises(ValueError, match="train.mlp_tile_tokens"):
        compose_job("peft=lora", "train.mlp_tile_tokens=512", override)
    with pytest.raises(ValueError, match="train.mlp_tile_tokens"):
        compose_job("train.mlp_tile_tokens=-1")


@pytest.mark.slow
def test_two_rank_fsdp2_run_with_tiles_matches_the_untiled_run(workdir) -> None:  # type: ignore[no-untyped-def]
    """The real `ftcluster train` on 2 gloo ranks (FSDP2, packed rows of the embedded default, fp32),
    tiles of 100 tokens against none: the same losses step by step."""
    common = ("peft=lora", "launcher.nproc_per_node=2", "train.max_steps=5", "train.dtype=fp32",
              "checkpoint.enabled=false", "eval.every_steps=0", "eval.at_start=false", "logger=none")
    runs = {}
    for tile in (0, 100):
        run = workdir / f"tile_{tile}"
        train_ok(*common, f"train.mlp_tile_tokens={tile}", run=run, cwd=workdir)
        runs[tile] = losses(run)
    assert sorted(runs[0]) == sorted(runs[100]) == list(range(1, 6))
    for step, l0 in runs[0].items():
        assert abs(runs[100][step] - l0) <= 1e-5 * l0, (step, l0, runs[100][step])
