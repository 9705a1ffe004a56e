"""Evaluation during training: the hold-out split, the sharded eval loss, early stopping, the best
checkpoint, and that evaluating changes nothing about training."""
from __future__ import annotations

import json
import math

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import cli_env, committed_steps, events, explain, losses, run_cli, train_ok
from ftcluster.compose import compose_job
from ftcluster.config import EvalConfig
from ftcluster.data.errors import DataError
from ftcluster.data.holdout import SPLIT_FILE, build_train_and_eval, holdout_indices
from ftcluster.evaluation.evaluator import EvalTracker
from ftcluster.evaluation.loss import EvalBatches

TESTS = Path(__file__).resolve().parent


def _tokenizer(job):  # type: ignore[no-untyped-def]
    from ftcluster.train import _load_tokenizer

    return _load_tokenizer(job)


def _ids(data) -> list[bytes]:  # type: ignore[no-untyped-def]
    return [data[i][0].tobytes() for i in range(len(data))]


# --- the hold-out split ---------------------------------------------------------------------------

def test_holdout_split_is_disjoint_deterministic_and_recorded(tmp_path: Path) -> None:
    job = compose_job("data.eval_path=null", "data.eval_fraction=0.05")
    tok = _tokenizer(job)
    train, held = build_train_and_eval(job.data, tokenizer=tok, seed=0, vocab_size=None, run_dir=tmp_path, is_main=True)
    assert len(held) == 100 and len(train) == 1900
    a, b = _ids(train), _ids(held)
    full = build_train_and_eval(compose_job("data.eval_path=null").data, tokenizer=tok, seed=0, vocab_size=None,
                                run_dir=tmp_path / "none", is_main=True)[0]
    assert sorted(a + b) == sorted(_ids(full))  # the same samples, split
    ti, ei = set(train._samples._indices.tolist()), set(held._samples._indices.tolist())
    assert not ti & ei and ti | ei == set(range(2000))  # every sample in exactly one of the two
    recorded = json.loads((tmp_path / SPLIT_FILE).read_text())
    assert recorded["num_samples"] == 2000 and recorded["eval_indices"] == holdout_indices(n=2000, k=100, seed=0).tolist()
    # Another seed holds out other samples; the same seed (any world size: no rank enters it) the same ones.
    assert holdout_indices(n=2000, k=100, seed=1).tolist() != recorded["eval_indices"]
    # A resumed run reads the record: same samples even if the split function were to change.
    (tmp_path / SPLIT_FILE).write_text(json.dumps({**recorded, "eval_indices": list(range(100))}))
    _, again = build_train_and_eval(job.data, tokenizer=tok, seed=0, vocab_size=None, run_dir=tmp_path, is_main=False)
    assert _ids(again) == _ids(full.subset(np.arange(100)))


def test_holdout_refuses_an_empty_split_a_split_of_everything_and_overlap(tmp_path: Path) -> None:
    tok = _tokenizer(compose_job())
    with pytest.raises(DataError, match="^data.eval_fraction: holds out no sample"):
        build_train_and_eval(compose_job("data.eval_path=null", "data.eval_fraction=0.0001").data, tokenizer=tok,
                             seed=0, vocab_size=None, run_dir=tmp_path, is_main=True)
    with pytest.raises(DataError, match="^data.eval_samples: holds out 2000 of 2000"):
        build_train_and_eval(compose_job("data.eval_path=null", "data.eval_samples=2000").data, tokenizer=tok,
                             seed=0, vocab_size=None, run_dir=tmp_path, is_main=True)
    same = compose_job("data.eval_path=${data.path}").data  # the training file as its own eval set
    with pytest.raises(DataError, match=r"^data.eval_path: 2000 eval sample\(s\) also in the training data, e.g. .*sample_chat.jsonl:1"):
        build_train_and_eval(same, tokenizer=tok, seed=0, vocab_size=None, run_dir=tmp_path, is_main=True)


