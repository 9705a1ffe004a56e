"""Training objectives: what loss a batch gives, what it is normalised by, what it reports.

The trainer knows only the `Objective` protocol; `build_objective(job)` picks the implementation
(`objective=sft|dpo`: sft.py, dpo.py). An objective's `head` runs inside the sharded
module's forward (so the backends gather the output projection with the rest of the root module);
the trainer divides the summed loss by the global `normaliser` over all micro-batches and ranks.
"""
from __future__ import annotations

from typing import Protocol

import torch

from ftcluster.config import JobConfig, tri_state
from ftcluster.data.batch import Batch


class Objective(Protocol):
    name: str
    needs_reference_forward: bool
    """True: `TrainModule` runs a no-grad forward with the adapters disabled before each forward
    and hands the objective its log-probs via `reference_logps` (DPO with objective.reference=adapters)."""

    def head(self, hidden: torch.Tensor, weight: torch.Tensor, batch: Batch) -> torch.Tensor:
        """The SUM of the loss over this micro-batch's units (fp32 0-d tensor), from the decoder's
        last hidden states [rows, width, d] and the output projection's weight [vocab, d]."""

    def normaliser(self, batch: Batch) -> int:
        """How many units the loss of `batch` sums over (a host integer: no device sync). The
        step's loss is sum over micro-batches and ranks of `head`, divided by the sum of this."""

    def reference_logps(self, hidden: torch.Tensor, weight: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Per-row log-probs under the reference model (only when `needs_reference_forward`)."""

    def take_stats(self) -> torch.Tensor | None:
        """Device sums of the objective's own metrics since the last call (then reset), or None
        (SFT has none). The trainer all-reduces them and reads them at log points only."""

    def describe(self, sums: list[float]) -> dict[str, float]:
        """The metrics (name -> value) from globally summed `take_stats` values."""


def build_objective(job: JobConfig) -> Objective:
    if job.objective.kind == "dpo":
        from ftcluster.objectives.dpo import DPO

        return DPO(cfg=job.objective, peft_method=job.peft.method, chunk_size=job.train.loss_chunk_size)
    from ftcluster.objectives.sft import SFT

    return SFT(chunk_size=job.train.loss_chunk_size, fused_linear_ce=bool(tri_state(job.model.liger, "model.liger")))
