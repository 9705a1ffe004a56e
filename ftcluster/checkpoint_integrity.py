"""Manifest, verification and I/O-error wording for the checkpoint manager.

Manifest: `manifest.json` in a checkpoint lists every file it holds (engine shards, rank_<r>.pt,
config.yaml, the backend's own metadata) with its size and BLAKE2b-256 digest. It is written into
the temporary directory after every rank finished writing and before meta.json (the commit marker)
and the rename, so a committed checkpoint always has a complete manifest; meta.json records the
manifest's own digest. BLAKE2b: cryptographic (a crafted file cannot be made to match by accident
of a weak checksum), faster than SHA-256 in CPython's hashlib on CPUs without SHA extensions, and
streamed in 8 MiB chunks so memory stays flat for multi-GB shards.

Cost at scale: hashing is shared out. Rank 0 lists the files and broadcasts the list; each rank
hashes a size-balanced share (all ranks see the same shared filesystem the commit rename needs);
rank 0 gathers the digests. Loading verifies the same way (every rank checks every size, a share of
the digests; the verdict is gathered, so all ranks agree on which checkpoint to load).

Legacy checkpoints (written before manifests existed) have none: they load with a warning, as
`Verdict.legacy`. That is no weaker than before, and their pickles still go through the safe
loaders (ftcluster/safe_load.py), so a legacy checkpoint can be silently corrupt but cannot run code.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import contextlib

log = logging.getLogger("ftcluster")

MANIFEST = "manifest.json"
META = "meta.json"
CHUNK = 8 << 20
ALGORITHM = "blake2b-256"
DERIVED = ("engine/universal/", "engine/.universal-tmp-")
"""Written into a committed checkpoint later (DeepSpeed's universal conversion on a world-size
change): not covered by the manifest, and ignored by verification."""


class CorruptCheckpointError(ValueError):
    """A checkpoint failed verification; `file` names the bad file."""

    def __init__(self, checkpoint: Path, file: str, reason: str) -> None:
        self.checkpoint, self.file, self.reason = Path(checkpoint), file, reason
        super().__init__(f"checkpoint {checkpoint} failed verification: {checkpoint / file}: {reason}")


@dataclass(frozen=True, kw_only=True)
class Rejection:
    """A checkpoint `resume=auto` skipped; log it as a `checkpoint_rejected` event (`as_event()`)."""
    checkpoint: Path
    file: str
    reason: str

    def as_event(self) -> dict[str, Any]:
        return {"checkpoint": str(self.checkpoint), "file": str(self.checkpoint / self.file), "reason": self.reason}


@dataclass(kw_only=True)
class Verdict:
    checkpoint: Path
    legacy: bool = False
    """No manifest (written before manifests): loadable, unverified."""
    problem: Rejection | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.problem is None


def file_digest(path: Path) -> str:
    h = hashlib.blake2b(digest_size=32)
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _derived(rel: str) -> bool:
    return any(rel.startswith(d) for d in DERIVED)


def list_files(root: Path) -> dict[str, int]:
    """Relative path -> size of every file the manifest covers (all but meta.json, the manifest)."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            p = Path(dirpath) / name
            rel = p.relative_to(root).as_posix()
            if rel in (MANIFEST, META) or _derived(rel):
                continue
            out[rel] = p.stat().st_size
    return dict(sorted(out.items()))


def share(sizes: dict[str, int], *, rank: int, world_size: int) -> list[str]:
    """This rank's files to hash: largest first onto the least-loaded rank (deterministic)."""
    load = [0] * world_size
    mine = []
    for rel, size in sorted(sizes.items(), key=lambda kv: (-kv[1], kv[0])):
        r = min(range(world_size), key=lambda i: (load[i], i))
        load[r] += size
        if r == rank:
            mine.append(rel)
    return mine


def build_manifest(root: Path, *, rank: int, world_size: int) -> dict[str, Any] | None:
    """Collective: every rank hashes its share of `root`'s files; rank 0 gets the manifest."""
    from ftcluster.distributed import all_gather_object, broadcast_object_if_dist

    sizes = broadcast_object_if_dist(list_files(root) if rank == 0 else None)
    digests = {rel: file_digest(root / rel) for rel in share(sizes, rank=rank, world_size=world_size)}
    gathered = all_gather_object(digests)
    if rank != 0:
        return None
    merged: dict[str, str] = {}
    for part in gathered:
        merged.update(part)
    return {"version": 1, "algorithm": ALGORITHM,
            "files": {rel: {"size": size, "digest": merged[rel]} for rel, size in sizes.items()}}


