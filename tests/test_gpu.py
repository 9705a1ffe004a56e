"""GPU-only checks, run on the GPU machine (`python -m pytest -q -m gpu tests/test_gpu.py`; the
results are recorded in bench/RESULTS.md, Issue 18). Skipped where there is no CUDA device: a skip
here is not a pass, the device run is.

No host sync in the step: `debug.sync_check=true` runs every step after the first two under
`torch.cuda.set_sync_debug_mode("error")` (ftcluster/trainer.py), so a `.item()`, a blocking copy
or a data-dependent shape anywhere in forward, backward, clipping or the optimizer step raises.
Log points (every 4 steps here) sync by design, outside the checked block."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import cli_env, run_cli

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

BASE = ("train.max_steps=10", "train.log_every=4", "debug.sync_check=true", "eval.every_steps=0", "eval.at_start=false",
        "checkpoint.enabled=false")


@pytest.mark.parametrize("overrides", [
    (),                                                          # the embedded default: packed rows (flex attention), auto layout
    ("model.liger=false",),                                      # the same without any Liger kernel
    ("peft=lora", "data.packing=false"),                         # padded rows, LoRA
    ("peft=lora", "train.activation_checkpointing=full"),
    ("peft=lora", "train.activation_checkpointing=selective"),
    ("peft=lora", "train.activation_checkpointing=offload"),
    ("peft=qlora", "train.activation_checkpointing=full"),
    ("peft=lora", "peft.fp8_base=true"),                         # the FP8 base (its per-token scales stay on the device)
], ids=["default", "default-noliger", "lora-padded", "lora-full", "lora-selective", "lora-offload", "qlora-full", "lora-fp8"])
def test_no_host_sync_inside_training_steps(tmp_path, overrides: tuple[str, ...]) -> None:
    env = cli_env()
    env.pop("DS_ACCELERATOR", None)
    run = tmp_path / "r"
    p = run_cli("train", f"run.dir={run}", *BASE, *overrides, cwd=tmp_path, env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if "loss" in r] == [4, 8, 10]  # steps 3-10 ran under the check
    assert next(r for r in recs if r.get("event") == "layout")["liger"] in (True, False)


def test_the_check_catches_a_host_sync(tmp_path) -> None:
    """The same check fails a run whose step reads the loss on the host (debug.sync_at_step)."""
    env = cli_env()
    env.pop("DS_ACCELERATOR", None)
    # The default job (Liger on): our loss head has no sync of its own, so the one caught is this one.
    p = run_cli("train", f"run.dir={tmp_path / 'r'}", *BASE, "debug.sync_at_step=5", cwd=tmp_path, env=env)
    assert p.returncode != 0 and "synchronizing" in (p.stdout + p.stderr), p.stdout[-2000:] + p.stderr[-2000:]
