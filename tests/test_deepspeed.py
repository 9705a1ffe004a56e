"""DeepSpeed ZeRO behind the parallelize seam: real DeepSpeed on CPU (DS_ACCELERATOR=cpu, set by
conftest.cli_env), 2 ranks over gloo, through the real CLI on the embedded tiny model.

Runs are few and each serves several assertions (a loaded 2-core box): the issue's ZeRO-3 LoRA job
(reference), the same job killed with SIGKILL after its step-8 checkpoint and started again, then
continued on 1 rank; FSDP2 runs of the same jobs for step-1 parity; full fine-tuning on ZeRO-2 and
ZeRO-3 with CPU offload at grad_accum=2 against FSDP2."""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import (cli_env, committed_steps, compose_job, events, explain, losses, records, run_cli,
                      third_party_lines, train_ok)
from ftcluster.config import ConfigError

ZERO3_LORA = ["launcher.nproc_per_node=2", "parallel=zero3", "peft=lora", "train.max_steps=12",
              "checkpoint.every_steps=4"]
# Full fine-tuning with accumulation: 2 ranks x 2 micro-batches x 4 samples. Only the step records
# are compared, so one held-out batch at the end and no generated samples (the default, every held-out
# batch at the start and at the end and two 64-token samples, was half of the ZeRO-3 offload run's
# time after start-up: 5.5 s of its training phase against 3 s, with a busy 2-core box for the latter).
FULL_GA2 = ["launcher.nproc_per_node=2", "peft=none", "train.max_steps=2", "train.grad_accum=2",
            "train.micro_batch_size=4", "checkpoint.enabled=false", "eval.at_start=false", "eval.max_batches=1",
            "eval.num_prompts=0"]


def step_records(run: Path) -> dict[int, dict]:
    return {r["step"]: r for r in records(run) if "loss" in r}


@pytest.fixture(scope="module")
def zero3_reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The issue's job, uninterrupted: ZeRO-3, LoRA, 2 ranks, 12 steps, a checkpoint every 4."""
    cwd = tmp_path_factory.mktemp("zero3_ref")
    p = train_ok(*ZERO3_LORA, run=cwd / "X", cwd=cwd)
    (cwd / "console.txt").write_text(p.stdout + p.stderr)  # for the quiet-console test
    return cwd / "X"


@pytest.mark.slow
def test_zero3_two_rank_console_has_no_third_party_line(zero3_reference: Path) -> None:
    """A healthy ZeRO-3 run prints only our lines (issue 16); DeepSpeed's and torch's warnings
    (42 FutureWarnings before) are kept in the ranks' logs, not lost."""
    out = (zero3_reference.parent / "console.txt").read_text()
    assert third_party_lines(out) == [], out[-4000:]
    assert "ftcluster train: fresh run" in out and "  steps            12 (finished)" in out
    assert "FutureWarning" in (zero3_reference / "logs/rank0.log").read_text()


