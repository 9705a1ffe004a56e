"""`debug.profile_steps`: torch.profiler over a few training steps, written next to the run.

Where the time of a step goes (which kernels, and whether the GPU waits on the host) is the first
question of any speed work, and the answer has to come from the real job, not a copy of it. The
profiler runs from `debug.profile_from_step` for `debug.profile_steps` steps (only the steps: log,
eval and save points between them are excluded) and each rank writes into <run.dir>/profile/:

- `rank<r>_ops.txt`: torch.profiler's operator table, sorted by device time (CPU time on a CPU
  rank), 40 rows;
- `rank<r>_summary.json`: wall time of the profiled steps, the device's busy time (the union of its
  kernel and copy intervals) and their ratio: well below 1 means the step waits on the host
  (launch-bound, or a sync);
- `rank<r>_trace.json.gz`: the Chrome/Perfetto trace (open in https://ui.perfetto.dev).
"""
from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path
from typing import Any, Iterator

import torch

log = logging.getLogger("ftcluster")


def busy_us(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals (microseconds): kernels on several streams
    overlap, so summing their durations would overstate how busy the device was."""
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if s > end:
            total += e - s
            end = e
        elif e > end:
            total += e - end
            end = e
    return total


class StepProfiler:
    """`with profiler.step(step):` around each training step; a no-op unless debug.profile_steps."""

    def __init__(self, *, first: int, count: int, out_dir: Path, rank: int, device_type: str) -> None:
        self.first, self.last = first, first + count - 1
        self.out_dir, self.rank, self.device_type = out_dir, rank, device_type
        self._prof: Any = None
        self._wall = 0.0

    @property
    def enabled(self) -> bool:
        return self.last >= self.first

    @contextlib.contextmanager
    def step(self, step: int) -> Iterator[None]:
        if not self.enabled or not self.first <= step <= self.last:
            yield
            return
        from torch.profiler import ProfilerActivity, profile

        if self._prof is None:
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device_type == "cuda" else [])
            self._prof = profile(activities=acts, record_shapes=False, with_stack=False)
            self._prof.__enter__()
        else:
            self._prof.toggle_collection_dynamic(True, self._prof.activities)
        t = time.perf_counter()
        try:
            yield
        finally:
            self._synchronize()  # the step's kernels belong to this window; a profiled step may sync
            self._wall += time.perf_counter() - t
            if step == self.last:
                self._finish()
            else:
                self._prof.toggle_collection_dynamic(False, self._prof.activities)

    def _synchronize(self) -> None:
        if self.device_type == "cuda":
            torch.cuda.synchronize()

    def _finish(self) -> None:
        prof, self._prof = self._prof, None
        prof.__exit__(None, None, None)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        on_gpu = self.device_type == "cuda"
        events = prof.key_averages()
        sort = "self_device_time_total" if on_gpu else "self_cpu_time_total"
        (self.out_dir / f"rank{self.rank}_ops.txt").write_text(events.table(sort_by=sort, row_limit=40) + "\n")
        spans = [(e.time_range.start, e.time_range.end) for e in prof.events()
                 if on_gpu and e.device_type == torch.autograd.DeviceType.CUDA]
        wall_us = self._wall * 1e6
        busy = busy_us(spans) if on_gpu else None
        summary = {"steps": [self.first, self.last], "wall_s": round(self._wall, 4),
                   "device_busy_s": None if busy is None else round(busy / 1e6, 4),
                   "device_busy_fraction": None if busy is None else round(busy / wall_us, 4),
                   "top_ops": [{"name": e.key, "self_time_ms": round(_self_time(e, on_gpu) / 1e3, 3), "calls": e.count}
                               for e in sorted(events, key=lambda e: -_self_time(e, on_gpu))[:15]]}
        (self.out_dir / f"rank{self.rank}_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        prof.export_chrome_trace(str(self.out_dir / f"rank{self.rank}_trace.json.gz"))  # torch gzips a .gz path
        log.info("debug.profile_steps: steps %d-%d profiled into %s (device busy %s of the wall time)",
                 self.first, self.last, self.out_dir,
                 "-" if busy is None else f"{busy / wall_us:.0%}")


def _self_time(e: Any, on_gpu: bool) -> float:
    return float(e.self_device_time_total if on_gpu else e.self_cpu_time_total)
