"""launcher=ray, what Ray Train itself saw, kept in the run dir: the controller's record of each
worker-group failure and of the step reports it received (`RunRecorder`), read back by the driver
and the workers; and the one-line error texts the console shows, root causes first."""
from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

from ray.train import UserCallback  # the package sets Ray Train's environment defaults first


FAILURES_FILE = "ray_failures.jsonl"
"""<run.dir>/logs/ray_failures.jsonl: one line per worker-group failure, written by the controller."""


def read_failures(run_dir: Path, launch_id: str) -> list[dict]:
    path = run_dir / "logs" / FAILURES_FILE
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("launch_id") == launch_id:
            out.append(rec)
    return out


REPORTS_FILE = "ray_reports.json"
"""<run.dir>/logs/ray_reports.json: how many step reports Ray Train's controller received, and the last."""


def read_reports(run_dir: Path, launch_id: str) -> dict:
    try:
        rec = json.loads((run_dir / "logs" / REPORTS_FILE).read_text())
    except (OSError, ValueError):
        return {"reports": 0, "last": None}
    return rec if rec.get("launch_id") == launch_id else {"reports": 0, "last": None}


class RunRecorder(UserCallback):
    """Runs in the Ray Train controller (on the driver's node). Records what Ray Train itself saw:
    the step reports it received (logs/ray_reports.json; Ray Train V2 keeps metrics only with
    checkpoints, and ours never go to Ray) and each worker-group failure, whether Ray restarts the
    group or gives up (logs/ray_failures.jsonl, and a line on the console)."""

    def __init__(self, *, run_dir: str, launch_id: str, max_failures: int) -> None:
        self.run_dir = Path(run_dir)
        self.launch_id = launch_id
        self.max_failures = max_failures
        self.reports = 0

    def after_report(self, run_context: Any, metrics: list[dict], checkpoint: Any) -> None:
        try:
            self.reports += 1
            path = self.run_dir / "logs" / REPORTS_FILE
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"launch_id": self.launch_id, "reports": self.reports,
                                       "last": metrics[0] if metrics else None}) + "\n")
            os.replace(tmp, path)
        except Exception:  # noqa: BLE001 - bookkeeping must never break Ray Train
            pass

    def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
        try:  # bookkeeping must never break Ray Train's failure handling
            errors = {int(r): one_line(e) for r, e in worker_exceptions.items()}
            n = len(read_failures(self.run_dir, self.launch_id)) + 1
            retry = self.max_failures < 0 or n <= self.max_failures
            rec = {"launch_id": self.launch_id, "failure": n, "time": time.time(), "restart": retry,
                   "errors": {str(r): m for r, m in errors.items()}}
            with open(self.run_dir / "logs" / FAILURES_FILE, "a") as f:
                f.write(json.dumps(rec) + "\n")
            limit = "unlimited" if self.max_failures < 0 else self.max_failures
            what = f"restarting the worker group (restart {n} of {limit})" if retry else "no restarts left"
            print("ftcluster: worker group failed: " + causes_first(errors)
                  + f"; {what}", flush=True)
        except Exception as e:  # noqa: BLE001
            print(f"ftcluster: could not record a worker failure: {e}", file=sys.stderr)


_COLLATERAL = re.compile(r"gloo|NCCL|Connection (reset|closed)|ProcessGroup|DistBackendError|Broken pipe", re.I)


def is_collateral(line: str) -> bool:
    """A collective failing because a peer went away (not the root cause)."""
    return bool(_COLLATERAL.search(line))


def causes_first(errors: dict) -> str:
    """`rank r: error; ...`, root causes before collateral collective failures."""
    items = sorted(((int(r), m) for r, m in errors.items()), key=lambda rm: (is_collateral(rm[1]), rm[0]))
    return "; ".join(f"rank {r}: {m}" for r, m in items)


def one_line(err: BaseException) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    return f"{type(err).__name__}: {lines[0] if lines else ''}"[:400]
