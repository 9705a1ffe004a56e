"""The one checkpoint manager: save, commit, retain, find, load.

Layout of a committed checkpoint `<run.dir>/checkpoints/step_<N>/`:
  engine/         model + optimizer, sharded, written by the parallel backend (FSDP2: torch.distributed
                  .checkpoint, which reshards on load). With checkpoint.adapter_only (the default) the
                  model part holds only trainable parameters: an adapter run's frozen base is rebuilt
                  from model.path / the seed before loading: a 70B LoRA r=16 checkpoint is 2.4 GB (adapters + AdamW).
  rank_<r>.pt     per-rank state (RNG); tensors and plain types only, loaded with weights_only=True
  config.yaml     the resolved config of the run that wrote it
  manifest.json   every file above with its size and BLAKE2b digest (ftcluster/checkpoint_integrity.py)
  meta.json       step, world size, and the state_dict() of each global stateful object the loop
                  hands over (train progress, data position, logger run id, how the model was built
                  for `ftcluster export`). Written last.

The manager owns the policy: when to save (`due`), what a checkpoint holds (the engine plus named
`Stateful` objects: it asks each for its state and gives it back on load), where it goes, how many
stay. The loop hands it objects, never hand-built metadata.

Commit protocol: every rank writes into `checkpoints/.tmp-step_<N>/`; after a barrier (every rank
finished) rank 0 writes meta.json, fsyncs, and renames the directory to `step_<N>` (atomic on POSIX
filesystems), then deletes committed checkpoints beyond keep_last. A crash or kill -9 at any point
leaves either the previous committed checkpoints untouched or the new one complete; a leftover
`.tmp-*` directory is ignored by `latest()` and removed by the next save.
The manifest is written (by rank 0, from digests every rank computed of its share of the files,
after the barrier) before meta.json and the rename, so the argument above covers it: a committed
checkpoint always has a complete manifest, and meta.json records the manifest's digest.

Verification: loading verifies first (every size, every digest; shared out across ranks). A
checkpoint that fails is never loaded: `resume=auto` falls back to the newest one that verifies
and lists what it skipped in `CheckpointManager.rejected` (the trainer logs each as a
`checkpoint_rejected` event); an explicit `resume=PATH` raises CorruptCheckpointError naming the
file; `ftcluster export` refuses it. A checkpoint without a manifest (written before manifests)
loads with a warning.

What a checkpoint from elsewhere can and cannot do: it cannot run code. Every pickle-bearing file
is loaded with `torch.load(weights_only=True)` and an allowlist of the types the backend writes
(rank_<r>.pt: none; DeepSpeed's *_model_states.pt / *_optim_states.pt: its loss scaler, ZeRO stage
enum and fragment address, also inside DeepSpeed's own loaders, zero_to_fp32 and the universal
conversion), or, for torch.distributed.checkpoint's `.metadata`, with a restricted unpickler that
admits only DCP's metadata classes (ftcluster/safe_load.py); meta.json and config.yaml are JSON and
YAML (safe_load). It can still set any weight, optimizer value, data position and RNG state it
likes, and a config.yaml naming a model path (read locally, trust_remote_code off unless asked):
a checkpoint from someone else is only as trustworthy as its training. The manifest detects
corruption, not forgery (whoever writes the files can write a matching manifest).

I/O errors: a save failing with ENOSPC, EACCES/EPERM or EROFS (also when torch's writer wraps it
in a RuntimeError without errno) raises CheckpointIOError saying so with the path; nothing is
committed, so the previous checkpoint stays the newest.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol

import logging

import torch

from ftcluster.checkpoint_integrity import (CorruptCheckpointError, Rejection, build_manifest, explain_io_errors,
                                           verify, verify_or_raise, write_manifest)
from ftcluster.config import CheckpointConfig
from ftcluster.distributed import Dist, barrier
from ftcluster.safe_load import load_pt

log = logging.getLogger("ftcluster")

STEP_PREFIX = "step_"
TMP_PREFIX = ".tmp-"


class Stateful(Protocol):
    """Anything the checkpoint manager saves: plain types (and, per rank, tensors) in, the same out."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass(kw_only=True)
