"""Stop requests: turn a preemption or a termination into a checkpoint at the next step boundary.

Three ways to ask a run to stop, all launcher-agnostic:
  SIGUSR1   preempt: checkpoint, stop cleanly, expect to be resumed (train() returns normally)
  SIGTERM   terminate (scancel, time limit, node failure): best-effort checkpoint, then exit 143
  SIGINT    interrupt (Ctrl-C): checkpoint as for SIGTERM, then exit 130; a second Ctrl-C aborts
  early-stop file  stop early (a sweep scheduler's decision), when $FTCLUSTER_EARLY_STOP_REQUEST
            names a file that exists: checkpoint, an `early_stopped` event, a successful end.
  request file  preempt, when $FTCLUSTER_PREEMPT_REQUEST names a file that exists. Rank 0 alone
            looks (one stat per step). The Slurm batch script creates it when Slurm sends the batch
            shell USR1 (`--signal=B:USR1@N`, `scancel --signal=USR1 --batch`): a file reaches ranks
            that a signal cannot (Ray workers run train() off the main thread, where Python cannot
            install handlers) and signals nothing else (a USR1 kills processes without a handler).

Signal handlers only set a flag. At every log point train() calls `agreed()`: one all-reduce (MAX)
of each rank's request, so every rank stops after the same step, even if only one got the signal.
After the checkpoint commits, rank 0 writes $FTCLUSTER_PREEMPT_SAVED (the step), which the batch
script reads to decide that the job should be requeued.
"""
from __future__ import annotations

import enum
import os
import signal
import threading
from pathlib import Path
from types import FrameType

import torch
import torch.distributed as dist

PREEMPT_REQUEST_ENV = "FTCLUSTER_PREEMPT_REQUEST"
PREEMPT_SAVED_ENV = "FTCLUSTER_PREEMPT_SAVED"
EARLY_STOP_REQUEST_ENV = "FTCLUSTER_EARLY_STOP_REQUEST"

NONE, PREEMPT, TERMINATE, INTERRUPT, EARLY_STOP = 0, 1, 2, 3, 4
"""Requests, ordered: when ranks disagree, the strongest wins. (EARLY_STOP, a sweep scheduler's
request file read by rank 0 alone, is numbered as StopReason.EARLY_STOPPED; every request
checkpoints, and an early stop ends the trial as finished.)"""
REASONS = {PREEMPT: "preempt", TERMINATE: "terminate", INTERRUPT: "interrupt"}
TERMINATED_EXIT_CODE = 128 + signal.SIGTERM
"""Exit status of a run stopped by SIGTERM (after its best-effort checkpoint), as if killed by it."""
INTERRUPTED_EXIT_CODE = 128 + signal.SIGINT
"""Exit status of a run stopped by SIGINT (Ctrl-C), after its checkpoint (130, as a shell reports it)."""

_SIGNALS = {signal.SIGUSR1: PREEMPT, signal.SIGTERM: TERMINATE, signal.SIGINT: INTERRUPT}


class StopReason(enum.IntEnum):
    """Why `train()` returned. Library code never exits the process: the launcher's rank entry
    turns this into the rank's exit code (`exit_code`)."""
    FINISHED = 0
    """Reached train.max_steps."""
    PREEMPTED = PREEMPT
    """SIGUSR1 or the request file: checkpointed, a clean stop; resume=auto continues."""
    TERMINATED = TERMINATE
    """SIGTERM: checkpointed (best effort), exit as if killed by SIGTERM."""
    INTERRUPTED = INTERRUPT
    """SIGINT (Ctrl-C): checkpointed at the step boundary like SIGTERM, exit 130."""
    EARLY_STOPPED = 4
    """eval.early_stopping: the metric stopped improving; checkpointed, a successful run (exit 0)."""


def exit_code(reason: StopReason) -> int:
    """The process exit code a rank reports for a stop reason."""
    return {StopReason.TERMINATED: TERMINATED_EXIT_CODE, StopReason.INTERRUPTED: INTERRUPTED_EXIT_CODE}.get(reason, 0)


class StopRequests:
    """This rank's stop request (signals, request file) and the all-rank agreement on it."""

    def __init__(self, *, is_main: bool) -> None:
        self._request = NONE
        self._is_main = is_main
        self._request_file = os.environ.get(PREEMPT_REQUEST_ENV) or None
        self._early_stop_file = os.environ.get(EARLY_STOP_REQUEST_ENV) or None
        self._previous: dict[int, object] = {}
        # Python runs handlers in the main thread only; elsewhere (Ray Train's training thread)
        # only the request file works.
        if threading.current_thread() is threading.main_thread():
            for sig in _SIGNALS:
                self._previous[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._request = max(self._request, _SIGNALS[signum])  # only a flag: the save happens at a step boundary
        if signum == signal.SIGINT:
            # A second Ctrl-C aborts at once: the default action, which ends the process even
            # inside a collective (a KeyboardInterrupt would wait for it to return).
            signal.signal(signal.SIGINT, signal.SIG_DFL)

    def local(self) -> int:
        if self._request == NONE and self._is_main and self._request_file and os.path.exists(self._request_file):
            self._request = PREEMPT
        if self._request == NONE and self._is_main and self._early_stop_file and os.path.exists(self._early_stop_file):
            self._request = EARLY_STOP
        return self._request

    def agreed(self, device: torch.device) -> torch.Tensor:
        """Collective (every rank, at the same steps): the strongest request of any rank, as a 0-d
        device tensor. No host sync here: the caller reads it with the rest of its logged values."""
        t = torch.tensor(self.local(), dtype=torch.int32).to(device, non_blocking=True)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t

    def acknowledge(self, *, step: int, checkpoint: Path | None) -> None:
        """Rank 0, after a preemption checkpoint committed: tell the job script (it requeues)."""
        path = os.environ.get(PREEMPT_SAVED_ENV)
        if not (self._is_main and path):
            return
        tmp = f"{path}.part"
        with open(tmp, "w") as f:
            f.write(f"step {step} {checkpoint or 'no checkpoint (checkpoint.enabled=false)'}\n")
        os.replace(tmp, path)

    def close(self) -> None:
        """Restore the handlers that were there before."""
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)  # type: ignore[arg-type]
        self._previous.clear()