def test_eval_config_needs_held_out_data() -> None:
    from ftcluster.config import ConfigError

    for key, override in [("checkpoint.keep_best", "checkpoint.keep_best=true"),
                          ("eval.early_stopping.patience", "eval.early_stopping.patience=2")]:
        with pytest.raises(ConfigError, match=f"^{key}: needs held-out data"):
            compose_job("data.eval_path=null", override)
    with pytest.raises(ConfigError, match="^data.eval_path: set one of"):
        compose_job("data.eval_fraction=0.1")  # the default already has an eval file


# --- eval batches and the tracker ---------------------------------------------------------------

@pytest.mark.parametrize("n, world, mb", [(10, 2, 3), (7, 3, 2), (4, 2, 4), (5, 1, 8)])
def test_eval_batches_cover_every_sample_once_with_the_same_count_per_rank(n: int, world: int, mb: int) -> None:
    data = [(np.array([1000 + i, 1, 2]), np.array([False, True, True])) for i in range(n)]
    per_rank = [list(EvalBatches(data, micro_batch_size=mb, max_batches=None, rank=r, world_size=world, pad_id=0,
                                 max_seq_len=16)) for r in range(world)]
    assert len({len(b) for b in per_rank}) == 1  # every rank runs the same number of forwards
    seen = [int(x) for bs in per_rank for b in bs for x in b.input_ids[:, 0] if x >= 1000]
    assert sorted(seen) == [1000 + i for i in range(n)]
    empties = [b for bs in per_rank for b in bs if b.num_supervised == 0]
    assert all(b.num_tokens == 0 for b in empties)
    assert sum(b.num_supervised for bs in per_rank for b in bs) == 2 * n
    capped = EvalBatches(data, micro_batch_size=mb, max_batches=1, rank=0, world_size=world, pad_id=0, max_seq_len=16)
    assert capped.num_batches == 1 and capped.samples_covered() == min(n, world * mb)


def test_tracker_best_min_delta_patience_and_state() -> None:
    cfg = EvalConfig(metric="eval_loss", early_stopping=compose_job().eval.early_stopping.__class__(patience=2, min_delta=0.1))
    t = EvalTracker(cfg=cfg)
    verdicts = [t.update(v, step=s) for s, v in [(0, 5.0), (5, 4.95), (10, 4.0), (15, 4.05), (20, 3.95)]]
    assert [v.improved for v in verdicts] == [True, False, True, False, False]  # 4.95 and 3.95: within min_delta
    assert [v.early_stop for v in verdicts] == [False, False, False, False, True]
    assert (t.best, t.best_step, t.since_best) == (4.0, 10, 2)
    u = EvalTracker(cfg=cfg)
    u.load_state_dict(json.loads(json.dumps(t.state_dict())))
    assert (u.best, u.best_step, u.since_best) == (4.0, 10, 2)
    up = EvalTracker(cfg=EvalConfig(metric="eval_rougeL"))
    assert [up.update(v, step=i).improved for i, v in enumerate([0.2, 0.1, 0.3])] == [True, False, True]
    assert not EvalTracker(cfg=EvalConfig()).update(math.nan, step=0).improved


# --- the eval loss: sharded equals direct ---------------------------------------------------------

