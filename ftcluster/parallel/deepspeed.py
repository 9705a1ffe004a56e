"""DeepSpeed ZeRO backend (`parallel.backend=zero1|zero2|zero3`), behind the same Engine protocol
as FSDP2: the training loop does not know which one runs.

The DeepSpeed config is generated from the typed config (`build_ds_config`); keys ftcluster owns
come from their typed fields only, and `parallel.deepspeed_overrides` adds anything else. The
merged config goes through DeepSpeed's own config model in the driver, before any process starts
(`check_deepspeed_config`).

Mixed precision, compared with FSDP2 (parallel/fsdp.py):
  * compute in bf16: both run forward/backward with bf16 copies of the weights; buffers (rotary
    frequencies) stay fp32 in both.
  * master weights and optimizer state in fp32: both. DeepSpeed would build its fp32 master copies
    from the bf16 module (so a weight not representable in bf16 -- random init, LoRA A, an fp32
    checkpoint -- would start at its bf16-rounded value); we fill trainable weights in fp32 first
    and write those exact values into DeepSpeed's masters after it has built them, so both backends
    start from the same fp32 masters. Cost: until then ZeRO-1/2 hold a full fp32 copy of the
    trainable weights per rank (ZeRO-3: this rank's partition).
  * gradient reduction in `parallel.reduce_dtype` (fp32 by default): DeepSpeed's
    `communication_data_type`. Accumulation over micro-batches: fp32 for zero2/zero3
    (`data_types.grad_accum_dtype`), like FSDP2's fp32 sharded gradients. zero1 accumulates in
    DeepSpeed's BF16_Optimizer, also in fp32.
  * frozen weights (LoRA base) are bf16 in both; ZeRO-1/2 keep them replicated on every rank (only
    ZeRO-3 partitions parameters), FSDP2 shards them.
  * clipping: the same global L2 norm of the reduced fp32 gradients; DeepSpeed divides by
    (norm + 1e-6) / max_norm where torch multiplies by max_norm / (norm + 1e-6): equal up to rounding.

Loss scaling: the loop scales each micro-batch loss by world_size / global_tokens and expects
gradients averaged over ranks. DeepSpeed averages over ranks too (gradient_average), but
`engine.backward` would also divide by gradient_accumulation_steps: we pass
`scale_wrt_gas=False`, because the loop's token weighting already spans the micro-batches.
The accumulation boundary is set explicitly on the last micro-batch of each step, so the
loop's one `step()` per optimizer step is DeepSpeed's boundary step.

Optimizer: `parallel.zero_optimizer=torch` (default) hands DeepSpeed a torch.optim.AdamW with the
fused kernel as its client optimizer, on GPU and CPU alike: nothing is JIT-compiled at start (no
nvcc/g++/ninja or arch list needed on the nodes), it is the same update rule and kernel as FSDP2,
and the fused kernel honours `found_inf`, so a non-finite step is skipped on the device.
`deepspeed` uses DeepSpeed's FusedAdam (DeepSpeedCPUAdam with cpu_offload); its ops are compiled
on first use, and a failed build is reported with what to install or set.

Host syncs per step: DeepSpeed itself reads the gradient norm on the host once (ZeRO-3:
`is_invalid_grad_norm` in its step; ZeRO-1/2: the same check inside its clipping when
train.grad_clip > 0); with offload the norm and the update run on the host anyway. With
`zero_optimizer=deepspeed` the skip decision is read on the host once more.

ZeRO-3 construction: the module arrives on the meta device. Parameters are converted to ZeRO-3
partitions one decoder layer at a time (each layer is allocated in full, uninitialised, then
partitioned and freed: a rank never holds more than one layer, or the embedding table; DeepSpeed's
conversion broadcasts each tensor from rank 0 on the way, one pass over the model's bytes), then
`materialize` fills each rank's partition: from the rows of the safetensors files that cover it,
or from the same seeded init rules as FSDP2 (model.py), so the same seed gives the same weights.
Tied input/output embeddings stay one parameter.

Checkpoints: DeepSpeed's own sharded save (`save_checkpoint`, tag `ds`) inside the checkpoint
manager's temporary directory, so its commit protocol, retention and resume=auto apply unchanged.
With checkpoint.adapter_only (the default) frozen weights (an adapter run's base model) are not
saved: they are rebuilt from model.path / the seed on resume, as under FSDP2. Loading at another world size converts the checkpoint to DeepSpeed's universal format first
(`ds_to_universal` in a subprocess of rank 0, into `<engine dir>/universal`, published by rename
and reused by later loads; the other ranks wait in a barrier, bounded by the process-group timeout)
and loads that.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import traceback
from collections.abc import KeysView
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import torch
import torch.nn as nn

from ftcluster.config import ConfigError, JobConfig
from ftcluster.data.batch import Batch
from ftcluster.distributed import Dist, barrier
from ftcluster.model.build import greedy_generate
from ftcluster.model.weights import LocalSlice, whole_tensor
from ftcluster.optim import build_optimizer, param_groups, set_lr

if TYPE_CHECKING:
    from ftcluster.parallel import Materialize

log = logging.getLogger("ftcluster")

ZERO_STAGES = {"zero1": 1, "zero2": 2, "zero3": 3}
TAG = "ds"
META = "ds_meta.json"

# Keys the typed config owns: an override of one of them is refused, naming the typed field.
OWNED_KEYS = {
    "train_batch_size": "train.micro_batch_size x train.grad_accum x ranks",
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.grad_accum",
    "gradient_clipping": "train.grad_clip",
    "bf16": "train.dtype", "bfloat16": "train.dtype", "fp16": "train.dtype", "amp": "train.dtype",
    "torch_autocast": "train.dtype",
    "communication_data_type": "parallel.reduce_dtype",
    "optimizer": "optim.* and parallel.zero_optimizer",
    "scheduler": "optim.* (the loop sets the learning rate every step)",
    "zero_optimization.stage": "parallel.backend",
    "zero_optimization.offload_optimizer.device": "parallel.cpu_offload",
    "zero_optimization.offload_param.device": "parallel.cpu_offload",
    "checkpoint.load_universal": "(set automatically when resuming at another world size)",
}


def build_ds_config(job: JobConfig) -> dict[str, Any]:
    """The DeepSpeed config for this job, without `deepspeed_overrides`. No train_batch_size: DeepSpeed
    derives it from micro-batch x accumulation x its world size."""
    p, t = job.parallel, job.train
    stage = ZERO_STAGES[p.backend]
    bf16 = t.dtype == "bf16"
    zero: dict[str, Any] = {
        "stage": stage,
        "overlap_comm": p.overlap_comm,
        "contiguous_gradients": True,
        "reduce_bucket_size": p.reduce_bucket_size,
        # Plain F.linear, as under FSDP2 (DeepSpeed's replacement changes what autograd saves).
        "memory_efficient_linear": False,
    }
    if stage == 3:
        zero.update(stage3_prefetch_bucket_size=p.stage3_prefetch_bucket_size,
                    stage3_param_persistence_threshold=p.stage3_param_persistence_threshold,
                    stage3_max_live_parameters=p.stage3_max_live_parameters,
                    stage3_max_reuse_distance=p.stage3_max_reuse_distance,
                    stage3_gather_16bit_weights_on_model_save=False)
    else:
        zero["allgather_bucket_size"] = p.allgather_bucket_size
    if p.cpu_offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        if stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": t.grad_clip,
        # The skip of a non-finite step is decided by the loop (Engine.step(skip=...)).
        "bf16": {"enabled": bf16, "check_grad_overflow": False},
        "communication_data_type": p.reduce_dtype,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # torch AdamW as the client optimizer
        "zero_force_ds_cpu_optimizer": False,  # ... also with offload (the fused CPU kernel)
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }
    if bf16:
        cfg["data_types"] = {"grad_accum_dtype": "fp32"}
    if p.zero_optimizer == "deepspeed":
        o = job.optim
        cfg["optimizer"] = {"type": "AdamW", "params": {"lr": o.lr, "betas": [o.beta1, o.beta2], "eps": o.eps,
                                                         "weight_decay": o.weight_decay}}
    return _merge(cfg, job.parallel.deepspeed_overrides)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def _leaf_paths(d: dict[str, Any], prefix: str = "") -> Iterator[str]:
    for k, v in d.items():
        path = f"{prefix}{k}"
        yield path
        if isinstance(v, dict):
            yield from _leaf_paths(v, path + ".")


class _ReadTracker(dict):
    """A dict that records which keys DeepSpeed looked at: a top-level key it never reads is one it
    does not know (DeepSpeed ignores unknown top-level keys silently; its sub-models refuse them)."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.__dict__["seen"] = set()

    def __getitem__(self, k: Any) -> Any:
        self.seen.add(k)
        return super().__getitem__(k)

    def get(self, k: Any, default: Any = None) -> Any:
        self.seen.add(k)
        return super().get(k, default)

    def __contains__(self, k: object) -> bool:
        self.seen.add(k)
        return super().__contains__(k)

    def keys(self) -> KeysView:  # type: ignore[override]
        return KeysView(self)  # membership tests go through __contains__


