"""Sequence packing: several samples per row of up to data.max_seq_len tokens, no padding between.

Order of operations (what makes it exact and resumable on any world size):

1. The epoch's samples in data order: the same seeded permutation as unpacked training
   (`batches.epoch_order`, a mix's epoch pool included).
2. Rows: first-fit decreasing (FFD) over consecutive windows of `data.packing_window` samples of
   that order, then the rows shuffled (seeded; FFD makes the long-sample rows first). A function
   of (seed, epoch, data) only: never of the rank or the world size.
3. Shard: the global row sequence is dealt out like unpacked samples (`micro_batch_size` rows per
   rank per call, the whole global window advanced on every rank), so the saved position counts
   global rows and resumes the same sequence on another number of ranks.

Each packed row carries `position_ids` restarting at every sample and segment ids from which the
model builds attention that never crosses samples (ftcluster/model/packed.py); the label of each
sample's last token is IGNORE_INDEX, so no sample predicts the next one's first token. The loss
per supervised token is therefore that of the sample trained alone.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np
import torch

from ftcluster.config import DataConfig
from ftcluster.data.batch import IGNORE_INDEX, Batch
from ftcluster.data.batches import epoch_order
from ftcluster.data.errors import DataError

log = logging.getLogger(__name__)

PACK_STREAM = 4
"""Random stream of the row order within an epoch (0: sample order, 1: synthetic, 2: hold-out, 3: mix)."""


def resolve_packing(cfg: DataConfig, data: Any) -> tuple[bool, str]:
    """(pack?, why) for `data.packing`: `auto` packs when some sample is shorter than max_seq_len
    (synthetic samples fill their row, so never there)."""
    mode = cfg.packing_mode
    if mode != "auto":
        return mode == "true", f"data.packing={mode}"
    if cfg.format == "synthetic":
        return False, "data.packing=auto: synthetic samples fill data.max_seq_len"
    shorter = int((data.lengths() < cfg.max_seq_len).sum())
    if shorter == 0:
        return False, f"data.packing=auto: every sample has data.max_seq_len={cfg.max_seq_len} tokens"
    return True, f"data.packing=auto: {shorter} of {len(data)} samples are shorter than data.max_seq_len={cfg.max_seq_len}"


def first_fit_decreasing(lengths: np.ndarray, *, capacity: int, window: int) -> list[np.ndarray]:
    """Rows (arrays of positions into `lengths`) from first-fit decreasing over consecutive windows:
    within a window the longest sample goes first, each into the first row with room. Every
    length must be <= capacity. Deterministic (stable sort, first fit)."""
    rows: list[np.ndarray] = []
    for w0 in range(0, len(lengths), window):
        chunk = np.asarray(lengths[w0:w0 + window], dtype=np.int64)
        free = np.empty(len(chunk), dtype=np.int64)
        members: list[list[int]] = []
        for i in np.argsort(-chunk, kind="stable"):
            n = chunk[i]
            j = int(np.argmax(free[:len(members)] >= n)) if members else 0
            if not members or free[j] < n:  # no open row has room: open one
                j = len(members)
                free[j] = capacity
                members.append([])
            free[j] -= n
            members[j].append(w0 + int(i))
        rows.extend(np.asarray(m, dtype=np.int64) for m in members)
    return rows


@dataclasses.dataclass(frozen=True)
class PackingStats:
    rows: int
    samples: int
    tokens: int
    fill: float
    """Real tokens / (rows x max_seq_len)."""

    @property
    def samples_per_row(self) -> float:
        return self.samples / max(self.rows, 1)

    def as_event(self) -> dict[str, float | int]:
        return {"rows": self.rows, "samples": self.samples, "tokens": self.tokens, "fill": round(self.fill, 4),
                "samples_per_row": round(self.samples_per_row, 3)}


class PackedBatches:
    """This rank's packed micro-batches (`micro_batch_size` rows each); the same interface as
    `DistributedBatches` (next_microbatch, consumed, epoch, state_dict, load_state_dict)."""

    def __init__(self, data: Any, *, micro_batch_size: int, rank: int, world_size: int, seed: int, shuffle: bool,
                 pad_id: int, max_seq_len: int, window: int, pin_memory: bool = False) -> None:
        if len(data) == 0:
            raise DataError("data.path: no usable samples")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.data, self.micro_batch_size, self.rank, self.world_size = data, micro_batch_size, rank, world_size
        self.seed, self.shuffle, self.pad_id, self.max_seq_len = seed, shuffle, pad_id, max_seq_len
        self.window, self.pin_memory = window, pin_memory
        self._lengths = np.asarray(data.lengths(), dtype=np.int64)
        if self._lengths.max() > max_seq_len:
            i = int(self._lengths.argmax())
            raise DataError(f"{data.where(i)}: {self._lengths[i]} tokens, more than data.max_seq_len={max_seq_len}")
        self._consumed = 0  # global rows taken
        self._epoch, self._epoch_start = 0, 0  # the epoch the position is in, and its first global row
        self._plans: dict[int, list[np.ndarray]] = {}

    @property
    def consumed(self) -> int:
        """Global rows taken so far, across all ranks."""
        return self._consumed

    @property
    def epoch(self) -> int:
        return self._epoch

    def plan(self, epoch: int) -> list[np.ndarray]:
        """The rows of `epoch`, each an array of sample indices (made once per epoch)."""
        if epoch not in self._plans:
            order = epoch_order(self.data, seed=self.seed, epoch=epoch, shuffle=self.shuffle)
            rows = first_fit_decreasing(self._lengths[order], capacity=self.max_seq_len, window=self.window)
            if self.shuffle:
                # FFD opens rows longest-first: without this, each window would train its long
                # samples first and its short ones last (a length curriculum nobody asked for).
                perm = np.random.default_rng([self.seed, PACK_STREAM, epoch]).permutation(len(rows))
                rows = [rows[i] for i in perm]
            self._plans = {e: p for e, p in self._plans.items() if e >= epoch - 1}
            self._plans[epoch] = [order[r] for r in rows]
        return self._plans[epoch]

    def stats(self, epoch: int = 0) -> PackingStats:
        rows = self.plan(epoch)
        tokens = int(sum(self._lengths[r].sum() for r in rows))
        return PackingStats(rows=len(rows), samples=int(sum(len(r) for r in rows)), tokens=tokens,
                            fill=tokens / (len(rows) * self.max_seq_len))

    def _row(self, p: int) -> np.ndarray:
        e, start = self._epoch, self._epoch_start
        while p >= start + len(self.plan(e)):
            start += len(self.plan(e))
            e += 1
        return self.plan(e)[p - start]

    def next_microbatch(self) -> Batch:
        start = self._consumed + self.rank * self.micro_batch_size
        rows = [self._row(p) for p in range(start, start + self.micro_batch_size)]
        self._consumed += self.world_size * self.micro_batch_size  # the whole global window, on every rank
        while self._consumed >= self._epoch_start + len(self.plan(self._epoch)):
            self._epoch_start += len(self.plan(self._epoch))
            self._epoch += 1
        batch = collate_packed([[self.data[int(i)] for i in r] for r in rows], max_seq_len=self.max_seq_len,
                               pad_id=self.pad_id)
        return batch.pin_memory() if self.pin_memory else batch

    def state_dict(self) -> dict[str, Any]:
        return {"packed": True, "consumed": self._consumed, "epoch": self._epoch, "epoch_start": self._epoch_start,
                "num_samples": len(self.data), "seed": self.seed, "shuffle": self.shuffle,
                "packing_window": self.window, "max_seq_len": self.max_seq_len}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state.get("packed"):
            raise DataError("cannot resume the data position: the checkpoint was taken with unpacked batches "
                            "(data.packing=false); resume with data.packing=false or start a new run.dir")
        # The rows are a function of these: any change would continue a different sequence of rows.
        for key, mine in (("num_samples", len(self.data)), ("seed", self.seed), ("data.shuffle", self.shuffle),
                          ("data.packing_window", self.window), ("data.max_seq_len", self.max_seq_len)):
            saved = state[key.removeprefix("data.")]
            if saved != mine:
                raise DataError(f"cannot resume the packed data position: the checkpoint was taken with {key}={saved}, "
                                f"this run has {mine}; the same data and settings are needed to continue the same rows")
        self._consumed, self._epoch, self._epoch_start = (int(state[k]) for k in ("consumed", "epoch", "epoch_start"))
        self._plans = {}


def collate_packed(rows: list[list[tuple[Any, Any]]], *, max_seq_len: int, pad_id: int) -> Batch:
    """Rows of samples `(input_ids, supervised)` into one packed Batch: samples back to back,
    positions restarting at each, the row's tail padded (a segment of its own). Width: always
    max_seq_len (rows are nearly full anyway), so every micro-batch has one shape and compiled
    kernels (flex attention) never recompile for a new width."""
    used = [sum(len(ids) for ids, _ in r) for r in rows]
    if max(used) > max_seq_len:
        raise DataError(f"a packed row holds {max(used)} tokens, more than data.max_seq_len={max_seq_len}")
    width = max_seq_len
    input_ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    labels = np.full((len(rows), width), IGNORE_INDEX, dtype=np.int64)
    positions = np.zeros((len(rows), width), dtype=np.int64)
    segments = np.zeros((len(rows), width), dtype=np.int32)
    bounds, seq_lens = [0], []
    for b, row in enumerate(rows):
        t = 0
        for k, (ids, supervised) in enumerate(row):
            ids, supervised = np.asarray(ids, dtype=np.int64), np.asarray(supervised, dtype=bool)
            n = len(ids)
            input_ids[b, t:t + n] = ids
            # labels[t + n - 1] stays IGNORE_INDEX: a sample never predicts the next one's first token.
            labels[b, t:t + n - 1] = np.where(supervised[1:], ids[1:], IGNORE_INDEX)
            positions[b, t:t + n] = np.arange(n)
            segments[b, t:t + n] = k
            t += n
            bounds.append(b * width + t)
        if t < width:  # the padded tail: its own segment, so no real token attends to it
            positions[b, t:] = np.arange(width - t)
            segments[b, t:] = len(row)
            bounds.append((b + 1) * width)
        seq_lens.append(tuple(len(ids) for ids, _ in row))
    return Batch(input_ids=torch.from_numpy(input_ids), labels=torch.from_numpy(labels), num_tokens=sum(used),
                 num_supervised=int((labels != IGNORE_INDEX).sum()), position_ids=torch.from_numpy(positions),
                 segment_ids=torch.from_numpy(segments), cu_seqlens=torch.tensor(bounds, dtype=torch.int32),
                 seq_lens=tuple(seq_lens))
