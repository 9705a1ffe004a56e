"""The console (issue 16): what a run prints, the noise kept off it, help, errors before launch."""
from __future__ import annotations

import dataclasses
import io
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, explain, run_cli, third_party_lines

def test_third_party_pattern_catches_the_known_noise() -> None:
    noise = [
        "/x/torch/distributed/c10d_logger.py:83: FutureWarning: `torch.distributed.reduce_scatter_tensor` is deprecated.",
        "  warnings.warn(",
        "\x1b[36m(PlacementGroupCleaner pid=9678)\x1b[0m Failed to query Ray Train Controller actor state.",
        "(TrainController pid=9456) [2026-12-01 23:49:53,386 E 9456 9597] core_worker.cc:2465: Actor with class name",
        "Tokenizing:  50%|█████     | 1000/2000 [00:00<00:00, 1937.30 examples/s]",
        "2026-12-01 23:49:25,202\tWARNING authentication_token_setup.py:85 -- Token authentication is enabled",
        "srun: error: node1: task 0: Killed",
    ]
    ours = ["step 5/100: loss 5.9815 lr 3.00e-03 88 tok/s grad_norm 2.249", "checkpoint step 50 saved (0.22 s)",
            "  rank 1: host vm (192.0.2.2), node 0, local rank 1, pid 19354, cpu", "  W&B         off (logger=wandb to log there)"]
    assert third_party_lines("\n".join(noise)) == noise
    assert third_party_lines("\n".join(ours)) == []


# --- Ray's forwarded output --------------------------------------------------------------------


def test_forwarded_filter_keeps_the_workers_lines_and_files_the_rest() -> None:
    from ftcluster.console import ForwardedFilter

    out, log = io.StringIO(), io.StringIO()
    f = ForwardedFilter(out, log=log)
    f.write("ftcluster: launcher=ray: 2 worker(s)\n(RayTrainWorker pid=9712) step 1/10: loss 6.9")
    f.write("204\n\x1b[36m(PlacementGroupCleaner pid=9678)\x1b[0m Failed to query Ray Train Controller actor state.\n")
    f.write("(TrainController pid=9456) [2026-12-01 23:49:53,386 E 9456 9597] core_worker.cc:2465: PreemptionWatcher\n")
    f.write("(RayTrainWorker pid=9712, ip=10.0.0.2) run /x/y")  # no newline yet: held until flush
    assert out.getvalue() == "ftcluster: launcher=ray: 2 worker(s)\nstep 1/10: loss 6.9204\n"
    f.flush()
    assert out.getvalue().endswith("step 1/10: loss 6.9204\nrun /x/y\n")
    assert "Failed to query" in log.getvalue() and "PreemptionWatcher" in log.getvalue()
    assert "Failed to query" not in out.getvalue() and "\x1b" not in out.getvalue()


def test_filter_forwarded_output_restores_the_streams(tmp_path: Path) -> None:
    from ftcluster.console import filter_forwarded_output

    before = sys.stdout, sys.stderr
    with filter_forwarded_output(tmp_path, level="info"):
        assert sys.stdout is not before[0]
        print("(PlacementGroupCleaner pid=1) noise")
    assert (sys.stdout, sys.stderr) == before
    assert "noise" in (tmp_path / "logs/driver.log").read_text()
    with filter_forwarded_output(tmp_path, level="debug"):  # --verbose: nothing filtered
        assert sys.stdout is before[0]


def test_console_every_keeps_a_run_to_about_twenty_lines() -> None:
    from ftcluster.console import console_every

    assert console_every(max_steps=100, log_every=1, level="info") == 5
    assert console_every(max_steps=12, log_every=1, level="info") == 1
    assert console_every(max_steps=1000, log_every=10, level="info") == 50
    assert console_every(max_steps=1000, log_every=7, level="info") == 49  # a multiple of log_every
    assert console_every(max_steps=1000, log_every=3, level="debug") == 3  # --verbose: every logged step