class Loaded:
    path: Path
    step: int
    world_size: int
    """The world size that wrote the checkpoint."""
    rank_state_restored: bool
    """Whether this rank's own state (RNG) was restored: only when the checkpoint was written at
    this world size (else the caller seeds fresh, deterministic per-rank streams)."""


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
    def __init__(self, run_dir: Path, *, cfg: CheckpointConfig, dist_info: Dist) -> None:
        self.dir = run_dir / "checkpoints"
        self.cfg = cfg
        self.keep_last = cfg.keep_last
        self.d = dist_info
        self.rejected: list[Rejection] = []
        """Checkpoints the last `resolve("auto")` skipped because they failed verification (newest
        first): the caller logs each as a `checkpoint_rejected` event (`Rejection.as_event()`)."""

    def due(self, step: int, *, last: bool) -> bool:
        """Whether `step` is a save point: every `checkpoint.every_steps` steps and the last step."""
        if not self.cfg.enabled:
            return False
        every = self.cfg.every_steps
        return last or bool(every and step % every == 0)

    def committed(self) -> list[Path]:
        """Committed checkpoints, oldest first."""
        return committed_checkpoints(self.dir.parent)

    def latest(self) -> Path | None:
        c = self.committed()
        return c[-1] if c else None

    def resolve(self, resume: str) -> Path | None:
        """Checkpoint to resume from for the `resume` setting (auto | never | path). Collective."""
        if self.d.is_main:
            self._recover_swap()
        barrier()
        if resume == "never":
            return None
        self.rejected = []
        if resume == "auto":
            for p in reversed(self.committed()):
                v = verify(p, rank=self.d.rank, world_size=self.d.world_size)
                if v.problem is None:
                    if v.legacy:
                        log.warning("checkpoint %s has no manifest (written before manifests): loading it unverified", p)
                    return p
                log.warning("resume: skipping %s: %s: %s; trying an older checkpoint", p,
                            p / v.problem.file, v.problem.reason)
                self.rejected.append(v.problem)
            if self.rejected:
                raise CorruptCheckpointError(self.rejected[-1].checkpoint, self.rejected[-1].file,
                                             self.rejected[-1].reason + "; no committed checkpoint verifies "
                                             "(resume=never starts afresh)")
            return None
        p = Path(resume)
        if not is_committed(p):
            raise ValueError(f"resume: {resume} is not a committed checkpoint (no meta.json)")
        verify_or_raise(p, rank=self.d.rank, world_size=self.d.world_size)
        return p

    # --- save ---------------------------------------------------------------------------------

    def save(self, *, step: int, engine, state: Mapping[str, Stateful], rank_state: Mapping[str, Stateful],  # type: ignore[no-untyped-def]
             config_yaml: str, before_commit: Callable[[], None] | None = None,
             best: dict[str, Any] | None = None) -> float:
        """Write and commit checkpoint `step`: the engine's shards, each of `state` (global: the
        same on every rank, written once by rank 0 into meta.json) and each of `rank_state` (this
        rank's, into rank_<r>.pt). Collective: every rank calls it. Returns seconds.
        `best` (checkpoint.keep_best: {"metric", "value"}) makes this checkpoint the best one.
        `before_commit` runs on rank 0 between the last write and the commit (a test hook)."""
        t0 = time.perf_counter()
        final = self.dir / f"{STEP_PREFIX}{step}"
        tmp = self.dir / f"{TMP_PREFIX}{STEP_PREFIX}{step}"
        if self.d.is_main:
            with explain_io_errors(tmp):
                self.dir.mkdir(parents=True, exist_ok=True)
                self._recover_swap()
                if tmp.exists():
                    shutil.rmtree(tmp)  # a crash's leftover of the same step
                tmp.mkdir()
                (tmp / "config.yaml").write_text(config_yaml)
        barrier()
        with explain_io_errors(tmp):
            engine.save_state(tmp / "engine")
            _atomic_torch_save({k: v.state_dict() for k, v in rank_state.items()}, tmp / f"rank_{self.d.rank}.pt")
        barrier()  # every rank's shards and state are on disk
        manifest = build_manifest(tmp, rank=self.d.rank, world_size=self.d.world_size)  # collective
        if self.d.is_main:
            meta = {**{k: v.state_dict() for k, v in state.items()}, "step": step, "world_size": self.d.world_size}
            with explain_io_errors(tmp):
                assert manifest is not None
                meta["manifest"] = write_manifest(tmp, manifest)  # before meta.json: see the docstring
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
            if best is not None:
                # After the commit, before retention: a crash in between leaves best.json naming
                # the previous best, which retention has not touched yet.
                _write_json_atomic(self.dir.parent / BEST_FILE, {"step": step, "checkpoint": str(final), **best})
            self._prune()
        barrier()
        return time.perf_counter() - t0

    def _recover_swap(self) -> None:
        """Re-saving a committed step swaps it in two renames (old -> `.tmp-old-step_N`, new ->
        `step_N`). A crash between them leaves the old one only under its temporary name: put it
        back before anything treats `.tmp-` directories as leftovers."""
        if not self.dir.is_dir():
            return
        prefix = f"{TMP_PREFIX}old-{STEP_PREFIX}"
        for p in self.dir.iterdir():
            final = self.dir / p.name[len(TMP_PREFIX) + len("old-"):]
            if p.name.startswith(prefix) and (p / "meta.json").is_file() and not final.exists():
                os.rename(p, final)

    def best(self) -> Path | None:
        """The best checkpoint (checkpoint.keep_best), if best.json names a committed one."""
        return best_checkpoint(self.dir.parent)

    def _prune(self) -> None:
        best = self.best()
        committed = [p for p in self.committed() if p != best]  # the best one is never retention's
        for p in committed[: max(0, len(committed) - self.keep_last)]:
            # Out of the committed namespace first (one atomic rename), then delete: a crash or a
            # failing delete leaves a `.tmp-` leftover, never a half-deleted "committed" checkpoint.
            doomed = self.dir / f"{TMP_PREFIX}pruned-{p.name}"
            shutil.rmtree(doomed, ignore_errors=True)
            os.rename(p, doomed)
            shutil.rmtree(doomed, ignore_errors=True)
        for p in self.dir.iterdir():  # leftovers of crashed saves, never a committed checkpoint
            if p.name.startswith(TMP_PREFIX):
                shutil.rmtree(p, ignore_errors=True)

    # --- load ---------------------------------------------------------------------------------

    def load(self, path: Path, *, engine, state: Mapping[str, Stateful],  # type: ignore[no-untyped-def]
             rank_state: Mapping[str, Stateful]) -> Loaded:
        """Restore the engine (model, optimizer; resharded by the backend) and each of `state` from
        `path`; each of `rank_state` too when the checkpoint was written at this world size."""
        meta = read_meta(path)
        engine.load_state(path / "engine")
        for key, obj in state.items():
            if key in meta:
                obj.load_state_dict(meta[key])
        rank_file = path / f"rank_{self.d.rank}.pt"
        restored = meta.get("world_size") == self.d.world_size and rank_file.is_file()
        if restored:
            saved = load_pt(rank_file, map_location="cpu")  # tensors and plain types only
            for key, obj in rank_state.items():
                obj.load_state_dict(saved[key])
        return Loaded(path=path, step=int(meta["step"]), world_size=int(meta["world_size"]), rank_state_restored=restored)


BEST_FILE = "best.json"
"""<run.dir>/best.json: {"step", "checkpoint", "metric", "value"} of the best checkpoint."""


def best_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint best.json names, when it is committed (no process group needed)."""
    f = Path(run_dir) / BEST_FILE
    if not f.is_file():
        return None
    p = Path(json.loads(f.read_text())["checkpoint"])
    p = p if p.is_absolute() else Path(run_dir) / p
    return p if is_committed(p) else None


def _write_json_atomic(path: Path, obj: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.part")
    _write_synced(tmp, json.dumps(obj, indent=1))
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def read_meta(path: Path) -> dict[str, Any]:
    """meta.json of a committed checkpoint (no process group needed)."""
    return json.loads((path / "meta.json").read_text())


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


class RNGState:
    """This process's torch RNG streams (CPU, and CUDA where present) as a Stateful."""

    def state_dict(self) -> dict[str, Any]:
        state = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])
