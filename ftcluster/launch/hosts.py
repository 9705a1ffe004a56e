"""Facts about this host that launchers need before any rank starts: how many GPUs it shows, and
so how many local ranks `auto` means."""
from __future__ import annotations

from ftcluster.config import LocalLauncherConfig


def visible_gpus() -> int:
    """CUDA devices this process can see (CUDA_VISIBLE_DEVICES applied); 0 without CUDA."""
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001 - a broken CUDA install counts as no GPU here
        return 0


def local_world_size(launcher: LocalLauncherConfig) -> int:
    """launcher.nproc_per_node resolved: `auto` is one rank per visible GPU, or one on CPU."""
    n = launcher.nproc_per_node
    if n == "auto":
        return max(1, visible_gpus())
    return int(n)
