"""Supervised fine-tuning: token-level cross-entropy on the supervised (label != -100) positions,
normalised by the number of supervised tokens in the global batch."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ftcluster.data.batch import IGNORE_INDEX, Batch


class SFT:
    """The output projection and cross-entropy run in chunks of `chunk_size` tokens, each
    recomputed in backward, so fp32 logits never exist for the whole batch (at 128k vocab and 4k
    tokens that is 2 GiB per sample). With `fused_linear_ce` (model.liger) Liger's fused linear
    cross-entropy does the same job in one kernel family (it too never holds full fp32 logits)."""

    name = "sft"
    needs_reference_forward = False

    def __init__(self, *, chunk_size: int, fused_linear_ce: bool = False) -> None:
        self.chunk_size = chunk_size
        self.fused_linear_ce = fused_linear_ce

    def head(self, hidden: torch.Tensor, weight: torch.Tensor, batch: Batch) -> torch.Tensor:
        h = hidden.reshape(-1, hidden.shape[-1])
        y = batch.labels.reshape(-1)
        if self.fused_linear_ce:
            from ftcluster.liger import fused_linear_ce_sum

            return fused_linear_ce_sum(h, weight, y, ignore_index=IGNORE_INDEX)
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, h.shape[0], self.chunk_size):
            hc, yc = h[start:start + self.chunk_size], y[start:start + self.chunk_size]
            total = total + checkpoint(_chunk_ce_sum, hc, yc, weight, use_reentrant=False)
        return total

    def normaliser(self, batch: Batch) -> int:
        return batch.num_supervised

    def reference_logps(self, hidden: torch.Tensor, weight: torch.Tensor, batch: Batch) -> torch.Tensor:
        raise NotImplementedError("SFT has no reference model")

    def take_stats(self) -> None:
        return None  # the loss is SFT's only metric

    def describe(self, sums: list[float]) -> dict[str, float]:
        return {}


def _chunk_ce_sum(h: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    logits = F.linear(h, w).float()
    return F.cross_entropy(logits, y, ignore_index=IGNORE_INDEX, reduction="sum")
