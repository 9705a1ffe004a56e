"""The one checkpoint manager: save, commit, retain, find, load.

Layout of a committed checkpoint `<run.dir>/checkpoints/step_<N>/`:
  engine/         model + optimizer, sharded, written by the parallel backend (FSDP2: torch.distributed
                  .checkpoint, which reshards on load). With checkpoint.adapter_only (the default) the
                  model part holds only trainable parameters: an adapter run's frozen base is rebuilt
                  from model.path / the seed before loading: a 70B LoRA r=16 checkpoint is 2.4 GB (adapters + AdamW).
  rank_<r>.pt     per-rank state (RNG, data position as seen by that rank); tensors and plain types
                  only, loaded with weights_only=True
  config.yaml     the resolved config of the run that wrote it
  meta.json       step, tokens seen, world size, data position, logger run id, adapter_only, the device
                  type seeded weights were made on (for `ftcluster export`). Written last.

Commit protocol: every rank writes into `checkpoints/.tmp-step_<N>/`; after a barrier (every rank
finished) rank 0 writes meta.json, fsyncs, and renames the directory to `step_<N>` (atomic on POSIX
filesystems), then deletes committed checkpoints beyond keep_last. A crash or kill -9 at any point
leaves either the previous committed checkpoints untouched or the new one complete; a leftover
`.tmp-*` directory is ignored by `latest()` and removed by the next save.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ftcluster.distributed import Dist, barrier

STEP_PREFIX = "step_"
TMP_PREFIX = ".tmp-"


@dataclass(kw_only=True)
class Loaded:
    path: Path
    meta: dict
    rank_state: dict | None
    """This rank's saved state, or None when the checkpoint was written at another world size
    (or by fewer ranks than this one)."""


def _step_of(p: Path) -> int | None:
    if not p.name.startswith(STEP_PREFIX):
        return None
    tail = p.name[len(STEP_PREFIX):]
    return int(tail) if tail.isdigit() else None


def is_committed(p: Path) -> bool:
    return p.is_dir() and _step_of(p) is not None and (p / "meta.json").is_file()


def committed_checkpoints(run_dir: Path) -> list[Path]:
    """Committed checkpoints of a run directory, oldest first (no process group needed)."""
    d = run_dir / "checkpoints"
    return sorted((p for p in d.iterdir() if is_committed(p)), key=lambda p: _step_of(p) or 0) if d.is_dir() else []


class CheckpointManager:
    def __init__(self, run_dir: Path, *, keep_last: int, dist_info: Dist) -> None:
        self.dir = run_dir / "checkpoints"
        self.keep_last = keep_last
        self.d = dist_info

    def committed(self) -> list[Path]:
        """Committed checkpoints, oldest first."""
        return committed_checkpoints(self.dir.parent)

    def latest(self) -> Path | None:
        c = self.committed()
        return c[-1] if c else None

    def resolve(self, resume: str) -> Path | None:
        """Checkpoint to resume from for the `resume` setting (auto | never | path)."""
        if resume == "never":
            return None
        if resume == "auto":
            return self.latest()
        p = Path(resume)
        if not is_committed(p):
            raise ValueError(f"resume: {resume} is not a committed checkpoint (no meta.json)")
        return p

    # --- save ---------------------------------------------------------------------------------

    def save(self, *, step: int, engine, rank_state: dict, meta: dict, config_yaml: str,  # type: ignore[no-untyped-def]
             before_commit: Callable[[], None] | None = None) -> float:
        """Write and commit checkpoint `step`. Collective: every rank calls it. Returns seconds.
        `before_commit` runs on rank 0 between the last write and the commit (a test hook)."""
        t0 = time.perf_counter()
        final = self.dir / f"{STEP_PREFIX}{step}"
        tmp = self.dir / f"{TMP_PREFIX}{STEP_PREFIX}{step}"
        if self.d.is_main:
            self.dir.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)  # a crash's leftover of the same step
            tmp.mkdir()
        barrier()
        engine.save_state(tmp / "engine")
        _atomic_torch_save(rank_state, tmp / f"rank_{self.d.rank}.pt")
        barrier()  # every rank's shards and state are on disk
        if self.d.is_main:
            (tmp / "config.yaml").write_text(config_yaml)
            meta = {**meta, "step": step, "world_size": self.d.world_size, "saved_at": time.time()}
            _write_synced(tmp / "meta.json", json.dumps(meta, indent=1))
            _fsync_tree(tmp)
            if before_commit is not None:
                before_commit()
            if final.exists():  # re-saving a step (e.g. a resumed run's final save): swap safely
                old = self.dir / f"{TMP_PREFIX}old-{final.name}"
                shutil.rmtree(old, ignore_errors=True)
                os.rename(final, old)
                os.rename(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(tmp, final)
            _fsync_dir(self.dir)
            self._prune()
        barrier()
        return time.perf_counter() - t0

    def _prune(self) -> None:
        committed = self.committed()
        for p in committed[: max(0, len(committed) - self.keep_last)]:
            shutil.rmtree(p, ignore_errors=True)
        for p in self.dir.iterdir():  # leftovers of crashed saves, never a committed checkpoint
            if p.name.startswith(TMP_PREFIX):
                shutil.rmtree(p, ignore_errors=True)

    # --- load ---------------------------------------------------------------------------------

    def load(self, path: Path, *, engine) -> Loaded:  # type: ignore[no-untyped-def]
        """Restore the engine (model, optimizer; resharded by the backend) from `path` and return
        the run's metadata and this rank's saved state."""
        meta = json.loads((path / "meta.json").read_text())
        engine.load_state(path / "engine")
        rank_file = path / f"rank_{self.d.rank}.pt"
        rank_state = None
        if meta.get("world_size") == self.d.world_size and rank_file.is_file():
            rank_state = torch.load(rank_file, weights_only=True, map_location="cpu")
        return Loaded(path=path, meta=meta, rank_state=rank_state)


def _atomic_torch_save(obj: dict, path: Path) -> None:
    tmp = path.with_suffix(".part")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """Make every file of the checkpoint durable before the rename publishes it."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
