"""launcher=ray, the driver side: connect to (or start) Ray, plan the workers, run the
TorchTrainer, then print the summary or the failing ranks, root cause first."""
from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from ftcluster.checkpoint import committed_checkpoints
from ftcluster.config import JobConfig, RayLauncherConfig
from ftcluster.console import filter_forwarded_output, quiet_ray_driver, ray_worker_env
from ftcluster.launch import hosts
from ftcluster.launch.ray.plan import RayPlan, check_capacity, forwarded_env, plan_workers
from ftcluster.launch.ray.preflight import LAUNCH_ID_FILE, preflight_hosts
from ftcluster.launch.ray.records import RunRecorder, causes_first, is_collateral, one_line, read_failures, read_reports
from ftcluster.launch.ray.worker import worker_main
from ftcluster.launch.runner import append_rank_error


def launch(job: JobConfig, run_dir: Path) -> int:
    """Connect, run the workers, report; the exit code (1 when Ray cannot be reached)."""
    cfg: RayLauncherConfig = job.launcher
    import ray

    try:
        started_here = _connect(cfg, run_dir=run_dir, level=job.log.level)
    except (ConnectionError, RuntimeError) as e:
        print(f"ftcluster: launcher.address={cfg.address}: cannot connect to Ray: {type(e).__name__}: {_first_line(e)}\n"
              "  auto joins the cluster this host runs (`ray start --head` / `ray start --address=HEAD:6379`) or "
              "$RAY_ADDRESS; launcher.address=local starts a private one.\n  Ray 2.60 clusters use token "
              "authentication by default: export RAY_AUTH_MODE=token and give this host the cluster's token "
              "(~/.ray/auth_token, RAY_AUTH_TOKEN_PATH or RAY_AUTH_TOKEN).", file=sys.stderr)
        return 1
    # The filter spans the shutdown too: Ray's own actors (the placement-group cleaner's "Failed to
    # query Ray Train Controller actor state") may forward a line after the workers finished.
    with filter_forwarded_output(run_dir, level=job.log.level):
        try:
            return _run(job, run_dir, cfg)
        finally:
            if started_here:
                ray.shutdown()


def _connect(cfg: RayLauncherConfig, *, run_dir: Path, level: str) -> bool:
    """Join (or, for address=local, start) a Ray cluster. True if this call started Ray. Ray's
    own log records (ray.init's token-auth notice, ...) go to logs/driver.log (console.py)."""
    import ray

    if ray.is_initialized():  # an embedding program (a notebook, a test) already connected
        return False
    quiet_ray_driver(run_dir, level=level)
    common: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": True}
    if cfg.address == "local":
        n = 1 if cfg.num_workers == "auto" else int(cfg.num_workers)
        # Logical resources only: enough for the workers (the Ray Train controller takes 0 CPUs).
        ray.init(num_cpus=max(1, n * cfg.cpus_per_worker), num_gpus=hosts.visible_gpus(), include_dashboard=False, **common)
    else:
        ray.init(address=cfg.address, **common)
    quiet_ray_driver(run_dir, level=level)
    return True


def run_workers(job: JobConfig, run_dir: Path) -> int:
    """The workers of one run on the Ray cluster this process is connected to (a sweep's trial
    calls this inside its Tune trial); the exit code."""
    return _run(job, run_dir, job.launcher)


