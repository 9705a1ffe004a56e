"""Preference optimisation: DPO, IPO and reference-free SimPO on whole pairs (`objective=dpo`).

The head gets the decoder's hidden states of a `PreferenceBatch` (rows [0, P) chosen, [P, 2P)
rejected) and computes each row's response log-prob in chunks of rows (each chunk recomputed in
backward, so fp32 logits exist for `train.loss_chunk_size` tokens at a time, as in SFT). The loss
is summed over pairs; the trainer divides by the global number of pairs. Reference log-probs come
with the batch: precomputed or from the frozen reference copy (`batch.ref_logps`, set before the
forward: ftcluster/objectives/reference.py), or from the adapters-disabled forward that
`TrainModule` runs when `needs_reference_forward`.

Metrics (TRL's names): rewards/chosen, rewards/rejected (beta x policy-minus-reference log-prob;
SimPO: beta x mean log-prob), rewards/margin, rewards/accuracy (chosen reward > rejected), and
logps/chosen, logps/rejected (summed response log-probs). They accumulate on the device as sums
and are read by the trainer / evaluator at their log points only (no host sync in a step).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ftcluster.config import DPOObjectiveConfig
from ftcluster.data.batch import IGNORE_INDEX, Batch

STAT_NAMES = ("pairs", "rewards/chosen", "rewards/rejected", "rewards/accuracy", "logps/chosen", "logps/rejected")


@dataclass(frozen=True, kw_only=True)
class PairLosses:
    losses: torch.Tensor
    """[P] loss of each pair."""
    chosen_rewards: torch.Tensor
    """[P] (detached) implicit reward of the chosen response."""
    rejected_rewards: torch.Tensor
    """[P] (detached) implicit reward of the rejected response."""


def preference_losses(*, policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
                      ref_chosen: torch.Tensor | None, ref_rejected: torch.Tensor | None,
                      chosen_tokens: torch.Tensor, rejected_tokens: torch.Tensor,
                      cfg: DPOObjectiveConfig) -> PairLosses:
    """Per-pair losses from summed response log-probs [P] (and token counts [P], for the losses
    that use mean log-probs). The formulas, each as its paper writes it:

    sigmoid (DPO): z = beta((pc - rc) - (pr - rr)); loss = -(1-ls) log s(z) - ls log s(-z).
    ipo (IPO):     h = (pc - rc) - (pr - rr) over mean log-probs (as TRL does: the 1/(2 beta)
                   target is then per token); loss = (h - 1/(2 beta))^2.
    simpo (SimPO): z = beta (pc/|c| - pr/|r|) - gamma; loss = -(1-ls) log s(z) - ls log s(-z).
    """
    beta, ls = cfg.beta, cfg.label_smoothing
    if cfg.loss == "simpo":
        mc, mr = policy_chosen / chosen_tokens.clamp(min=1), policy_rejected / rejected_tokens.clamp(min=1)
        z = beta * (mc - mr) - cfg.simpo_gamma
        losses = -(1 - ls) * F.logsigmoid(z) - ls * F.logsigmoid(-z)
        return PairLosses(losses=losses, chosen_rewards=(beta * mc).detach(), rejected_rewards=(beta * mr).detach())
    assert ref_chosen is not None and ref_rejected is not None, "DPO/IPO need reference log-probs"
    if cfg.loss == "ipo":
        nc, nr = chosen_tokens.clamp(min=1), rejected_tokens.clamp(min=1)
        dc, dr = (policy_chosen - ref_chosen) / nc, (policy_rejected - ref_rejected) / nr
        losses = (dc - dr - 1 / (2 * beta)) ** 2
    else:
        dc, dr = policy_chosen - ref_chosen, policy_rejected - ref_rejected
        z = beta * (dc - dr)
        losses = -(1 - ls) * F.logsigmoid(z) - ls * F.logsigmoid(-z)
    return PairLosses(losses=losses, chosen_rewards=(beta * dc).detach(), rejected_rewards=(beta * dr).detach())


def sequence_logps(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                   chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-prob of each row's labelled tokens [rows] fp32, labelled tokens per row [rows])."""
    rows, width = labels.shape
    per_chunk = max(1, chunk_size // max(width, 1))
    sums = []
    for start in range(0, rows, per_chunk):
        h, y = hidden[start:start + per_chunk], labels[start:start + per_chunk]
        if torch.is_grad_enabled():
            sums.append(checkpoint(_chunk_logps, h, y, weight, use_reentrant=False))
        else:
            sums.append(_chunk_logps(h, y, weight))
    return torch.cat(sums), (labels != IGNORE_INDEX).sum(-1)


def _chunk_logps(h: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    logits = F.linear(h, w).float()
    nll = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX, reduction="none")
    return -nll.view(y.shape).sum(-1)


class DPO:
    name = "dpo"

    def __init__(self, *, cfg: DPOObjectiveConfig, peft_method: str, chunk_size: int) -> None:
        self.cfg, self.chunk_size = cfg, chunk_size
        self.reference = cfg.reference_source(peft_method)  # none | adapters | precompute | model
        self.needs_reference_forward = self.reference == "adapters"
        self._stats: torch.Tensor | None = None

    def reference_logps(self, hidden: torch.Tensor, weight: torch.Tensor, batch: Batch) -> torch.Tensor:
        """[2P] summed response log-probs under the reference (called without autograd)."""
        return sequence_logps(hidden, weight, batch.labels, chunk_size=self.chunk_size)[0].detach()

    def head(self, hidden: torch.Tensor, weight: torch.Tensor, batch: Batch) -> torch.Tensor:
        logps, tokens = sequence_logps(hidden, weight, batch.labels, chunk_size=self.chunk_size)
        if getattr(batch, "logps_only", False):
            return logps.detach()  # the reference pass (ftcluster/objectives/reference.py)
        p = logps.shape[0] // 2
        ref = getattr(batch, "ref_logps", None)
        if self.reference != "none" and ref is None:
            raise RuntimeError(f"objective.reference={self.reference}: the batch carries no reference log-probs")
        out = preference_losses(policy_chosen=logps[:p], policy_rejected=logps[p:],
                                ref_chosen=None if ref is None else ref[:p], ref_rejected=None if ref is None else ref[p:],
                                chosen_tokens=tokens[:p], rejected_tokens=tokens[p:], cfg=self.cfg)
        valid = (tokens[:p] > 0).to(torch.float32)  # an empty eval pair (padding rank) adds nothing
        pc, pr = logps[:p].detach(), logps[p:].detach()
        stats = torch.stack([valid.sum(), (out.chosen_rewards * valid).sum(), (out.rejected_rewards * valid).sum(),
                             ((out.chosen_rewards > out.rejected_rewards).float() * valid).sum(),
                             (pc * valid).sum(), (pr * valid).sum()]).double()
        self._stats = stats if self._stats is None else self._stats + stats
        return (out.losses * valid).sum()

    def normaliser(self, batch: Batch) -> int:
        return int(getattr(batch, "num_pairs"))

    def take_stats(self) -> torch.Tensor | None:
        """The metric sums accumulated since the last call (float64 device tensor), and reset."""
        stats, self._stats = self._stats, None
        return stats

    def describe(self, sums: list[float]) -> dict[str, float]:
        """Host-side metrics from globally summed stats: means over pairs, and the margin."""
        n = max(sums[0], 1.0)
        out = {name: v / n for name, v in zip(STAT_NAMES[1:], sums[1:])}
        out["rewards/margin"] = out["rewards/chosen"] - out["rewards/rejected"]
        return out
