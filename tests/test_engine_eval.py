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
