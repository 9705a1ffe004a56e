"""`parallel.shard_frozen` (issue 18): FSDP2 leaves an adapter run's frozen base outside its
management at world size 1 (auto) or when asked (false), so the forward uses the weights in place,
with no all-gather buffer and no copy; the trained parameters stay FSDP2's. The same losses either
way, and the plan counts what the engine really holds.

The engine is built under torch's fake process group (collectives are no-ops, so a world of 2 runs
in one process; the weights are real CPU tensors), except the loss comparison, which trains for
real on 2 gloo ranks through the CLI.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import LIGHT_EVAL, cli_env, losses, train_ok
from ftcluster.compose import compose_job
from ftcluster.config import ConfigError
from ftcluster.plan import plan_memory

REPO = Path(__file__).resolve().parents[1]

ENGINE_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch, torch.distributed as dist
    from torch.distributed.tensor import DTensor
    from torch.testing._internal.distributed.fake_pg import FakeStore
    from ftcluster.compose import compose_job
    from ftcluster.distributed import Dist
    from ftcluster.layout import concrete
    from ftcluster.model import build_module, materialize
    from ftcluster.parallel import parallelize
    results = []
    for world, overrides in json.loads(sys.argv[1]):  # each case: its own job, module and process group
        job = concrete(compose_job(*overrides))
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
        built = build_module(job)
        d = Dist(rank=0, world_size=world, local_rank=0, device=torch.device("cpu"))
        engine = parallelize(built.module, layers=built.layers, job=job, dist=d,
                             materialize=lambda m, dev, view: materialize(m, cfg=job.model, seed=0, device=dev, shard_view=view))
        out = {"frozen_plain": 0, "frozen_dtensor": 0, "trainable_plain": 0, "frozen_bytes": 0, "full_shape": True}
        for p in built.module.parameters():
            kind = ("trainable_" if p.requires_grad else "frozen_") + ("dtensor" if isinstance(p, DTensor) else "plain")
            out[kind] = out.get(kind, 0) + 1
            if not p.requires_grad:
                local = p.to_local() if isinstance(p, DTensor) else p
                out["frozen_bytes"] += local.numel() * local.element_size()
                out["full_shape"] &= tuple(local.shape) == tuple(p.shape)
        results.append(out)
        del engine, built
        dist.destroy_process_group()
    print("RESULT", json.dumps(results), flush=True)
""")

TINY = ("peft=lora", "data.max_seq_len=32", "train.micro_batch_size=1")


CASES = [
    (1, (), False),                               # auto at one rank: outside FSDP2
    (1, ("parallel.shard_frozen=true",), True),   # asked: FSDP2 manages them (the old behaviour)
    (2, (), True),                                # auto at two ranks: sharded
    (2, ("parallel.shard_frozen=false",), False),  # asked: whole on every rank
]


@pytest.fixture(scope="module")
def engines() -> dict[tuple[int, tuple[str, ...]], dict]:
    """What the engine holds for every case, built in one subprocess (one interpreter start and
    torch import for the four, not one each; each case has its own job, module and fake process
    group). tests/conftest.py keeps this file on one xdist worker, so it runs once."""
    cases = [(world, [*TINY, *overrides]) for world, overrides, _ in CASES]
    p = subprocess.run([sys.executable, "-c", ENGINE_SCRIPT, json.dumps(cases)], cwd=REPO, env=cli_env(),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    results = json.loads([ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")][-1][len("RESULT "):])
    assert len(results) == len(CASES)
    return {(world, overrides): got for (world, overrides, _), got in zip(CASES, results)}


def _plan(world: int, *overrides: str):  # type: ignore[no-untyped-def]
    return plan_memory(compose_job(*TINY, *overrides), world_size=world, micro_batch_size=1,
                       activation_checkpointing="none", activation_checkpointing_every=1, liger=False)


@pytest.mark.parametrize("world, overrides, sharded", CASES)
def test_frozen_parameters_are_sharded_only_when_they_should_be(world: int, overrides: tuple[str, ...], sharded: bool,
                                                                engines: dict) -> None:
    got = engines[(world, overrides)]
    assert got.get("trainable_plain", 0) == 0  # the adapters are always FSDP2's (sharded, mixed precision)
    if sharded:
        assert got["frozen_plain"] == 0 and got["frozen_dtensor"] > 0
    else:
        assert got["frozen_dtensor"] == 0 and got["frozen_plain"] > 0 and got["full_shape"]
    # The plan holds the same frozen bytes as the engine, and gathers nothing frozen when unsharded.
    plan = _plan(world, *overrides)
    assert plan.frozen_weights == got["frozen_bytes"]
    trainable_only = _plan(world, "parallel.shard_frozen=false")
    if not sharded:
        assert plan.comm_buffers == trainable_only.comm_buffers
    else:
        assert plan.comm_buffers > trainable_only.comm_buffers


def test_the_8b_plan_at_one_rank_drops_the_all_gather_copies() -> None:
    """8B LoRA at one rank: the old sharded layout's 2.8 GiB of gathered layers and root are gone."""
    base = ("model=llama3_8b", "peft=lora", "data=synthetic", "data.max_seq_len=4096")
    kw = dict(world_size=1, micro_batch_size=1, activation_checkpointing="offload", activation_checkpointing_every=1,
              liger=True)
    new = plan_memory(compose_job(*base), **kw)
    old = plan_memory(compose_job(*base, "parallel.shard_frozen=true"), **kw)
    saved = (old.comm_buffers - new.comm_buffers) / 2 ** 30
    assert 2.5 < saved < 3.0, saved
    assert new.frozen_weights == old.frozen_weights  # one rank: a shard is the whole tensor either way


def test_bad_value_names_the_key() -> None:
    with pytest.raises(ConfigError, match="parallel.shard_frozen"):
        compose_job(*TINY, "parallel.shard_frozen=sometimes")


@pytest.mark.slow
def test_two_ranks_train_the_same_losses_with_the_base_sharded_or_whole(workdir: Path) -> None:
    """2 gloo ranks, LoRA: the base replicated on each rank (no all-gather of it) trains exactly
    the run whose base FSDP2 shards (the same weights meet the same inputs; only the adapters'
    gradients are reduced either way)."""
    common = ("peft=lora", "launcher.nproc_per_node=2", "train.max_steps=4", "checkpoint.every_steps=0", *LIGHT_EVAL)
    train_ok(*common, run=workdir / "sharded", cwd=workdir)
    train_ok(*common, "parallel.shard_frozen=false", run=workdir / "whole", cwd=workdir)
    want, got = losses(workdir / "sharded"), losses(workdir / "whole")
    assert sorted(got) == [1, 2, 3, 4]
    assert [got[s] for s in sorted(got)] == pytest.approx([want[s] for s in sorted(want)], rel=1e-6)