@pytest.mark.slow
def test_zero3_lora_kill9_resume_identical_then_continue_on_one_rank(zero3_reference: Path, tmp_path: Path) -> None:
    ref = losses(zero3_reference)
    assert sorted(ref) == list(range(1, 13)) and all(math.isfinite(v) for v in ref.values())
    assert committed_steps(zero3_reference) == [8, 12]
    # The embedded model's 4 decoder layers are DeepSpeed leaf modules (one gather per layer).
    assert "ZeRO-3: parameters gathered per decoder layer (4 layers)" in (zero3_reference / "logs/rank0.log").read_text()

    # The control for the 1-rank continuation below (the same checkpoint continued on 2 ranks, a
    # copy of the reference) needs nothing of this run: it trains meanwhile.
    two = tmp_path / "two"
    shutil.copytree(zero3_reference, two)
    longer = [a for a in ZERO3_LORA if not a.startswith("train.max_steps")] + ["train.max_steps=14"]
    control_log = tmp_path / "control.txt"
    with open(control_log, "w") as log:
        control = subprocess.Popen([sys.executable, "-m", "ftcluster", "train", *longer, f"run.dir={two}"],
                                   cwd=tmp_path, env=cli_env(), stdout=log, stderr=subprocess.STDOUT)
    try:
        _kill9_and_resume(zero3_reference, tmp_path, ref)
        assert control.wait(timeout=600) == 0, control_log.read_text()[-4000:]
    finally:
        if control.poll() is None:
            control.kill()
    run = tmp_path / "X"

    # The 2-rank checkpoint continues on 1 rank, to a larger max_steps: converted to DeepSpeed's
    # universal format on the fly (no manual step). grad_accum=2 keeps the global batch (16 samples),
    # so steps 13-14 must match the same checkpoint continued on 2 ranks (a copy of the reference).
    one = [a for a in longer if not a.startswith("launcher.")] + ["launcher.nproc_per_node=1", "train.grad_accum=2"]
    train_ok(*one, run=run, cwd=tmp_path)
    r = events(run, "resume")[-1]
    assert r["step"] == 12 and r["world_size"] == 1
    got, want = losses(run), losses(two)
    assert [got[s] for s in (13, 14)] == pytest.approx([want[s] for s in (13, 14)], rel=1e-4)
    assert got[13] != got[12]  # it trained on, not replayed
    assert committed_steps(run) == [12, 14]
    assert json.loads((run / "checkpoints/step_14/meta.json").read_text())["world_size"] == 1
    assert (run / "checkpoints/step_12/engine/universal/ds").is_dir()


def _kill9_and_resume(zero3_reference: Path, tmp_path: Path, ref: dict[int, float]) -> None:
    """The issue's job SIGKILLed (launcher and both ranks) after its step-8 checkpoint, then the same
    command again: steps 9-12 are the uninterrupted run's, bit for bit."""
    run = tmp_path / "X"
    args = [sys.executable, "-m", "ftcluster", "train", *ZERO3_LORA, f"run.dir={run}"]
    proc = subprocess.Popen(args, cwd=tmp_path, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.monotonic() + 400
    while not (run / "checkpoints/step_8/meta.json").is_file():
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:] if proc.stdout else ""
        assert time.monotonic() < deadline, "no step-8 checkpoint in time"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks, at once
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert committed_steps(run)[-1] == 8, committed_steps(run)
    engine_dir = run / "checkpoints/step_8/engine"
    assert (engine_dir / "ds_meta.json").is_file() and any((engine_dir / "ds").glob("*optim_states.pt"))

    p = run_cli("train", *ZERO3_LORA, f"run.dir={run}", cwd=tmp_path)  # the same command again
    assert p.returncode == 0, explain(p)
    resumed = events(run, "resume")
    assert len(resumed) == 1 and resumed[0]["step"] == 8 and resumed[0]["world_size"] == 2
    got = losses(run)
    assert [got[s] for s in range(9, 13)] == [ref[s] for s in range(9, 13)]  # bit-identical on CPU
    assert committed_steps(run) == [8, 12]


@pytest.mark.slow
def test_step1_parity_with_fsdp2_lora_zero2_and_zero3(zero3_reference: Path, tmp_path: Path) -> None:
    """Same seed => same initial weights and step-1 loss (1e-4 relative) on FSDP2, ZeRO-2 and ZeRO-3."""
    base = [a for a in ZERO3_LORA if not a.startswith(("parallel=", "train.max_steps", "checkpoint."))]
    runs = {}
    for backend, steps in (("fsdp2", 1), ("zero2", 2)):
        runs[backend] = tmp_path / backend
        p = run_cli("train", *base, f"parallel={backend}", f"train.max_steps={steps}", "checkpoint.enabled=false",
                    f"run.dir={runs[backend]}", cwd=tmp_path)
        assert p.returncode == 0, explain(p)
    fsdp, z2, z3 = step_records(runs["fsdp2"]), step_records(runs["zero2"]), step_records(zero3_reference)
    for other in (z2, z3):
        assert other[1]["loss"] == pytest.approx(fsdp[1]["loss"], rel=1e-4)
        assert other[1]["grad_norm"] == pytest.approx(fsdp[1]["grad_norm"], rel=1e-4)
    # ZeRO-2 and ZeRO-3 after one update (warm-up learning rate, independent of max_steps).
    assert z2[2]["loss"] == pytest.approx(z3[2]["loss"], rel=1e-4)


