"""launcher=ray: the ranks are Ray Train workers (Ray Train V2 `TorchTrainer`) on a Ray cluster.

    driver (this process)                          every worker (one Ray actor per rank)
    ---------------------                          -------------------------------------
    connect to / start Ray; plan workers           Ray has joined the torch process group (gloo|nccl)
    write <run.dir>/ray_launch_id                  and set RANK/LOCAL_RANK/WORLD_SIZE/MASTER_*
    TorchTrainer(worker_main, {job, run_dir..}) -> pre-flight: gather host/rank/devices/versions,
      FailureConfig(max_failures)                    all check the same facts, fail naming a worker
      _RunRecorder (controller callback)           train(job, run_dir, on_log=reporter)  (as local)
    fit(); summary, or the failing ranks           reporter thread: ray.train.report(step record)

Ray does the placing, the process group and the restarts; ftcluster does the training and the
checkpoints. Recovery: when a worker raises, dies or loses its node, Ray Train tears the worker group
down and starts a new one (up to `max_failures` times); train() there resumes from the newest
committed checkpoint in <run.dir>/checkpoints (resume=auto). We never hand checkpoints to Ray
(`ray.train.report` carries metrics only): our checkpoint manager owns commit and retention, and
Ray's storage_path only holds Ray Train's own bookkeeping. Both must be on a filesystem every node
sees (checked in pre-flight for the run dir).

The driver ships the resolved, validated JobConfig (a plain dataclass) and the absolute run dir to
the workers; they never run Hydra. Needs Ray Train V2 (the default in Ray 2.60, the version this was
written and tested against).
"""
from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import queue
import re
import socket
import sys
import threading
import time
import traceback
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Ray Train V2 settings the driver sets (Ray forwards RAY_TRAIN_* to the controller and workers).
RAY_ENV_DEFAULTS = {
    "RAY_TRAIN_V2_ENABLED": "1",
    # Ray's print patch routes print() through its logger and doubles every line on the console.
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    # Ray would chdir each worker into its own trial directory; relative paths in the config are
    # taken from the driver's working directory instead (see _enter_driver_cwd).
    "RAY_CHDIR_TO_TRIAL_DIR": "0",
}
for _k, _v in RAY_ENV_DEFAULTS.items():
    # Set before ray.train is first imported (it reads RAY_TRAIN_V2_ENABLED then) and before this
    # process starts a trainer (the others are read then, and forwarded to its actors). A value the
    # user exported wins.
    os.environ.setdefault(_k, _v)

from ray.train import UserCallback  # noqa: E402 - after the environment defaults above

from ftcluster.checkpoint import committed_checkpoints
from ftcluster.launch.local import append_rank_error
from ftcluster.config import ConfigError, JobConfig, RayLauncherConfig, is_secret_name

LAUNCH_ID_FILE = "ray_launch_id"
"""Written by the driver into the run dir; every worker must read the same id (pre-flight)."""

# Environment forwarded from the driver to every worker (a cluster's workers do not inherit the
# driver's shell). Secret-looking names (WANDB_API_KEY, HF_TOKEN) are never forwarded: Ray shows
# runtime environments in its dashboard and job records. Put secrets on the nodes themselves.
FORWARD_ENV_PREFIXES = ("FTCLUSTER_", "HF_", "TRANSFORMERS_", "WANDB_", "NCCL_", "TORCH_", "PYTORCH_", "DS_",
                        "TOKENIZERS_", "OMP_NUM_THREADS", "CUDA_LAUNCH_BLOCKING")



class PreflightError(RuntimeError):
    """The workers disagree on the run, or one cannot run it. The message names the worker."""


