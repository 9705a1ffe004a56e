"""Issue 15, item 6: resume compares the new config with the checkpoint's, before anything starts."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from conftest import committed_steps, explain, run_cli
from ftcluster import driver
from ftcluster.checkpoint import CheckpointManager
from ftcluster.compose import compose_job
from ftcluster.config import ConfigError
from ftcluster.distributed import Dist
from ftcluster.train import resolved_config_yaml

BASE = ("peft=lora", "peft.rank=8")


def _checkpoint(run_dir: Path, *overrides: str) -> None:
    class Engine:
        def save_state(self, directory: Path) -> None:
            directory.mkdir(parents=True)
            torch.save({"w": torch.zeros(1)}, directory / "w.pt")

    job = compose_job(*overrides, f"run.dir={run_dir}")
    CheckpointManager(run_dir, cfg=job.checkpoint, dist_info=Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
                      ).save(step=3, engine=Engine(), state={}, rank_state={}, config_yaml=resolved_config_yaml(job))
    (run_dir / "config.yaml").write_text(resolved_config_yaml(job))


@pytest.mark.parametrize("override, key", [("peft.rank=4", "peft.rank"), ("seed=1", "seed"),
                                           ("data.max_seq_len=128", "data.max_seq_len"),
                                           ("peft.target_modules=[q_proj]", "peft.target_modules")])
def test_frozen_key_is_refused_naming_both_values(tmp_path: Path, override: str, key: str) -> None:
    _checkpoint(tmp_path, *BASE)
    before = (tmp_path / "config.yaml").read_text()
    with pytest.raises(ConfigError, match=rf"^{key}: cannot change on resume .*{key}: .* in the checkpoint, .* now"):
        driver.check_resume_config(compose_job(*BASE, override, f"run.dir={tmp_path}"), tmp_path)
    assert (tmp_path / "config.yaml").read_text() == before


def test_allowed_changes_are_recorded_with_history(tmp_path: Path) -> None:
    _checkpoint(tmp_path, *BASE)
    old_config = (tmp_path / "config.yaml").read_text()
    job = compose_job(*BASE, "optim.lr=1e-3", "train.micro_batch_size=2", "train.grad_accum=4", "train.max_steps=9",
                      f"run.dir={tmp_path}")
    seg = driver.check_resume_config(job, tmp_path)
    assert seg is not None and seg.step == 3
    assert seg.changed["optim.lr"][1] == 1e-3 and seg.changed["train.grad_accum"] == ["auto", 4]
    assert set(seg.changed) == {"optim.lr", "train.micro_batch_size", "train.grad_accum", "train.max_steps"}
    driver.record_resume(tmp_path, seg)
    assert (tmp_path / "config_history" / "1-step_3.yaml").read_text() == old_config
    ev = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert ev[-1]["event"] == "config_change" and ev[-1]["step"] == 3 and ev[-1]["changed"]["train.max_steps"][1] == 9
    assert driver.check_resume_config(compose_job(*BASE, f"run.dir={tmp_path}", "resume=never"), tmp_path) is None


@pytest.mark.slow
def test_changed_peft_rank_fails_in_the_driver_and_keeps_config_yaml(tmp_path: Path) -> None:
    run = tmp_path / "run"
    p = run_cli("train", *BASE, "train.max_steps=2", f"run.dir={run}", cwd=tmp_path)
    assert p.returncode == 0 and committed_steps(run) == [2], explain(p)
    before = (run / "config.yaml").read_text()
    p = run_cli("train", "peft=lora", "peft.rank=4", "train.max_steps=4", f"run.dir={run}", cwd=tmp_path, timeout=120)
    assert p.returncode == 2 and "peft.rank: cannot change on resume" in p.stderr and "8 in the checkpoint, 4 now" in p.stderr, explain(p)
    assert (run / "config.yaml").read_text() == before and not (run / "config_history").exists()
    p = run_cli("train", *BASE, "train.max_steps=3", "optim.lr=1e-3", f"run.dir={run}", cwd=tmp_path)
    assert p.returncode == 0 and committed_steps(run)[-1] == 3, explain(p)
    assert yaml.safe_load((run / "config.yaml").read_text())["optim"]["lr"] == 1e-3
    assert yaml.safe_load((run / "config_history" / "1-step_2.yaml").read_text())["train"]["max_steps"] == 2