def check_job(job: JobConfig) -> None:
    """Driver-side checks of a ZeRO job (no process group, no device): backend x PEFT method, then
    the generated DeepSpeed config through DeepSpeed's own config model."""
    if job.peft.method == "qlora":
        # NF4Linear's flat quantised state is sharded by FSDP2's fully_shard; ZeRO would cast,
        # flatten or partition it in ways it does not survive.
        raise ConfigError(f"parallel.backend: QLoRA does not work with DeepSpeed {job.parallel.backend} (its 4-bit "
                          "base weights cannot be cast, flattened or partitioned by ZeRO); use parallel=fsdp2 for QLoRA")
    check_deepspeed_config(job)


def check_deepspeed_config(job: JobConfig) -> None:
    """Refuse overrides of owned keys, then validate the merged config with DeepSpeed's config model
    (`deepspeed.runtime.config.DeepSpeedConfig` and its pydantic sub-models). Raises ConfigError
    naming the key. Runs in the driver: no process group, no device."""
    root = "parallel.deepspeed_overrides"
    overrides = job.parallel.deepspeed_overrides
    for path in _leaf_paths(overrides):
        if path in OWNED_KEYS:
            raise ConfigError(f"{root}.{path}: set by ftcluster from {OWNED_KEYS[path]}; use that instead")
    from ftcluster.layout import concrete

    cfg = build_ds_config(concrete(job))  # the driver checks the overrides; `auto` batch sizes are 8 x 1 here
    with _quiet_deepspeed():
        from deepspeed.runtime.config import DeepSpeedConfig

        tracked = _ReadTracker(cfg)
        try:
            DeepSpeedConfig(tracked)
        except Exception as e:  # noqa: BLE001 - DeepSpeed raises pydantic, ValueError, AssertionError...
            raise ConfigError(_explain_ds_config_error(e, overrides, root)) from None
    unknown = sorted(k for k in overrides if k not in tracked.seen)
    if unknown:
        raise ConfigError(f"{root}.{unknown[0]}: not a DeepSpeed config key (DeepSpeed {_ds_version()} does not read it)")