def write_manifest(root: Path, manifest: dict[str, Any]) -> str:
    """Write `root/manifest.json` durably; returns its digest (recorded in meta.json)."""
    text = json.dumps(manifest, indent=1)
    with open(root / MANIFEST, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    return hashlib.blake2b(text.encode(), digest_size=32).hexdigest()


def _check(path: Path, *, rank: int, world_size: int, checksums: bool) -> tuple[bool, Rejection | None]:
    """This rank's part of verifying `path`: (legacy, first problem)."""
    def bad(file: str, reason: str) -> tuple[bool, Rejection]:
        return False, Rejection(checkpoint=path, file=file, reason=reason)

    mpath = path / MANIFEST
    try:
        meta = json.loads((path / META).read_text())
    except (OSError, ValueError) as e:
        return bad(META, f"unreadable ({e})")
    if not mpath.is_file():
        if "manifest" in meta:
            return bad(MANIFEST, "missing (meta.json says the checkpoint has one)")
        return True, None
    text = mpath.read_bytes()
    if "manifest" in meta and hashlib.blake2b(text, digest_size=32).hexdigest() != meta["manifest"]:
        return bad(MANIFEST, "digest differs from the one recorded in meta.json")
    try:
        files = json.loads(text)["files"]
    except (ValueError, KeyError) as e:
        return bad(MANIFEST, f"unreadable ({e})")
    present = list_files(path)
    for rel, entry in files.items():
        if rel not in present:
            return bad(rel, "missing")
        if present[rel] != entry["size"]:
            return bad(rel, f"size {present[rel]} bytes, the manifest says {entry['size']} (truncated or altered)")
    extra = sorted(set(present) - set(files))
    if extra:
        return bad(extra[0], "not in the manifest (added after the commit)")
    if checksums:
        sizes = {rel: e["size"] for rel, e in files.items()}
        for rel in share(sizes, rank=rank, world_size=world_size):
            if file_digest(path / rel) != files[rel]["digest"]:
                return bad(rel, "checksum mismatch (corrupted or altered)")
    return False, None


def verify(path: Path, *, rank: int = 0, world_size: int = 1, checksums: bool = True) -> Verdict:
    """Verify a committed checkpoint against its manifest. Collective when world_size > 1 (each
    rank hashes a share; all ranks get the same verdict). Never raises for a bad checkpoint."""
    import time

    from ftcluster.distributed import all_gather_object

    t0 = time.perf_counter()
    legacy, problem = _check(path, rank=rank, world_size=world_size, checksums=checksums)
    problems = [p for p in all_gather_object(problem) if p is not None]
    return Verdict(checkpoint=path, legacy=legacy, problem=problems[0] if problems else None,
                   seconds=time.perf_counter() - t0)


def verify_or_raise(path: Path, **kw: Any) -> Verdict:
    v = verify(path, **kw)
    if v.problem is not None:
        raise CorruptCheckpointError(path, v.problem.file, v.problem.reason)
    if v.legacy:
        log.warning("checkpoint %s has no manifest (written before manifests): loading it unverified", path)
    return v


# --- I/O errors in words ----------------------------------------------------------------------------

class CheckpointIOError(OSError):
    """Saving a checkpoint failed for an I/O reason; the message says which, with the path."""


_WORDS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
          errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
          errno.EROFS: "read-only filesystem"}


def _chain(e: BaseException) -> Iterator[BaseException]:
    """`e`, what it wraps, and the per-rank failures a torch.distributed.checkpoint
    CheckpointException carries (`failures`: rank -> (exception, traceback))."""
    seen: set[int] = set()
    todo = [e]
    while todo:
        x = todo.pop(0)
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        yield x
        todo += [x.__cause__, x.__context__]
        for f in (getattr(x, "failures", None) or {}).values():
            todo.append(f[0] if isinstance(f, tuple) else f)


def _newest_file(root: Path) -> Path | None:
    best: tuple[float, Path] | None = None
    for dirpath, _, files in os.walk(root):
        for name in files:
            p = Path(dirpath) / name
            with contextlib.suppress(OSError):
                m = p.stat().st_mtime_ns
                if best is None or m > best[0]:
                    best = (m, p)
    return best[1] if best else None


def diagnose(e: BaseException, *, directory: Path) -> tuple[int, str] | None:
    """(errno, path) when `e` (or what it wraps) is an I/O failure writing under `directory`.
    torch's writers often wrap the OSError in a RuntimeError without errno ("[enforce fail at
    inline_container.cc] unexpected pos"): then the filesystem itself is asked (free space,
    read-only flag, write permission)."""
    for x in _chain(e):
        if isinstance(x, OSError) and x.errno in _WORDS:
            return x.errno, str(x.filename or _newest_file(directory) or directory)
        text = str(x)
        for code, words in _WORDS.items():
            if os.strerror(code).lower() in text.lower() or words in text.lower():
                return code, str(_newest_file(directory) or directory)
    if not isinstance(e, (OSError, RuntimeError)) and type(e).__name__ != "CheckpointException":
        return None
    probe = directory if directory.exists() else directory.parent
    with contextlib.suppress(OSError):
        st = os.statvfs(probe)
        where = str(_newest_file(directory) or directory)
        if st.f_flag & os.ST_RDONLY:
            return errno.EROFS, where
        if st.f_bavail * st.f_frsize < (1 << 20):  # under 1 MiB left: the write ran out of space
            return errno.ENOSPC, where
        if not os.access(probe, os.W_OK):
            return errno.EACCES, where
    return None


@contextlib.contextmanager
def explain_io_errors(directory: Path) -> Iterator[None]:
    """Re-raise an I/O failure of a save under `directory` as CheckpointIOError, in words.
    On ENOSPC the partial file is removed: the space it took lets the error reach the run's logs."""
    try:
        yield
    except CheckpointIOError:
        raise
    except (KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as e:  # torch.distributed.checkpoint's CheckpointException is a BaseException
        found = diagnose(e, directory=directory)
        if found is None:
            raise
        code, where = found
        if code in (errno.ENOSPC, errno.EDQUOT) and Path(where).is_file() and directory in Path(where).parents:
            with contextlib.suppress(OSError):
                os.unlink(where)
        raise CheckpointIOError(code, f"checkpoint: {_WORDS[code]} writing {where} (the previous checkpoint is "
                                      f"kept; {os.strerror(code)})") from e
