"""The one seam over parallelism backends: `parallelize(module, ...) -> Engine`.

The training loop talks only to the Engine protocol below and never branches on the backend:
`parallel.backend=fsdp2` is parallel/fsdp.py, `zero1|zero2|zero3` is parallel/deepspeed.py.
Order inside every backend: the module arrives with PEFT and activation checkpointing already
applied (on the meta device); the backend shards it, then calls `materialize` so each rank fills
only its own shards, then builds the optimizer over the trainable (sharded) parameters.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Protocol

import torch
import torch.nn as nn

from ftcluster.config import JobConfig
from ftcluster.distributed import Dist


class Engine(Protocol):
    module: nn.Module
    """The sharded training module (call it through `forward`)."""

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Summed token loss of one micro-batch (fp32 scalar on the device)."""

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate gradients of `loss` (already scaled by the loop)."""

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """Global gradient L2 norm over all ranks (before clipping), as a 0-d device tensor;
        clips to max_norm when max_norm > 0. Never syncs with the host."""

    def step(self, *, lr: float, skip: torch.Tensor) -> None:
        """Apply the optimizer update with learning rate `lr` unless the 0-d bool tensor `skip` is
        true (decided on the device: a non-finite step changes no weight and no optimizer state),
        then zero the gradients."""

    def save_state(self, directory: Path) -> None:
        """Collective: write model and optimizer state, sharded, under `directory` (created by the
        caller, inside the checkpoint manager's temporary directory)."""

    def load_state(self, directory: Path) -> None:
        """Collective: restore what save_state wrote, resharding to the current world size."""


Materialize = Callable[[nn.Module, torch.device], None]
"""Allocates a (sharded, meta) module's parameters on a device and fills them."""


def parallelize(module: nn.Module, *, job: JobConfig, dist: Dist, materialize: Materialize,
                layer_classes: set[str]) -> Engine:
    if job.parallel.backend == "fsdp2":
        from ftcluster.parallel.fsdp import FSDP2Engine

        return FSDP2Engine(module, job=job, dist=dist, materialize=materialize, layer_classes=layer_classes)
    if job.parallel.backend in ("zero1", "zero2", "zero3"):
        from ftcluster.parallel.deepspeed import DeepSpeedEngine

        return DeepSpeedEngine(module, job=job, dist=dist, materialize=materialize, layer_classes=layer_classes)
    raise ValueError(f"parallel.backend: unknown backend {job.parallel.backend!r}")
