"""The layout a run trains with: the `auto` knobs of the config resolved to concrete values.

`train.micro_batch_size`, `train.grad_accum`, `train.activation_checkpointing`, `model.liger` and
`peft.fused` may be `auto` (their default). `resolve_layout` turns them into a `Layout` from the memory plan
(ftcluster/plan.py) and what this machine has (CUDA or not, free GPU memory or
`train.memory_budget_gib`, Liger installed or not); an explicit value always wins. `apply_layout`
returns a copy of the job with those values filled in, so the code that builds batches, modules
and engines reads plain ints and mode names. The user's config (with `auto`) is what the run dir
saves; the layout is logged as an event at start and printed in the start block.

Every rank resolves the same layout: the inputs are the config, the world size and the smallest
free memory over the ranks (one all-reduce at start, in train.py), never anything rank-local.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import math
from typing import Any, Optional

from ftcluster.config import AUTO, DEFAULT_SELECTIVE_EVERY, ConfigError, JobConfig, ac_mode, tri_state

DEFAULT_PER_RANK_BATCH = 8
"""Sequences per rank per micro-batch when neither train.global_batch_size (or _tokens) nor
train.micro_batch_size is set (the old default micro-batch of 8): the global batch is then
8 x grad_accum x world size, the same as before `auto` existed."""



@dataclasses.dataclass(frozen=True, kw_only=True)
class Layout:
    micro_batch_size: int
    grad_accum: int
    activation_checkpointing: str
    """One of config.AC_MODES."""
    activation_checkpointing_every: int
    liger: bool
    fused: bool = False
    """peft.fused: LoRA linears as one fused node (ftcluster/model/fused_lora.py)."""
    budget_gib: Optional[float] = None
    """The GPU memory the plan had to fit (per rank), None on a CPU."""
    predicted_peak_gib: Optional[float] = None
    why: tuple[str, ...] = ()
    """One line per choice that was made for the user (explicit values are not listed)."""

    def event(self) -> dict[str, Any]:
        return {"event": "layout", "micro_batch_size": self.micro_batch_size, "grad_accum": self.grad_accum,
                "activation_checkpointing": self.activation_checkpointing,
                "activation_checkpointing_every": self.activation_checkpointing_every, "liger": self.liger,
                "fused": self.fused, "budget_gib": self.budget_gib, "predicted_peak_gib": self.predicted_peak_gib, "why": list(self.why)}

    def describe(self) -> str:
        ac = self.activation_checkpointing
        ac = f"selective (every {self.activation_checkpointing_every})" if ac == "selective" else ac
        peak = "" if self.predicted_peak_gib is None else f", planned peak {self.predicted_peak_gib:.1f} of {self.budget_gib:.1f} GiB"
        return (f"micro-batch {self.micro_batch_size} x accumulation {self.grad_accum}, activation checkpointing {ac}, "
                f"liger {'on' if self.liger else 'off'}, fused LoRA {'on' if self.fused else 'off'}{peak}")


def global_batch_size(job: JobConfig, *, world_size: int) -> int:
    """Sequences (rows when packed) per optimizer step over all ranks."""
    t = job.train
    if t.global_batch_size is not None:
        return t.global_batch_size
    if t.global_batch_tokens is not None:
        return max(1, math.ceil(t.global_batch_tokens / job.data.max_seq_len))
    if t.micro_batch_size != AUTO and t.grad_accum != AUTO:
        return int(t.micro_batch_size) * int(t.grad_accum) * world_size
    if t.micro_batch_size != AUTO:
        return int(t.micro_batch_size) * world_size  # grad_accum auto, nothing else asked: 1
    accum = 1 if t.grad_accum == AUTO else int(t.grad_accum)
    return DEFAULT_PER_RANK_BATCH * accum * world_size  # the old default micro-batch of 8


def per_rank_batch(job: JobConfig, *, world_size: int) -> int:
    g = global_batch_size(job, world_size=world_size)
    if g % world_size:
        raise ConfigError(f"train.global_batch_size: {g} sequences do not split evenly over {world_size} ranks")
    return g // world_size


def liger_available() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def _fused_lora(job: JobConfig, *, device_type: str, why: list[str]) -> bool:
    """peft.fused=auto: on where it applies and was measured faster (CUDA ranks; bench/RESULTS.md
    issue 18); explicit values were checked at compose."""
    asked = tri_state(job.peft.fused, "peft.fused")
    if asked is not None:
        return asked
    if job.peft.method == "none":
        return False  # nothing to fuse: not worth a line
    reason = ("not on a GPU" if device_type != "cuda" else
              f"peft.dropout={job.peft.dropout} (the fused node has none)" if job.peft.dropout else
              "parallel=zero3 (gathers each parameter when its own module runs)" if job.parallel.backend == "zero3" else None)
    why.append("fused LoRA on: the ranks run on CUDA" if reason is None else f"fused LoRA off: {reason}")
    return reason is None


def resolve_layout(job: JobConfig, *, world_size: int, nodes: int = 1, device_type: str,
                   free_gib: Optional[float] = None, liger_installed: Optional[bool] = None) -> Layout:
    """The concrete layout. `free_gib`: the smallest free GPU memory over the ranks (ignored when
    train.memory_budget_gib is set; unused on a CPU). Raises ConfigError (naming the key) when the
    explicit values contradict each other, PlanError (ftcluster/plan.py) when nothing fits."""
    t = job.train
    per_rank = per_rank_batch(job, world_size=world_size)
    mb_fixed = None if t.micro_batch_size == AUTO else int(t.micro_batch_size)
    accum_fixed = None if t.grad_accum == AUTO else int(t.grad_accum)
    ac_fixed = None if ac_mode(t.activation_checkpointing) == AUTO else ac_mode(t.activation_checkpointing)
    liger_asked = tri_state(job.model.liger, "model.liger")
    why: list[str] = []
    if liger_asked is None:
        installed = liger_available() if liger_installed is None else liger_installed
        liger = device_type == "cuda" and installed
        why.append("liger on: installed and the ranks run on CUDA" if liger else
                   f"liger off: {'not on a GPU' if device_type != 'cuda' else 'liger-kernel is not installed'}")
    else:
        liger = liger_asked
    fused = _fused_lora(job, device_type=device_type, why=why)
    if mb_fixed is not None and accum_fixed is not None:
        if t.global_batch_size is not None or t.global_batch_tokens is not None:
            if mb_fixed * accum_fixed != per_rank:
                raise ConfigError(f"train.grad_accum: train.micro_batch_size={mb_fixed} x train.grad_accum={accum_fixed} x "
                                  f"{world_size} ranks != the global batch of {per_rank * world_size}; leave one of them auto")
    elif mb_fixed is not None and per_rank % mb_fixed:
        raise ConfigError(f"train.micro_batch_size: {mb_fixed} does not divide the per-rank batch of {per_rank} "
                          f"(global batch {per_rank * world_size} over {world_size} ranks)")
    elif accum_fixed is not None and per_rank % accum_fixed:
        raise ConfigError(f"train.grad_accum: {accum_fixed} does not divide the per-rank batch of {per_rank}")
    every = t.activation_checkpointing_every or DEFAULT_SELECTIVE_EVERY
    if device_type != "cuda":
        # Nothing to plan against on a CPU (host memory is not the limit the plan is for): keep
        # everything in one micro-batch and store activations, the fastest and the old default.
        mb = mb_fixed or (per_rank // accum_fixed if accum_fixed else per_rank)
        ac = ac_fixed or "none"
        if ac_fixed is None:
            why.append("activation checkpointing none: on a CPU")
        if mb_fixed is None:
            why.append(f"micro-batch {mb}: the whole per-rank batch (on a CPU)")
        return Layout(micro_batch_size=mb, grad_accum=accum_fixed or per_rank // mb, activation_checkpointing=ac,
                      activation_checkpointing_every=every, liger=liger, fused=fused, why=tuple(why))
    from ftcluster.plan import choose_layout

    budget = t.memory_budget_gib if t.memory_budget_gib is not None else free_gib
    if budget is None:
        raise ConfigError("train.memory_budget_gib: unknown GPU memory: set train.memory_budget_gib")
    choice = choose_layout(job, world_size=world_size, nodes=nodes, budget_gib=budget, liger=liger, per_rank_batch=per_rank,
                           micro_batch_size=mb_fixed if mb_fixed is not None else (per_rank // accum_fixed if accum_fixed else None),
                           activation_checkpointing=ac_fixed, activation_checkpointing_every=t.activation_checkpointing_every)
    why.extend(choice.why)
    return Layout(micro_batch_size=choice.micro_batch_size, grad_accum=per_rank // choice.micro_batch_size,
                  activation_checkpointing=choice.activation_checkpointing,
                  activation_checkpointing_every=choice.activation_checkpointing_every, liger=liger, fused=fused,
                  budget_gib=budget, predicted_peak_gib=choice.predicted_peak_gib, why=tuple(why))


def apply_layout(job: JobConfig, layout: Layout) -> JobConfig:
    """A copy of `job` with the layout's concrete values (the original is not changed)."""
    train = dataclasses.replace(job.train, micro_batch_size=layout.micro_batch_size, grad_accum=layout.grad_accum,
                                activation_checkpointing=layout.activation_checkpointing,
                                activation_checkpointing_every=layout.activation_checkpointing_every)
    model = dataclasses.replace(job.model, liger=str(layout.liger).lower())
    peft = dataclasses.replace(job.peft, fused=str(layout.fused).lower())
    return dataclasses.replace(job, train=train, model=model, peft=peft)


def has_auto(job: JobConfig) -> bool:
    t = job.train
    return AUTO in (t.micro_batch_size, t.grad_accum, t.activation_checkpointing, job.model.liger, job.peft.fused)


def concrete(job: JobConfig) -> JobConfig:
    """The job as built outside training (export, generate, tests that build a module directly):
    `auto` resolved as on a CPU, so nothing downstream reads an `auto`."""
    return apply_layout(job, resolve_layout(job, world_size=1, device_type="cpu", liger_installed=False))
