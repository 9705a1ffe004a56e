"""launcher=ray, pre-flight: before training, every worker gathers what it is and sees (rank,
host, devices, the run dir, versions) and all check the same list, so they fail together with a
message that names the worker, instead of hanging in the first collective."""
from __future__ import annotations

import glob
import hashlib
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from ftcluster.config import JobConfig


LAUNCH_ID_FILE = "ray_launch_id"
"""Written by the driver into the run dir; every worker must read the same id (pre-flight)."""


class PreflightError(RuntimeError):
    """The workers disagree on the run, or one cannot run it. The message names the worker."""


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


def all_gather(facts: dict) -> list[dict]:
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


def write_preflight(run_dir: Path, facts: list[dict], launch_id: str, attempt: int) -> None:
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


def preflight_hosts(run_dir: Path) -> dict[int, str]:
    try:
        workers = json.loads((run_dir / "logs" / "preflight.json").read_text())["workers"]
        return {w["rank"]: f"host {w['host']}, pid {w['pid']}" for w in workers}
    except (OSError, ValueError, KeyError, TypeError):
        return {}
