"""What runs inside a Slurm allocation (called by the rendered batch script, not by users).

It loads the resolved config saved at submission (<run.dir>/slurm/submit-<n>/config.yaml), types
and validates it again, and runs it: the config is never composed again, so the job runs exactly
what was submitted, in the run dir the driver resolved.

    python -m ftcluster.launch.slurm_job torchrun CONFIG --run-dir DIR --nnodes N \\
        --rdzv-endpoint HOST:PORT --rdzv-id ID        (one per node, under srun)
    python -m ftcluster.launch.slurm_job ray CONFIG --run-dir DIR --address HOST:PORT \\
        --nodes N --wait-s S                          (once, in the batch shell on the first node)

Exit status: 0 when training finished or stopped cleanly for preemption (the batch script tells the
two apart by $FTCLUSTER_PREEMPT_SAVED and requeues), non-zero when it failed.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path


from ftcluster.compose import load_saved_job
from ftcluster.config import ConfigError, JobConfig, RayLauncherConfig, SlurmLauncherConfig
from ftcluster.preemption import PREEMPT_SAVED_ENV

SHUTDOWN_S = 600
"""torch elastic agent: how long to wait for ranks to exit after the agent got SIGTERM (they save a
checkpoint first); Slurm's KillWait SIGKILL is the real bound."""


def _restart() -> int:
    v = os.environ.get("SLURM_RESTART_COUNT", "")
    return int(v) if v.isdigit() else 0


def for_this_run(job: JobConfig) -> JobConfig:
    """A requeued run always continues from the newest committed checkpoint: resume=never would
    start over, a fixed checkpoint path would go back to it."""
    if _restart() and job.resume != "auto":
        print(f"ftcluster: requeued run {_restart()}: resume=auto instead of {job.resume!r}", flush=True)
        return dataclasses.replace(job, resume="auto")
    return job


def _preempted_note(run_dir: Path) -> None:
    path = os.environ.get(PREEMPT_SAVED_ENV)
    if path and os.path.isfile(path):
        print(f"ftcluster: stopped for preemption: {Path(path).read_text().strip()}; "
              f"the job requeues and resumes from {run_dir / 'checkpoints'}", flush=True)


# --- mode=torchrun: one torch elastic agent per node --------------------------------------------

def run_torchrun(job: JobConfig, run_dir: Path, *, nnodes: int, rdzv_endpoint: str, rdzv_id: str) -> int:
    from torch.distributed.launcher.api import LaunchConfig

    from ftcluster.launch.runner import run_elastic

    c: SlurmLauncherConfig = job.launcher
    nproc = max(1, c.gpus_per_node)
    host = socket.gethostname()
    config = LaunchConfig(
        min_nodes=nnodes, max_nodes=nnodes, nproc_per_node=nproc, run_id=rdzv_id,
        rdzv_backend="c10d", rdzv_endpoint=rdzv_endpoint,
        max_restarts=0,  # a failure ends the job; Slurm's requeue or a resubmission resumes it
        monitor_interval=0.5, start_method="spawn",
        # torch >= 2.13; older agents give ranks their fixed 30 s after a SIGTERM.
        **({"shutdown_timeout": SHUTDOWN_S} if "shutdown_timeout" in _fields(LaunchConfig) else {}),
    )
    cpus = int(os.environ.get("SLURM_CPUS_PER_TASK") or len(os.sched_getaffinity(0)))
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, cpus // nproc)))
    print(f"ftcluster: node {host}: {nproc} rank(s), {nnodes} node(s), rendezvous {rdzv_endpoint} ({rdzv_id})",
          flush=True)
    code = run_elastic(config, job, run_dir, where=f"node {host}: ")
    if code != 0:
        return code  # 1: failed; 143: stopped by SIGTERM after its checkpoint
    _preempted_note(run_dir)
    return 0


def _fields(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


# --- mode=ray: the Ray cluster the batch script started, then the Ray launcher -------------------

def wait_for_ray(address: str, *, nodes: int, wait_s: float) -> None:
    """Connect to the head and wait until `nodes` Ray nodes are alive; after `wait_s`, a
    RuntimeError naming the Slurm nodes that did not join."""
    import ray

    host, port = address.rsplit(":", 1)
    deadline = time.monotonic() + wait_s
    while not _port_open(host, int(port)):
        if time.monotonic() > deadline:
            raise RuntimeError(f"the Ray head at {address} did not answer within {wait_s:g} s "
                               "(launcher.ray_wait_s); its `ray start --head` output is in the job output file")
        time.sleep(1)
    ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True)
    while True:
        alive = [n for n in ray.nodes() if n.get("Alive")]
        if len(alive) >= nodes:
            print(f"ftcluster: all {nodes} node(s) joined the Ray cluster at {address}", flush=True)
            return
        if time.monotonic() > deadline:
            joined = sorted({str(n.get("NodeManagerHostname") or n.get("NodeManagerAddress")) for n in alive})
            expected = _slurm_nodes()
            missing = [h for h in expected if h not in joined] if expected else []
            raise RuntimeError(f"only {len(alive)} of {nodes} node(s) joined the Ray cluster at {address} within "
                               f"{wait_s:g} s (launcher.ray_wait_s): joined {joined}"
                               + (f", missing {missing}" if missing else "")
                               + "; see the job output file for the `ray start` steps")
        time.sleep(1)


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def _slurm_nodes() -> list[str]:
    nodelist = os.environ.get("SLURM_JOB_NODELIST")
    if not nodelist:
        return []
    p = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True)
    return p.stdout.split() if p.returncode == 0 else []