def _explain_ds_config_error(e: Exception, overrides: dict[str, Any], root: str) -> str:
    errors = getattr(e, "errors", None)
    if callable(errors):  # pydantic.ValidationError: the location inside one sub-model
        first = e.errors()[0]  # type: ignore[attr-defined]
        loc = ".".join(str(x) for x in first.get("loc", ()))
        paths = [p for p in _leaf_paths(overrides) if loc and (p == loc or p.endswith("." + loc))]
        where = f"{root}.{paths[0]}" if paths else f"{root} ({getattr(e, 'title', 'DeepSpeed config')}.{loc})"
        return f"{where}: {first.get('msg', str(e))} (DeepSpeed's config model)"
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    named = [p for p in _leaf_paths(overrides) if p.split(".")[-1] in msg]
    where = f"{root}.{named[0]}" if named else root
    return f"{where}: DeepSpeed rejected the config: {msg}"


def _ds_version() -> str:
    import deepspeed

    return deepspeed.__version__


@contextlib.contextmanager
def _quiet_deepspeed() -> Iterator[None]:
    """DeepSpeed logs at INFO to stdout on import and for every config it parses."""
    ds_logger = logging.getLogger("DeepSpeed")
    level = ds_logger.level
    ds_logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        ds_logger.setLevel(max(level, logging.WARNING))


# --- op build failures ----------------------------------------------------------------------------

class OpBuildError(RuntimeError):
    """A DeepSpeed op had to be compiled and could not be."""


