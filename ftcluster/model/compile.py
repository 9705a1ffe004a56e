"""`model.compile`: torch.compile each decoder layer in place.

`nn.Module.compile()` compiles the layer's `__call__` without wrapping the module (unlike
`torch.compile(module)`, whose OptimizedModule adds `_orig_mod.` to every parameter name), so
checkpoints, export and the FSDP2/DeepSpeed state dicts see the same names. Per layer rather than
the whole model (torchtitan's choice): the decoder layers are identical, so one graph is compiled
and reused by all of them, and FSDP2's per-layer `fully_shard` (applied after this) keeps its hooks
at layer boundaries, where dynamo leaves them to run eagerly. Applied after activation
checkpointing: the compiled call includes the checkpointed forward.

On a CPU rank the layers stay eager (a warning, once): inductor's CPU backend needs a C++ toolchain
and takes most of a minute to compile even the tiny model, for no gain a CPU run is for. Tests use
`apply_compile(..., backend="aot_eager")` to run the same path without inductor.
"""
from __future__ import annotations

import logging

import torch
import torch.nn as nn

log = logging.getLogger("ftcluster")


def compile_backend(*, device_type: str) -> str | None:
    """The torch.compile backend for `model.compile=true` on this device type; None: stay eager."""
    return "inductor" if device_type == "cuda" else None


def apply_compile(layers: list[nn.Module], *, device_type: str, backend: str | None = None) -> None:
    """Compile every decoder layer in place (`backend`: default `compile_backend(device_type)`)."""
    backend = backend or compile_backend(device_type=device_type)
    if backend is None:
        log.warning("model.compile: not on a GPU (%s ranks); the decoder layers run eagerly", device_type)
        return
    for layer in layers:
        layer.compile(backend=backend)


def compile_device_type() -> str:
    """Where the module built now will run: the ranks use CUDA whenever it is available
    (ftcluster/distributed.py picks the device the same way)."""
    return "cuda" if torch.cuda.is_available() else "cpu"
