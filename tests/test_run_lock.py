"""Issue 15, item 4: one run per run dir (launch/lock.py)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import explain, run_cli
from ftcluster.config import ConfigError
from ftcluster.launch.lock import RunDirLock

HOLD = "import sys,time; from ftcluster.launch.lock import RunDirLock; RunDirLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(600)"


def _holder(run_dir: Path) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stdout.readline().strip() == "held"
    return p


def test_second_holder_is_refused_naming_the_first_and_a_dead_holder_is_taken_over(tmp_path: Path) -> None:
    p = _holder(tmp_path)
    try:
        with pytest.raises(ConfigError, match=rf"^run.dir: .* in use by another run \(host \S+, pid {p.pid}, started "):
            RunDirLock(tmp_path).acquire()
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    with RunDirLock(tmp_path):  # the kernel dropped the dead holder's lock: the stale file is taken over
        assert f'"pid": {os.getpid()}' in (tmp_path / ".lock").read_text()
    with RunDirLock(tmp_path):  # released on exit of the block
        pass


@pytest.mark.slow
def test_a_second_run_on_a_busy_run_dir_fails_at_once(tmp_path: Path) -> None:
    run = tmp_path / "run"
    p = _holder(run)
    try:
        t0 = time.monotonic()
        proc = run_cli("train", f"run.dir={run}", "train.max_steps=2", cwd=tmp_path, timeout=120)
        assert proc.returncode == 2, explain(proc)
        assert f"pid {p.pid}" in proc.stderr and "in use by another run" in proc.stderr, explain(proc)
        assert not (run / "config.yaml").exists() and not (run / "metrics.jsonl").exists(), "nothing written"
        assert time.monotonic() - t0 < 60
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