@dataclass(frozen=True, kw_only=True)
class RayPlan:
    """What launcher=ray resolved against the cluster (derived facts; the config stays as given)."""
    num_workers: int
    gpus_per_worker: int
    cpus_per_worker: int
    backend: str
    """torch.distributed backend Ray Train initialises: nccl with GPUs, gloo without."""

    @property
    def resources_per_worker(self) -> dict[str, float]:
        res: dict[str, float] = {"CPU": self.cpus_per_worker}
        if self.gpus_per_worker:
            res["GPU"] = self.gpus_per_worker
        return res


def plan_workers(cfg: RayLauncherConfig, cluster: dict[str, float]) -> RayPlan:
    """Resolve the `auto` settings against the cluster's resources (`ray.cluster_resources()`)."""
    cluster_gpus = int(cluster.get("GPU", 0))
    gpus = (1 if cluster_gpus > 0 else 0) if cfg.gpus_per_worker == "auto" else int(cfg.gpus_per_worker)
    if cfg.num_workers == "auto":
        if gpus:
            n = cluster_gpus // gpus
            if n < 1:
                raise ConfigError("launcher.num_workers: 'auto' found no GPUs in the Ray cluster; set it explicitly "
                                  "(an autoscaling cluster adds GPU nodes only once they are requested)")
        else:
            n = 1
    else:
        n = int(cfg.num_workers)
    return RayPlan(num_workers=n, gpus_per_worker=gpus, cpus_per_worker=cfg.cpus_per_worker,
                   backend="nccl" if gpus else "gloo")


def forwarded_env(environ: dict[str, str] | os._Environ) -> dict[str, str]:
    return {k: v for k, v in environ.items()
            if k.startswith(FORWARD_ENV_PREFIXES) and not is_secret_name(k)}


# --- driver ---------------------------------------------------------------------------------------

def launch_ray(job: JobConfig, run_dir: Path) -> int:
    cfg: RayLauncherConfig = job.launcher
    import ray

    try:
        started_here = _connect(cfg)
    except (ConnectionError, RuntimeError) as e:
        print(f"ftcluster: launcher.address={cfg.address}: cannot connect to Ray: {type(e).__name__}: {_first_line(e)}\n"
              "  auto joins the cluster this host runs (`ray start --head` / `ray start --address=HEAD:6379`) or "
              "$RAY_ADDRESS; launcher.address=local starts a private one.\n  Ray 2.60 clusters use token "
              "authentication by default: export RAY_AUTH_MODE=token and give this host the cluster's token "
              "(~/.ray/auth_token, RAY_AUTH_TOKEN_PATH or RAY_AUTH_TOKEN).", file=sys.stderr)
        return 1
    try:
        return _run(job, run_dir, cfg)
    finally:
        if started_here:
            ray.shutdown()


def _connect(cfg: RayLauncherConfig) -> bool:
    """Join (or, for address=local, start) a Ray cluster. True if this call started Ray."""
    import ray

    if ray.is_initialized():  # an embedding program (a notebook, a test) already connected
        return False
    common: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": True}
    if cfg.address == "local":
        from ftcluster.driver import visible_gpus

        n = 1 if cfg.num_workers == "auto" else int(cfg.num_workers)
        # Logical resources only: enough for the workers (the Ray Train controller takes 0 CPUs).
        ray.init(num_cpus=max(1, n * cfg.cpus_per_worker), num_gpus=visible_gpus(), include_dashboard=False, **common)
    else:
        ray.init(address=cfg.address, **common)
    return True


def _run(job: JobConfig, run_dir: Path, cfg: RayLauncherConfig) -> int:
    import ray
    from ray.train import FailureConfig, LoggingConfig, RunConfig, ScalingConfig, TrainingFailedError, WorkerGroupError
    from ray.train.torch import TorchConfig, TorchTrainer

    t0 = time.time()
    plan = plan_workers(cfg, ray.cluster_resources())
    _check_capacity(plan, cfg, ray.cluster_resources())
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
            callbacks=[_RunRecorder(run_dir=str(run_dir), launch_id=launch_id, max_failures=cfg.max_failures)],
            worker_runtime_env={"env_vars": forwarded_env(os.environ)},
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )
    try:
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


