"""Deterministic, resumable micro-batches for one data-parallel rank.

The whole data order is one global sequence: position p is sample `order_e[p % N]` of epoch
`e = p // N`, where `order_e` is a permutation seeded by (seed, e). Every call takes the next
`world_size x micro_batch_size` positions; rank r gets the r-th slice of `micro_batch_size`. The
position (`consumed`, global samples taken) is the same on every rank and independent of the
world size, so a run resumed on a different number of ranks continues the same sequence with
nothing replayed or skipped.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ftcluster.data.batch import IGNORE_INDEX, Batch
from ftcluster.data.errors import DataError

# Random streams, kept apart from the synthetic-token stream (see dataset.SYNTHETIC_STREAM).
ORDER_STREAM = 0


class DistributedBatches:
    def __init__(self, data: Any, *, micro_batch_size: int, rank: int, world_size: int, seed: int, shuffle: bool,
                 pad_id: int, max_seq_len: int, pad_to_multiple_of: int = 8, pin_memory: bool = False) -> None:
        """`data`: anything with `len` and `data[i] -> (input_ids, supervised)` (a TokenizedData)."""
        if len(data) == 0:
            raise DataError("data.path: no usable samples")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        if micro_batch_size < 1 or pad_to_multiple_of < 1:
            raise ValueError("micro_batch_size and pad_to_multiple_of must be >= 1")
        self.data = data
        self.micro_batch_size = micro_batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle = shuffle
        self.pad_id = pad_id
        self.max_seq_len = max_seq_len
        self.pad_to_multiple_of = pad_to_multiple_of
        self.pin_memory = pin_memory
        self._consumed = 0
        # Permutations of the epochs the current window touches (at most two: a window can
        # straddle an epoch boundary). Made once per epoch, not per step.
        self._orders: dict[int, np.ndarray] = {}

    @property
    def consumed(self) -> int:
        """Global samples taken so far, across all ranks."""
        return self._consumed

    @property
    def epoch(self) -> int:
        return self._consumed // epoch_size(self.data)

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            order = epoch_order(self.data, seed=self.seed, epoch=epoch, shuffle=self.shuffle)
            self._orders = {e: o for e, o in self._orders.items() if e >= epoch - 1}
            self._orders[epoch] = order
        return self._orders[epoch]

    def global_indices(self, start: int, stop: int) -> list[int]:
        """Sample indices at global positions [start, stop)."""
        n = epoch_size(self.data)
        return [int(self._order(p // n)[p % n]) for p in range(start, stop)]

    def next_microbatch(self) -> Batch:
        """This rank's next micro-batch, on the CPU (see `Batch` for the label layout)."""
        start = self._consumed + self.rank * self.micro_batch_size
        indices = self.global_indices(start, start + self.micro_batch_size)
        # Advance by the whole global window on every rank, so all ranks hold the same position.
        self._consumed += self.world_size * self.micro_batch_size
        return self._collate([self.data[i] for i in indices], indices)

    def _collate(self, samples: list[tuple[Any, Any]], indices: list[int]) -> Batch:
        batch = collate(samples, indices=indices, pad_id=self.pad_id, max_seq_len=self.max_seq_len,
                        pad_to_multiple_of=self.pad_to_multiple_of)
        return batch.pin_memory() if self.pin_memory else batch

    def state_dict(self) -> dict[str, int | bool]:
        # num_samples/seed/shuffle are recorded so a resume on different data is caught, not silently misaligned.
        return {"consumed": self._consumed, "epoch": self.epoch, "num_samples": len(self.data),
                "seed": self.seed, "shuffle": self.shuffle}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("packed"):
            raise DataError("cannot resume the data position: the checkpoint was taken with packed rows "
                            "(data.packing); resume with data.packing=true or start a new run.dir")
        for key, mine in (("num_samples", len(self.data)), ("seed", self.seed), ("shuffle", self.shuffle)):
            if key in state and state[key] != mine:
                raise DataError(
                    f"cannot resume the data position: the checkpoint was taken with {key}={state[key]}, this run has "
                    f"{key}={mine}; the same data, seed and data.shuffle are needed to continue the same sample order")
        self._consumed = int(state["consumed"])
        self._orders = {}


def epoch_size(data: Any) -> int:
    """Samples in one epoch: a mix's epoch pool (see data/mixing.py), else every sample once."""
    return int(getattr(data, "epoch_size", len(data)))


def epoch_order(data: Any, *, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """Sample indices of `epoch` in data order: a permutation seeded by (seed, epoch) of every
    sample (or of a mix's epoch pool, itself seeded by (seed, epoch))."""
    pool = data.epoch_pool(seed=seed, epoch=epoch) if hasattr(data, "epoch_pool") else None
    n = len(data) if pool is None else len(pool)
    order = np.random.default_rng([seed, ORDER_STREAM, epoch]).permutation(n) if shuffle else np.arange(n)
    return order if pool is None else pool[order]


def collate(samples: list[tuple[Any, Any]], *, indices: list[int], pad_id: int, max_seq_len: int,
            pad_to_multiple_of: int = 8) -> Batch:
    """Right-pad samples `(input_ids, supervised)` into one Batch (see `Batch` for the label
    layout); the width is the longest sample rounded up to a multiple of `pad_to_multiple_of`,
    at most max_seq_len. `indices` name the samples in errors."""
    longest = max(len(ids) for ids, _ in samples)
    if longest > max_seq_len:
        i = indices[max(range(len(samples)), key=lambda j: len(samples[j][0]))]
        raise DataError(f"sample {i} has {longest} tokens, more than data.max_seq_len={max_seq_len}")
    m = pad_to_multiple_of
    width = min(-(-longest // m) * m, max_seq_len)
    input_ids = np.full((len(samples), width), pad_id, dtype=np.int64)
    labels = np.full((len(samples), width), IGNORE_INDEX, dtype=np.int64)
    for b, (ids, supervised) in enumerate(samples):
        ids = np.asarray(ids, dtype=np.int64)
        supervised = np.asarray(supervised, dtype=bool)
        n = len(ids)
        input_ids[b, :n] = ids
        labels[b, :n - 1] = np.where(supervised[1:], ids[1:], IGNORE_INDEX)
    # Real (non-pad) tokens, known here for free; the pad id may also be a real token.
    return Batch(input_ids=torch.from_numpy(input_ids), labels=torch.from_numpy(labels),
                 num_tokens=sum(len(ids) for ids, _ in samples), num_supervised=int((labels != IGNORE_INDEX).sum()))
