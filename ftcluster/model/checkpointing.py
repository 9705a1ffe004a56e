"""Activation checkpointing per decoder layer: `none`, `selective`, `full`, `offload`.

Through transformers' own mechanism, so no wrapper module is added and every parameter name
(checkpoints, export, FSDP2/DeepSpeed state dicts) stays as it is: each decoder layer is a
`GradientCheckpointingLayer`, which, while training with autograd on, runs its `forward` through
`layer._gradient_checkpointing_func` when `layer.gradient_checkpointing` is set. It checkpoints
`forward`, not `__call__`, so FSDP2's and DeepSpeed's module hooks stay outside the checkpoint: the
recompute in backward runs on the parameters their pre-backward hooks gathered.

* `full`: every layer recomputed (non-reentrant `torch.utils.checkpoint`).
* `selective` (every k): layers 0, k, 2k, ... (index % k == 0) recomputed; the others keep their
  activations. k=1 is `full`. Layer 0 is always recomputed, as transformers' `every_n_layers` does.
* `offload`: `full`, and the one tensor each layer keeps for its recompute (the hidden state
  entering it) moves to pinned host memory: copied on a side CUDA stream in forward, brought back
  on that stream in backward (the next layer's one prefetched while this one recomputes), so GPU
  memory no longer grows with layers x tokens x hidden (Unsloth's "offloaded gradient
  checkpointing"; torchtune's OffloadActivations does the same for every saved tensor).

How the input gets off the GPU: non-reentrant checkpoint stores its tensor positional arguments as
autograd saved tensors (torch >= 2.1: `_NoopSaveInputs.save_for_backward`, later
`_CheckpointFrame.save_inputs`), outside its own saved-tensor hooks, so a `saved_tensors_hooks` pair
around the checkpoint call sees exactly those and nothing else (the layer's own saved activations
go to checkpoint's inner hooks, which store nothing). transformers' decoders pass the hidden state
positionally (its docstring requires it); keyword arguments (RoPE cos/sin, the mask) stay on the
device, shared by all layers. `OffloadingCheckpoint` fails loudly if nothing was saved that way (a
torch or transformers change), rather than silently keeping everything on the GPU.

Why our own hooks rather than transformers' `activation_checkpointing_enable(offload=True)` or
torch's `save_on_cpu`: those copy on the compute stream with a blocking device-to-host copy (a host
sync per layer) and fetch back without prefetch; we copy on a side stream with stream ordering only.
Why not Unsloth's reentrant autograd.Function: it needs the layer input to require grad (a LoRA run's
frozen embedding output does not) and runs a nested backward per layer; this keeps non-reentrant
checkpoint's semantics (keyword tensors, early stop, RNG replay) and only changes where one tensor lives.
"""
from __future__ import annotations

import functools
import logging
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from ftcluster.config import ConfigError, ac_mode

log = logging.getLogger("ftcluster")

KEY = "train.activation_checkpointing"


def recomputed_layers(*, num_layers: int, mode: str, every: int) -> list[int]:
    """Indices of the decoder layers recomputed in backward under `mode`."""
    if mode == "none":
        return []
    if mode == "selective":
        return [i for i in range(num_layers) if i % every == 0]
    return list(range(num_layers))  # full, offload


