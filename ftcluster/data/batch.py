"""The typed unit the data pipeline yields and the trainer, objectives and engines consume."""
from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE_INDEX = -100
"""Label of a position that carries no loss (prompt tokens, padding, each row's last position)."""


@dataclass(frozen=True, kw_only=True)
class Batch:
    """One micro-batch of one rank.

    `labels` are already shifted for next-token prediction: `labels[b, t]` is `input_ids[b, t+1]`
    when token t+1 is supervised, else IGNORE_INDEX, so the loss is plain cross-entropy of
    logits[b, t] against labels[b, t]. The counts are host integers computed while collating, so
    using them never waits on the device."""

    input_ids: torch.Tensor
    """LongTensor [rows, width] of token ids (right-padded)."""
    labels: torch.Tensor
    """LongTensor [rows, width] of shifted targets, IGNORE_INDEX where there is no loss."""
    num_tokens: int
    """Real (non-pad) input tokens in the batch (what tokens/s counts)."""
    num_supervised: int
    """Positions with a label (the SFT loss's normaliser)."""

    @property
    def width(self) -> int:
        """Padded sequence length of the batch (the attended span without S2-Attn)."""
        return int(self.input_ids.shape[1])

    def to(self, device: torch.device, *, non_blocking: bool = True) -> "Batch":
        """The same batch with its tensors on `device` (counts stay on the host)."""
        return Batch(input_ids=self.input_ids.to(device, non_blocking=non_blocking),
                     labels=self.labels.to(device, non_blocking=non_blocking),
                     num_tokens=self.num_tokens, num_supervised=self.num_supervised)

    def pin_memory(self) -> "Batch":
        return Batch(input_ids=self.input_ids.pin_memory(), labels=self.labels.pin_memory(),
                     num_tokens=self.num_tokens, num_supervised=self.num_supervised)
