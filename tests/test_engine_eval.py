"""The engine's evaluation forward touches no training state: an evaluation batch run between two
training micro-batches (2 ranks over gloo, FSDP2 and ZeRO-3) leaves every training loss, gradient
norm and final weight bit-identical to a run without it.

LoRA dropout is on (0.1), so an evaluation forward that drew from the dropout RNG, accumulated a
gradient, or counted as a micro-batch (DeepSpeed's accumulation boundary) would change the losses.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import cli_env, explain

SCRIPT = r'''
import json, sys
import torch
from ftcluster.distributed import all_reduce_sum, init_distributed, shutdown
from ftcluster.model import build_module, materialize
from ftcluster.parallel import parallelize
from ftcluster.data import DistributedBatches, build_dataset
from ftcluster.train import _load_tokenizer, _pad_id
sys.path.insert(0, sys.argv[1])
from conftest import compose_job

d = init_distributed()
out = {}
for backend in sys.argv[3:]:
    job = compose_job(f"parallel={backend}", "peft=lora", "peft.dropout=0.1", "train.grad_accum=2",
                      "train.micro_batch_size=2", "data.max_seq_len=64", "launcher.nproc_per_node=2")
    tok = _load_tokenizer(job)
    data = build_dataset(job.data, tokenizer=tok, seed=0, vocab_size=len(tok))
    runs = {}
    for with_eval in (False, True):
        torch.manual_seed(0)
        built = build_module(job)
        engine = parallelize(built.module, layers=built.layers, job=job, dist=d,
                             materialize=lambda m, dev, view: materialize(m, cfg=job.model, seed=0, device=dev,
                                                                          shard_view=view))
        built.module.train()
        torch.manual_seed(1 + d.rank)
        batches = DistributedBatches(data, micro_batch_size=2, rank=d.rank, world_size=d.world_size, seed=0,
                                     shuffle=True, pad_id=_pad_id(tok), max_seq_len=64)
        held_out = DistributedBatches(data, micro_batch_size=2, rank=d.rank, world_size=d.world_size, seed=7,
                                      shuffle=True, pad_id=_pad_id(tok), max_seq_len=64)
        trace = []
        for step in range(1, 5):
            micro = [batches.next_microbatch() for _ in range(2)]
            units = all_reduce_sum(torch.tensor(float(sum(b.num_supervised for b in micro)), dtype=torch.float64))
            scale = (d.world_size / units).float()
            total = torch.zeros(())
            for i, b in enumerate(micro):
                if with_eval and i == 1:  # between the step's two micro-batches
                    ev = engine.eval_forward(held_out.next_microbatch())
                    assert torch.isfinite(ev) and not ev.requires_grad
                loss = engine.forward(b)
                engine.backward(loss * scale, last_micro=i == 1)
                total += loss.detach()
            norm = engine.clip_grad_norm(1.0)
            engine.step(lr=1e-2, skip=torch.tensor(False))
            trace.append([(all_reduce_sum(total) / units).item(), norm.item()])
        weights = [p.detach().double().sum().item() for p in built.module.parameters() if p.requires_grad]
        runs[str(with_eval)] = {"trace": trace, "weights": weights}
    out[backend] = runs
if d.rank == 0:
    open(sys.argv[2], "w").write(json.dumps(out))
shutdown()
'''


@pytest.mark.slow
def test_eval_forward_between_micro_batches_changes_no_training_state(tmp_path: Path) -> None:
    result = tmp_path / "result.json"
    tests_dir = str(Path(__file__).resolve().parent)
    # torchrun's standalone rendezvous picks a free port; --no-python runs `python -c SCRIPT ...`.
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "--no-python", sys.executable, "-c", SCRIPT, tests_dir, str(result), "fsdp2", "zero3"],
                       cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, explain(p)
    out = json.loads(result.read_text())
    for backend in ("fsdp2", "zero3"):
        plain, with_eval = out[backend]["False"], out[backend]["True"]
        assert len(plain["trace"]) == 4 and all(v == v for row in plain["trace"] for v in row)  # finite, not NaN
        assert with_eval["trace"] == plain["trace"], backend  # bit for bit
        assert with_eval["weights"] == plain["weights"], backend


@pytest.mark.slow
def test_fsdp2_deferred_gradient_sync_matches_per_micro_batch_reduction(tmp_path: Path) -> None:
    """parallel.defer_grad_sync=true (what `auto` picks on GPUs for adapter runs): one
    reduce-scatter per step after the last micro-batch. The same sums in another order, so the
    losses equal the per-micro-batch run's (the golden 2-rank LoRA run, grad_accum 2) to float
    rounding (on this CPU run they even agree bit for bit)."""
    from conftest import records, train_ok
    from test_golden import GOLDEN, KILLED

    run = tmp_path / "X"
    train_ok(*KILLED, "parallel.defer_grad_sync=true", "checkpoint.enabled=false", run=run, cwd=tmp_path)
    assert "gradients reduced once per step" in (run / "logs/rank0.log").read_text()
    got = [[r["step"], r["loss"], r["grad_norm"]] for r in records(run) if "loss" in r]
    want = json.loads(GOLDEN.read_text())["lora_fsdp2_2rank_ga2_kill9_resume"]
    assert [g[0] for g in got] == [w[0] for w in want]
    for g, w in zip(got, want):
        assert g[1] == pytest.approx(w[1], rel=1e-5) and g[2] == pytest.approx(w[2], rel=1e-4), (g, w)


DEFER_SCRIPT = r'''
import sys
import torch
from ftcluster.distributed import init_distributed, shutdown
from ftcluster.model import build_module, materialize
from ftcluster.parallel import parallelize
sys.path.insert(0, sys.argv[1])
from conftest import compose_job, lm_batch

d = init_distributed()
for defer in ("true", "false"):
    job = compose_job("peft=lora", "train.grad_accum=2", "launcher.nproc_per_node=2", f"parallel.defer_grad_sync={defer}")
    built = build_module(job)
    engine = parallelize(built.module, layers=built.layers, job=job, dist=d,
                         materialize=lambda m, dev, view: materialize(m, cfg=job.model, seed=0, device=dev, shard_view=view))
    params = [p for p in built.module.parameters() if p.requires_grad]
    ids = torch.randint(6, 1000, (2, 16), generator=torch.Generator().manual_seed(d.rank))
    engine.backward(engine.forward(lm_batch(ids)) / 64, last_micro=False)
    reduced_early = [p.grad is not None for p in params]
    engine.backward(engine.forward(lm_batch(ids)) / 64, last_micro=True)
    assert all(p.grad is not None for p in params)
    # Deferred: no sharded gradient exists before the last micro-batch's reduce-scatter.
    assert (not any(reduced_early)) if defer == "true" else all(reduced_early), (defer, reduced_early[:4])
    print(f"DEFER-OK {defer}", flush=True)
shutdown()
'''


@pytest.mark.slow
def test_fsdp2_deferred_gradient_sync_reduces_only_after_the_last_micro_batch(tmp_path: Path) -> None:
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "--no-python", sys.executable, "-c", DEFER_SCRIPT, str(Path(__file__).resolve().parent)],
                       cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and "DEFER-OK true" in p.stdout and "DEFER-OK false" in p.stdout, explain(p)