def test_event_lines_are_one_line() -> None:
    from ftcluster.console import event_line

    assert event_line("checkpoint", {"step": 50, "seconds": 0.175}) == "checkpoint step 50 saved (0.17 s)"
    assert event_line("end", {"step": 3}) is None and event_line("start", {"step": 0}) is None
    assert event_line("early_stop", {"step": 7, "metric": "eval_loss"}) == "early_stop at step 7: metric=eval_loss"


def test_third_party_warnings_go_to_the_log_file_only(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import logging
    import warnings

    from ftcluster.console import file_handler, route_third_party

    monkeypatch.setenv("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # route_third_party sets it; restored after
    fh = file_handler(tmp_path / "rank0.log", prefix="rank0")
    try:
        route_third_party(fh, level="info")
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.warn("`is_gradient_checkpointing` is deprecated", FutureWarning)
        logging.getLogger("transformers.modeling_utils").warning("a transformers warning")
        fh.flush()
        err = capsys.readouterr().err
        assert "is_gradient_checkpointing" not in err and "transformers warning" not in err
        text = (tmp_path / "rank0.log").read_text()
        assert "FutureWarning" in text and "a transformers warning" in text
    finally:
        logging.captureWarnings(False)
        for name in ("py.warnings", "transformers"):
            logging.getLogger(name).removeHandler(fh)
            logging.getLogger(name).propagate = True
        fh.close()


# --- help, version, exported modes -------------------------------------------------------------


def test_train_help_explains_every_key_from_the_schema() -> None:
    from ftcluster import config as schema
    from ftcluster.compose import conf_dir
    from ftcluster.help import field_docs, train_help

    text = train_help(conf_dir())
    assert "model.path: Optional[str] = None\n      Local Hugging Face model directory" in text
    assert "train.max_steps: int = 100" in text and "log.level: str = 'info'" in text
    assert "ftcluster train -m" in text and "model=local model.path=/models/" in text  # sweeps, a real model
    assert "peft=longlora | lora | none* | qlora" in text  # options, the default marked
    assert "'data.path=\"" in text  # how to pass a comma-separated list through Hydra
    for cls, prefix in [(schema.TrainConfig, "train."), (schema.ZeroConfig, "parallel."),
                        (schema.SlurmLauncherConfig, "launcher."), (schema.EarlyStoppingConfig, "eval.early_stopping.")]:
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(f.default_factory if callable(f.default_factory) else None):
                continue
            assert docs.get(f.name), f"{cls.__name__}.{f.name} has no docstring"
            assert f"  {prefix}{f.name}: {f.type} = " in text and docs[f.name] in text, f.name


def test_version_and_help_through_main(capsys: pytest.CaptureFixture) -> None:
    from ftcluster.cli import main

    assert main(["--version"]) == 0 and re.fullmatch(r"ftcluster \S+\n", capsys.readouterr().out)
    assert main(["train", "--help"]) == 0 and "== Keys" in capsys.readouterr().out


def test_exported_files_get_the_usual_modes(tmp_path: Path) -> None:
    from ftcluster.export import _usual_modes

    (tmp_path / "sub").mkdir(mode=0o700)
    fd = os.open(tmp_path / "sub" / "model.safetensors", os.O_CREAT | os.O_WRONLY, 0o600)
    os.close(fd)
    (tmp_path / "config.json").write_text("{}")
    umask = os.umask(0o022)
    os.umask(umask)
    _usual_modes(tmp_path)
    assert (tmp_path / "sub/model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask
    assert (tmp_path / "sub").stat().st_mode & 0o777 == 0o777 & ~umask


# --- errors before launch, one exit code (through the real CLI) ---------------------------------


def _timed_cli(*args: str, cwd: Path) -> tuple[subprocess.CompletedProcess, float, float]:
    """(result, wall seconds, CPU seconds of the child): CPU time does not grow when other
    processes share the machine, so the 2 s bound holds on a busy CI host too."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    p = run_cli(*args, cwd=cwd)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return p, wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


@pytest.mark.slow
def test_bad_input_fails_before_any_rank_with_exit_2(tmp_path: Path) -> None:
    run = tmp_path / "r"
    p, wall, cpu = _timed_cli("train", "data=jsonl", f"data.path={tmp_path}/missing.jsonl", f"run.dir={run}", cwd=tmp_path)
    assert p.returncode == 2, explain(p)
    assert f"data.path: no such file or directory: {tmp_path}/missing.jsonl" in p.stderr
    assert cpu < 2.0 and wall < 30, (cpu, wall)  # done when: under 2 s (idle machine: 1.2 s wall)
    assert not run.exists()  # no run dir, so no rank (they log there) ever started
    # A malformed line: named once, as file:line with our 1-based numbering, before launch.
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n\n{"messages": [\n')
    p = run_cli("train", "data=jsonl", f"data.path={bad}", f"run.dir={run}", cwd=tmp_path)
    assert p.returncode == 2 and f"{bad}:3: malformed JSON" in p.stderr, explain(p)
    assert p.stderr.count(f"{bad}:3") == 1 and "row" not in p.stderr and not run.exists()
    # Past the rows the driver reads, the rank finds it: still file:line once, still exit 2.
    rows = [ln for ln in (REPO / "ftcluster/assets/data/sample_chat.jsonl").read_text().splitlines()[:40]]
    rows[20] = '{"messages": [}'
    bad.write_text("\n".join(rows) + "\n")
    p = run_cli("train", "data=jsonl", f"data.path={bad}", f"run.dir={run}", "train.max_steps=1", cwd=tmp_path)
    assert p.returncode == 2 and p.stderr.count(f"{bad}:21: malformed JSON") == 1, explain(p)
    assert "row 20" not in p.stdout + p.stderr
    # Hydra's own compose error is a usage error too.
    p = run_cli("train", "data.pth=1", f"run.dir={run}", cwd=tmp_path)
    assert p.returncode == 2 and "data.pth" in p.stderr + p.stdout, explain(p)


@pytest.mark.slow
def test_default_run_prints_one_screen_and_a_summary_then_nothing_to_do(tmp_path: Path) -> None:
    """`ftcluster train` (the embedded default job, a fresh run dir, output not a terminal): our
    lines only, at most ~40 apart from the step lines, the start block first and the summary last;
    the same command again says there is nothing to do, without starting a rank."""
    run = tmp_path / "runs/default"
    p = run_cli("train", cwd=tmp_path)  # run.dir defaults to runs/default under the cwd
    assert p.returncode == 0, explain(p)
    out = p.stdout + p.stderr
    assert third_party_lines(out) == [], out
    lines = out.splitlines()
    steps = [ln for ln in lines if re.match(r"step \d+/100: loss", ln)]
    assert 15 <= len(steps) <= 22 and steps[-1].startswith("step 100/100"), steps  # ~every 5 steps
    assert len(lines) - len(steps) <= 40, out
    assert lines[1] == "ftcluster train: fresh run" and f"  run dir     {run}" in lines
    assert any(ln.startswith("  data        2,000 samples from ") for ln in lines), out
    # The embedded default packs, and the start block says so with the rows' fill.
    assert any(ln.startswith("  rows        packed: ") and "samples/row" in ln and "fill" in ln for ln in lines), out
    summary = lines[lines.index(f"run {run}"):]
    for row in ("steps            100 (finished)", "train loss ", "eval loss ", "tokens/s ", "MFU ",
                "peak GPU memory ", "wall time ", f"checkpoint       {run}/checkpoints/step_100",
                f"next             ftcluster export {run}/checkpoints/step_100 {run}/export"):
        assert any(ln.startswith("  " + row) for ln in summary), (row, summary)
    assert lines[-1].startswith("ftcluster: done.")
    assert all(len(ln) < 400 for ln in lines)  # nothing padded to a terminal width, nothing wrapped
    p = run_cli("train", cwd=tmp_path)
    assert p.returncode == 0 and p.stdout.startswith(f"ftcluster: nothing to do: {run} is at step 100"), explain(p)
    assert "train.max_steps=200" in p.stdout and "rank" not in p.stdout + p.stderr