def apply_activation_checkpointing(hf_model: nn.Module, *, layers: list[nn.Module], mode: str,
                                   every: int) -> Optional["ActivationOffloader"]:
    """Set each decoder layer's checkpointing for `mode` (one of config.AC_MODES; `auto` must be
    resolved before, ftcluster/layout.py). After PEFT (the layers hold their adapters), before
    compile and sharding. Returns the offloader for `offload` (its `stats` count the copies), else None."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    mode = ac_mode(mode)
    if mode == "auto":
        raise ValueError(f"{KEY}: `auto` is resolved before the module is built (ftcluster/layout.py)")
    if every < 1:
        raise ConfigError(f"{KEY}_every: must be >= 1; got {every}")
    bad = sorted({type(m).__name__ for m in layers if not isinstance(m, GradientCheckpointingLayer)})
    if mode != "none" and bad:
        raise ConfigError(f"{KEY}: decoder layers {bad} of {type(hf_model).__name__} are not transformers "
                          "GradientCheckpointingLayers; set it to none")
    offloader = ActivationOffloader() if mode == "offload" else None
    func: Callable[..., Any] = (OffloadingCheckpoint(offloader=offloader) if offloader is not None
                                else functools.partial(checkpoint, use_reentrant=False))
    chosen = set(recomputed_layers(num_layers=len(layers), mode=mode, every=every))
    for i, layer in enumerate(layers):
        # The attributes transformers' own gradient_checkpointing_enable sets (per layer here, so
        # selective picks the layers and offload gives them another checkpoint function).
        layer.gradient_checkpointing = i in chosen
        if i in chosen:
            layer._gradient_checkpointing_func = func
    if chosen:
        # As transformers' gradient_checkpointing_enable does (and this code did through it before):
        # the embedding output requires grad even when the embedding is frozen (LoRA). Non-reentrant
        # checkpoint does not need it, but DeepSpeed ZeRO-3's per-module release hooks order
        # themselves on the layer inputs' gradients (ftcluster/parallel/deepspeed.py); the cost is
        # the first layer's input gradient (1/num_layers of the input-gradient work).
        hf_model.enable_input_require_grads()
    return offloader


# ----------------------------------------------------------------------------------- offload


@dataclass
class OffloadStats:
    """Host-side counters (no device work): what the offloader moved. Read by tests and logs."""
    offloaded: int = 0
    """Tensors copied device -> host in forward."""
    offloaded_bytes: int = 0
    fetched: int = 0
    """Host -> device copies issued in backward (prefetched or on demand)."""
    prefetched: int = 0
    """Of those, issued ahead of the unpack that used them (while the later layer recomputed)."""


class _Saved:
    """One offloaded checkpoint input: its host copy, and its device copy once fetched back.
    `prev` (a weak reference) is the one saved just before it in forward: the next one backward
    needs, prefetched when this one is unpacked. Weak, so a graph freed without backward frees it."""

    __slots__ = ("host", "device", "fetched", "ready", "prev", "__weakref__")

    def __init__(self, *, host: torch.Tensor, device: torch.device, prev: Optional["weakref.ref[_Saved]"]) -> None:
        self.host = host
        self.device = device
        self.fetched: Optional[torch.Tensor] = None
        self.ready: Any = None
        self.prev = prev


class ActivationOffloader:
    """saved_tensors_hooks pack/unpack that keep checkpoint inputs in host memory.

    CUDA tensors: pinned host copy on a side stream (`_CudaCopies`). CPU tensors (a CPU rank, the
    tests): `_HostStandIn`, a plain host copy, so the same autograd structure, counting and
    prefetch order run; there is nothing to free on a CPU, but the original tensor is released
    just as on a GPU (tests check its storage is gone before backward)."""

    def __init__(self) -> None:
        self.stats = OffloadStats()
        self._last: Optional[weakref.ref[_Saved]] = None
        self._cuda: dict[torch.device, _CudaCopies] = {}
        self._host = _HostStandIn()

    def _copies(self, device: torch.device) -> "_CudaCopies | _HostStandIn":
        if device.type != "cuda":
            return self._host
        if device not in self._cuda:
            self._cuda[device] = _CudaCopies(device)  # lazily: the module is built on the meta device
        return self._cuda[device]

    def pack(self, t: torch.Tensor) -> Any:
        if t.device.type == "meta" or t.numel() == 0:
            return t
        saved = _Saved(host=self._copies(t.device).to_host(t), device=t.device, prev=self._last)
        self._last = weakref.ref(saved)
        self.stats.offloaded += 1
        self.stats.offloaded_bytes += t.numel() * t.element_size()
        return saved

    def unpack(self, saved: Any) -> torch.Tensor:
        if isinstance(saved, torch.Tensor):
            return saved
        copies = self._copies(saved.device)
        if saved.fetched is None:
            self._fetch(saved, copies)
        t, ready = saved.fetched, saved.ready
        saved.fetched = saved.ready = None  # the recompute owns it now; a second backward fetches again
        prev = saved.prev() if saved.prev is not None else None
        if prev is not None and prev.fetched is None:
            # Overlaps the previous layer's input copy with this layer's recompute and backward
            # (one extra layer input on the device at a time).
            self._fetch(prev, copies)
            self.stats.prefetched += 1
        copies.wait(ready)
        return t

    def _fetch(self, saved: _Saved, copies: "_CudaCopies | _HostStandIn") -> None:
        saved.fetched, saved.ready = copies.to_device(saved.host, saved.device)
        self.stats.fetched += 1


PINNED_MIN_CHUNK = 1 << 20


def pinned_chunks(nbytes: int) -> list[tuple[int, int]]:
    """(start, stop) byte ranges that cut one offloaded tensor into power-of-two blocks, largest first.
    torch's pinned host allocator rounds every block up to a power of two (torch < 2.9 has no setting
    to stop it): a 3 GiB layer input (8B, 393,216 tokens) took 4 GiB of pinned RAM, and 32 layers asked
    128 GiB of a 125 GiB host, which killed the rank (one H200, 2026-12-03, bench/RESULTS.md). Blocks
    that are powers of two already waste nothing; the tail below PINNED_MIN_CHUNK stays one block."""
    out, pos = [], 0
    while pos < nbytes:
        rest = nbytes - pos
        size = rest if rest <= PINNED_MIN_CHUNK else 1 << (rest.bit_length() - 1)
        out.append((pos, pos + size))
        pos += size
    return out


def host_copy(t: torch.Tensor, *, pin: bool, non_blocking: bool) -> list[torch.Tensor]:
    """`t`'s elements as host blocks along pinned_chunks (each a flat tensor of t's dtype)."""
    flat = t.detach().reshape(-1)  # layer inputs are contiguous: a view, no copy
    size = flat.element_size()
    blocks = []
    for a, b in pinned_chunks(flat.numel() * size):
        block = torch.empty((b - a) // size, dtype=t.dtype, pin_memory=pin)
        block.copy_(flat[a // size: b // size], non_blocking=non_blocking)
        blocks.append(block)
    return blocks


def device_copy(blocks: list[torch.Tensor], out: torch.Tensor, *, non_blocking: bool) -> torch.Tensor:
    """The inverse of host_copy into `out` (allocated by the caller, t's shape and dtype)."""
    flat, pos = out.view(-1), 0
    for block in blocks:
        flat[pos: pos + block.numel()].copy_(block, non_blocking=non_blocking)
        pos += block.numel()
    return out


@dataclass(frozen=True)
class _Host:
    """An offloaded tensor on the host: its blocks (host_copy) and what to rebuild it as."""
    blocks: list
    shape: torch.Size
    dtype: torch.dtype


class _CudaCopies:
    """Device <-> pinned host copies on one side stream per device; ordering by stream waits and
    events only (no host sync: nothing here blocks the CPU on the GPU)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device)

    def to_host(self, t: torch.Tensor) -> "_Host":
        compute = torch.cuda.current_stream(t.device)
        self.stream.wait_stream(compute)  # the kernels producing `t` run before the copy reads it
        with torch.cuda.stream(self.stream):
            host = _Host(host_copy(t, pin=True, non_blocking=True), t.shape, t.dtype)
        # `t` is dropped by the caller right away; the caching allocator must not hand its memory to
        # the compute stream before the side stream has read it.
        t.record_stream(self.stream)
        return host  # pinned blocks are reused only after their copies' events (CachingHostAllocator)

    def to_device(self, host: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, Any]:
        compute = torch.cuda.current_stream(device)
        # Allocated on the compute stream (which alone uses and frees it); the side stream writes it
        # only after the compute work queued so far, which may still be using that memory.
        out = torch.empty(host.shape, dtype=host.dtype, device=device)
        self.stream.wait_stream(compute)
        with torch.cuda.stream(self.stream):
            device_copy(host.blocks, out, non_blocking=True)  # after this tensor's own device-to-host copy: same stream
            ready = self.stream.record_event()
        return out, ready

    def wait(self, ready: Any) -> None:
        torch.cuda.current_stream(self.device).wait_event(ready)  # the compute stream, not the host, waits


class _HostStandIn:
    """CPU stand-in for `_CudaCopies` (no pinned memory or streams on a CPU rank): plain host copies,
    so backward reads a copy made in forward, not the original tensor."""

    def to_host(self, t: torch.Tensor) -> "_Host":
        return _Host(host_copy(t, pin=False, non_blocking=False), t.shape, t.dtype)

    def to_device(self, host: "_Host", device: torch.device) -> tuple[torch.Tensor, Any]:
        return device_copy(host.blocks, torch.empty(host.shape, dtype=host.dtype, device=device), non_blocking=False), None

    def wait(self, ready: Any) -> None:
        pass


class OffloadingCheckpoint:
    """A layer's `_gradient_checkpointing_func` for `offload`: non-reentrant checkpoint, its saved
    inputs through the offloader's hooks."""

    def __init__(self, *, offloader: ActivationOffloader) -> None:
        self.offloader = offloader
        self._backend: Any = None
        self._compiled: dict[Any, Callable[..., Any]] = {}

    def compile(self, *, backend: Any) -> None:
        """model.compile under offload: compile the layer's forward inside the checkpoint. Dynamo
        cannot trace `saved_tensors_hooks` (it breaks the graph there and runs the whole layer
        eagerly), so the layer's compiled `__call__` would gain nothing; the forward transformers
        hands us (`partial(forward, layer, **kwargs)`) is the same function for every layer, so one
        compiled graph serves them all."""
        self._backend = backend

    def __call__(self, function: Callable[..., Any], *args: Any) -> Any:
        if self._backend is not None and isinstance(function, functools.partial):
            if function.func not in self._compiled:
                self._compiled[function.func] = torch.compile(function.func, backend=self._backend)
            function = functools.partial(self._compiled[function.func], *function.args, **function.keywords)
        before = self.offloader.stats.offloaded
        with torch.autograd.graph.saved_tensors_hooks(self.offloader.pack, self.offloader.unpack):
            out = checkpoint(function, *args, use_reentrant=False)
        if self.offloader.stats.offloaded == before and torch.is_grad_enabled() and any(
                isinstance(a, torch.Tensor) and a.device.type != "meta" for a in args):
            raise RuntimeError(f"{KEY}=offload: torch.utils.checkpoint saved none of the layer's inputs as "
                               "autograd saved tensors (has torch changed?); nothing would be offloaded")
        if not args:
            raise RuntimeError(f"{KEY}=offload: the decoder passes the hidden state by keyword; it stays on the "
                               "device (transformers requires it positional for checkpointing)")
        return out