def _check_capacity(plan: RayPlan, cfg: RayLauncherConfig, cluster: dict[str, float]) -> None:
    need = {"GPU": plan.num_workers * plan.gpus_per_worker, "CPU": plan.num_workers * plan.cpus_per_worker}
    short = {k: (v, cluster.get(k, 0)) for k, v in need.items() if v > cluster.get(k, 0)}
    if not short:
        return
    text = ", ".join(f"{v:g} {k} needed, {have:g} in the cluster" for k, (v, have) in short.items())
    if cfg.address == "local":
        raise ConfigError(f"launcher.num_workers: {text} (launcher.address=local has only this host)")
    print(f"ftcluster: warning: {text}; Ray Train waits until the autoscaler adds nodes", file=sys.stderr, flush=True)


def _report_success(run_dir: Path, t0: float, plan: RayPlan, failures: list[dict], *, reports: dict) -> None:
    last = _last_step_record(run_dir)
    step = f"step {last['step']}, loss {last['loss']:.4f}" if last else "no step logged"
    ckpts = committed_checkpoints(run_dir)
    print(f"ftcluster: done in {time.time() - t0:.1f} s on {plan.num_workers} Ray worker(s), "
          f"{len(failures)} restart(s): {step}", flush=True)
    for i, f in enumerate(failures, 1):
        print(f"  restart {i} after: " + _causes_first(f["errors"]))
    last_report = reports["last"] or {}
    to_ray = (f"Ray Train received {reports['reports']} step report(s), the last for step {last_report.get('step')}"
              if reports["reports"] else "no step reported to Ray Train: nothing was left to train")
    print(f"  metrics {run_dir / 'metrics.jsonl'} ({to_ray})\n"
          f"  checkpoints {run_dir / 'checkpoints'}"
          f" (newest: {ckpts[-1].name if ckpts else 'none'})\n  logs {run_dir / 'logs'}", flush=True)


def _report_failure(run_dir: Path, t0: float, worker_failures: dict[int, BaseException], *, restarts: int,
                    cfg: RayLauncherConfig) -> None:
    hosts = _preflight_hosts(run_dir)
    print(f"ftcluster: training failed on {len(worker_failures)} Ray worker(s) after {time.time() - t0:.1f} s and "
          f"{restarts} restart(s) (launcher.max_failures={cfg.max_failures}); logs in {run_dir / 'logs'}",
          file=sys.stderr)
    # The cause first: when one rank dies, its peers fail in a collective a moment later.
    for rank, err in sorted(worker_failures.items(), key=lambda kv: (_is_collateral(_one_line(kv[1])), kv[0])):
        where = f" ({hosts[rank]})" if rank in hosts else ""
        note = " (likely a consequence of another rank's failure)" if _is_collateral(_one_line(err)) \
            and len(worker_failures) > 1 else ""
        print(f"  rank {rank}{where}: {_one_line(err)}{note}", file=sys.stderr)
        err_file = run_dir / "logs" / f"rank{rank}.error"
        if not err_file.is_file() or err_file.stat().st_mtime < t0:  # the worker could not write it itself
            append_rank_error(run_dir, rank, f"{type(err).__name__}: {err}", header="reported by the Ray driver")
    ckpts = committed_checkpoints(run_dir)
    if ckpts:
        print(f"  the newest committed checkpoint is {ckpts[-1]}; the same command again resumes from it",
              file=sys.stderr)
    sys.stderr.flush()


_COLLATERAL = re.compile(r"gloo|NCCL|Connection (reset|closed)|ProcessGroup|DistBackendError|Broken pipe", re.I)


def _is_collateral(line: str) -> bool:
    """A collective failing because a peer went away (not the root cause)."""
    return bool(_COLLATERAL.search(line))


