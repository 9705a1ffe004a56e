"""The `auto` layout (ftcluster/layout.py): what a run trains with when the user sets nothing, and
how explicit values win. Pure logic over composed configs, plus the driver's check before launch
and the event a real run records."""
from __future__ import annotations

import json

import pytest

from conftest import LIGHT_EVAL, compose_job, run_cli
from ftcluster.config import ConfigError
from ftcluster.layout import apply_layout, concrete, global_batch_size, resolve_layout


def _cpu(*overrides: str, world: int = 1):
    return resolve_layout(compose_job(*overrides), world_size=world, device_type="cpu", liger_installed=True)


def test_defaults_on_a_cpu_are_the_old_defaults() -> None:
    lay = _cpu()
    assert (lay.micro_batch_size, lay.grad_accum, lay.activation_checkpointing, lay.liger) == (8, 1, "none", False)
    assert any("liger off" in w for w in lay.why) and any("on a CPU" in w for w in lay.why)
    two = _cpu(world=2)
    assert (two.micro_batch_size, two.grad_accum) == (8, 1)  # 8 per rank, as before auto existed


def test_global_batch_splits_into_micro_batch_and_accumulation() -> None:
    lay = _cpu("train.global_batch_size=32", "train.micro_batch_size=4", world=2)
    assert (lay.micro_batch_size, lay.grad_accum) == (4, 4)  # 32 = 4 x 4 x 2
    lay = _cpu("train.global_batch_size=32", "train.grad_accum=2", world=2)
    assert (lay.micro_batch_size, lay.grad_accum) == (8, 2)
    # tokens: 40,000 tokens of 4,096-token rows -> 10 sequences
    job = compose_job("train.global_batch_tokens=40000", "data.max_seq_len=4096")
    assert global_batch_size(job, world_size=1) == 10
    assert _cpu("train.grad_accum=4").micro_batch_size == 8  # accumulation alone keeps micro-batches of 8


def test_explicit_values_win_and_booleans_mean_full_or_none() -> None:
    lay = _cpu("train.activation_checkpointing=true", "model.liger=false", "train.micro_batch_size=2", "train.grad_accum=3")
    assert (lay.micro_batch_size, lay.grad_accum, lay.activation_checkpointing, lay.liger) == (2, 3, "full", False)
    assert lay.why == ()  # nothing was chosen for the user
    assert _cpu("train.activation_checkpointing=false").activation_checkpointing == "none"
    sel = _cpu("train.activation_checkpointing=selective", "train.activation_checkpointing_every=3")
    assert (sel.activation_checkpointing, sel.activation_checkpointing_every) == ("selective", 3)


@pytest.mark.parametrize("overrides, world, key", [
    (("train.global_batch_size=3",), 2, "train.global_batch_size"),
    (("train.global_batch_size=8", "train.micro_batch_size=3"), 1, "train.micro_batch_size"),
    (("train.global_batch_size=8", "train.micro_batch_size=2", "train.grad_accum=2"), 1, "train.grad_accum"),
    (("train.global_batch_size=8", "train.grad_accum=3"), 1, "train.grad_accum"),
])
def test_contradictions_name_the_key(overrides: tuple[str, ...], world: int, key: str) -> None:
    with pytest.raises(ConfigError) as e:
        _cpu(*overrides, world=world)
    assert str(e.value).startswith(key + ":"), str(e.value)


@pytest.mark.parametrize("override, key", [("train.activation_checkpointing=sometimes", "train.activation_checkpointing"),
                                           ("model.liger=maybe", "model.liger"), ("train.micro_batch_size=0", "train.micro_batch_size"),
                                           ("train.memory_budget_gib=0", "train.memory_budget_gib")])
def test_bad_values_fail_at_compose(override: str, key: str) -> None:
    with pytest.raises(ConfigError) as e:
        compose_job(override)
    assert str(e.value).startswith(key + ":"), str(e.value)


def test_apply_layout_copies_and_concrete_leaves_no_auto() -> None:
    job = compose_job()
    lay = _cpu()
    applied = apply_layout(job, lay)
    assert job.train.micro_batch_size == "auto" and applied.train.micro_batch_size == 8  # the original is untouched
    c = concrete(job)
    assert (c.train.micro_batch_size, c.train.grad_accum, c.train.activation_checkpointing, c.model.liger) == (8, 1, "none", "false")


def test_driver_refuses_a_batch_that_does_not_split_before_any_process(tmp_path) -> None:
    p = run_cli("train", f"run.dir={tmp_path / 'r'}", "launcher.nproc_per_node=2", "train.global_batch_size=3", cwd=tmp_path)
    assert p.returncode == 2 and "train.global_batch_size: 3 sequences do not split evenly over 2 ranks" in p.stderr, p.stderr
    assert not (tmp_path / "r" / "logs").exists()  # nothing started


def test_a_run_records_and_prints_its_layout(tmp_path) -> None:
    run = tmp_path / "r"
    p = run_cli("train", f"run.dir={run}", "train.max_steps=2", "eval.every_steps=0", *LIGHT_EVAL,
                "train.global_batch_size=4", "checkpoint.enabled=false", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    ev = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"layout"' in line]
    assert len(ev) == 1 and ev[0]["micro_batch_size"] == 4 and ev[0]["grad_accum"] == 1
    assert ev[0]["activation_checkpointing"] == "none" and ev[0]["liger"] is False
    assert "memory      micro-batch 4 x accumulation 1, activation checkpointing none, liger off" in p.stdout, p.stdout


@pytest.mark.parametrize("overrides, on, why", [
    (("peft=lora",), True, "fused LoRA on"),
    (("peft=qlora",), True, "fused LoRA on"),
    (("peft=lora", "peft.dropout=0.1"), False, "peft.dropout=0.1"),
    (("peft=lora", "parallel=zero3"), False, "parallel=zero3"),
    (("peft=lora", "peft.fused=false"), False, None),
    (("peft=none",), False, None),
])
def test_fused_lora_auto_is_on_for_gpu_ranks_where_it_applies(overrides: tuple[str, ...], on: bool, why) -> None:  # type: ignore[no-untyped-def]
    """peft.fused=auto on CUDA ranks (planned against a budget, no GPU needed): on unless dropout
    or ZeRO-3 rule it out, and the layout says which; explicit false and peft=none stay off."""
    job = compose_job(*overrides, "train.memory_budget_gib=40")
    lay = resolve_layout(job, world_size=1, device_type="cuda", liger_installed=False)
    assert lay.fused is on
    lines = [w for w in lay.why if w.startswith("fused LoRA")]
    assert (lines == []) if why is None else (len(lines) == 1 and why in lines[0]), lay.why
    assert apply_layout(job, lay).peft.fused == str(on).lower()
    cpu = resolve_layout(job, world_size=1, device_type="cpu", liger_installed=False)
    assert cpu.fused is False  # CPU ranks: peft's forward (the goldens' path)
