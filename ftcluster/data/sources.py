"""Turn `data.path` into raw rows, and a raw row index back into `file:line`.

Accepted: a JSONL/JSON/Parquet file, a comma-separated list or glob of them, a folder of them
(all data files inside it, recursively, in sorted order), or a folder written by
`datasets.save_to_disk`. Everything is local; nothing is looked up on a hub. Files are loaded as
one split named after `data.split`, so `data.split=train[:1000]` takes a slice; a saved
`DatasetDict` is indexed by `data.split`.
"""
from __future__ import annotations

import glob
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ftcluster.data.errors import DataError

if TYPE_CHECKING:
    import datasets

_LOADERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
_SUPPORTED = ".jsonl, .json, .parquet, or a datasets.save_to_disk folder"


@dataclass(frozen=True)
class Source:
    """Where rows come from. `files` are absolute, in load order (the order of rows)."""

    path: str
    """`data.path` as configured, for messages."""
    files: tuple[str, ...] = ()
    loader: str | None = None
    """`json` or `parquet`; None for a save_to_disk folder."""
    saved_dir: str | None = None

    def locate(self, row: int) -> str:
        """`file:line` (JSON Lines) or `file: row N` for a raw row index. Reads files, so it is
        meant for error messages only."""
        offset = 0
        for f in self.files:
            if self.loader == "json" and _is_json_lines(f):
                for lineno in _nonblank_lines(f):
                    if offset == row:
                        return f"{f}:{lineno}"
                    offset += 1
                continue
            n = _count_rows(f, loader=self.loader)
            if n is None:
                break
            if row < offset + n:
                return f"{f}: row {row - offset}"
            offset += n
        return f"{self.path}: row {row}"


def resolve(path: str) -> Source:
    """Find the files (or saved dataset) that `data.path` names. Fails naming `data.path`."""
    items = [os.path.expanduser(p.strip()) for p in path.split(",") if p.strip()]
    if not items:
        raise DataError("data.path: empty")
    if len(items) == 1 and _is_saved_dataset(Path(items[0])):
        return Source(path=path, saved_dir=os.path.abspath(items[0]))
    files: list[str] = []
    for item in items:
        if any(c in item for c in "*?["):
            matched = [f for f in sorted(glob.glob(item, recursive=True)) if os.path.isfile(f)]
            if not matched:
                raise DataError(f"data.path: pattern {item!r} matches no file")
            files += matched
        elif os.path.isdir(item):
            found = _data_files_in(Path(item))
            if not found:
                raise DataError(f"data.path: folder {item} holds no data files ({_SUPPORTED})")
            files += found
        elif os.path.isfile(item):
            files.append(item)
        else:
            raise DataError(f"data.path: no such file or directory: {item}")
    loaders = set()
    for f in files:
        loader = _LOADERS.get(Path(f).suffix.lower())
        if loader is None:
            raise DataError(f"data.path: {f}: unsupported file type; use {_SUPPORTED}")
        loaders.add(loader)
    if len(loaders) > 1:
        raise DataError(f"data.path: {path} mixes JSON and Parquet files; use one kind")
    return Source(path=path, files=tuple(os.path.abspath(f) for f in files), loader=loaders.pop())


def load_rows(source: Source, *, split: str) -> "datasets.Dataset":
    """Raw rows through Hugging Face `datasets` (memory-mapped Arrow, cached by `datasets`)."""
    import datasets  # here, not at module level: the driver reads files with this module (instantly)

    if source.saved_dir is not None:
        saved = datasets.load_from_disk(source.saved_dir)
        if isinstance(saved, datasets.DatasetDict):
            if split not in saved:
                raise DataError(f"data.split: {split!r} is not a split of {source.saved_dir}; it has {', '.join(saved)}")
            return saved[split]
        return saved
    # Files form one split; naming it after data.split lets split slices (train[:100]) work.
    name = re.match(r"\w+", split)
    if name is None:
        raise DataError(f"data.split: {split!r} is not a split name")
    assert source.loader is not None
    try:
        return datasets.load_dataset(source.loader, data_files={name.group(0): list(source.files)}, split=split)
    except Exception as e:  # datasets wraps parser errors in several types; find the culprit ourselves
        if source.loader == "json":
            for f in source.files:
                check_json_file(f)
            _check_same_fields(source.files)
        else:
            for f in source.files:
                _check_parquet_file(f)
        cause = e
        while cause.__cause__ is not None:
            cause = cause.__cause__
        raise DataError(f"data.path: could not load {source.path}: {type(cause).__name__}: {cause}") from e


