"""End to end through the real CLI on the embedded tiny model: FSDP2 over gloo with 2 processes,
LoRA and full fine-tuning, kill -9 and resume, retention, partial checkpoints, resharding,
non-finite steps, W&B offline."""
from __future__ import annotations

import json
import math
import signal
from pathlib import Path

import pytest
import torch

from conftest import LIGHT_EVAL, cli_env, committed_steps, events, explain, losses, records, run_cli, train_ok

pytestmark = pytest.mark.slow  # end to end: the real CLI / multi-rank process groups

TWO_RANK_LORA = ["launcher.nproc_per_node=2", "parallel=fsdp2", "peft=lora", "train.max_steps=12",
                 "checkpoint.every_steps=4", *LIGHT_EVAL]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference: the issue's 2-rank FSDP2 LoRA job, run to the end without interruption."""
    cwd = tmp_path_factory.mktemp("ref")
    train_ok(*TWO_RANK_LORA, run=cwd / "X", cwd=cwd)
    return cwd / "X"


def test_two_rank_lora_run_commits_and_retains(uninterrupted: Path) -> None:
    run = uninterrupted
    assert sorted(losses(run)) == list(range(1, 13))
    assert all(math.isfinite(v) for v in losses(run).values())
    assert committed_steps(run) == [8, 12]  # every 4 steps, keep_last=2 deleted step_4
    meta = json.loads((run / "checkpoints/step_12/meta.json").read_text())
    assert meta["step"] == 12 and meta["world_size"] == 2 and meta["data"]["consumed"] == 12 * 2 * 8
    assert {p.name for p in (run / "checkpoints/step_12").iterdir()} >= {"engine", "meta.json", "rank_0.pt", "rank_1.pt", "config.yaml"}
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".tmp")]
    rec = [r for r in records(run) if "loss" in r][-1]
    for key in ("step", "loss", "lr", "grad_norm", "tokens_per_s", "tokens_per_s_per_gpu", "mfu"):
        assert key in rec, key
    assert [e["step"] for e in events(run, "checkpoint")] == [4, 8, 12]
    assert (run / "logs/rank0.log").is_file() and (run / "logs/rank1.log").is_file()


def test_kill_9_after_checkpoint_then_resume_is_bit_identical(uninterrupted: Path, tmp_path: Path) -> None:
    run = tmp_path / "X"
    # SIGKILL of the whole job (launcher + both ranks) right after step 8 commits.
    p = run_cli("train", *TWO_RANK_LORA, f"run.dir={run}", "debug.kill_at_step=8", cwd=tmp_path, new_session=True)
    assert p.returncode == -signal.SIGKILL, explain(p)
    assert committed_steps(run) == [4, 8]
    # Leftovers of a crash must be ignored: a half-written temp dir and a step dir without meta.json.
    (run / "checkpoints/.tmp-step_9/engine").mkdir(parents=True)
    (run / "checkpoints/step_10").mkdir()
    p = run_cli("train", *TWO_RANK_LORA, f"run.dir={run}", cwd=tmp_path)  # the same command again
    assert p.returncode == 0, explain(p)
    resumed = events(run, "resume")
    assert len(resumed) == 1 and resumed[0]["step"] == 8
    ref, got = losses(uninterrupted), losses(run)
    assert [got[s] for s in range(9, 13)] == [ref[s] for s in range(9, 13)]  # bit-identical on CPU
    assert [got[s] for s in range(1, 9)] == [ref[s] for s in range(1, 9)]
    assert committed_steps(run) == [8, 12]
    assert not (run / "checkpoints/.tmp-step_9").exists()


def test_kill_9_during_save_keeps_last_checkpoint(uninterrupted: Path, tmp_path: Path) -> None:
    run = tmp_path / "X"
    p = run_cli("train", *TWO_RANK_LORA, f"run.dir={run}", "debug.kill_in_save_at_step=8", cwd=tmp_path,
                new_session=True)
    assert p.returncode == -signal.SIGKILL, explain(p)
    assert committed_steps(run) == [4]  # step 8 was fully written but never committed
    assert (run / "checkpoints/.tmp-step_8/meta.json").is_file()
    train_ok(*TWO_RANK_LORA, run=run, cwd=tmp_path)
    assert events(run, "resume")[0]["step"] == 4
    assert committed_steps(run) == [8, 12]
    ref, got = losses(uninterrupted), losses(run)
    assert [got[s] for s in range(5, 13)] == [ref[s] for s in range(5, 13)]  # steps 5-8 re-done identically


