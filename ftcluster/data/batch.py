"""The typed unit the data pipeline yields and the trainer, objectives and engines consume."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

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
    position_ids: Optional[torch.Tensor] = None
    """Packed batches only (None: one sample per row): LongTensor [rows, width] of positions,
    restarting at 0 at each sample (and at the row's padded tail)."""
    segment_ids: Optional[torch.Tensor] = None
    """Packed batches only: IntTensor [rows, width], the sample number within its row of every
    position (the padded tail is a segment of its own); attention never crosses segments."""
    cu_seqlens: Optional[torch.Tensor] = None
    """Packed batches only: IntTensor [segments + 1] of segment boundaries over the flattened
    rows x width positions (FlashAttention's varlen layout; S2-Attn's per-sample groups)."""
    seq_lens: Optional[tuple[tuple[int, ...], ...]] = None
    """Packed batches only, on the host: the sample lengths of each row (padded tails excluded),
    for the per-sample attention span in the FLOPs count."""

    @property
    def packed(self) -> bool:
        return self.position_ids is not None

    @property
    def width(self) -> int:
        """Padded sequence length of the batch (the attended span without S2-Attn)."""
        return int(self.input_ids.shape[1])

    def to(self, device: torch.device, *, non_blocking: bool = True) -> "Batch":
        """The same batch with its tensors on `device` (counts stay on the host)."""
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "Batch":
        return self._map(lambda t: t.pin_memory())

    def _map(self, fn) -> "Batch":  # type: ignore[no-untyped-def]
        if not self.packed:
            return Batch(input_ids=fn(self.input_ids), labels=fn(self.labels),
                         num_tokens=self.num_tokens, num_supervised=self.num_supervised)
        return replace(self, input_ids=fn(self.input_ids), labels=fn(self.labels), position_ids=fn(self.position_ids),
                       segment_ids=fn(self.segment_ids), cu_seqlens=fn(self.cu_seqlens))
