"""launcher=local: `nproc_per_node` ranks on this host through torch's elastic launcher API."""
from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path

from ftcluster.config import JobConfig
from ftcluster.driver import local_world_size


def launch_local(job: JobConfig, run_dir: Path) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    nproc = local_world_size(job.launcher)
    port = job.launcher.master_port
    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=nproc,
        run_id=f"ftcluster-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d", rdzv_endpoint=f"127.0.0.1:{port}",  # port 0: pick a free one
        max_restarts=0, monitor_interval=0.5,
        start_method="spawn", local_addr="127.0.0.1",
    )
    # Ranks share the host's cores: split them rather than oversubscribe (a user's setting wins).
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    print(f"ftcluster: {nproc} rank(s) on this host; run dir {run_dir}", flush=True)
    try:
        elastic_launch(config, rank_entry)(job, str(run_dir))
    except ChildFailedError as e:
        print(f"ftcluster: training failed ({len(e.failures)} rank(s)); logs in {run_dir / 'logs'}", file=sys.stderr)
        for rank, failure in sorted(e.failures.items()):
            print(f"  rank {rank}: {_failure_message(failure)}", file=sys.stderr)
        return 1
    print(f"ftcluster: done. metrics {run_dir / 'metrics.jsonl'}, checkpoints {run_dir / 'checkpoints'}", flush=True)
    return 0


def _failure_message(failure) -> str:  # type: ignore[no-untyped-def]
    msg = failure.message
    if isinstance(msg, dict):  # the error file written by @record
        msg = msg.get("message", msg)
        if isinstance(msg, dict):
            msg = msg.get("message", str(msg))
    text = str(msg).strip()
    if not text or text.startswith("To enable traceback"):
        text = f"exited with code {failure.exitcode} (see the rank's log)"
    # The last line of a traceback is the error itself.
    return text.strip().splitlines()[-1] if "Traceback" in text else text


def rank_entry(job: JobConfig, run_dir: str) -> None:
    """Runs in each spawned rank. Ranks other than 0 write stdout/stderr to their log file only."""
    from torch.distributed.elastic.multiprocessing.errors import record

    rank = int(os.environ.get("RANK", "0"))
    if rank != 0:
        _redirect_output(Path(run_dir) / "logs" / f"rank{rank}.out")
    from ftcluster.train import train

    record(train)(job, Path(run_dir))


def _redirect_output(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