@contextlib.contextmanager
def explain_op_build_failures() -> Iterator[None]:
    """Turn an exception raised while DeepSpeed JIT-compiles one of its ops (op_builder, torch's
    cpp_extension) into one line that says what to install or set."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - inspected and re-raised
        op = _failed_op(e)
        if op is None:
            raise
        reason = (str(e).strip().splitlines() or [type(e).__name__])[-1][:300]
        arch = os.environ.get("TORCH_CUDA_ARCH_LIST")
        raise OpBuildError(
            f"DeepSpeed could not compile its '{op}' op ({type(e).__name__}: {reason}). Either set "
            "parallel.zero_optimizer=torch (torch's fused AdamW: nothing to compile), or make the build work: "
            "install a C++ compiler and ninja (and on GPU the CUDA toolkit's nvcc matching torch's CUDA), and on "
            f"H100/H200 export TORCH_CUDA_ARCH_LIST=9.0 (currently {arch!r}; '9.0a' breaks DeepSpeed's op builder), "
            "or pre-build the ops: DS_BUILD_FUSED_ADAM=1 DS_BUILD_CPU_ADAM=1 pip install deepspeed"
        ) from e


def _failed_op(e: BaseException) -> str | None:
    seen: set[int] = set()
    exc: BaseException | None = e
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        tb = exc.__traceback__
        for frame, _ in traceback.walk_tb(tb):
            fn = frame.f_code.co_filename.replace("\\", "/")
            if "/deepspeed/ops/op_builder/" in fn or fn.endswith("torch/utils/cpp_extension.py"):
                for f, _ in traceback.walk_tb(tb):
                    name = getattr(f.f_locals.get("self"), "NAME", None)
                    if isinstance(name, str):
                        return name
                return "unknown"
        exc = exc.__cause__ or exc.__context__
    return None


# --- the engine ----------------------------------------------------------------------------------

class Engine:
    def __init__(self, module: nn.Module, *, layers: list[nn.Module], job: JobConfig, dist: Dist,
                 materialize: "Materialize") -> None:
        with _quiet_deepspeed():
            import deepspeed
        if dist.device_type == "cpu":
            # deepspeed.comm would JIT-compile its shared-memory all-reduce for CPU ranks (used by
            # its inference all-reduce only; training collectives go through our gloo group). Its
            # table of buildable ops is a module-level dict meant to be edited: mark that op unavailable.
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        self.dist = dist
        self.job = job
        self.stage = ZERO_STAGES[job.parallel.backend]
        self._skip_on_host = False
        self._master_device = torch.device("cpu") if job.parallel.cpu_offload else dist.device
        compute = torch.bfloat16 if job.train.dtype == "bf16" else torch.float32
        ds_config = build_ds_config(job)
        # Frozen weights are stored in the compute dtype (cast on meta: free). Trainable ones are
        # filled in fp32 first, so that DeepSpeed's fp32 master copies can start from the exact
        # values FSDP2 starts from (see _to_compute_dtype); buffers stay fp32.
        for p in module.parameters():
            if not p.requires_grad and p.dtype != compute:
                p.data = p.data.to(compute)
        if self.stage == 3:
            with _quiet_deepspeed():
                _partition_zero3(module, ds_config=ds_config, layers=layers, device=dist.device)
            # The loss head reads the output projection's weight outside lm_head.forward: gather it
            # with the root module's forward and backward.
            deepspeed.zero.register_external_parameter(module, module.hf_model.get_output_embeddings().weight)
            if job.parallel.stage3_gather_per_layer:
                # One gather (and one set of hooks) per decoder layer instead of per linear/LoRA
                # submodule: DeepSpeed's per-submodule hooks cost Python time and, with more than
                # two gathers in flight, a host sync each (partitioned_param_coordinator's
                # __max_ongoing_fetch_events), which stalls the GPU on small modules. The unit is
                # the same as FSDP2's; a layer's full weights are live while it runs, as there.
                from deepspeed.utils import set_z3_leaf_modules

                leaves = set_z3_leaf_modules(module, sorted({type(m).__name__ for m in layers}))
                # A leaf layer's parameters are released by its backward hook, which torch fires as
                # soon as the gradient w.r.t. the layer's inputs exists -- or, when no input needs a
                # gradient (a frozen embedding, as in LoRA), as soon as the gradient w.r.t. its
                # outputs does: before the layer's own weight gradients are accumulated. Making the
                # embedding output need a gradient keeps that order (cost: one input gradient
                # through the first layer). Activation checkpointing does the same already.
                module.hf_model.enable_input_require_grads()
                log.info("ZeRO-3: parameters gathered per decoder layer (%d layers)", len(leaves))
            else:
                log.info("ZeRO-3: parameters gathered per submodule (parallel.stage3_gather_per_layer=false)")
        else:
            # Every rank allocates the full model (ZeRO-1/2 replicate it), keeping tied weights tied.
            _to_empty_keep_ties(list(module.modules()), _ties(module), dist.device)
        # ZeRO-3: each rank fills its own partitions.
        materialize(module, dist.device, shard_view)
        exact = _to_compute_dtype(module, compute, zero3=self.stage == 3)

        client = None
        model_parameters = None
        if job.parallel.zero_optimizer == "torch":
            client = build_optimizer(module, cfg=job.optim)
        else:
            model_parameters = param_groups(module, weight_decay=job.optim.weight_decay)
        with _quiet_deepspeed(), explain_op_build_failures():
            self.ds, _, _, _ = deepspeed.initialize(model=module, optimizer=client, model_parameters=model_parameters,
                                                    config=ds_config, dist_init_required=False)
        _set_fp32_masters(exact, zero3=self.stage == 3)
        self.module = module
        # The optimizer that updates the fp32 partitions (ours, or the one DeepSpeed built).
        self.inner = client if client is not None else self.ds.optimizer.optimizer
        if client is None:
            _guard_step(self.inner, self)
        log.info("DeepSpeed %s ZeRO-%d (%s): %s", _ds_version(), self.stage, type(self.ds.optimizer).__name__,
                 type(self.inner).__name__)

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.ds(batch)

    def backward(self, loss: torch.Tensor, *, last_micro: bool) -> None:
        # The step's last micro-batch is DeepSpeed's accumulation boundary (reduction, offload
        # copy), said explicitly: a count of forwards would be shifted by any forward that is not
        # a training micro-batch (an evaluation batch, a reference pass).
        self.ds.set_gradient_accumulation_boundary(last_micro)
        # The loop already weights tokens across micro-batches: no division by accumulation steps.
        self.ds.backward(loss, scale_wrt_gas=False)

    @torch.no_grad()
    def eval_forward(self, batch: Batch) -> torch.Tensor:
        # Through DeepSpeed's engine, so ZeRO-3 gathers (and frees) parameters as in training; in
        # eval mode and without autograd no gradient hook fires and no accumulation state moves.
        self.ds.eval()
        try:
            return self.ds(batch)
        finally:
            self.ds.train()

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, max_new_tokens: int,
                 eos_token_id: int | None, pad_token_id: int) -> torch.Tensor:
        # Greedy decoding on the model inside the engine: ZeRO-3's hooks on every submodule (each
        # decoder layer as one leaf) gather parameters per forward; synced_gpus keeps ranks in
        # lockstep (every forward is collective under ZeRO-3) until all of them are done.
        self.ds.eval()
        try:
            return greedy_generate(self.module.hf_model, input_ids=input_ids, attention_mask=attention_mask,
                                   max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                                   pad_token_id=pad_token_id, synced_gpus=self.stage == 3 and self.dist.world_size > 1)
        finally:
            self.ds.train()

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        # DeepSpeed clips inside its step with the norm of the same reduced gradients; computing it
        # here too costs one pass over this rank's gradient partition and one all-reduce of a scalar.
        opt = self.ds.optimizer
        opt.clip_grad = max_norm
        norm = _global_grad_norm(opt).to(self.dist.device, torch.float32)
        # DeepSpeed reports an invalid norm as a negative sentinel; the loop tests isfinite.
        return torch.where(norm < 0, torch.full_like(norm, float("nan")), norm)

    def step(self, *, lr: float, skip: torch.Tensor) -> None:
        set_lr(self.inner, lr)
        if isinstance(self.inner, torch.optim.AdamW):
            # Fused kernel: skipped where the fp32 partitions live (host memory with cpu_offload).
            self.inner.found_inf = skip.to(device=self._master_device, dtype=torch.float32)
        else:
            self._skip_on_host = bool(skip)  # the one extra host sync of DeepSpeed's own optimizers
        self.ds.step()

    def save_state(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        # checkpoint.adapter_only: frozen weights (an adapter run's base model) are not saved; they
        # are rebuilt from the model source before loading, as at the start.
        self.ds.save_checkpoint(str(directory), tag=TAG, client_state={}, save_latest=False,
                                exclude_frozen_parameters=self.job.checkpoint.adapter_only)
        if self.dist.is_main:
            (directory / META).write_text(json.dumps({"world_size": self.dist.world_size, "stage": self.stage,
                                                      "deepspeed": _ds_version()}))

    def load_state(self, directory: Path) -> None:
        meta_file = directory / META
        if not meta_file.is_file():
            raise ValueError(f"resume: {directory.parent} was not written by a DeepSpeed backend (no {META}); "
                             f"resume it with the parallel.backend that wrote it")
        meta = json.loads(meta_file.read_text())
        if meta["stage"] != self.stage:
            raise ValueError(f"resume: {directory.parent} was written by ZeRO stage {meta['stage']}, this run is "
                             f"ZeRO-{self.stage}; resume with parallel.backend=zero{meta['stage']}")
        kwargs = {"load_module_strict": False, "load_optimizer_states": True, "load_lr_scheduler_states": False}
        from ftcluster.safe_load import deepspeed_globals, forced_weights_only

        # DeepSpeed torch.loads its .pt files with weights_only=False: inside, every torch.load is
        # weights_only=True with the allowlist of what DeepSpeed writes (no code from a checkpoint).
        if meta["world_size"] == self.dist.world_size:
            with forced_weights_only(deepspeed_globals()):
                path, _ = self.ds.load_checkpoint(str(directory), tag=TAG, **kwargs)
        else:
            universal = _universal_checkpoint(directory, self.dist)
            self.ds._config.load_universal_checkpoint = True  # read by load_checkpoint only
            try:
                with forced_weights_only(deepspeed_globals()):
                    path, _ = self.ds.load_checkpoint(str(universal), tag=TAG, **kwargs)
            finally:
                self.ds._config.load_universal_checkpoint = False
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint in {directory}")


def build_frozen_ds_config(job: JobConfig) -> dict[str, Any]:
    """The DeepSpeed config of a frozen copy (DPO's reference): the job's, without an optimizer.
    ZeRO-3 keeps stage 3 (the copy's parameters are partitioned and gathered per forward); under
    ZeRO-1/2 DeepSpeed partitions only optimizer state and gradients, which a frozen copy has none
    of, so it runs at stage 0 (replicated, as the trained weights are there). TRL's
    `prepare_deepspeed` prepares its reference model the same way."""
    cfg = build_ds_config(job)
    cfg.pop("optimizer", None)
    if ZERO_STAGES[job.parallel.backend] != 3:
        cfg["zero_optimization"] = {"stage": 0}
    else:
        cfg["zero_optimization"].pop("offload_optimizer", None)
    return cfg


class FrozenEngine:
    """A frozen module (objective.reference=model) through `deepspeed.initialize` without an
    optimizer (see `build_frozen_ds_config`), filled by `materialize` from the same weights as the
    trained module; each forward runs in eval mode without autograd."""

    def __init__(self, module: nn.Module, *, layers: list[nn.Module], job: JobConfig, dist: Dist,
                 materialize: "Materialize") -> None:
        with _quiet_deepspeed():
            import deepspeed
        if any(p.requires_grad for p in module.parameters()):
            raise ValueError("FrozenEngine: the module has trainable parameters")
        compute = torch.bfloat16 if job.train.dtype == "bf16" else torch.float32
        ds_config = build_frozen_ds_config(job)
        for p in module.parameters():
            p.data = p.data.to(compute)  # on the meta device: free
        zero3 = ds_config["zero_optimization"]["stage"] == 3
        if zero3:
            with _quiet_deepspeed():
                _partition_zero3(module, ds_config=ds_config, layers=layers, device=dist.device)
            deepspeed.zero.register_external_parameter(module, module.hf_model.get_output_embeddings().weight)
            if job.parallel.stage3_gather_per_layer:  # one gather per decoder layer, as the trained copy
                from deepspeed.utils import set_z3_leaf_modules

                set_z3_leaf_modules(module, sorted({type(m).__name__ for m in layers}))
        else:
            _to_empty_keep_ties(list(module.modules()), _ties(module), dist.device)
        materialize(module, dist.device, shard_view)
        with _quiet_deepspeed():
            self.ds, _, _, _ = deepspeed.initialize(model=module, config=ds_config, dist_init_required=False)
        self.ds.eval()
        self.module = module

    @torch.no_grad()
    def eval_forward(self, batch: Batch) -> torch.Tensor:
        return self.ds(batch)


def shard_view(param: torch.Tensor) -> LocalSlice:
    """This rank's part of a parameter. ZeRO-3: this rank holds `ds_tensor`, elements [start, end)
    of the flattened tensor (the last rank's partition is zero-padded); the block of whole rows
    covering it is what to read. ZeRO-1/2 parameters are whole on every rank."""
    import torch.distributed as dist

    if getattr(param, "ds_tensor", None) is None:
        return whole_tensor(param)
    shape = torch.Size(param.ds_shape)  # a ZeRO-3 parameter's own shape is empty
    part = param.ds_tensor.ds_numel
    start = part * dist.get_rank(group=param.ds_process_group)
    end = min(start + part, param.ds_numel)
    local = param.ds_tensor.view(-1)
    local.zero_()  # the padding of the last partition
    if start >= end:
        return LocalSlice(local=local[:0], index=(), flat=None, shape=shape)
    row = 1
    for s in shape[1:]:
        row *= s
    r0, r1 = start // row, -(-end // row)
    return LocalSlice(local=local[: end - start], index=(slice(r0, r1),), flat=slice(start - r0 * row, end - r0 * row),
                 shape=shape)


def _partition_zero3(module: nn.Module, *, ds_config: dict[str, Any], layers: list[nn.Module],
                     device: torch.device) -> None:
    """Convert the meta module's parameters to ZeRO-3 partitions, one decoder layer at a time, then
    what remains (embeddings, final norm, output head). Each group is allocated in full (uninitialised)
    only while it is partitioned; `materialize` fills the partitions afterwards."""
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import is_zero_param

    ties = _ties(module)
    groups = [*layers, module]
    for group in groups:
        owners = [m for m in group.modules() if any(p.is_meta and not is_zero_param(p) for p in m.parameters(recurse=False))]
        if not owners:
            continue
        _to_empty_keep_ties(owners, ties, device)
        deepspeed.zero.Init(module=group, config_dict_or_path=ds_config)


def _ties(module: nn.Module) -> list[list[tuple[nn.Module, str]]]:
    """Parameters registered under several modules (tied input and output embeddings)."""
    owners: dict[int, list[tuple[nn.Module, str]]] = {}
    for m in module.modules():
        for name, p in m._parameters.items():
            if p is not None:
                owners.setdefault(id(p), []).append((m, name))
    return [v for v in owners.values() if len(v) > 1]


def _to_empty_keep_ties(modules: list[nn.Module], ties: list[list[tuple[nn.Module, str]]], device: torch.device) -> None:
    """`to_empty` of these modules' own parameters. Moving off the meta device makes new Parameter
    objects, one per owning module, which would untie tied weights: re-register the first."""
    for m in modules:
        m.to_empty(device=device, recurse=False)
    for owners in ties:
        first = owners[0][0]._parameters[owners[0][1]]
        for m, name in owners[1:]:
            m._parameters[name] = first


def _to_compute_dtype(module: nn.Module, compute: torch.dtype, *, zero3: bool) -> dict[nn.Parameter, torch.Tensor]:
    """Cast the (filled) fp32 trainable weights to the compute dtype and return their exact fp32
    values (ZeRO-3: this rank's partition; ZeRO-1/2: the whole tensor), which become the fp32
    master weights once DeepSpeed has built its optimizer (it builds them from the cast module).
    Held only until then: a full fp32 copy of the trainable weights per rank under ZeRO-1/2."""
    exact: dict[nn.Parameter, torch.Tensor] = {}
    for p in module.parameters():
        if p.dtype == compute:
            continue
        if zero3:
            fp32 = p.ds_tensor.data
            p.ds_tensor.data = fp32.to(compute)
            p.data = torch.empty(0, dtype=compute, device=p.data.device)  # partitioned: no data of its own
        else:
            fp32 = p.data
            p.data = fp32.to(compute)
        exact[p] = fp32
    return exact


def _set_fp32_masters(exact: dict[nn.Parameter, torch.Tensor], *, zero3: bool) -> None:
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_local_fp32_param

    for p, value in exact.items():
        (safe_set_local_fp32_param if zero3 else safe_set_full_fp32_param)(p, value)
    exact.clear()


def _global_grad_norm(opt) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """L2 norm of the reduced gradients this step will apply, from DeepSpeed's own helpers (the
    same numbers its step uses for clipping)."""
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.utils import combine_grad_norm_groups, get_global_norm_of_tensors
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    if isinstance(opt, DeepSpeedZeroOptimizer_Stage3):
        norm = combine_grad_norm_groups(opt._get_norm_groups())
    elif isinstance(opt, DeepSpeedZeroOptimizer):
        norm = opt.scaled_global_norm()
    elif isinstance(opt, BF16_Optimizer):
        grads, _ = opt.get_grads_for_norm()
        norm = get_global_norm_of_tensors(input_tensors=grads, mpu=opt.mpu, norm_type=opt.norm_type)
    else:
        raise TypeError(f"unsupported DeepSpeed optimizer wrapper {type(opt).__name__}")
    norm = norm if torch.is_tensor(norm) else torch.tensor(float(norm))
    return norm / float(getattr(opt, "loss_scale", 1.0) or 1.0)


def _guard_step(inner: torch.optim.Optimizer, engine: Engine) -> None:
    """DeepSpeed's own optimizers do not read `found_inf`: skip their update from the host flag."""
    original = inner.step

    def step(*args: Any, **kwargs: Any) -> Any:
        if engine._skip_on_host:
            return None
        return original(*args, **kwargs)

    inner.step = step  # type: ignore[method-assign]


def _universal_checkpoint(directory: Path, d: Dist) -> Path:
    """`<directory>/universal`: the checkpoint in DeepSpeed's universal (world-size independent)
    format, converted once by rank 0 and published by an atomic rename; later loads reuse it."""
    out = directory / "universal"
    if d.is_main and not (out / TAG).is_dir():
        tmp = directory / f".universal-tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        workers = max(1, min(8, (os.cpu_count() or 2) // 2))
        # Through ftcluster.safe_load: every torch.load of the conversion (and of its forked
        # workers) is weights_only=True with DeepSpeed's allowlist.
        cmd = [sys.executable, "-m", "ftcluster.safe_load", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(directory / TAG),
               "--output_folder", str(tmp / TAG), "--inject_missing_state", "--num_extract_workers", str(workers),
               "--num_merge_workers", str(max(1, workers // 2))]
        log.info("converting %s to DeepSpeed's universal checkpoint format for a new world size", directory)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
            raise RuntimeError(f"converting {directory} to a universal checkpoint failed:\n{tail}")
        os.rename(tmp, out)
    barrier()
    return out


class CheckpointReader:
    """A DeepSpeed ZeRO checkpoint (`<engine>/ds`, written by `Engine.save_state`) read offline
    (`ftcluster export`): the fp32 master weights of the trainable parameters, from DeepSpeed's
    zero_to_fp32 in lazy mode (the optimizer partitions are memory-mapped and each tensor is
    assembled when read). Frozen weights are never in it (saved with exclude_frozen_parameters)."""

    def __init__(self, directory: Path) -> None:
        from ftcluster.parallel import CheckpointFormatError

        if not (directory / TAG).is_dir():
            raise CheckpointFormatError(f"{directory}: no DeepSpeed checkpoint (expected {directory / TAG})")
        with _quiet_deepspeed(), contextlib.redirect_stdout(io.StringIO()):  # DeepSpeed prints on import
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            from ftcluster.safe_load import deepspeed_globals, forced_weights_only

            with forced_weights_only(deepspeed_globals()):  # zero_to_fp32 loads with weights_only=False
                self._lazy = get_fp32_state_dict_from_zero_checkpoint(str(directory), tag=TAG,
                                                                      exclude_frozen_parameters=True, lazy_mode=True)
        self._names = {n: (torch.Size(t.shape), torch.float32) for n, t in self._lazy.items()}

    def names(self) -> dict[str, tuple[torch.Size, torch.dtype]]:
        return self._names

    def read(self, names: Sequence[str]) -> dict[str, torch.Tensor]:
        return {n: self._lazy[n].contiguous().to("cpu", torch.float32) for n in names}
