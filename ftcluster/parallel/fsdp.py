"""FSDP2 backend: `fully_shard` on every decoder layer, then on the root module.

Mixed precision: parameters are stored sharded in fp32 (trainable) or in the compute dtype
(frozen base weights of an adapter run: they never receive an update, so an fp32 copy would only
cost memory), gathered in the compute dtype for forward/backward, and gradients are reduced in
`parallel.reduce_dtype` (fp32 by default) into fp32 sharded gradients that the optimizer updates.

QLoRA: each NF4 linear's whole quantised state is one frozen 1-D parameter typed as the compute
dtype (ftcluster/quant.py), so it is sharded, gathered (without a cast: it already has the param
dtype) and freed like any frozen weight; only its bytes' meaning differs.

Checkpoints (`checkpoint.adapter_only`, default on): only trainable parameters and the optimizer are
saved; on load a frozen parameter is restored only if the checkpoint holds it.
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch
import torch.nn as nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard

from ftcluster.config import JobConfig
from ftcluster.data.batch import Batch
from ftcluster.distributed import Dist
from ftcluster.model.build import greedy_generate
from ftcluster.model.weights import LocalSlice, whole_tensor
from ftcluster.optim import build_optimizer, set_lr

if TYPE_CHECKING:
    from ftcluster.parallel import Materialize

log = logging.getLogger("ftcluster")

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


class Engine:
    def __init__(self, module: nn.Module, *, layers: list[nn.Module], job: JobConfig, dist: Dist,
                 materialize: "Materialize") -> None:
        self.dist = dist
        self.adapter_only = job.checkpoint.adapter_only
        compute = DTYPES[job.train.dtype]
        # Frozen weights are stored in the compute dtype before sharding (see module docstring).
        for p in module.parameters():
            if not p.requires_grad and p.dtype != compute:
                p.data = p.data.to(compute)
        mesh = init_device_mesh(dist.device_type, (dist.world_size,))
        mp = MixedPrecisionPolicy(param_dtype=compute if compute != torch.float32 else None,
                                  reduce_dtype=DTYPES[job.parallel.reduce_dtype])
        if job.parallel.cpu_offload and dist.device_type == "cpu":
            raise ValueError("parallel.cpu_offload: needs GPU ranks (FSDP2 offloads from an accelerator; on a "
                             "CPU-only host the parameters already live in host memory)")
        offload = CPUOffloadPolicy() if job.parallel.cpu_offload else None
        kw = {"mesh": mesh, "mp_policy": mp, **({"offload_policy": offload} if offload else {})}
        if not layers:
            raise ValueError("no decoder layers to shard")
        self._reshard_after_forward = job.parallel.reshard_after_forward
        kw["ignored_params"] = unsharded_frozen_params(module, job=job, world_size=dist.world_size)
        for layer in layers:
            fully_shard(layer, reshard_after_forward=job.parallel.reshard_after_forward, **kw)
        fully_shard(module, **kw)
        self.module = module
        # Shards are allocated only now, each rank its own; with CPU offload they live in host memory.
        materialize(module, torch.device("cpu") if offload is not None else dist.device, shard_view)
        self.optimizer = build_optimizer(module, cfg=job.optim)
        self._params = [p for p in module.parameters() if p.requires_grad]
        self._defer_sync = _defer_grad_sync(job, dist, module)
        if self._defer_sync:
            log.info("FSDP2: gradients reduced once per step (after the last of %d micro-batches)", job.train.grad_accum)

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.module(batch)

    def backward(self, loss: torch.Tensor, *, last_micro: bool) -> None:
        if self._defer_sync:
            # Earlier micro-batches accumulate unsharded (fp32) gradients locally; the last one
            # reduce-scatters their sum: one collective per layer per step instead of grad_accum.
            self.module.set_requires_gradient_sync(last_micro)
        loss.backward()

    @torch.no_grad()
    def eval_forward(self, batch: Batch) -> torch.Tensor:
        # eval(): dropout off (no RNG drawn), full attention under S2-Attn, no recompute. FSDP2
        # gathers and frees each layer as in training; no gradient or optimizer state is touched.
        self.module.eval()
        try:
            return self.module(batch)
        finally:
            self.module.train()

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, max_new_tokens: int,
                 eos_token_id: int | None, pad_token_id: int) -> torch.Tensor:
        # Greedy decoding with transformers' generate on the model inside the root. The root's own
        # parameters (embeddings, final norm, output head) are gathered only inside the root's
        # forward, which generate bypasses: unshard them for the call. Decoder layers are FSDP
        # modules of their own and gather per forward -- once per generated token, unless the whole
        # unsharded model fits in half the free GPU memory: then each layer stays gathered for the
        # call (one gather per layer instead of one per token). synced_gpus keeps ranks in lockstep
        # (every forward is collective) until all of them are done.
        layers = [m for m in self.module.modules() if isinstance(m, FSDPModule) and m is not self.module]
        keep = self._unsharded_fits()
        self.module.eval()
        self.module.unshard()
        if keep:
            for m in layers:
                m.set_reshard_after_forward(False, recurse=False)
        try:
            return greedy_generate(self.module.hf_model, input_ids=input_ids, attention_mask=attention_mask,
                                   max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                                   pad_token_id=pad_token_id, synced_gpus=self.dist.world_size > 1)
        finally:
            for m in layers if keep else []:
                m.reshard()
                m.set_reshard_after_forward(self._reshard_after_forward, recurse=False)
            self.module.reshard()
            self.module.train()

    def _unsharded_fits(self) -> bool:
        """Whether every parameter, gathered (compute dtype), fits in half the free GPU memory.
        Agreed across ranks (the gathers are collective)."""
        if self.dist.device_type != "cuda":
            return False
        need = sum(p.numel() * 2 for p in self.module.parameters())  # numel of a DTensor is the global size
        free = torch.tensor(float(torch.cuda.mem_get_info(self.dist.device)[0] / 2 >= need), device=self.dist.device)
        torch.distributed.all_reduce(free, op=torch.distributed.ReduceOp.MIN)
        return bool(free.item())

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        limit = max_norm if max_norm > 0 else float("inf")  # inf: compute the norm, scale by 1
        norm = torch.nn.utils.clip_grad_norm_(self._params, limit, foreach=True)
        if hasattr(norm, "full_tensor"):  # a replicated DTensor across the mesh
            norm = norm.full_tensor()
        return norm

    def step(self, *, lr: float, skip: torch.Tensor) -> None:
        set_lr(self.optimizer, lr)
        # The fused AdamW kernel reads `found_inf` and leaves parameters, moments and its step
        # counter untouched when it is non-zero: the skip is decided on the device, no host sync.
        self.optimizer.found_inf = skip.to(torch.float32)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def save_state(self, directory: Path) -> None:
        # checkpoint.adapter_only: the frozen base (an adapter run's base weights, QLoRA's NF4 state)
        # is left out; it is rebuilt from model.path or the seed before the resume loads this.
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        opts = StateDictOptions(ignore_frozen_params=self.adapter_only)
        model_sd, optim_sd = get_state_dict(self.module, self.optimizer, options=opts)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(directory))

    def load_state(self, directory: Path) -> None:
        # torch.distributed.checkpoint reshards: each rank reads the pieces of its current shards.
        # Every trainable parameter must be in the checkpoint; a frozen one is loaded when the
        # checkpoint holds it (saved with adapter_only=false), else it keeps its rebuilt value.
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

        from ftcluster.safe_load import safe_filesystem_reader

        # The metadata is a pickle: read through the restricted unpickler (no code from a checkpoint).
        saved = safe_filesystem_reader(directory).read_metadata().state_dict_metadata
        model_sd, optim_sd = get_state_dict(self.module, self.optimizer)
        trainable = get_state_dict(self.module, self.optimizer, options=StateDictOptions(ignore_frozen_params=True))[0]
        model_sd = {k: v for k, v in model_sd.items() if k in trainable or f"model.{k}" in saved}
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, storage_reader=safe_filesystem_reader(directory))
        set_state_dict(self.module, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                       options=StateDictOptions(strict=False))


class FrozenEngine:
    """A frozen module (DPO's reference copy, objective.reference=model) sharded like the trained
    one: `fully_shard` per decoder layer and on the root, weights in the compute dtype, no
    optimizer, no gradients; each forward gathers and frees layer by layer as in training."""

    def __init__(self, module: nn.Module, *, layers: list[nn.Module], job: JobConfig, dist: Dist,
                 materialize: "Materialize") -> None:
        if any(p.requires_grad for p in module.parameters()):
            raise ValueError("FrozenEngine: the module has trainable parameters")
        compute = DTYPES[job.train.dtype]
        for p in module.parameters():
            p.data = p.data.to(compute)  # on the meta device: free
        mesh = init_device_mesh(dist.device_type, (dist.world_size,))
        offload = CPUOffloadPolicy() if job.parallel.cpu_offload else None  # as the trained copy
        kw = {"mesh": mesh, "mp_policy": MixedPrecisionPolicy(param_dtype=None),  # already in compute dtype
              "ignored_params": unsharded_frozen_params(module, job=job, world_size=dist.world_size),
              **({"offload_policy": offload} if offload else {})}
        for layer in layers:
            fully_shard(layer, **kw)  # resharded after each forward: one gathered layer at a time
        fully_shard(module, **kw)
        materialize(module, torch.device("cpu") if offload is not None else dist.device, shard_view)
        self.module = module.eval()

    @torch.no_grad()
    def eval_forward(self, batch: Batch) -> torch.Tensor:
        return self.module(batch)


def unsharded_frozen_params(module: nn.Module, *, job: JobConfig, world_size: int) -> set[nn.Parameter]:
    """The parameters FSDP2 leaves alone (`ignored_params`): none, or every frozen one when they are
    not sharded. Ignored parameters stay plain tensors, whole on every rank, in the compute dtype;
    the forward uses them in place (no all-gather buffer, no copy) and they get no gradient, so
    nothing has to reduce them. CPU offload keeps them sharded (offload moves FSDP2's shards)."""
    if job.parallel.shards_frozen(world_size=world_size) or job.parallel.cpu_offload:
        return set()
    return {p for p in module.parameters() if not p.requires_grad}


def shard_view(param: torch.Tensor) -> LocalSlice:
    """This rank's part of an FSDP2 parameter: a DTensor's local shard and where it sits."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if not isinstance(param, DTensor):
        return whole_tensor(param)
    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    return LocalSlice(local=param.to_local(), index=tuple(slice(o, o + s) for o, s in zip(offset, shape)), flat=None,
                 shape=param.shape)


DEFER_SYNC_MAX_TRAINABLE_FRACTION = 0.05
"""Deferring the reduce-scatter keeps unsharded fp32 gradients of every trainable parameter for the
whole step: cheap for adapters (well under 5% of the model), a full model's worth for a full fine-tune."""


def _defer_grad_sync(job: JobConfig, dist: Dist, module: nn.Module) -> bool:
    """Reduce gradients once per step instead of once per micro-batch: `parallel.defer_grad_sync`
    true/false, or `auto`: on GPU, with accumulation, several ranks and few trainable parameters.
    (On CPU, gloo, the order of the floating-point sums would differ from the per-micro-batch
    reduction for no measurable gain; `true` forces it for tests.)"""
    choice = job.parallel.defer_grad_sync
    if choice is True:
        return job.train.grad_accum > 1
    if choice is False:
        return False
    total = sum(p.numel() for p in module.parameters())
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return (dist.device_type == "cuda" and job.train.grad_accum > 1 and dist.world_size > 1
            and trainable <= DEFER_SYNC_MAX_TRAINABLE_FRACTION * total)


def check_job(job: JobConfig) -> None:
    """Driver-side checks of an FSDP2 job (no process group, no device): none beyond the schema's."""


class CheckpointReader:
    """An FSDP2 checkpoint (torch.distributed.checkpoint) read offline without a process group
    (`ftcluster export`). Keys are `model.<parameter name>` (and `optim.*`, ignored)."""

    def __init__(self, directory: Path) -> None:
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        from ftcluster.safe_load import safe_filesystem_reader

        self.directory = directory
        md = safe_filesystem_reader(directory).read_metadata().state_dict_metadata
        self._names = {k[len("model."):]: (torch.Size(m.size), m.properties.dtype) for k, m in md.items()
                       if k.startswith("model.") and isinstance(m, TensorStorageMetadata)}

    def names(self) -> dict[str, tuple[torch.Size, torch.dtype]]:
        return self._names

    def read(self, names: Sequence[str]) -> dict[str, torch.Tensor]:
        import torch.distributed.checkpoint as dcp

        from ftcluster.safe_load import safe_filesystem_reader

        if not names:
            return {}
        sd = {f"model.{n}": torch.empty(self._names[n][0], dtype=self._names[n][1]) for n in names}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "torch.distributed is disabled ... single process": intended
            dcp.load(sd, storage_reader=safe_filesystem_reader(self.directory), no_dist=True)
        return {n: sd[f"model.{n}"] for n in names}
