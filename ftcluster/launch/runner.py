"""What every launcher shares: running train() in a rank and turning its stop reason into the
rank's exit code, torch elastic's runner for one host's ranks (launcher=local, and Slurm's torchrun
mode on each node), the per-rank error files, and the per-rank output redirect (also Ray's)."""
from __future__ import annotations

import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

from ftcluster.config import JobConfig
from ftcluster.preemption import INTERRUPTED_EXIT_CODE, TERMINATED_EXIT_CODE, StopReason, exit_code


def train_rank(job: JobConfig, run_dir: Path, *, on_log: Callable[[dict], None] | None = None) -> int:
    """Run train() in this rank; return the exit code its stop reason asks for (0 or 143). The
    caller, a launcher's rank entry, exits with it: library code never ends the process."""
    from ftcluster.train import train

    try:
        reason = train(job, run_dir, on_log=on_log)
    except SystemExit as e:
        # train() from before StopReason: a SIGTERM stop raised SystemExit(143) after its checkpoint.
        if e.code != TERMINATED_EXIT_CODE:
            raise
        reason = StopReason.TERMINATED
    return exit_code(StopReason.FINISHED if reason is None else reason)  # None: a train() that returns nothing


def rank_entry(job: JobConfig, run_dir: str) -> None:
    """Torch elastic's entry in each spawned rank. Ranks other than 0 write stdout/stderr to their
    log file only. A SIGTERM stop exits 143, which `run_elastic` reads as a stop, not a failure."""
    from torch.distributed.elastic.multiprocessing.errors import record

    rank = int(os.environ.get("RANK", "0"))
    if rank != 0:
        redirect_output(Path(run_dir) / "logs" / f"rank{rank}.out")
    # record(): an exception's traceback goes to torch elastic's error file, read by _failure_text.
    code = record(train_rank)(job, Path(run_dir))
    if code:
        sys.exit(code)


def run_elastic(config, job: JobConfig, run_dir: Path, *, where: str) -> int:  # type: ignore[no-untyped-def]
    """Run `rank_entry` on this host's ranks with torch elastic (`config`: a LaunchConfig). A failed
    rank's traceback goes to logs/rank<r>.error (unless the rank already wrote one) and one line per
    failed rank to stderr. Returns the exit code. `where` prefixes messages (e.g. "node x: ")."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch

    # torch elastic's multiprocessing layer logs each failed rank's traceback at ERROR; we write it to
    # logs/rank<r>.error and print one line per failed rank instead. Its agent and rendezvous
    # warnings (the clues when a multi-node start fails) stay on.
    quiet = logging.getLogger("torch.distributed.elastic.multiprocessing")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    stopped = f"ftcluster: {where}stopped by SIGTERM; the newest committed checkpoint is in {run_dir / 'checkpoints'}"
    # Ctrl-C signals the whole foreground process group, ranks included: they checkpoint at the
    # next log point and exit 130 (preemption.py). The agent here must not treat SIGINT as its
    # death signal (it would kill the ranks mid-save), so it handles only the others, and this
    # process waits for the ranks. A second Ctrl-C aborts: the agent stops the ranks at once.
    if hasattr(config, "signals_to_handle"):
        config.signals_to_handle = "SIGTERM,SIGHUP,SIGQUIT"
    previous_int = _install_interrupt_handler(where) if _main_thread() else None
    try:
        elastic_launch(config, rank_entry)(job, str(run_dir))
    except SignalException as e:
        if e.sigval == signal.SIGINT:
            print(f"ftcluster: {where}aborted by a second Ctrl-C; the newest committed checkpoint is in "
                  f"{run_dir / 'checkpoints'}", file=sys.stderr, flush=True)
            return INTERRUPTED_EXIT_CODE
        # This process got SIGTERM too (scancel signals every process of the job; a user may signal
        # only the launcher): torch elastic passed it on to the ranks, which checkpoint and stop
        # (train.py), and waited for them. Not a crash; exit as a process killed by SIGTERM would.
        if e.sigval != signal.SIGTERM:
            raise
        print(stopped, file=sys.stderr, flush=True)
        return TERMINATED_EXIT_CODE
    except ChildFailedError as e:
        codes = {f.exitcode for f in e.failures.values()}
        if INTERRUPTED_EXIT_CODE in codes and codes <= {INTERRUPTED_EXIT_CODE, TERMINATED_EXIT_CODE}:
            print(f"ftcluster: {where}interrupted (Ctrl-C); checkpoint saved: {_newest_checkpoint(run_dir)}",
                  file=sys.stderr, flush=True)
            return INTERRUPTED_EXIT_CODE
        if all(f.exitcode == TERMINATED_EXIT_CODE for f in e.failures.values()):
            # Only the ranks got SIGTERM: they agreed on it, checkpointed and exited 143 on purpose.
            print(stopped, file=sys.stderr, flush=True)
            return TERMINATED_EXIT_CODE
        texts = _report_failed_ranks(e.failures, run_dir=run_dir, where=where)
        return DATA_ERROR_EXIT_CODE if all(is_data_error(t) for t in texts) else 1
    finally:
        quiet.setLevel(level)
        if previous_int is not None:
            signal.signal(signal.SIGINT, previous_int)
    return 0


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _install_interrupt_handler(where: str):  # type: ignore[no-untyped-def]
    """First SIGINT: say so and keep waiting for the ranks' checkpoint; second: abort (raised as
    torch elastic's SignalException, so its agent stops the ranks). Returns the previous handler."""
    from torch.distributed.elastic.multiprocessing.api import SignalException

    def first(signum, frame) -> None:  # type: ignore[no-untyped-def]
        print(f"ftcluster: {where}interrupted: the ranks checkpoint at the next log point; Ctrl-C again to abort",
              file=sys.stderr, flush=True)
        signal.signal(signal.SIGINT, second)

    def second(signum, frame) -> None:  # type: ignore[no-untyped-def]
        raise SignalException(f"Process {os.getpid()} got signal: {signum}", sigval=signal.Signals(signum))

    return signal.signal(signal.SIGINT, first)


