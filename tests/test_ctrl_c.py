"""Issue 15, item 5: Ctrl-C (SIGINT to the foreground process group) checkpoints at the step
boundary, exits 130, and resume=auto continues with the losses of an uninterrupted run."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import LIGHT_EVAL, cli_env, committed_steps, events, explain, losses, records, train_ok

ARGS = ("train.max_steps=40", "train.log_every=1", "checkpoint.every_steps=0", "launcher.nproc_per_node=1", *LIGHT_EVAL)


@pytest.mark.slow
def test_ctrl_c_checkpoints_exits_130_and_resumes_exactly(tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "ftcluster", "train", *ARGS, f"run.dir={run}"], cwd=tmp_path,
                            env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group, as a terminal's foreground job
    deadline = time.monotonic() + 180
    while not any("loss" in r for r in records(run)):
        assert proc.poll() is None and time.monotonic() < deadline, "no step logged in time"
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C does: every process of the group
    out, err = proc.communicate(timeout=180)
    p = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    assert proc.returncode == 130, explain(p)
    steps = committed_steps(run)
    assert len(steps) == 1 and 1 <= steps[0] < 40, (steps, explain(p))
    assert f"checkpoint saved: {run / 'checkpoints' / f'step_{steps[0]}'}" in err, explain(p)
    assert "Traceback" not in err, explain(p)
    assert max(losses(run)) == steps[0], "stopped at the step it checkpointed"

    train_ok(*ARGS, run=run, cwd=tmp_path)  # resume=auto
    assert events(run, "resume")[-1]["step"] == steps[0]
    ref = tmp_path / "ref"
    train_ok(*ARGS, run=ref, cwd=tmp_path)
    assert losses(run) == losses(ref)