def json_lines(path: str):  # type: ignore[no-untyped-def]
    """(line number, object) of each non-blank line of a JSON Lines file; DataError naming
    `file:line` for bytes that are not UTF-8, malformed JSON, or a line that is not an object."""
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
            if not line:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: malformed JSON: {e.msg} (column {e.colno})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{lineno}: expected one JSON object per line, got {type(obj).__name__}")
            yield lineno, obj


def check_json_file(path: str) -> None:
    """Raise `DataError("file:line: ...")` for the first malformed line (JSON Lines) or the parse
    error (one JSON document), or for an empty file. Returns if the file is fine."""
    if _is_json_lines(path):
        seen = False
        for _ in json_lines(path):
            seen = True
        if not seen:
            raise DataError(f"{path}: no rows (empty file)")
        return
    try:
        with open(path, encoding="utf-8") as fh:
            obj = json.load(fh)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: malformed JSON: {e.msg} (column {e.colno})") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    if not isinstance(obj, list) or not all(isinstance(r, dict) for r in obj):
        raise DataError(f"{path}: expected JSON Lines or one JSON array of objects")
    if not obj:
        raise DataError(f"{path}: no rows (empty array)")


def _check_same_fields(files: tuple[str, ...]) -> None:
    """The datasets JSON loader takes its columns from the first file and fails on a file with
    other columns; name that file. Compares first rows only: this runs on the error path."""
    first: tuple[str, frozenset] | None = None
    for f in files:
        if not _is_json_lines(f):
            continue
        with open(f, "rb") as fh:
            for lineno, raw in enumerate(fh, start=1):
                if raw.strip():
                    keys = frozenset(json.loads(raw))
                    if first is None:
                        first = (f"{f}:{lineno}", keys)
                    elif keys != first[1]:
                        raise DataError(f"{f}:{lineno}: fields {', '.join(sorted(keys))} differ from the fields "
                                        f"{', '.join(sorted(first[1]))} of {first[0]}; all files need the same fields")
                    break


def _check_parquet_file(path: str) -> None:
    import pyarrow.parquet as pq

    try:
        pq.read_metadata(path)
    except Exception as e:
        raise DataError(f"{path}: not a readable Parquet file: {e}") from None


def _is_saved_dataset(p: Path) -> bool:
    return p.is_dir() and ((p / "state.json").is_file() or (p / "dataset_dict.json").is_file())


def _data_files_in(folder: Path) -> list[str]:
    found = []
    for f in sorted(folder.rglob("*")):
        hidden = any(part.startswith((".", "_")) for part in f.relative_to(folder).parts)
        if f.is_file() and not hidden and f.suffix.lower() in _LOADERS:
            found.append(str(f))
    return found


def _is_json_lines(path: str) -> bool:
    """`.jsonl`, or a `.json` file whose first non-blank line is a whole JSON object (the same
    order of attempts as the `datasets` JSON loader: lines first, one document second)."""
    if path.lower().endswith(".jsonl"):
        return True
    with open(path, "rb") as fh:
        for raw in fh:
            line = raw.strip()
            if not line:
                continue
            if not line.startswith(b"{"):
                return False
            try:
                json.loads(line)
                return True
            except (json.JSONDecodeError, UnicodeDecodeError):
                return False
    return True


def _nonblank_lines(path: str):
    # The datasets JSON Lines reader skips blank lines, so row i is the i-th non-blank line.
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            if raw.strip():
                yield lineno


def _count_rows(path: str, *, loader: str | None) -> int | None:
    try:
        if loader == "parquet":
            import pyarrow.parquet as pq

            return pq.read_metadata(path).num_rows
        with open(path, encoding="utf-8") as fh:
            obj = json.load(fh)
        return len(obj) if isinstance(obj, list) else None
    except Exception:
        return None
