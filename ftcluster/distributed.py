"""Process-group setup and the facts derived from it (rank, world, device).

Every launcher ends with the same environment on each rank (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR/PORT, set by torch elastic or Ray Train), so `train()` needs no launcher knowledge.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True, kw_only=True)
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device_type(self) -> str:
        return self.device.type


# The CUDA caching allocator's settings for the ranks unless the user set their own: expandable
# segments grow one mapping instead of caching fixed-size blocks, so reserved memory stays close to
# allocated (fragmentation is what made reserved exceed allocated by 8% + 1 GiB before; torchtitan's
# launcher and Unsloth set the same). The planner's slack (ftcluster/plan.py) follows this setting.
ALLOC_CONF_ENV = "PYTORCH_CUDA_ALLOC_CONF"
DEFAULT_ALLOC_CONF = "expandable_segments:True"


def expandable_segments() -> bool:
    """Whether the ranks' CUDA allocator uses expandable segments (our default, or the user's)."""
    conf = os.environ.get(ALLOC_CONF_ENV, DEFAULT_ALLOC_CONF)
    return "expandable_segments:true" in conf.replace(" ", "").lower()


def init_distributed(*, timeout_s: float = 1800.0) -> Dist:
    """Join (or create) the default process group: NCCL when this rank has a GPU, else gloo."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    # Before the first CUDA allocation of this process, which is when the allocator reads it.
    os.environ.setdefault(ALLOC_CONF_ENV, DEFAULT_ALLOC_CONF)
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        if "RANK" not in os.environ:  # a bare `python -c 'train(...)'`: a world of one
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
        kwargs = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s), **kwargs)
    return Dist(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, device=device)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast_object(obj, *, src: int = 0):  # type: ignore[no-untyped-def]
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def broadcast_object_if_dist(obj, *, src: int = 0):  # type: ignore[no-untyped-def]
    """`broadcast_object`, or `obj` itself without a process group (a world of one)."""
    return broadcast_object(obj, src=src) if dist.is_initialized() else obj


def all_gather_object(obj) -> list:  # type: ignore[no-untyped-def]
    """Every rank's `obj`, in rank order, on every rank (`[obj]` without a process group)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