def _newest_checkpoint(run_dir: Path) -> str:
    from ftcluster.checkpoint import committed_checkpoints

    c = committed_checkpoints(run_dir)
    return str(c[-1]) if c else f"none committed in {run_dir / 'checkpoints'}"


def _report_failed_ranks(failures: dict, *, run_dir: Path, where: str) -> list[str]:
    """One line per failed rank on stderr; the full traceback in its logs/rank<r>.error. Returns
    each failed rank's error line."""
    print(f"ftcluster: {where}training failed on {len(failures)} rank(s); logs in {run_dir / 'logs'}",
          file=sys.stderr)
    lines = []
    for rank, failure in sorted(failures.items()):
        full = _failure_text(failure)
        append_rank_error(run_dir, rank, full, header=f"{where}pid {failure.pid}")
        lines.append(_last_line(full))
        print(f"  rank {rank}: {lines[-1]}", file=sys.stderr)
    sys.stderr.flush()
    return lines


DATA_ERROR_EXIT_CODE = 2
"""Bad input data found by the ranks (a malformed line past the rows the driver checks): the same
exit code as the driver's config and data errors, not a training failure's 1."""


def is_data_error(error_line: str) -> bool:
    """A rank's error line (`module.Type: message`) is our DataError."""
    return error_line.startswith(("ftcluster.data.errors.DataError:", "DataError:"))


def append_rank_error(run_dir: Path, rank: int, text: str, *, header: str) -> None:
    """Add a failure to logs/rank<r>.error. Appended, under a header with the time: a resumed or
    requeued run reuses its run dir, and each failure's traceback must stay readable."""
    try:
        with open(run_dir / "logs" / f"rank{rank}.error", "a") as f:
            f.write(f"--- {header}, {time.ctime()}\n{text.rstrip()}\n")
    except OSError:
        pass


def _failure_text(failure) -> str:  # type: ignore[no-untyped-def]
    """The rank's error with its traceback, from the error file `record` wrote."""
    msg = failure.message
    # torch elastic's error file: {"message": "<Error: text>", "extraInfo": {"py_callstack": ...}},
    # older versions nest it once more under "message".
    while isinstance(msg, dict):
        extra = msg.get("extraInfo") or {}
        msg = extra.get("py_callstack") or msg.get("message", str(msg))
    text = str(msg).strip()
    if not text or text.startswith("To enable traceback"):
        text = f"exited with code {failure.exitcode} (signal or crash; see the rank's log)"
    return text


def _last_line(text: str) -> str:
    """The error itself: the last non-empty line of a traceback."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return lines[-1].strip() if lines else text


def redirect_output(path: Path) -> None:
    """Send this process's stdout and stderr (file descriptors 1 and 2, so C libraries' output
    too) to `path`, appended: only rank 0 writes to the launcher's console."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
