"""Issue 15, item 10: config holes, each refused before any process starts, naming the key."""
from __future__ import annotations

from pathlib import Path

import pytest

from ftcluster import driver
from ftcluster.compose import compose_job
from ftcluster.config import ConfigError
from ftcluster.launch import hosts


@pytest.mark.parametrize("override, key", [
    ("+train.foo=1", "train.foo"),
    ("+optim.foo=1", "optim.foo"),
    ("optim.lr=inf", "optim.lr"),
    ("optim.lr=nan", "optim.lr"),
    ("optim.eps=-inf", "optim.eps"),
    ("peft.alpha=inf", "peft.alpha"),
    ("data.path=/no/such/train.jsonl", "data.path"),
    ("data.path=/no/such/*.jsonl", "data.path"),
])
def test_refused_at_compose(override: str, key: str) -> None:
    with pytest.raises(ConfigError) as e:
        compose_job(override)
    assert str(e.value).startswith(f"{key}:"), str(e.value)


def test_non_finite_in_a_free_form_mapping_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"^parallel.deepspeed_overrides.zero_optimization.x: must be a finite"):
        compose_job("parallel=zero2", "+parallel.deepspeed_overrides.zero_optimization.x=inf")


def test_free_form_mappings_stay_open() -> None:
    assert compose_job("launcher=slurm", "+launcher.env.FOO=1").launcher.env == {"FOO": "1"}


def test_too_many_cpu_ranks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hosts, "visible_gpus", lambda: 0)
    with pytest.raises(ConfigError, match=r"^launcher.nproc_per_node: 999 CPU ranks but this host has only"):
        driver.check_environment(compose_job("launcher.nproc_per_node=999"))


@pytest.mark.parametrize("overrides, key", [
    (("debug.fail_at_step=1", "debug.fail_rank=2"), "debug.fail_rank"),
    (("debug.nan_at_step=1", "debug.nan_rank=5"), "debug.nan_rank"),
])
def test_debug_rank_beyond_world_size(monkeypatch: pytest.MonkeyPatch, overrides, key) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(hosts, "visible_gpus", lambda: 0)
    with pytest.raises(ConfigError, match=rf"^{key}: rank \d+ does not exist \(world size 2"):
        driver.check_environment(compose_job("launcher.nproc_per_node=2", *overrides))
    driver.check_environment(compose_job("launcher.nproc_per_node=2", overrides[0], f"{key}=1"))


def test_peft_target_modules_matching_nothing() -> None:
    with pytest.raises(ConfigError, match=r"^peft.target_modules: 'q_prj' match no module .* q_proj"):
        driver.check_peft_targets(compose_job("peft=lora", "peft.target_modules=[q_prj,v_proj]"))
    driver.check_peft_targets(compose_job("peft=lora", "peft.target_modules=[q_proj,v_proj]"))
    driver.check_peft_targets(compose_job("peft=lora"))  # all-linear
