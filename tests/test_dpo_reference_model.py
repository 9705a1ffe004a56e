"""objective.reference=model: DPO's reference as a frozen sharded copy of the model (full fine-tuning).

Config checks and the frozen copy's DeepSpeed config are pure logic; end to end through the real
CLI on the embedded tiny model (a 64-pair slice of the preference demo, to keep the runs short):
the same losses as the precomputed reference (1 rank, fp32; FSDP2, and ZeRO-2's stage-0 copy), and 2-rank FSDP2 and ZeRO-3 runs
whose step-1 loss is log 2 (policy == reference), the FSDP2 one killed with -9 and resumed with
the reference rebuilt from the model's weights (nothing of it in the checkpoint)."""
from __future__ import annotations

import math
import signal
from pathlib import Path

import pytest

from conftest import compose_job, events, explain, losses, run_cli, train_ok

from ftcluster.compose import ASSETS_DIR
from ftcluster.config import ConfigError


def test_reference_model_is_for_full_fine_tuning_and_names_the_key() -> None:
    job = compose_job("objective=dpo", "objective.reference=model")
    assert job.objective.reference_source(job.peft.method) == "model"
    assert compose_job("objective=dpo", "objective.reference=model", "objective.loss=simpo") \
        .objective.reference_source("none") == "none"  # reference-free: no copy is built
    with pytest.raises(ConfigError, match=r"^objective.reference: model .*peft=lora use adapters"):
        compose_job("objective=dpo", "peft=lora", "objective.reference=model")


def test_frozen_copy_deepspeed_config_has_no_optimizer_and_zero3_only_partitions() -> None:
    """As TRL's prepare_deepspeed: no optimizer; ZeRO-3 stays stage 3 (the copy is partitioned),
    ZeRO-1/2 become stage 0 (they partition only optimizer state and gradients: none here)."""
    from ftcluster.parallel.deepspeed import build_ds_config, build_frozen_ds_config

    for backend, stage in [("zero1", 0), ("zero2", 0), ("zero3", 3)]:
        job = compose_job("objective=dpo", f"parallel={backend}", "parallel.zero_optimizer=deepspeed",
                          "parallel.cpu_offload=true")
        cfg = build_frozen_ds_config(job)
        assert "optimizer" not in cfg and cfg["zero_optimization"]["stage"] == stage, backend
        assert "offload_optimizer" not in cfg["zero_optimization"]
        assert "optimizer" in build_ds_config(job)  # the trained copy's config is untouched
    z3 = build_frozen_ds_config(compose_job("objective=dpo", "parallel=zero3"))["zero_optimization"]
    assert z3["stage3_param_persistence_threshold"] == compose_job("parallel=zero3").parallel.stage3_param_persistence_threshold


def _small_demo(tmp_path: Path) -> list[str]:
    """The first 64 training and 16 held-out pairs of the demo: the precomputed pass and the
    evaluations stay short; the model and its weights are the embedded ones."""
    data = ASSETS_DIR / "data"
    for name, n in [("sample_preferences.jsonl", 64), ("sample_preferences_eval.jsonl", 16)]:
        lines = (data / name).read_text().splitlines()[:n]
        (tmp_path / name).write_text("\n".join(lines) + "\n")
    return [f"data.path={tmp_path / 'sample_preferences.jsonl'}",
            f"data.eval_path={tmp_path / 'sample_preferences_eval.jsonl'}"]


COMMON = ["objective=dpo", "peft=none", "train.dtype=fp32", "eval.max_batches=1", "eval.at_start=false"]


def _checkpoint_names(run: Path, step: int) -> set[str]:
    from ftcluster.parallel.fsdp import CheckpointReader

    return set(CheckpointReader(run / f"checkpoints/step_{step}/engine").names())


