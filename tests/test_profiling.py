"""debug.profile_steps: the profiled steps leave an operator table, a summary and a trace in
<run.dir>/profile/, and profiling does not change training (same losses as a run without it)."""
from __future__ import annotations

import gzip
import json

import pytest
from conftest import losses, train_ok

from ftcluster.profiling import busy_us

BASE = ("train.max_steps=6", "train.log_every=1", "eval.every_steps=0", "eval.at_start=false", "checkpoint.enabled=false",
        "logger=none", "train.dtype=fp32")


@pytest.mark.slow
def test_profiled_steps_write_the_table_summary_and_trace_and_train_the_same(workdir) -> None:
    train_ok(*BASE, run=workdir / "plain", cwd=workdir)
    train_ok(*BASE, "debug.profile_steps=2", "debug.profile_from_step=3", run=workdir / "prof", cwd=workdir)
    assert losses(workdir / "prof") == losses(workdir / "plain")
    out = workdir / "prof" / "profile"
    table = (out / "rank0_ops.txt").read_text()
    assert "aten::mm" in table or "aten::addmm" in table or "aten::bmm" in table, table[:2000]
    summary = json.loads((out / "rank0_summary.json").read_text())
    assert summary["steps"] == [3, 4] and summary["wall_s"] > 0
    assert summary["device_busy_fraction"] is None  # a CPU rank: no device timeline
    assert summary["top_ops"] and all(op["calls"] > 0 for op in summary["top_ops"])
    trace = json.loads(gzip.open(out / "rank0_trace.json.gz").read())
    names = {e.get("name") for e in trace["traceEvents"]}
    assert "aten::mm" in names or "aten::addmm" in names
    assert not (workdir / "plain" / "profile").exists()


def test_busy_time_is_the_union_of_overlapping_intervals() -> None:
    assert busy_us([(0, 10), (5, 15), (20, 30), (21, 22)]) == 25
    assert busy_us([]) == 0


def test_a_profile_window_past_the_last_step_fails_at_compose_naming_the_key() -> None:
    """Steps that never run would leave no profile and no word why: refused before any process."""
    from conftest import compose_job

    with pytest.raises(ValueError, match="debug.profile_from_step"):
        compose_job("train.max_steps=5", "debug.profile_steps=3", "debug.profile_from_step=4")
    compose_job("train.max_steps=6", "debug.profile_steps=3", "debug.profile_from_step=4")  # steps 4-6: fine