EVAL_SCRIPT = r'''
import json, sys
import torch
from ftcluster.distributed import init_distributed, shutdown
from ftcluster.model import build_module, materialize
from ftcluster.parallel import parallelize
from ftcluster.data.holdout import build_train_and_eval
from ftcluster.evaluation.loss import EvalBatches, eval_loss
from ftcluster.train import _load_tokenizer, _pad_id
sys.path.insert(0, sys.argv[1])
from conftest import compose_job, lm_batch

d = init_distributed()
out = {}
for backend in sys.argv[3:]:
    job = compose_job(f"parallel={backend}", "peft=lora", "train.dtype=fp32", f"launcher.nproc_per_node={d.world_size}")
    tok = _load_tokenizer(job)
    _, held = build_train_and_eval(job.data, tokenizer=tok, seed=0, vocab_size=None, run_dir=sys.argv[2], is_main=False)
    built = build_module(job)
    engine = parallelize(built.module, layers=built.layers, job=job, dist=d,
                         materialize=lambda m, dev, view: materialize(m, cfg=job.model, seed=0, device=dev, shard_view=view))
    batches = EvalBatches(held, micro_batch_size=3, max_batches=None, rank=d.rank, world_size=d.world_size,
                          pad_id=_pad_id(tok), max_seq_len=job.data.max_seq_len)
    out[backend] = eval_loss(engine, built.module.objective, batches, device=d.device)["eval_loss"]
if d.rank == 0:
    # The direct computation: one sample at a time, unsharded, no engine, float64 sums.
    job = compose_job("peft=lora", "train.dtype=fp32")
    plain = build_module(job).module
    materialize(plain, cfg=job.model, seed=0, device=torch.device("cpu"))
    plain.eval()
    total = units = 0.0
    with torch.no_grad():
        for i in range(len(held)):
            ids, sup = (torch.as_tensor(x).unsqueeze(0) for x in held[i])
            labels = torch.full_like(ids, -100)
            labels[0, :-1] = torch.where(sup[0, 1:], ids[0, 1:], -100)
            b = lm_batch(ids, labels)
            total += float(plain(b)); units += b.num_supervised
    out["direct"] = total / units
    open(sys.argv[2] + "/out.json", "w").write(json.dumps(out))
shutdown()
'''


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [1, 2])
def test_sharded_eval_loss_equals_a_direct_computation(ranks: int, tmp_path: Path) -> None:
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
                        "--no-python", sys.executable, "-c", EVAL_SCRIPT, str(TESTS), str(tmp_path), "fsdp2", "zero3"],
                       cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, explain(p)
    out = json.loads((tmp_path / "out.json").read_text())
    # The pretrained tiny base on the held-out set: well below an untrained model's ln(1024) = 6.93.
    assert 4 < out["direct"] < math.log(1024) - 1
    for backend in ("fsdp2", "zero3"):
        assert out[backend] == pytest.approx(out["direct"], rel=1e-6, abs=0), backend


# --- through the CLI ------------------------------------------------------------------------------

SHORT = ["train.max_steps=8", "train.micro_batch_size=4", "data.max_seq_len=128", "eval.max_batches=2",
         "eval.micro_batch_size=4"]


def _evals(run: Path) -> list[dict]:
    return events(run, "eval")


@pytest.mark.slow
def test_evaluating_between_steps_leaves_training_bit_identical(tmp_path: Path) -> None:
    """2 ranks, LoRA with dropout: a run evaluating (loss and generation) every 2 steps logs the same
    training losses, bit for bit, as the same run with no eval data at all."""
    common = ["launcher.nproc_per_node=2", "peft=lora", "peft.dropout=0.1", *SHORT, "checkpoint.every_steps=4"]
    train_ok(*common, "eval.every_steps=2", run=tmp_path / "A", cwd=tmp_path)
    train_ok(*common, "data.eval_path=null", "eval.every_steps=0", run=tmp_path / "B", cwd=tmp_path)
    assert [e["step"] for e in _evals(tmp_path / "A")] == [0, 2, 4, 6, 8] and not _evals(tmp_path / "B")
    assert losses(tmp_path / "A") == losses(tmp_path / "B")