@pytest.mark.slow
def test_reference_model_gives_the_precomputed_reference_losses(tmp_path: Path) -> None:
    """1 rank, fp32, full fine-tune, 4 steps: the frozen copy (run before every forward, in the
    training batches' shapes) gives the losses and held-out loss of the reference precomputed in
    one pass before step 1; it writes no reference file and adds nothing to the checkpoint. ZeRO-2
    (the copy at DeepSpeed stage 0) gives them too, to fp32 rounding across backends."""
    args = [*COMMON, *_small_demo(tmp_path), "train.max_steps=4", "eval.every_steps=4", "checkpoint.every_steps=4"]
    runs = {ref: tmp_path / ref for ref in ("precompute", "model")}
    for ref, run in runs.items():
        train_ok(*args, f"objective.reference={ref}", run=run, cwd=tmp_path)
    a, b = losses(runs["precompute"]), losses(runs["model"])
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for s in a:
        assert b[s] == pytest.approx(a[s], abs=1e-6), (s, a, b)
    assert a[1] == pytest.approx(math.log(2), abs=1e-6) and a[4] < a[1] - 0.01  # it trains
    ea, eb = events(runs["precompute"], "eval")[-1], events(runs["model"], "eval")[-1]
    assert eb["eval_loss"] == pytest.approx(ea["eval_loss"], abs=1e-6)
    assert eb["eval_rewards/margin"] == pytest.approx(ea["eval_rewards/margin"], abs=1e-5)
    assert (runs["precompute"] / "reference_logps.train.safetensors").is_file()
    assert not list(runs["model"].glob("reference_logps.*")) and not events(runs["model"], "reference")
    assert _checkpoint_names(runs["model"], 4) == _checkpoint_names(runs["precompute"], 4)
    # ZeRO-2: the frozen copy through deepspeed.initialize at stage 0 (replicated, no optimizer).
    zero2 = tmp_path / "zero2"
    train_ok(*args, "objective.reference=model", "parallel=zero2", "checkpoint.enabled=false", run=zero2, cwd=tmp_path)
    c = losses(zero2)
    assert c[1] == pytest.approx(math.log(2), abs=1e-6)
    for s in a:
        assert c[s] == pytest.approx(a[s], abs=1e-5), (s, a, c)  # another backend: fp32 rounding apart


@pytest.mark.slow
def test_reference_model_on_two_ranks_fsdp2_and_zero3(tmp_path: Path) -> None:
    """2 ranks through the real CLI: FSDP2 (fully_shard of the frozen copy) killed with -9 after
    step 2 and resumed, and ZeRO-3 (deepspeed.initialize of the copy without an optimizer, still
    partitioned). Step 1's loss is log 2 on both (policy == reference); the resumed FSDP2 run's
    step 3 matches ZeRO-3's uninterrupted one, so the reference after resume is again the untrained
    model (rebuilt from its weights), and the checkpoint holds one copy of the model, not two."""
    args = [*COMMON, *_small_demo(tmp_path), "objective.reference=model", "launcher.nproc_per_node=2",
            "train.micro_batch_size=4", "train.max_steps=3", "eval.every_steps=3"]
    fsdp = [*args, "parallel=fsdp2", "checkpoint.every_steps=2"]
    run = tmp_path / "fsdp2"
    p = run_cli("train", *fsdp, f"run.dir={run}", "debug.kill_at_step=2", cwd=tmp_path, new_session=True)
    assert p.returncode == -signal.SIGKILL, explain(p)
    train_ok(*fsdp, run=run, cwd=tmp_path)
    assert events(run, "resume")[0]["step"] == 2
    zero3 = tmp_path / "zero3"
    train_ok(*args, "parallel=zero3", "checkpoint.enabled=false", run=zero3, cwd=tmp_path)
    a, b = losses(run), losses(zero3)
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for got in (a, b):
        assert got[1] == pytest.approx(math.log(2), abs=1e-6)
        assert got[3] < got[1] - 0.01
    assert a[3] == pytest.approx(b[3], abs=1e-5)  # the two backends agree to fp32 rounding
    names = _checkpoint_names(run, 2)
    assert len(names) == 39 and not any("reference" in n for n in names)  # the tiny Llama's tensors, once
    for r in (run, zero3):
        assert not list(r.glob("reference_logps.*"))
        assert math.isfinite(events(r, "eval")[-1]["eval_loss"])
