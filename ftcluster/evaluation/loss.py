"""Held-out loss: the objective's loss over the whole eval set (or `eval.max_batches` per rank),
sharded across ranks, through the engine's evaluation forward (no gradient, no optimizer or
accumulation state touched, on every backend).

The eval set is cut into global windows of `world_size x micro_batch_size` samples in order; rank r
takes the r-th slice of each. Every rank runs the same number of forwards (a sharded forward is
collective): a rank whose slice of the last window is empty runs a batch with no supervised token,
which adds nothing. The loss is the sum over all samples' supervised tokens divided by their
number, so it does not depend on the world size (up to float rounding of the batch sums).
"""
from __future__ import annotations

import math
import time
from typing import Any, Iterator

import torch

from ftcluster.data.batch import IGNORE_INDEX, Batch
from ftcluster.data.batches import collate
from ftcluster.distributed import all_reduce_sum


class EvalBatches:
    """This rank's evaluation micro-batches, the same number on every rank."""

    def __init__(self, data: Any, *, micro_batch_size: int, max_batches: int | None, rank: int, world_size: int,
                 pad_id: int, max_seq_len: int, collator: Any = None) -> None:
        """`collator`: None collates samples (SFT); a `PairCollator` collates whole preference pairs."""
        self.data, self.mb, self.rank, self.world = data, micro_batch_size, rank, world_size
        self.pad_id, self.max_seq_len, self.collator = pad_id, max_seq_len, collator
        windows = -(-len(data) // (world_size * micro_batch_size))
        self.num_batches = windows if max_batches is None else min(windows, max_batches)

    def __iter__(self) -> Iterator[Batch]:
        n = len(self.data)
        for w in range(self.num_batches):
            start = w * self.world * self.mb + self.rank * self.mb
            indices = list(range(start, min(start + self.mb, n)))
            if self.collator is not None:
                yield self.collator([self.data[i] for i in indices], indices) if indices else self.collator.empty()
                continue
            if not indices:
                yield self._empty()
                continue
            yield collate([self.data[i] for i in indices], indices=indices, pad_id=self.pad_id,
                          max_seq_len=self.max_seq_len)

    def samples_covered(self) -> int:
        """Eval samples the batches hold over all ranks."""
        return min(len(self.data), self.num_batches * self.world * self.mb)

    def _empty(self) -> Batch:
        ids = torch.full((1, 8), self.pad_id, dtype=torch.long)
        return Batch(input_ids=ids, labels=torch.full_like(ids, IGNORE_INDEX), num_tokens=0, num_supervised=0)


def eval_loss(engine: Any, objective: Any, batches: EvalBatches, *, device: torch.device) -> dict[str, float]:
    """Collective: the eval record's loss fields. One host sync, at the end."""
    t0 = time.perf_counter()
    total = torch.zeros((), dtype=torch.float64, device=device)
    units = tokens = 0
    objective.take_stats()  # nothing of training's metrics leaks into the eval record
    for batch in batches:
        total += engine.eval_forward(batch.to(device)).double()
        units += objective.normaliser(batch)
        tokens += batch.num_tokens
    counts = torch.tensor([units, tokens], dtype=torch.float64).to(device)
    stats = objective.take_stats()  # DPO: rewards, accuracy, log-probs over the held-out pairs
    parts = [total.reshape(1), counts] + ([stats] if stats is not None else [])
    loss_sum, units_all, tokens_all, *stat_sums = all_reduce_sum(torch.cat(parts)).tolist()
    seconds = max(time.perf_counter() - t0, 1e-9)
    loss = loss_sum / max(units_all, 1.0)
    # Perplexity is exp of a per-token loss (SFT); a preference loss is per pair: no perplexity.
    ppl = {"eval_ppl": math.exp(loss) if loss < 700 else math.inf} if stats is None else {}
    return {"eval_loss": loss, **ppl,
            "eval_tokens_per_s": tokens_all / seconds, "eval_samples": batches.samples_covered(),
            "eval_tokens": int(tokens_all), "eval_seconds": round(seconds, 3),
            **({f"eval_{k}": v for k, v in objective.describe(stat_sums).items()} if stats is not None else {})}