@pytest.mark.slow
def test_full_finetune_zero2_and_zero3_offload_match_fsdp2_with_accumulation(tmp_path: Path) -> None:
    """grad_accum=2: the loop's token weighting spans micro-batches, so DeepSpeed must not divide by
    the accumulation steps again; the step-1 gradient norm and the step-2 loss show it."""
    runs = {}
    # zero3_offload also takes DeepSpeed's per-submodule gathering (the LoRA reference job takes the
    # default, per decoder layer): both must train like FSDP2.
    extra = {"zero3_offload": ["parallel.stage3_gather_per_layer=false"]}
    for backend in ("fsdp2", "zero2", "zero3_offload"):
        runs[backend] = tmp_path / backend
        p = run_cli("train", *FULL_GA2, f"parallel={backend}", *extra.get(backend, []), f"run.dir={runs[backend]}",
                    cwd=tmp_path)
        assert p.returncode == 0, explain(p)
    fsdp = step_records(runs["fsdp2"])
    for backend in ("zero2", "zero3_offload"):
        got = step_records(runs[backend])
        assert got[1]["loss"] == pytest.approx(fsdp[1]["loss"], rel=1e-4), backend
        assert got[1]["grad_norm"] == pytest.approx(fsdp[1]["grad_norm"], rel=1e-4), backend
        assert got[2]["loss"] == pytest.approx(fsdp[2]["loss"], rel=1e-4), backend
    assert "ZeRO-3: parameters gathered per submodule" in (runs["zero3_offload"] / "logs/rank0.log").read_text()


@pytest.mark.slow
def test_bad_override_fails_before_start_naming_the_key(tmp_path: Path) -> None:
    run = tmp_path / "X"
    p = run_cli("train", "launcher.nproc_per_node=2", "parallel=zero3",
                "+parallel.deepspeed_overrides.zero_optimization.stage3_prefetch_bucket_sise=1000", f"run.dir={run}",
                cwd=tmp_path)
    assert p.returncode == 2, explain(p)
    assert "parallel.deepspeed_overrides.zero_optimization.stage3_prefetch_bucket_sise" in p.stderr, p.stderr
    assert not run.exists()  # failed in the driver: no run dir, no process


# --- no processes: config validation, errors -----------------------------------------------------

_job = compose_job


@pytest.mark.parametrize("override, key", [
    ("+parallel.deepspeed_overrides.bogus_top_level=1", "parallel.deepspeed_overrides.bogus_top_level"),
    ("+parallel.deepspeed_overrides.gradient_clipping=2.0", "parallel.deepspeed_overrides.gradient_clipping"),
    ("+parallel.deepspeed_overrides.zero_optimization.offload_param={device:cpu}",
     "parallel.deepspeed_overrides.zero_optimization.offload_param.device"),
    ("+parallel.deepspeed_overrides.zero_optimization.sub_group_size=lots",
     "parallel.deepspeed_overrides.zero_optimization.sub_group_size"),
])
def test_overrides_validated_by_deepspeed_naming_the_key(override: str, key: str) -> None:
    from ftcluster.config import ConfigError

    with pytest.raises(ConfigError) as e:
        _job("parallel=zero3", override)
    assert str(e.value).startswith(key + ":"), str(e.value)


def test_generated_config_and_accepted_override() -> None:
    from ftcluster.layout import concrete
    from ftcluster.parallel.deepspeed import build_ds_config

    j = _job("parallel=zero3_offload", "train.grad_accum=4", "train.grad_clip=0.5",
             "+parallel.deepspeed_overrides.zero_optimization.sub_group_size=100000000")
    assert j.parallel.backend == "zero3" and j.parallel.cpu_offload
    c = build_ds_config(concrete(j))  # train.micro_batch_size=auto resolved as on a CPU: 8 per micro-batch
    z = c["zero_optimization"]
    assert (c["gradient_accumulation_steps"], c["gradient_clipping"], c["train_micro_batch_size_per_gpu"]) == (4, 0.5, 8)
    assert c["bf16"]["enabled"] and c["communication_data_type"] == "fp32" and c["data_types"]["grad_accum_dtype"] == "fp32"
    assert z["stage"] == 3 and z["offload_param"]["device"] == "cpu" and z["offload_optimizer"]["device"] == "cpu"
    assert z["sub_group_size"] == 100_000_000 and z["overlap_comm"] and z["stage3_prefetch_bucket_size"] == 50_000_000
    assert "optimizer" not in c  # torch AdamW, given to DeepSpeed as the client optimizer
    # FSDP2 has no such key: its schema refuses it at compose.
    with pytest.raises(ConfigError, match=r"^parallel.deepspeed_overrides:"):
        _job("parallel=fsdp2", "+parallel.deepspeed_overrides.steps_per_print=10")