def _run(job: JobConfig, run_dir: Path, cfg: RayLauncherConfig) -> int:
    import ray
    from ray.train import FailureConfig, LoggingConfig, RunConfig, ScalingConfig, TrainingFailedError, WorkerGroupError
    from ray.train.torch import TorchConfig, TorchTrainer

    t0 = time.time()
    plan = plan_workers(cfg, ray.cluster_resources())
    check_capacity(plan, cfg, ray.cluster_resources())
    launch_id = uuid.uuid4().hex[:12]
    (run_dir / LAUNCH_ID_FILE).write_text(launch_id + "\n")
    storage = cfg.storage_path or str(run_dir)
    name = "ray" if cfg.storage_path is None else run_dir.name
    logs = run_dir / "logs"
    print(f"ftcluster: launcher=ray: {plan.num_workers} worker(s) x ({plan.gpus_per_worker} GPU, "
          f"{plan.cpus_per_worker} CPU), {plan.backend}, placement {cfg.placement_strategy}, "
          f"max_failures {cfg.max_failures}; launch {launch_id}\n"
          f"  run dir     {run_dir}\n  logs        {logs}/rank<r>.log (ranks > 0 also rank<r>.out)\n"
          f"  metrics     {run_dir / 'metrics.jsonl'} (also reported to Ray Train)\n"
          f"  checkpoints {run_dir / 'checkpoints'}\n  ray storage {storage.rstrip('/')}/{name}", flush=True)

    config = {
        "job": job, "run_dir": str(run_dir), "launch_id": launch_id, "world_size": plan.num_workers,
        "gpus_per_worker": plan.gpus_per_worker, "driver_cwd": os.getcwd(), "driver_host": socket.gethostname(),
    }
    trainer = TorchTrainer(
        worker_main,
        train_loop_config=config,
        torch_config=TorchConfig(backend=plan.backend),
        scaling_config=ScalingConfig(num_workers=plan.num_workers, use_gpu=plan.gpus_per_worker > 0,
                                     resources_per_worker=plan.resources_per_worker,
                                     placement_strategy=cfg.placement_strategy),
        run_config=RunConfig(
            name=name, storage_path=storage,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            callbacks=[RunRecorder(run_dir=str(run_dir), launch_id=launch_id, max_failures=cfg.max_failures)],
            worker_runtime_env={"env_vars": {**forwarded_env(os.environ), **ray_worker_env(job.log.level)}},
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )
    try:
        # Lines Ray forwards from its own actors go to logs/driver.log; rank 0's reach the console.
        with filter_forwarded_output(run_dir, level=job.log.level):
            trainer.fit()
    except WorkerGroupError as e:
        failures = read_failures(run_dir, launch_id)
        _report_failure(run_dir, t0, e.worker_failures, restarts=sum(1 for f in failures if f.get("restart")),
                        cfg=cfg)
        return 1
    except TrainingFailedError as e:
        print(f"ftcluster: Ray Train failed: {e}", file=sys.stderr)
        return 1
    _report_success(run_dir, t0, plan, read_failures(run_dir, launch_id), reports=read_reports(run_dir, launch_id))
    return 0


def _report_success(run_dir: Path, t0: float, plan: RayPlan, failures: list[dict], *, reports: dict) -> None:
    last = _last_step_record(run_dir)
    step = f"step {last['step']}, loss {last['loss']:.4f}" if last else "no step logged"
    ckpts = committed_checkpoints(run_dir)
    print(f"ftcluster: done in {time.time() - t0:.1f} s on {plan.num_workers} Ray worker(s), "
          f"{len(failures)} restart(s): {step}", flush=True)
    for i, f in enumerate(failures, 1):
        print(f"  restart {i} after: " + causes_first(f["errors"]))
    last_report = reports["last"] or {}
    to_ray = (f"Ray Train received {reports['reports']} step report(s), the last for step {last_report.get('step')}"
              if reports["reports"] else "no step reported to Ray Train: nothing was left to train")
    print(f"  metrics {run_dir / 'metrics.jsonl'} ({to_ray})\n"
          f"  checkpoints {run_dir / 'checkpoints'}"
          f" (newest: {ckpts[-1].name if ckpts else 'none'})\n  logs {run_dir / 'logs'}", flush=True)


def _report_failure(run_dir: Path, t0: float, worker_failures: dict[int, BaseException], *, restarts: int,
                    cfg: RayLauncherConfig) -> None:
    hosts = preflight_hosts(run_dir)
    print(f"ftcluster: training failed on {len(worker_failures)} Ray worker(s) after {time.time() - t0:.1f} s and "
          f"{restarts} restart(s) (launcher.max_failures={cfg.max_failures}); logs in {run_dir / 'logs'}",
          file=sys.stderr)
    # The cause first: when one rank dies, its peers fail in a collective a moment later.
    for rank, err in sorted(worker_failures.items(), key=lambda kv: (is_collateral(one_line(kv[1])), kv[0])):
        where = f" ({hosts[rank]})" if rank in hosts else ""
        note = " (likely a consequence of another rank's failure)" if is_collateral(one_line(err)) \
            and len(worker_failures) > 1 else ""
        print(f"  rank {rank}{where}: {one_line(err)}{note}", file=sys.stderr)
        err_file = run_dir / "logs" / f"rank{rank}.error"
        if not err_file.is_file() or err_file.stat().st_mtime < t0:  # the worker could not write it itself
            append_rank_error(run_dir, rank, f"{type(err).__name__}: {err}", header="reported by the Ray driver")
    ckpts = committed_checkpoints(run_dir)
    if ckpts:
        print(f"  the newest committed checkpoint is {ckpts[-1]}; the same command again resumes from it",
              file=sys.stderr)
    sys.stderr.flush()


def _first_line(err: BaseException) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    return lines[0][:300] if lines else ""


def _last_step_record(run_dir: Path) -> dict | None:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    last = None
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "loss" in rec:
            last = rec
    return last
