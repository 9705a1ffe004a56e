"""One run per run dir: an exclusive `fcntl.flock` on `<run.dir>/.lock` for the whole run.

Taken by the process that owns the run, never by ranks: the driver (launcher=local and ray, from
before anything is written to the run dir until the launcher returns), and inside a Slurm
allocation the job entry (`launch/slurm_job.py`, on the job's first node only) for the job's
duration; the submitting driver holds it only while it renders and submits. A requeued Slurm job is
a new job entry process, which takes the lock afresh; torch elastic ranks never touch it, so
nothing can deadlock on it.

The kernel drops an flock when its holder exits, however it exits (kill -9 included): a holder
that died leaves only a stale file, whose next run takes the lock over and rewrites it. The file
says who holds it (host, pid, start time) so a refused second run can name the holder.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from ftcluster.config import ConfigError

LOCK_NAME = ".lock"


class RunDirLock:
    """`with RunDirLock(run_dir):` holds the run dir for the block, or raises ConfigError at once
    (no waiting) naming the run that holds it."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self, *, wait_s: float = 0.0) -> "RunDirLock":
        """Take the lock, or raise ConfigError naming the holder. `wait_s`: keep trying that long
        first (the Slurm job entry: the driver that submitted it may still be releasing it)."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                return self._try()
            except ConfigError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.5)

    def _try(self) -> "RunDirLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(os.read(fd, 4096))
            os.close(fd)
            raise ConfigError(f"run.dir: {self.path.parent} is in use by another run ({holder}); wait for it to "
                              "finish, stop it, or use another run.dir") from None
        except BaseException:
            os.close(fd)
            raise
        # Ours now (a stale file of a dead holder is simply overwritten).
        info = {"host": socket.gethostname(), "pid": os.getpid(),
                "start": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "slurm_job": os.environ.get("SLURM_JOB_ID")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunDirLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _describe(raw: bytes) -> str:
    try:
        info = json.loads(raw.decode() or "{}")
    except (UnicodeDecodeError, json.JSONDecodeError):
        info = {}
    if not info:
        return "holder unknown: it is still writing the lock file"
    job = f", Slurm job {info['slurm_job']}" if info.get("slurm_job") else ""
    return f"host {info.get('host')}, pid {info.get('pid')}, started {info.get('start')}{job}"