def _causes_first(errors: dict) -> str:
    """`rank r: error; ...`, root causes before collateral collective failures."""
    items = sorted(((int(r), m) for r, m in errors.items()), key=lambda rm: (_is_collateral(rm[1]), rm[0]))
    return "; ".join(f"rank {r}: {m}" for r, m in items)


def _first_line(err: BaseException) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    return lines[0][:300] if lines else ""


def _one_line(err: BaseException) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    return f"{type(err).__name__}: {lines[0] if lines else ''}"[:400]


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


def _preflight_hosts(run_dir: Path) -> dict[int, str]:
    try:
        workers = json.loads((run_dir / "logs" / "preflight.json").read_text())["workers"]
        return {w["rank"]: f"host {w['host']}, pid {w['pid']}" for w in workers}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


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


class _RunRecorder(UserCallback):
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
            errors = {int(r): _one_line(e) for r, e in worker_exceptions.items()}
            n = len(read_failures(self.run_dir, self.launch_id)) + 1
            retry = self.max_failures < 0 or n <= self.max_failures
            rec = {"launch_id": self.launch_id, "failure": n, "time": time.time(), "restart": retry,
                   "errors": {str(r): m for r, m in errors.items()}}
            with open(self.run_dir / "logs" / FAILURES_FILE, "a") as f:
                f.write(json.dumps(rec) + "\n")
            limit = "unlimited" if self.max_failures < 0 else self.max_failures
            what = f"restarting the worker group (restart {n} of {limit})" if retry else "no restarts left"
            print("ftcluster: worker group failed: " + _causes_first(errors)
                  + f"; {what}", flush=True)
        except Exception as e:  # noqa: BLE001
            print(f"ftcluster: could not record a worker failure: {e}", file=sys.stderr)


# --- worker ---------------------------------------------------------------------------------------

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
        everyone = _all_gather(facts)
        problems = check_preflight(everyone, expected_world=config["world_size"], launch_id=config["launch_id"],
                                   gpus_per_worker=config["gpus_per_worker"])
        if problems:
            raise PreflightError("pre-flight failed:\n  " + "\n  ".join(problems))
        if rank == 0:
            _write_preflight(run_dir, everyone, config["launch_id"], attempt)
        else:
            # Like launcher=local: rank 0's output reaches the driver's console, the others' go to files.
            from ftcluster.launch.local import _redirect_output

            _redirect_output(run_dir / "logs" / f"rank{rank}.out")
        reporter = _RayReporter(rank=rank)
        from ftcluster.train import train

        train(job, run_dir, on_log=reporter)
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


def collect_facts(*, job: JobConfig, run_dir: Path) -> dict:
    """What this worker is and sees, for pre-flight. Touches no GPU memory."""
    import ray
    import ray.train
    import torch
    import torch.distributed as dist
    import transformers

    import ftcluster

    ctx = ray.train.get_context()
    launch_file = run_dir / LAUNCH_ID_FILE
    gpu_ids = [str(g) for g in ray.get_runtime_context().get_accelerator_ids().get("GPU", [])]
    return {
        "rank": ctx.get_world_rank(), "local_rank": ctx.get_local_rank(), "node_rank": ctx.get_node_rank(),
        "world_size": ctx.get_world_size(),
        "env": {k: os.environ.get(k) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")},
        "pg_rank": dist.get_rank() if dist.is_initialized() else None,
        "pg_world_size": dist.get_world_size() if dist.is_initialized() else None,
        "host": socket.gethostname(), "ip": ray.util.get_node_ip_address(), "pid": os.getpid(),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "ray_gpu_ids": gpu_ids,
        "cuda_device_count": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "launch_id": launch_file.read_text().strip() if launch_file.is_file() else None,
        "config_yaml_sha": _sha(run_dir / "config.yaml"),
        "missing_paths": missing_paths(job),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "ray": ray.__version__, "ftcluster": getattr(ftcluster, "__version__", "?"),
                     "ftcluster sources": _source_digest(Path(ftcluster.__file__).parent),
                     "python": sys.version.split()[0]},
        "cwd": os.getcwd(),
    }


