"""launcher=ray, each worker: pre-flight, then train() with its step records mirrored to Ray
Train; the stop reason becomes the worker's outcome, a failure's traceback goes to the run dir."""
from __future__ import annotations

import logging
import os
import queue
import socket
import sys
import threading
import traceback
from pathlib import Path

from ftcluster.config import JobConfig
from ftcluster.launch.ray.preflight import PreflightError, all_gather, check_preflight, collect_facts, write_preflight
from ftcluster.launch.ray.records import read_failures
from ftcluster.launch.runner import append_rank_error, redirect_output, train_rank


def worker_main(config: dict) -> None:
    """Runs on every Ray Train worker (in Ray's training thread). Ray has already initialised the
    torch process group and the torch elastic environment variables; train() joins that group."""
    import ray.train

    job: JobConfig = config["job"]
    run_dir = Path(config["run_dir"])
    rank = ray.train.get_context().get_world_rank()
    _quiet_report_log()
    _enter_driver_cwd(config["driver_cwd"])
    attempt = len(read_failures(run_dir, config["launch_id"])) + 1  # labels logs only
    try:
        facts = collect_facts(job=job, run_dir=run_dir)
        everyone = all_gather(facts)
        problems = check_preflight(everyone, expected_world=config["world_size"], launch_id=config["launch_id"],
                                   gpus_per_worker=config["gpus_per_worker"])
        if problems:
            raise PreflightError("pre-flight failed:\n  " + "\n  ".join(problems))
        if rank == 0:
            write_preflight(run_dir, everyone, config["launch_id"], attempt)
        else:
            # Like launcher=local: rank 0's output reaches the driver's console, the others' go to files.
            redirect_output(run_dir / "logs" / f"rank{rank}.out")
        reporter = _RayReporter(rank=rank)
        code = train_rank(job, run_dir, on_log=reporter)
        if code:
            # A SIGTERM stop (after its checkpoint). Ray Train knows no "stopped" worker: exiting
            # non-zero makes it a worker failure, recorded in rank<r>.error and retried within
            # max_failures (the new group resumes from the checkpoint), as when train() itself
            # raised SystemExit(143). The reporter is not closed: its last round is moot then.
            sys.exit(code)
        reporter.close()
    except BaseException as e:
        _write_error(run_dir, rank, attempt, e)
        raise


def _quiet_report_log() -> None:
    """Ray Train 2.60 logs every report at INFO on the worker's console (its logger is named after
    the module's file, so RunConfig's LoggingConfig does not reach it): one line per step."""
    try:
        from ray.train.v2._internal.execution import context

        context.logger.setLevel(logging.WARNING)
    except (ImportError, AttributeError):
        pass


def _enter_driver_cwd(driver_cwd: str) -> None:
    """Relative paths in the config were validated against the driver's working directory. Use it
    where this node has it (one host, or a shared filesystem); otherwise stay in the worker's own
    working directory (with `ray job submit --working-dir`, the same shipped files)."""
    if os.path.isdir(driver_cwd):
        os.chdir(driver_cwd)


def _write_error(run_dir: Path, rank: int, attempt: int, err: BaseException) -> None:
    """logs/rank<r>.error: this rank's traceback (the driver prints its last line)."""
    text = "".join(traceback.format_exception(type(err), err, err.__traceback__))
    append_rank_error(run_dir, rank, text, header=f"attempt {attempt}, host {socket.gethostname()}, pid {os.getpid()}")


class _RayReporter:
    """train()'s `on_log` observer under Ray: mirrors step records to `ray.train.report` (metrics
    only, no checkpoint) from a background thread, so nothing here ever waits inside a step.

    Two facts of Ray Train V2 shape it. Every worker must call `report` equally often (it is a
    barrier), and the controller takes one report per worker per health-check poll (every 2 s), so
    reporting every step would queue without bound on fast steps. So rank 0 leads: each round it
    takes the newest record it has (older ones are skipped; metrics.jsonl has them all) and
    broadcasts it with `ray.train.collective.broadcast_from_rank_zero`; then every rank reports that
    same record. A round with nothing new (a step longer than 30 s, model loading) only broadcasts,
    which keeps Ray's collective-wait warnings quiet. `close()` reports the final record and stops
    every rank's thread in the same round."""

    HEARTBEAT_S = 30.0

    def __init__(self, *, rank: int) -> None:
        self.rank = rank
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="ftcluster-ray-report", daemon=True)
        self._thread.start()

    def __call__(self, record: dict) -> None:
        if self.rank == 0:  # the others report rank 0's record; they keep nothing
            self._queue.put(_compact(record))

    def _next(self) -> tuple[dict | None, bool]:
        """Rank 0: the newest queued record (waiting up to HEARTBEAT_S for one) and whether close() was called."""
        items = []
        try:
            items.append(self._queue.get(timeout=self.HEARTBEAT_S))
            while True:
                items.append(self._queue.get_nowait())
        except queue.Empty:
            pass
        closing = any(i is None for i in items)
        records = [i for i in items if i is not None]
        return (records[-1] if records else None), closing

    def _run(self) -> None:
        import ray.train
        from ray.train.collective import broadcast_from_rank_zero

        try:
            while True:
                msg = None
                if self.rank == 0:
                    record, closing = self._next()
                    msg = {"record": record, "stop": closing}
                msg = broadcast_from_rank_zero(msg)
                if msg["record"] is not None:
                    ray.train.report(metrics=msg["record"])
                if msg["stop"]:
                    return
        except Exception as e:  # noqa: BLE001 - a failing worker group; Ray reports the real error
            print(f"ftcluster: stopped reporting metrics to Ray Train: {type(e).__name__}: {e}", file=sys.stderr)

    def close(self) -> None:
        """Report the last record (every rank takes part), then stop. Rank 0 decides the round."""
        if self.rank == 0:
            self._queue.put(None)
        self._thread.join(timeout=600)


def _compact(record: dict) -> dict:
    """A step record small enough for broadcast_from_rank_zero (< 1 kB): plain scalars only."""
    return {k: v for k, v in record.items() if isinstance(v, (int, float, str, bool)) or v is None}