def test_full_finetune_resumes_on_fewer_ranks(tmp_path: Path) -> None:
    """2 ranks x micro-batch 4 and 1 rank x micro-batch 8 see the same global batches, so a run
    stopped at step 4 on 2 ranks and continued on 1 rank must log (to float tolerance) the losses
    of an uninterrupted 2-rank run."""
    # fp32: CPU bf16 matmuls of micro-batch 8 and 4 round differently on AMX CPUs (1.2e-4 apart
    # by step 6); this test is about resuming, not bf16.
    common = ["peft=none", "train.max_steps=6", "checkpoint.every_steps=2", "train.grad_clip=1.0",
              "train.dtype=fp32"]
    two = ["launcher.nproc_per_node=2", "train.micro_batch_size=4"]
    ref = tmp_path / "ref"
    p = run_cli("train", *common, *two, f"run.dir={ref}", cwd=tmp_path)
    assert p.returncode == 0, explain(p)
    run = tmp_path / "X"
    # Rank 1 fails at step 5 (after step 4 committed): the run ends non-zero naming the rank.
    p = run_cli("train", *common, *two, f"run.dir={run}", "debug.fail_at_step=5", "debug.fail_rank=1", cwd=tmp_path)
    assert p.returncode == 1, explain(p)
    assert "rank 1" in p.stderr and "InjectedFailure" in p.stderr, p.stderr[-3000:]
    err = (run / "logs/rank1.error").read_text()  # the rank's whole traceback, not just its last line
    assert "Traceback" in err and "InjectedFailure" in err and "ftcluster/train.py" in err, err
    assert committed_steps(run) == [2, 4]
    p = run_cli("train", *common, "launcher.nproc_per_node=1", "train.micro_batch_size=8", f"run.dir={run}", cwd=tmp_path)
    assert p.returncode == 0, explain(p)
    r = events(run, "resume")[0]
    assert r["step"] == 4 and r["world_size"] == 1
    a, b = losses(ref), losses(run)
    for s in (5, 6):
        assert b[s] == pytest.approx(a[s], rel=1e-4), (s, a, b)
    meta = json.loads((run / "checkpoints/step_6/meta.json").read_text())
    assert meta["world_size"] == 1 and meta["data"]["consumed"] == 6 * 8


def test_non_finite_message_names_the_first_bad_step_between_log_points(tmp_path: Path) -> None:
    """log_every=4, a NaN at step 5: noticed at the step-8 log point, reported as step 5 with
    step 5's own (non-finite) loss, not step 8's."""
    run = tmp_path / "X"
    p = run_cli("train", "peft=lora", "train.max_steps=8", "train.log_every=4", "checkpoint.every_steps=100",
                "debug.nan_at_step=5", "debug.nan_rank=0", f"run.dir={run}", cwd=tmp_path)
    assert p.returncode == 1, explain(p)
    assert "non-finite loss or gradient at step 5 (loss=nan" in p.stderr and "noticed after step 8" in p.stderr, \
        p.stderr[-3000:]


def test_non_finite_loss_on_one_rank_stops_all_without_committing(tmp_path: Path) -> None:
    run = tmp_path / "X"
    p = run_cli("train", "launcher.nproc_per_node=2", "peft=lora", "train.max_steps=6", "checkpoint.every_steps=2",
                "debug.nan_at_step=3", "debug.nan_rank=1", f"run.dir={run}", cwd=tmp_path)
    assert p.returncode == 1, explain(p)
    assert "NonFiniteError: non-finite loss or gradient at step 3 (loss=nan" in p.stderr, p.stderr[-3000:]
    # The NaN was injected on rank 1 only; rank 0 stopping on it too shows the ranks agree.
    for r in (0, 1):
        assert "non-finite loss or gradient at step 3" in (run / f"logs/rank{r}.log").read_text(), r
    assert committed_steps(run) == [2]
    assert sorted(losses(run)) == [1, 2]
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    out = tmp_path / "full.pt"
    dcp_to_torch_save(str(run / "checkpoints/step_2/engine"), str(out))
    sd = torch.load(out, weights_only=True)
    tensors = [v for v in _flatten(sd) if torch.is_tensor(v) and v.is_floating_point()]
    assert tensors and all(torch.isfinite(t).all() for t in tensors)


def _flatten(obj):  # type: ignore[no-untyped-def]
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _flatten(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _flatten(v)
    else:
        yield obj


def test_wandb_offline_run_continues_and_holds_no_secret(tmp_path: Path) -> None:
    run = tmp_path / "X"
    secret = "sekrit-0123456789abcdef0123456789abcdef01234567"
    env = cli_env(WANDB_API_KEY=secret, HF_TOKEN=secret + "-hf")
    args = ["logger=wandb", "logger.mode=offline", "logger.project=ftc-test", "logger.tags=[a,b]",
            "checkpoint.every_steps=2", f"run.dir={run}"]
    p = run_cli("train", *args, "train.max_steps=2", cwd=tmp_path, env=env)
    assert p.returncode == 0, explain(p)
    run_id = (run / "wandb_run_id").read_text().strip()
    p = run_cli("train", *args, "train.max_steps=4", cwd=tmp_path, env=env)
    assert p.returncode == 0, explain(p)
    assert (run / "wandb_run_id").read_text().strip() == run_id  # the same W&B run continues
    offline = sorted((run / "wandb").glob("offline-run-*"))
    assert offline and all(d.name.endswith(run_id) for d in offline), offline
    assert any(f.suffix == ".wandb" for d in offline for f in d.iterdir())
    # The console says where the offline run is and how to upload it (issue 16).
    assert f"wandb sync {offline[-1]}" in p.stdout and "  W&B         offline, " in p.stdout, p.stdout[-3000:]
    for f in run.rglob("*"):
        if f.is_file():
            assert secret.encode() not in f.read_bytes(), f"secret leaked into {f}"
    assert secret not in p.stdout + p.stderr