@pytest.mark.slow
def test_early_stopping_stops_at_the_right_evaluation_and_resumes_with_its_state(tmp_path: Path) -> None:
    """A learning rate that makes the eval loss rise after step 2: with patience 2 the run stops at
    the second evaluation without improvement, with a committed checkpoint and exit 0; run again,
    it remembers the best value and the count (a fresh tracker would not stop at its first eval)."""
    run = tmp_path / "X"
    # One conversation per row (data.packing=false): the too-high learning rate was calibrated on
    # those batches to make later evaluations worse; packed rows carry ~6x the data per step.
    args = ["peft=none", "data.packing=false", "optim.lr=0.05", "optim.warmup_steps=5", "train.max_steps=16", "eval.every_steps=2",
            "eval.at_start=false", "eval.max_batches=3", "eval.early_stopping.patience=2", "eval.num_prompts=0",
            "checkpoint.every_steps=100", "checkpoint.keep_best=true"]
    p = train_ok(*args, run=run, cwd=tmp_path)
    ev = _evals(run)
    values = [e["eval_loss"] for e in ev]
    # Where the tracker must have stopped: the first eval that is the 2nd in a row without improvement.
    best, since, stop_at = math.inf, 0, None
    for e in ev:
        if e["eval_loss"] < best:
            best, since = e["eval_loss"], 0
        else:
            since += 1
        if since >= 2:
            stop_at = e["step"]
            break
    assert stop_at is not None and stop_at < 16 and ev[-1]["step"] == stop_at, values
    stops = events(run, "early_stop")
    assert len(stops) == 1 and stops[0]["step"] == stop_at and stops[0]["best"] == min(values)
    assert committed_steps(run)[-1] == stop_at and max(losses(run)) == stop_at
    meta = json.loads((run / f"checkpoints/step_{stop_at}/meta.json").read_text())
    assert meta["eval"]["since_best"] == 2 and meta["eval"]["best"] == min(values)
    best_rec = json.loads((run / "best.json").read_text())
    assert best_rec["value"] == min(values) and best_rec["step"] == ev[values.index(min(values))]["step"]
    assert Path(best_rec["checkpoint"]).is_dir()
    assert p.returncode == 0
    # Resume: the saved state says 2 evaluations without improvement, so the next one stops again.
    p2 = train_ok(*args, "eval.early_stopping.patience=3", run=run, cwd=tmp_path)
    stops = events(run, "early_stop")
    assert len(stops) == 2 and stops[1]["step"] == stop_at + 2, explain(p2)


@pytest.mark.slow
def test_keep_best_survives_retention_and_exports(tmp_path: Path) -> None:
    """keep_last=1 with keep_best: the best checkpoint (an early eval) stays while retention deletes
    every other older one; `ftcluster export RUN --best` writes it and transformers loads it."""
    run = tmp_path / "X"
    # One conversation per row (data.packing=false): the too-high learning rate was calibrated on
    # those batches to make later evaluations worse; packed rows carry ~6x the data per step.
    args = ["peft=none", "data.packing=false", "optim.lr=0.05", "optim.warmup_steps=5", "train.max_steps=10", "eval.every_steps=2",
            "eval.at_start=false", "eval.max_batches=3", "eval.num_prompts=0", "checkpoint.every_steps=2",
            "checkpoint.keep_last=1", "checkpoint.keep_best=true"]
    train_ok(*args, run=run, cwd=tmp_path)
    ev = _evals(run)
    best_step = min(ev, key=lambda e: e["eval_loss"])["step"]
    assert best_step < 10  # the learning rate makes later evals worse
    assert committed_steps(run) == sorted({best_step, 10})
    assert json.loads((run / "best.json").read_text())["step"] == best_step
    out = tmp_path / "best"
    p = run_cli("export", str(run), str(out), "--best", "--dtype", "fp32", cwd=tmp_path)
    assert p.returncode == 0 and f"step {best_step}" in p.stdout, explain(p)
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(out).num_parameters() > 0
    p = run_cli("export", str(tmp_path / "nowhere"), str(tmp_path / "o2"), "--best", cwd=tmp_path)
    assert p.returncode == 2 and "best.json" in p.stderr


@pytest.mark.slow
def test_two_rank_zero3_eval_equals_the_same_checkpoint_evaluated_on_one_rank(tmp_path: Path) -> None:
    run = tmp_path / "X"
    args = ["parallel=zero3", "peft=lora", "train.max_steps=10", "eval.every_steps=5", "eval.num_prompts=0",
            "checkpoint.keep_best=true", "checkpoint.every_steps=5", "train.micro_batch_size=4", "data.max_seq_len=128"]
    train_ok("launcher.nproc_per_node=2", *args, run=run, cwd=tmp_path)
    two = {e["step"]: e["eval_loss"] for e in _evals(run)}
    assert sorted(two) == [0, 5, 10] and two[10] < two[0]
    one = tmp_path / "one"
    train_ok("launcher.nproc_per_node=1", *args, "train.grad_accum=2", f"resume={run}/checkpoints/step_10", run=one,
             cwd=tmp_path)
    got = _evals(one)
    assert [e["step"] for e in got] == [10]
    assert got[0]["eval_loss"] == pytest.approx(two[10], rel=1e-6, abs=0)
