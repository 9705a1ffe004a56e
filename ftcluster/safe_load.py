"""Loading pickle-bearing checkpoint files without running code from them.

A checkpoint from elsewhere (a shared run dir, a downloaded run) is data, never code. Every file of
a checkpoint that holds a pickle goes through one of two doors here:

  * `.pt` files (our rank_<r>.pt; DeepSpeed's *_model_states.pt / *_optim_states.pt, read by its
    engine on resume, by zero_to_fp32 on export and by ds_to_universal on a world-size change):
    `torch.load(weights_only=True)` with an allowlist of exactly the (non-builtin) types the backend
    writes (`DEEPSPEED_GLOBALS`, found by saving ZeRO-1/2/3 checkpoints, LoRA and full, and loading
    them with weights_only=True). DeepSpeed calls `torch.load(..., weights_only=False)` itself, in
    many places; `forced_weights_only()` replaces `torch.load` for the duration of such a call with
    one that always uses weights_only=True and the allowlist.
  * torch.distributed.checkpoint's `.metadata` (FSDP2): a plain pickle of dataclasses, read by
    `SafeFileSystemReader.read_metadata` with a restricted Unpickler whose `find_class` admits only
    the (module, name) pairs in `DCP_METADATA_GLOBALS`.

Anything else in such a file (a `__reduce__` that calls os.system, an unknown class) raises
`UnsafeCheckpointError` naming the file before any object of it is built.
"""
from __future__ import annotations

import contextlib
import functools
import io
import os
import pickle
from pathlib import Path
from typing import Any, Iterator

import torch


class UnsafeCheckpointError(ValueError):
    """A checkpoint file holds a pickled object outside the backend's allowlist (never loaded)."""


def _deepspeed_globals() -> list[Any]:
    """Types DeepSpeed (0.19) pickles into its checkpoint files beyond what weights_only admits by
    default (tensors, storages, torch.Size, OrderedDict, builtins): found by saving ZeRO-1/2/3
    checkpoints (LoRA and full fine-tune, bf16) and listing every global their pickles reference."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler  # optim_states: the (static) loss scaler
    from deepspeed.runtime.zero.config import ZeroStageEnum  # optim_states: zero_stage
    from deepspeed.utils.tensor_fragment import fragment_address  # ZeRO-1/2 optim_states: param_slice_mappings

    return [LossScaler, ZeroStageEnum, fragment_address]


@functools.lru_cache(maxsize=1)
def deepspeed_globals() -> tuple[Any, ...]:
    return tuple(_deepspeed_globals())


def load_pt(path: str | os.PathLike | Any, *, allow: tuple[Any, ...] = (), **kwargs: Any) -> Any:
    """`torch.load(path, weights_only=True)` admitting also `allow`; an unsafe pickle raises
    UnsafeCheckpointError naming the file. `path` may be an open file (its name is reported)."""
    kwargs.pop("weights_only", None)
    name = getattr(path, "name", path)
    try:
        with torch.serialization.safe_globals(list(allow)):
            return _REAL_TORCH_LOAD(path, weights_only=True, **kwargs)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        detail = next((ln.strip() for ln in str(e).splitlines() if "GLOBAL" in ln or "Unsupported" in ln), first)
        raise UnsafeCheckpointError(
            f"checkpoint: refusing to load {name}: it holds a pickled object outside the allowlist "
            f"({detail}); a checkpoint file may hold tensors and plain data only") from None


_REAL_TORCH_LOAD = torch.load


@contextlib.contextmanager
def forced_weights_only(allow: tuple[Any, ...]) -> Iterator[None]:
    """While inside: every `torch.load` (DeepSpeed's own calls included, which pass
    weights_only=False) loads with weights_only=True and the allowlist `allow`."""
    def safe(f: Any, map_location: Any = None, *args: Any, **kwargs: Any) -> Any:
        kwargs.pop("weights_only", None)
        return load_pt(f, allow=allow, map_location=map_location, *args, **kwargs)

    torch.load = safe  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.load = _REAL_TORCH_LOAD  # type: ignore[assignment]


# --- torch.distributed.checkpoint metadata ------------------------------------------------------

_DTYPES = ("float32", "bfloat16", "float16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool")

DCP_METADATA_GLOBALS: frozenset[tuple[str, str]] = frozenset({
    ("torch.distributed.checkpoint.metadata", n) for n in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
        "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")
} | {("torch", d) for d in _DTYPES} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # TensorProperties.__setstate__: a layout by its name
    ("pathlib", "PosixPath"),  # StorageMeta.checkpoint_id
})
"""Every global torch (2.13) pickles into DCP's `.metadata` (found by saving FSDP2 checkpoints, LoRA
and full, and recording `find_class` calls): its metadata dataclasses, torch.Size, dtypes (each a
singleton), a layout looked up by name, the checkpoint id path. Nothing here runs arbitrary code."""


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, f: Any, *, name: str) -> None:
        super().__init__(f)
        self._name = name

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in DCP_METADATA_GLOBALS:
            raise UnsafeCheckpointError(
                f"checkpoint: refusing to load {self._name}: it references {module}.{name}, which is not "
                "part of torch.distributed.checkpoint's metadata (a crafted or foreign file)")
        return super().find_class(module, name)


def load_dcp_metadata(path: str | os.PathLike) -> Any:
    """A DCP `.metadata` file through the restricted unpickler."""
    data = Path(path).read_bytes()
    try:
        return _RestrictedUnpickler(io.BytesIO(data), name=str(path)).load()
    except UnsafeCheckpointError:
        raise
    except Exception as e:  # truncated / garbage: still a clear error naming the file
        raise UnsafeCheckpointError(f"checkpoint: cannot read {path}: not a valid metadata file ({e})") from None


def safe_filesystem_reader(directory: str | os.PathLike):  # type: ignore[no-untyped-def]
    """A torch.distributed.checkpoint FileSystemReader whose metadata load runs no code."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeFileSystemReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any):  # type: ignore[no-untyped-def]
            # torch's own body (filesystem.py, read_metadata) with pickle.load replaced.
            path = self._get_metadata_path(kwargs.get("rank"))
            metadata = load_dcp_metadata(path)
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeFileSystemReader(str(directory))


def _main(argv: list[str]) -> None:
    """`python -m ftcluster.safe_load MODULE ARGS...`: run MODULE as __main__ with every torch.load
    safe (DeepSpeed's ds_to_universal; its ProcessPoolExecutor workers fork and inherit this)."""
    import runpy
    import sys

    sys.argv = argv
    with forced_weights_only(deepspeed_globals()):
        runpy.run_module(argv[0], run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    import sys

    _main(sys.argv[1:])
