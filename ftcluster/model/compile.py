"""`model.compile`: torch.compile each decoder layer in place.

`nn.Module.compile()` compiles the layer's `__call__` without wrapping the module (unlike
`torch.compile(module)`, whose OptimizedModule adds `_orig_mod.` to every parameter name), so
checkpoints, export and the FSDP2/DeepSpeed state dicts see the same names. Per layer rather than
the whole model (torchtitan's choice): the decoder layers are identical, so one graph is compiled
and reused by all of them, and FSDP2's per-layer `fully_shard` (applied after this) keeps its hooks
at layer boundaries, where dynamo leaves them to run eagerly. Applied after activation
checkpointing: the compiled call includes the checkpointed forward (dynamo traces
torch.utils.checkpoint as one higher-order op); under `offload` the forward inside the checkpoint
is what is compiled (ftcluster/model/checkpointing.py `OffloadingCheckpoint.compile`).

On a CPU rank the layers stay eager (a warning, once): inductor's CPU backend needs a C++ toolchain
and takes most of a minute to compile even the tiny model, for no gain a CPU run is for. Tests use
`apply_compile(..., backend="aot_eager")` to run the same path without inductor.
"""
from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn as nn

log = logging.getLogger("ftcluster")


def compile_backend(*, device_type: str) -> str | None:
    """The torch.compile backend for `model.compile=true` on this device type; None: stay eager."""
    return "inductor" if device_type == "cuda" else None


def apply_compile(layers: list[nn.Module], *, device_type: str, backend: Any = None) -> None:
    """Compile every decoder layer in place (`backend`: a torch.compile backend, default
    `compile_backend(device_type)`). Under `offload` the layer's forward inside the checkpoint is
    compiled instead of its `__call__` (dynamo cannot trace the offload's saved-tensor hooks)."""
    backend = backend or compile_backend(device_type=device_type)
    if backend is None:
        log.warning("model.compile: not on a GPU (%s ranks); the decoder layers run eagerly", device_type)
        return
    from ftcluster.model.checkpointing import OffloadingCheckpoint

    for layer in layers:
        func = getattr(layer, "_gradient_checkpointing_func", None)
        if layer.gradient_checkpointing and isinstance(func, OffloadingCheckpoint):
            func.compile(backend=backend)  # inside the checkpoint: see OffloadingCheckpoint.compile
        else:
            layer.compile(backend=backend)


def compile_device_type() -> str:
    """Where the module built now will run: the ranks use CUDA whenever it is available
    (ftcluster/distributed.py picks the device the same way)."""
    return "cuda" if torch.cuda.is_available() else "cpu"
