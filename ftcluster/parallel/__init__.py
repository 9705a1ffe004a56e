"""The one seam over parallelism backends: `parallelize(module, ...) -> Engine`.

The training loop talks only to the Engine protocol below and never branches on the backend.
`BACKENDS` is the one table from a `parallel.backend` name to the module that implements it; each
such module provides `Engine` (training), `FrozenEngine` (a frozen copy: DPO's reference model),
`CheckpointReader` (its checkpoints read offline, for export, beside the code that writes them)
and `check_job` (driver-side config checks).
Order inside every backend: the module arrives with PEFT and activation checkpointing already
applied (on the meta device); the backend shards it, then calls `materialize` so each rank fills
only its own shards, then builds the optimizer over the trainable (sharded) parameters.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType
from typing import Callable, Protocol, Sequence

import torch
import torch.nn as nn

from ftcluster.config import JobConfig
from ftcluster.data.batch import Batch
from ftcluster.distributed import Dist
from ftcluster.model.weights import ShardView

BACKENDS: dict[str, str] = {
    "fsdp2": "ftcluster.parallel.fsdp",
    "zero1": "ftcluster.parallel.deepspeed",
    "zero2": "ftcluster.parallel.deepspeed",
    "zero3": "ftcluster.parallel.deepspeed",
}
"""`parallel.backend` -> the module implementing it (imported on first use: DeepSpeed is heavy)."""


class CheckpointFormatError(ValueError):
    """An `engine/` directory is not what the backend that reads it writes."""


def backend_for(name: str) -> ModuleType:
    """The module implementing backend `name` (Engine, CheckpointReader, check_job)."""
    if name not in BACKENDS:
        raise ValueError(f"parallel.backend: unknown backend {name!r}; one of {', '.join(BACKENDS)}")
    return importlib.import_module(BACKENDS[name])


def check_job(job: JobConfig) -> None:
    """The backend's own checks of a validated job, in the driver before any process starts
    (ConfigError naming the key)."""
    backend_for(job.parallel.backend).check_job(job)


class Engine(Protocol):
    """What the loop calls; accumulation is explicit (`backward(..., last_micro=)`), and an
    evaluation forward touches no optimizer, gradient or accumulation state."""

    module: nn.Module
    """The sharded training module (call it through `forward` / `eval_forward`)."""

    def forward(self, batch: Batch) -> torch.Tensor:
        """Training forward of one micro-batch: the objective's summed loss (fp32 0-d tensor)."""

    def backward(self, loss: torch.Tensor, *, last_micro: bool) -> None:
        """Accumulate gradients of `loss` (already scaled by the loop). `last_micro`: this is the
        step's last micro-batch, after which gradients must be reduced across ranks (a backend may
        defer its reduction until then)."""

    def eval_forward(self, batch: Batch) -> torch.Tensor:
        """The same output as `forward` in evaluation mode (dropout off, full attention), without
        autograd, and leaving every optimizer, gradient, accumulation and RNG state as it was:
        training losses after it are bit-identical to a run without it. Collective under
        sharding: every rank calls it with a batch."""

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, max_new_tokens: int,
                 eos_token_id: int | None, pad_token_id: int) -> torch.Tensor:
        """Greedy decoding (KV cache, eval mode, no autograd) from left-padded prompts [rows, T]:
        the ids [rows, T + new]. Collective: every rank passes the same prompts and runs the same
        number of forwards. Touches no training state (greedy draws no random numbers)."""

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


class EngineState(Protocol):
    """A backend's checkpoint (`engine/`) read offline, without a process group."""

    def names(self) -> dict[str, tuple[torch.Size, torch.dtype]]:
        """Parameters of the trained module held by the checkpoint: name -> (shape, dtype)."""

    def read(self, names: Sequence[str]) -> dict[str, torch.Tensor]:
        """Those parameters, full (unsharded), on the CPU."""


Materialize = Callable[[nn.Module, torch.device, ShardView], None]
"""Allocates a (sharded, meta) module's parameters on a device and fills them; the engine passes
its `ShardView` (which part of each parameter this rank holds), so model code knows no backend."""


def parallelize(module: nn.Module, *, layers: list[nn.Module], job: JobConfig, dist: Dist,
                materialize: Materialize) -> Engine:
    """Shard `module` (decoder `layers` are the sharding unit), fill its local shards, build the
    optimizer. The module arrives with PEFT and activation checkpointing applied. A job whose
    batch sizes are still `auto` (built outside train(): tests, tools) gets layout.py's CPU
    resolution; train() passes the resolved job."""
    from ftcluster.layout import concrete, has_auto

    job = concrete(job) if has_auto(job) else job
    engine_cls = backend_for(job.parallel.backend).Engine
    return engine_cls(module, layers=layers, job=job, dist=dist, materialize=materialize)


class FrozenEngine(Protocol):
    """A frozen module sharded by the same backend as the trained one (DPO's reference copy,
    objective.reference=model): no optimizer, no gradient, never checkpointed."""

    module: nn.Module

    def eval_forward(self, batch: Batch) -> torch.Tensor:
        """The module's output in eval mode without autograd. Collective under sharding."""


def parallelize_frozen(module: nn.Module, *, layers: list[nn.Module], job: JobConfig, dist: Dist,
                       materialize: Materialize) -> FrozenEngine:
    """Shard a module with no trainable parameters the way `parallelize` shards the trained one and
    fill its local shards; no optimizer is built."""
    engine_cls = backend_for(job.parallel.backend).FrozenEngine
    return engine_cls(module, layers=layers, job=job, dist=dist, materialize=materialize)
