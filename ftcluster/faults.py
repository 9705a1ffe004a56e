"""Fault injection for tests (`debug.*`): one object the trainer calls at named points.

Every hook is off by default (0). They exist so the end-to-end tests can make a real run fail in
the ways real runs fail (a crashing rank, a non-finite loss on one rank, `kill -9` of the whole job
after or during a checkpoint) and check that nothing is lost; none of them changes a healthy run.
"""
from __future__ import annotations

import logging
import os
import signal
from pathlib import Path
from typing import Callable

import torch

from ftcluster.config import DebugConfig

log = logging.getLogger("ftcluster")


class InjectedFailure(RuntimeError):
    """Raised by the debug.fail_at_step hook."""


class Faults:
    def __init__(self, cfg: DebugConfig, *, rank: int, run_dir: Path) -> None:
        self.cfg = cfg
        self.rank = rank
        self.run_dir = run_dir

    def loss(self, loss: torch.Tensor, *, step: int) -> torch.Tensor:
        """debug.nan_at_step: rank `nan_rank` makes its loss non-finite at that step."""
        if self.cfg.nan_at_step == step and self.rank == self.cfg.nan_rank:
            return loss * float("nan")
        if self.cfg.sync_at_step == step:
            float(loss)  # debug.sync_at_step: a deliberate host sync, which debug.sync_check must catch
        return loss

    def after_step(self, step: int) -> None:
        """debug.fail_at_step: rank `fail_rank` raises once; a marker in the run dir stops a retry
        from raising again (so recovery can be tested)."""
        if self.cfg.fail_at_step != step or self.rank != self.cfg.fail_rank:
            return
        marker = self.run_dir / f".debug_failed_at_step_{step}"
        if marker.exists():
            return
        marker.write_text(f"rank {self.rank}\n")
        raise InjectedFailure(f"debug.fail_at_step={step}: injected failure on rank {self.rank}")

    def before_commit(self, step: int) -> Callable[[], None] | None:
        """debug.kill_in_save_at_step: the hook the checkpoint manager runs between the last write
        and the commit rename."""
        return kill_job if self.cfg.kill_in_save_at_step == step else None

    def after_save(self, step: int) -> None:
        """debug.kill_at_step: SIGKILL the job right after this step's checkpoint committed."""
        if self.cfg.kill_at_step == step and self.rank == 0:
            kill_job()


def kill_job() -> None:
    """SIGKILL our whole process group (launcher and every local rank), exactly like `kill -9`."""
    log.info("debug: killing the job's process group with SIGKILL")
    os.killpg(os.getpgid(0), signal.SIGKILL)
