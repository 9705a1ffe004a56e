"""launcher=ray, what the driver resolves before starting workers: the `auto` settings against the
cluster's resources, whether the cluster can hold the plan, and the environment the workers get."""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass

from ftcluster.config import ConfigError, RayLauncherConfig, is_secret_name


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


def check_capacity(plan: RayPlan, cfg: RayLauncherConfig, cluster: dict[str, float]) -> None:
    need = {"GPU": plan.num_workers * plan.gpus_per_worker, "CPU": plan.num_workers * plan.cpus_per_worker}
    short = {k: (v, cluster.get(k, 0)) for k, v in need.items() if v > cluster.get(k, 0)}
    if not short:
        return
    text = ", ".join(f"{v:g} {k} needed, {have:g} in the cluster" for k, (v, have) in short.items())
    if cfg.address == "local":
        raise ConfigError(f"launcher.num_workers: {text} (launcher.address=local has only this host)")
    print(f"ftcluster: warning: {text}; Ray Train waits until the autoscaler adds nodes", file=sys.stderr, flush=True)


FORWARD_ENV_PREFIXES = ("FTCLUSTER_", "HF_", "TRANSFORMERS_", "WANDB_", "NCCL_", "TORCH_", "PYTORCH_", "DS_",
                        "TOKENIZERS_", "OMP_NUM_THREADS", "CUDA_LAUNCH_BLOCKING")


def forwarded_env(environ: dict[str, str] | os._Environ) -> dict[str, str]:
    return {k: v for k, v in environ.items()
            if k.startswith(FORWARD_ENV_PREFIXES) and not is_secret_name(k)}