def test_op_that_cannot_compile_says_what_to_install_or_set(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """DeepSpeed's real op builder, with a compiler that does not work (and no cached build)."""
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setenv("CXX", "/bin/false")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "torch_extensions"))
    from deepspeed.ops.op_builder.cpu import FusedAdamBuilder

    from ftcluster.parallel.deepspeed import OpBuildError, explain_op_build_failures

    with pytest.raises(OpBuildError) as e:
        with explain_op_build_failures():
            FusedAdamBuilder().load()
    msg = str(e.value)
    assert "'fused_adam'" in msg and "parallel.zero_optimizer=torch" in msg and "TORCH_CUDA_ARCH_LIST=9.0" in msg
    assert "\n" not in msg  # one line: the launcher prints it per failed rank


SKIP_SCRIPT = r'''
import sys, torch
from hydra import compose, initialize_config_dir
from ftcluster.compose import conf_dir, register_configs, to_job
from ftcluster.distributed import init_distributed, shutdown
from ftcluster.data import Batch
from ftcluster.model import build_module, materialize
from ftcluster.parallel import parallelize

register_configs()
d = init_distributed()
for backend in sys.argv[1:]:  # one process group, one engine after the other
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        job = to_job(compose("config", overrides=["parallel=" + backend, "peft=none", "launcher.nproc_per_node=1"]))
    built = build_module(job)
    engine = parallelize(built.module, layers=built.layers, job=job, dist=d,
                         materialize=lambda m, dev, view: materialize(m, cfg=job.model, seed=0, device=dev, shard_view=view))
    ids = torch.randint(0, 1000, (2, 16))
    batch = Batch(input_ids=ids, labels=ids, num_tokens=32, num_supervised=32)

    def state():
        opt = engine.ds.optimizer
        flat = getattr(opt, "fp32_partitioned_groups_flat", None) or opt.single_partition_of_fp32_groups
        moments = [v for s in engine.inner.state.values() for v in s.values()]
        return [t.detach().clone() for t in [*flat, *moments]]

    def step(scale, skip):
        engine.backward(engine.forward(batch) * scale, last_micro=True)
        norm = engine.clip_grad_norm(1.0)
        engine.step(lr=1e-3, skip=torch.tensor(skip))
        return norm

    step(1 / 32, False)  # creates the optimizer state
    before = state()
    nan_norm = step(float("nan"), True)  # non-finite gradients
    finite_norm = step(1 / 32, True)  # finite gradients, skipped because the loop says so
    after = state()
    assert not torch.isfinite(nan_norm) and torch.isfinite(finite_norm), (nan_norm, finite_norm)
    assert all(torch.equal(a, b) for a, b in zip(before, after)), "a skipped step changed weights or optimizer state"
    step(1 / 32, False)
    assert not all(torch.equal(a, b) for a, b in zip(after, state())), "a good step must update"
    print("SKIP-OK", backend)
shutdown()
'''


def test_skipped_step_changes_no_weight_and_no_optimizer_state(tmp_path: Path) -> None:
    """One rank, in a fresh process: the device-side skip (fused AdamW's found_inf) under ZeRO-2
    (the only guard there) and ZeRO-3 (which also skips non-finite gradients itself)."""
    p = subprocess.run([sys.executable, "-c", SKIP_SCRIPT, "zero2", "zero3"], cwd=tmp_path, env=cli_env(),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and "SKIP-OK zero2" in p.stdout and "SKIP-OK zero3" in p.stdout, explain(p)