def _source_digest(package_dir: Path) -> str:
    """Digest of the ftcluster sources this worker imports: nodes running different code (a stale
    install, another checkout) differ here even when the version string agrees."""
    h = hashlib.sha256()
    for f in sorted(package_dir.rglob("*.py")):
        h.update(str(f.relative_to(package_dir)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:12]


def _sha(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.is_file() else None


def missing_paths(job: JobConfig) -> list[str]:
    """Config paths this worker cannot see (`key: path`)."""
    out = []
    for key, value in (("model.path", job.model.path), ("model.tokenizer", job.model.tokenizer)):
        if value and not os.path.exists(os.path.expanduser(value)):
            out.append(f"{key}: {value}")
    if job.data.format != "synthetic" and job.data.path:
        for item in (p.strip() for p in job.data.path.split(",")):
            item = os.path.expanduser(item)
            if item and not (glob.glob(item) if glob.has_magic(item) else os.path.exists(item)):
                out.append(f"data.path: {item}")
    return out


def _all_gather(facts: dict) -> list[dict]:
    """Every worker's facts, over the process group Ray Train set up, the one training uses. Under
    NCCL the object travels through this worker's GPU, so check first (alone) that it has one."""
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        raise PreflightError(f"{_who(facts)}: Ray Train did not initialise torch.distributed")
    if dist.get_backend() == "nccl":
        problem = _own_gpu_problem(facts)
        if problem:
            raise PreflightError(f"pre-flight failed:\n  {_who(facts)}: {problem}")
        torch.cuda.set_device(facts["local_rank"])  # the device train() uses: cuda:LOCAL_RANK
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, facts)
    return out


def _who(f: dict) -> str:
    return f"worker rank {f['rank']} (host {f['host']}, ip {f['ip']}, local rank {f['local_rank']}, pid {f['pid']})"


def check_preflight(facts: list[dict], *, expected_world: int, launch_id: str, gpus_per_worker: int) -> list[str]:
    """Problems with the gathered worker facts; each names the worker. Pure: unit-testable, and
    every worker computes the same answer from the same list, so all fail together."""
    problems: list[str] = []
    if len(facts) != expected_world:
        problems.append(f"{len(facts)} workers joined the process group, the driver planned {expected_world}")
    ref = facts[0]
    seen_ranks = set()
    for f in facts:
        who = _who(f)
        env = f["env"]
        sizes = {f["world_size"], f["pg_world_size"], _int(env.get("WORLD_SIZE"))}
        if sizes != {expected_world}:
            problems.append(f"{who}: world size disagrees (ray {f['world_size']}, process group {f['pg_world_size']}, "
                            f"WORLD_SIZE {env.get('WORLD_SIZE')}; expected {expected_world})")
        if {f["rank"], f["pg_rank"], _int(env.get("RANK"))} != {f["rank"]}:
            problems.append(f"{who}: rank disagrees (ray {f['rank']}, process group {f['pg_rank']}, RANK {env.get('RANK')})")
        if _int(env.get("LOCAL_RANK")) != f["local_rank"]:
            problems.append(f"{who}: LOCAL_RANK={env.get('LOCAL_RANK')} but Ray's local rank is {f['local_rank']}")
        if f["rank"] in seen_ranks:
            problems.append(f"{who}: rank {f['rank']} taken twice")
        seen_ranks.add(f["rank"])
        if f["launch_id"] is None:
            problems.append(f"{who}: cannot see the run dir ({LAUNCH_ID_FILE} written by the driver is missing): "
                            "run.dir must be on a filesystem shared by the driver and every node")
        elif f["launch_id"] != launch_id:
            problems.append(f"{who}: the run dir belongs to another launch ({f['launch_id']}, this is {launch_id}): "
                            "two drivers on one run dir?")
        if f["config_yaml_sha"] != ref["config_yaml_sha"]:
            problems.append(f"{who}: sees a different config.yaml in the run dir than rank 0")
        for m in f["missing_paths"]:
            problems.append(f"{who}: cannot see {m} (cwd {f['cwd']}): paths in the config must exist on every node")
        for name, version in f["versions"].items():
            if version != ref["versions"].get(name):
                problems.append(f"{who}: {name} {version}, but rank 0 has {ref['versions'].get(name)}")
    if gpus_per_worker:
        problems += _check_gpus(facts)
    return problems


def _check_gpus(facts: list[dict]) -> list[str]:
    """train() uses cuda:LOCAL_RANK. With Ray Train's default CUDA_VISIBLE_DEVICES sharing, each
    worker sees all the group's GPUs of its node, so that is a distinct GPU Ray gave the group."""
    problems = []
    by_host: dict[str, list[dict]] = {}
    for f in facts:
        by_host.setdefault(f["ip"], []).append(f)
    for host_facts in by_host.values():
        granted = {g for f in host_facts for g in f["ray_gpu_ids"]}
        used: dict[str, dict] = {}
        for f in host_facts:
            who = _who(f)
            visible = [v for v in (f["cuda_visible_devices"] or "").split(",") if v]
            problem = _own_gpu_problem(f)
            if problem:
                problems.append(f"{who}: {problem}")
                continue
            if len(visible) > f["local_rank"]:
                gpu = visible[f["local_rank"]]
                if granted and gpu not in granted:
                    problems.append(f"{who}: would use GPU {gpu}, which Ray did not assign to this job on this node "
                                    f"({sorted(granted)})")
                if gpu in used:
                    problems.append(f"{who}: would use GPU {gpu}, as does {_who(used[gpu])}")
                used[gpu] = f
    return problems


def _own_gpu_problem(f: dict) -> str | None:
    """What keeps this worker from using cuda:LOCAL_RANK, if anything."""
    if f["cuda_device_count"] < 1:
        return f"torch sees no CUDA device (CUDA_VISIBLE_DEVICES={f['cuda_visible_devices']!r})"
    if f["local_rank"] >= f["cuda_device_count"]:
        return (f"would use cuda:{f['local_rank']} but sees only {f['cuda_device_count']} device(s) "
                f"(CUDA_VISIBLE_DEVICES={f['cuda_visible_devices']!r}; keep Ray Train's CUDA_VISIBLE_DEVICES "
                "sharing on)")
    return None


def _int(v: str | None) -> int | None:
    return int(v) if v is not None and v.lstrip("-").isdigit() else None


def _write_preflight(run_dir: Path, facts: list[dict], launch_id: str, attempt: int) -> None:
    keep = ("rank", "local_rank", "node_rank", "host", "ip", "pid", "cuda_visible_devices", "ray_gpu_ids")
    workers = [{k: f[k] for k in keep} for f in facts]
    record = {"launch_id": launch_id, "attempt": attempt, "world_size": len(facts), "time": time.time(),
              "versions": facts[0]["versions"], "workers": workers}
    (run_dir / "logs" / "preflight.json").write_text(json.dumps(record, indent=1) + "\n")
    lines = [f"pre-flight ok (launch {launch_id}, attempt {attempt}): {len(facts)} workers agree on the run dir, "
             f"world size, config and versions"]
    for f in facts:
        dev = f"GPU {f['ray_gpu_ids']} (CUDA_VISIBLE_DEVICES={f['cuda_visible_devices']})" if f["ray_gpu_ids"] else "cpu"
        lines.append(f"  rank {f['rank']}: host {f['host']} ({f['ip']}), node {f['node_rank']}, "
                     f"local rank {f['local_rank']}, pid {f['pid']}, {dev}")
    print("\n".join(lines), flush=True)


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
