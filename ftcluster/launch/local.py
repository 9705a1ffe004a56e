"""launcher=local: `nproc_per_node` ranks on this host through torch's elastic launcher API."""
from __future__ import annotations

import os
import uuid
from pathlib import Path

from ftcluster.config import ConfigError, JobConfig, LocalLauncherConfig
from ftcluster.launch import hosts
from ftcluster.launch.runner import run_elastic


def check(job: JobConfig) -> None:
    """Checks that need this host (not just the config), before the run dir or any process exists."""
    launcher: LocalLauncherConfig = job.launcher
    gpus = hosts.visible_gpus()
    n = hosts.local_world_size(launcher)
    if gpus and n > gpus:
        raise ConfigError(f"launcher.nproc_per_node: {n} ranks but only {gpus} visible GPUs on this host")
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if not gpus and n > cpus:
        # CPU ranks beyond the cores only thrash (each rank holds a model copy's worth of memory).
        raise ConfigError(f"launcher.nproc_per_node: {n} CPU ranks but this host has only {cpus} CPU cores "
                          "available to this process")
    check_debug_ranks(job, world_size=n)
    if job.parallel.cpu_offload and job.parallel.backend == "fsdp2" and not gpus:  # ZeRO offload runs on CPU ranks
        raise ConfigError("parallel.cpu_offload: needs GPUs (FSDP2 offloads from an accelerator; on a CPU-only "
                          "host the parameters already live in host memory)")


def check_debug_ranks(job: JobConfig, *, world_size: int) -> None:
    """A debug hook aimed at a rank that does not exist would never fire (the test it serves would
    pass for the wrong reason). Only where the world size is known in the driver."""
    d = job.debug
    for step_key, rank_key in (("fail_at_step", "fail_rank"), ("nan_at_step", "nan_rank")):
        rank = getattr(d, rank_key)
        if getattr(d, step_key) and not 0 <= rank < world_size:
            raise ConfigError(f"debug.{rank_key}: rank {rank} does not exist (world size {world_size}, ranks "
                              f"0..{world_size - 1}); debug.{step_key}={getattr(d, step_key)} would never fire")


def launch_local(job: JobConfig, run_dir: Path) -> int:
    from torch.distributed.launcher.api import LaunchConfig

    nproc = hosts.local_world_size(job.launcher)
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
    code = run_elastic(config, job, run_dir, where="")
    if code == 0:
        print(f"ftcluster: done. metrics {run_dir / 'metrics.jsonl'}, checkpoints {run_dir / 'checkpoints'}", flush=True)
    return code
