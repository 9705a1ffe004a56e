"""The run summary and its picture, from hand-written metrics.jsonl files (values worked out by hand)
and from a real run through the CLI."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from conftest import run_cli, train_ok
from ftcluster.report import ReportError, draw, summarize, write_summary


def _write(run: Path, lines: list[dict | str]) -> None:
    run.mkdir(parents=True, exist_ok=True)
    (run / "metrics.jsonl").write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))


def _step(s: int, loss: float, tps: float = 100.0) -> dict:
    return {"step": s, "loss": loss, "lr": 1e-4, "grad_norm": 1.0, "tokens_per_s": tps, "tokens_per_s_per_gpu": tps / 2,
            "mfu": None, "tokens_seen": s * 10}


def _resumed_run(run: Path) -> None:
    """Two segments: steps 1-3 (start at t=100, preempted at t=130), resume at t=200 re-doing step 3,
    steps 3-4, end at t=220; evals at steps 2 and 4."""
    _write(run, [
        {"event": "start", "step": 0, "world_size": 2, "time": 100.0},
        _step(1, 5.0), _step(2, 4.0),
        {"event": "eval", "step": 2, "eval_loss": 4.5, "eval_ppl": 90.0, "eval_tokens_per_s": 1.0, "eval_samples": 4,
         "eval_tokens": 40, "time": 120.0},
        _step(3, 3.9),
        {"event": "preempted", "step": 3, "time": 130.0},
        {"event": "resume", "step": 2, "world_size": 2, "time": 200.0},
        _step(3, 3.5), _step(4, 3.0),
        {"event": "eval", "step": 4, "eval_loss": 3.2, "eval_ppl": 24.5, "eval_tokens_per_s": 1.0, "eval_samples": 4,
         "eval_tokens": 40, "time": 215.0},
        {"event": "end", "step": 4, "tokens_seen": 40, "time": 220.0},
    ])


def test_summary_of_a_resumed_run_with_evals(tmp_path: Path) -> None:
    _resumed_run(tmp_path)
    s = summarize(tmp_path)
    assert s["steps"] == 4 and s["tokens_seen"] == 40 and s["world_size"] == 2
    assert s["train_loss"]["first"] == 5.0 and s["train_loss"]["last"] == 3.0
    ev = s["eval"]["eval_loss"]
    assert (ev["first"], ev["last"]) == (4.5, 3.2) and ev["best"] == 3.2 and ev["best_step"] == 4
    assert s["wall_time_s"] == pytest.approx(30.0 + 20.0)  # two segments, the gap between them not counted
    assert s["mfu"] is None and s["peak_mem_gib"] is None  # CPU records
    assert not s["early_stopped"]
    written = write_summary(tmp_path)
    assert json.loads((tmp_path / "summary.json").read_text()) == json.loads(json.dumps(written))


def test_a_step_logged_twice_keeps_the_last_value(tmp_path: Path) -> None:
    _resumed_run(tmp_path)
    from ftcluster.report import load_run

    steps = {r["step"]: r["loss"] for r in load_run(tmp_path).step_records()}
    assert steps == {1: 5.0, 2: 4.0, 3: 3.5, 4: 3.0}


def test_no_eval_and_bad_files_name_the_line(tmp_path: Path) -> None:
    _write(tmp_path / "a", [{"event": "start", "step": 0, "world_size": 1, "time": 0.0}, _step(1, 2.0),
                            {"event": "end", "step": 1, "time": 5.0}])
    s = summarize(tmp_path / "a")
    assert s["steps"] == 1 and not s["eval"] and s["wall_time_s"] == pytest.approx(5.0)
    _write(tmp_path / "b", [_step(1, 2.0), "{not json", _step(2, 1.0)])
    with pytest.raises(ReportError, match=r"metrics.jsonl:2"):
        summarize(tmp_path / "b")
    with pytest.raises(ReportError, match="metrics.jsonl"):
        summarize(tmp_path / "missing")


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def test_draw_writes_a_png_also_for_a_one_step_run(tmp_path: Path) -> None:
    _resumed_run(tmp_path / "r")
    w, h = _png_size(draw(tmp_path / "r"))
    assert w >= 800 and h >= 500
    _write(tmp_path / "one", [{"event": "start", "step": 0, "world_size": 1, "time": 0.0}, _step(1, 2.0)])
    assert _png_size(draw(tmp_path / "one", tmp_path / "one.png"))[0] >= 800


@pytest.mark.slow
def test_report_command_on_a_real_run(tmp_path: Path) -> None:
    run = tmp_path / "X"
    train_ok("train.max_steps=6", "checkpoint.every_steps=3", "eval.every_steps=3", "eval.max_batches=2", run=run,
             cwd=tmp_path)
    assert (run / "summary.json").is_file() and (run / "report.png").is_file()  # written at the end of the run
    (run / "summary.json").unlink()
    p = run_cli("report", str(run), cwd=tmp_path)
    assert p.returncode == 0 and "report.png" in p.stdout and "train loss" in p.stdout, p.stderr
    s = json.loads((run / "summary.json").read_text())
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line and '"event"' not in line]
    assert s["train_loss"]["first"] == losses[0] and s["train_loss"]["last"] == losses[-1]
    assert [e for e in (run / "samples.jsonl").read_text().splitlines()]  # generation samples were written
    empty = tmp_path / "empty"
    empty.mkdir()
    p = run_cli("report", str(empty), cwd=tmp_path)
    assert p.returncode == 2 and "metrics.jsonl" in p.stderr
