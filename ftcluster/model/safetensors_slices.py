"""The safetensors slice reader: each rank reads only the bytes of the tensor slices it owns."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

import torch

_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


class SafetensorsSlices:
    """Reads slices of tensors from a Hugging Face safetensors checkpoint (single file or sharded
    with model.safetensors.index.json) without loading whole tensors or files.

    A block of whole leading-dimension rows (what a dim-0 shard or a full tensor needs)
    is read with plain positioned reads of exactly its bytes into a fresh tensor: no file mapping,
    so the pages read never count towards this process's resident memory (a memory-mapped read
    keeps every touched page resident and mapped: a rank would end up holding its shards twice).
    Other slices fall back to safetensors' own memory-mapped `get_slice`."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._handles: dict[str, object] = {}
        self._files: dict[str, object] = {}
        self._headers: dict[str, tuple[int, dict]] = {}
        index = directory / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        else:
            single = directory / "model.safetensors"
            if not single.is_file():
                raise FileNotFoundError(f"model.path: {directory} has no model.safetensors or model.safetensors.index.json "
                                        "(only safetensors checkpoints are loaded; convert .bin files first)")
            weight_map = {k: single.name for k in self._header(single.name)[1] if k != "__metadata__"}
        self.weight_map: dict[str, str] = weight_map

    def _handle(self, filename: str):  # type: ignore[no-untyped-def]
        if filename not in self._handles:
            from safetensors import safe_open

            self._handles[filename] = safe_open(str(self.directory / filename), framework="pt")
        return self._handles[filename]

    def close(self) -> None:
        """Close the open files (positioned reads) and drop safetensors' mapped handles."""
        for f in self._files.values():
            f.close()  # type: ignore[attr-defined]
        self._files.clear()
        self._handles.clear()

    def _file(self, filename: str):  # type: ignore[no-untyped-def]
        if filename not in self._files:
            self._files[filename] = open(self.directory / filename, "rb", buffering=0)
        return self._files[filename]

    def _header(self, filename: str) -> tuple[int, dict]:
        """(byte offset of the data section, the JSON header) of one safetensors file."""
        if filename not in self._headers:
            import struct

            with open(self.directory / filename, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                self._headers[filename] = (8 + n, json.loads(f.read(n)))
        return self._headers[filename]

    def shape(self, key: str) -> list[int]:
        return list(self._header(self.weight_map[key])[1][key]["shape"])

    def read(self, key: str, index: tuple[slice, ...], *, tied_fallback: str | None = None) -> torch.Tensor:
        """Tensor `key` restricted to `index` (one slice per leading dimension; () = the whole tensor)."""
        if key not in self.weight_map and tied_fallback is not None:
            key = tied_fallback
        if key not in self.weight_map:
            raise KeyError(f"model.path: {self.directory} has no tensor {key!r}")
        filename = self.weight_map[key]
        start, header = self._header(filename)
        info = header[key]
        dtype, shape = _ST_DTYPES.get(info["dtype"]), list(info["shape"])
        rows = _leading_rows(index, shape)
        if dtype is None or rows is None:
            sl = self._handle(filename).get_slice(key)
            return sl[index] if index else sl[:]
        r0, r1 = rows
        row_numel = 1
        for d in shape[1:]:
            row_numel *= d
        row_bytes = row_numel * dtype.itemsize
        out = torch.empty((r1 - r0) * row_bytes, dtype=torch.uint8)
        if out.numel():
            _pread_into(self._file(filename), out, start + info["data_offsets"][0] + r0 * row_bytes)
        return out.view(dtype).reshape([r1 - r0, *shape[1:]] if shape else [])

    def keys(self) -> Iterator[str]:
        return iter(self.weight_map)


def _leading_rows(index: tuple[slice, ...], shape: list[int]) -> tuple[int, int] | None:
    """(first, end) row when `index` selects whole rows of dimension 0 (and all of every other
    dimension), else None."""
    if not shape:
        return (0, 1) if not index else None
    if not index:
        return 0, shape[0]
    first = index[0]
    if first.step not in (None, 1):
        return None
    for sl, n in zip(index[1:], shape[1:]):
        if sl.step not in (None, 1) or (sl.start or 0) != 0 or (n if sl.stop is None else min(sl.stop, n)) != n:
            return None
    r0, r1, _ = first.indices(shape[0])
    return r0, max(r0, r1)


def _pread_into(f, out: torch.Tensor, offset: int) -> None:  # type: ignore[no-untyped-def]
    """Fill the uint8 tensor `out` with the file's bytes from `offset` (loops: one read returns at
    most ~2 GiB on Linux)."""
    view = memoryview(out.numpy()).cast("B")
    done = 0
    while done < len(view):
        n = os.preadv(f.fileno(), [view[done:]], offset + done)
        if n <= 0:
            raise OSError(f"unexpected end of file reading {getattr(f, 'name', f)} at byte {offset + done}")
        done += n