def ray_config(job: JobConfig, *, address: str, nodes: int) -> RayLauncherConfig:
    """The Ray launcher settings for this allocation: one worker (rank) per GPU, or per node on CPU."""
    c: SlurmLauncherConfig = job.launcher
    per_node = max(1, c.gpus_per_node)
    cfg = RayLauncherConfig(
        address=address, num_workers=nodes * per_node, gpus_per_worker=1 if c.gpus_per_node else 0,
        cpus_per_worker=max(1, (c.cpus_per_task or per_node) // per_node),
        placement_strategy="PACK" if c.gpus_per_node else "SPREAD", max_failures=c.ray_max_failures,
    )
    cfg.validate()
    return cfg


def is_sweep(run_dir: Path) -> bool:
    """The run dir is a sweep's (`ftcluster sweep` wrote its sweep.json before submitting)."""
    from ftcluster.launch.tune import SWEEP_FILE

    return (run_dir / SWEEP_FILE).is_file()


def sweep_ray_config(job: JobConfig, *, address: str) -> RayLauncherConfig:
    """The Ray launcher settings of each trial of a sweep in this allocation: sweep.trial_workers
    workers (default one node's: a GPU each, or one CPU worker)."""
    c: SlurmLauncherConfig = job.launcher
    per_node = max(1, c.gpus_per_node)
    cfg = RayLauncherConfig(
        address=address, num_workers=job.sweep.trial_workers or per_node, gpus_per_worker=1 if c.gpus_per_node else 0,
        cpus_per_worker=max(1, (c.cpus_per_task or per_node) // per_node), placement_strategy="PACK",
        max_failures=c.ray_max_failures,
    )
    cfg.validate()
    return cfg


def run_ray(job: JobConfig, run_dir: Path, *, address: str, nodes: int, wait_s: float) -> int:
    from ftcluster.launch import ray as ray_launcher  # sets Ray Train's environment defaults

    import ray

    try:
        wait_for_ray(address, nodes=nodes, wait_s=wait_s)
    except RuntimeError as e:
        print(f"ftcluster: {e}", file=sys.stderr, flush=True)
        return 1
    try:
        if is_sweep(run_dir):  # `ftcluster sweep launcher=slurm`: the allocation runs the whole sweep
            from ftcluster.launch.tune import run_sweep

            rc = run_sweep(dataclasses.replace(job, launcher=sweep_ray_config(job, address=address)), run_dir)
        else:
            rc = ray_launcher.launch_ray(dataclasses.replace(job, launcher=ray_config(job, address=address, nodes=nodes)),
                                         run_dir)
    finally:
        ray.shutdown()
    if rc == 0:
        _preempted_note(run_dir)
    return rc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ftcluster.launch.slurm_job",
                                 description="Run a submitted ftcluster job inside its Slurm allocation.")
    sub = ap.add_subparsers(dest="mode", required=True)
    t = sub.add_parser("torchrun")
    r = sub.add_parser("ray")
    for p in (t, r):
        p.add_argument("config", type=Path, help="the resolved config saved at submission")
        p.add_argument("--run-dir", type=Path, required=True)
    t.add_argument("--nnodes", type=int, required=True)
    t.add_argument("--rdzv-endpoint", required=True)
    t.add_argument("--rdzv-id", required=True)
    r.add_argument("--address", required=True)
    r.add_argument("--nodes", type=int, required=True)
    r.add_argument("--wait-s", type=float, required=True)
    args = ap.parse_args(argv)
    try:
        job = for_this_run(load_saved_job(args.config))
    except ConfigError as e:
        print(f"ftcluster: config error in {args.config}: {e}", file=sys.stderr)
        return 2
    if not isinstance(job.launcher, SlurmLauncherConfig):
        print(f"ftcluster: {args.config} is not a launcher=slurm config", file=sys.stderr)
        return 2
    run_dir = args.run_dir.resolve()
    # One run per run dir (launch/lock.py): the job's first node holds the lock for the job's
    # duration (the submitting driver released it when sbatch returned). Only this entry takes it,
    # never the ranks, and a requeued job is a new entry process, so nothing waits on it.
    from ftcluster.launch.lock import RunDirLock

    lock = RunDirLock(run_dir) if os.environ.get("SLURM_NODEID", "0") == "0" else None
    try:
        if lock is not None:
            lock.acquire(wait_s=60)  # the submitting driver releases it once sbatch has returned
        if args.mode == "torchrun":
            return run_torchrun(job, run_dir, nnodes=args.nnodes, rdzv_endpoint=args.rdzv_endpoint,
                                rdzv_id=args.rdzv_id)
        return run_ray(job, run_dir, address=args.address, nodes=args.nodes, wait_s=args.wait_s)
    except ConfigError as e:
        print(f"ftcluster: {e}", file=sys.stderr)
        return 2
    finally:
        if lock is not None:
            lock.release()


if __name__ == "__main__":
    raise SystemExit(main())
