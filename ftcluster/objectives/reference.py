"""Reference log-probs for DPO/IPO on full fine-tuning: precomputed (`objective.reference=precompute`,
the default) or from a frozen copy of the model (`objective.reference=model`, `WithReferenceModel`).

Before step 1, one sharded pass of the untrained model over every pair (through the engine's
evaluation forward, so FSDP2 / ZeRO-3 gather layer by layer as in training; no second copy of the
model) gives each pair's summed response log-probs under the reference. Every rank computes its
slice of each window of pairs (the same number of forwards on every rank); one all-reduce gives
every rank the whole table, which rank 0 writes to `<run.dir>/reference_logps.<split>.safetensors`
keyed by pair (its raw row), with a fingerprint of the tokenised pairs. A resumed run, at any world
size, reads the table instead of recomputing it with trained weights; a resumed run without it
(or with other data) fails rather than use the wrong reference.

`objective.reference=model` keeps a frozen copy instead (a second copy of the weights, sharded by
the same backend; no file, nothing in checkpoints: it is rebuilt from the same weights on resume)
and runs it before each forward of the trained model; its log-probs reach the objective on the
batch (`ref_logps`), where the precomputed ones do.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ftcluster.data.errors import DataError
from ftcluster.distributed import all_reduce_sum, barrier

log = logging.getLogger("ftcluster")


class ReferenceLogps:
    """key -> (chosen, rejected) reference log-probs."""

    def __init__(self, *, keys: np.ndarray, values: np.ndarray) -> None:
        self.keys, self.values = np.asarray(keys, dtype=np.int64), np.asarray(values, dtype=np.float32)
        self._row = {int(k): i for i, k in enumerate(self.keys)}

    def lookup(self, keys: tuple[int, ...]) -> torch.Tensor:
        """[2P] float32: the chosen values of `keys`, then their rejected values."""
        rows = self.values[[self._row[int(k)] for k in keys]]
        return torch.from_numpy(np.concatenate([rows[:, 0], rows[:, 1]]).astype(np.float32))


def fingerprint(data: Any) -> str:
    """Digest of the pairs' keys and token ids: the table belongs to exactly this data."""
    h = hashlib.blake2b(digest_size=16)
    for i in range(len(data)):
        h.update(np.int64(data.key(i)).tobytes())
        for ids in data[i]:
            h.update(np.ascontiguousarray(ids, dtype=np.int64).tobytes())
            h.update(b"|")
    return h.hexdigest()


def reference_path(run_dir: Path, split: str) -> Path:
    return Path(run_dir) / f"reference_logps.{split}.safetensors"


def prepare_reference(*, engine: Any, collator: Any, split: str, run_dir: Path, rank: int, world_size: int,
                      device: torch.device, micro_batch_size: int, resumed: bool, is_main: bool) -> tuple[ReferenceLogps, bool]:
    """Collective: the reference table of `collator.data` (read, or computed and saved), and
    whether it was computed now. Sets it on the collator, so its batches carry it."""
    from safetensors.numpy import load_file, save_file

    data, path = collator.data, reference_path(run_dir, split)
    digest = fingerprint(data)
    if path.is_file():
        from safetensors import safe_open

        with safe_open(str(path), framework="np") as f:
            saved = (f.metadata() or {}).get("fingerprint")
        if saved != digest:
            raise DataError(f"{path}: reference log-probs of other {split} data (fingerprint {saved} != {digest}); "
                            "resume needs the same data (or start a new run.dir)")
        tensors = load_file(str(path))
        table, computed = ReferenceLogps(keys=tensors["keys"], values=tensors["logps"]), False
    else:
        if resumed:
            raise DataError(f"{path}: missing; a resumed run cannot recompute the reference from trained weights")
        table, computed = _compute(engine=engine, collator=collator, rank=rank, world_size=world_size, device=device,
                                   micro_batch_size=micro_batch_size), True
        if is_main:
            tmp = path.with_name(f".{path.name}.{os.getpid()}")
            save_file({"keys": table.keys, "logps": table.values}, str(tmp), metadata={"fingerprint": digest})
            os.replace(tmp, path)
        barrier()
    collator.reference = table
    return table, computed


def _compute(*, engine: Any, collator: Any, rank: int, world_size: int, device: torch.device,
             micro_batch_size: int) -> ReferenceLogps:
    data, mb = collator.data, micro_batch_size
    n = len(data)
    values = torch.zeros((n, 2), dtype=torch.float32, device=device)
    collator.logps_only = True
    try:
        for w in range(-(-n // (world_size * mb))):
            start = w * world_size * mb + rank * mb
            indices = list(range(start, min(start + mb, n)))
            batch = collator([data[i] for i in indices], indices) if indices else collator.empty()
            logps = engine.eval_forward(batch.to(device)).float()  # [2P]: chosen rows, then rejected
            if indices:
                p = len(indices)
                values[indices[0]:indices[0] + p] = torch.stack([logps[:p], logps[p:]], dim=1)
    finally:
        collator.logps_only = False
    if torch.distributed.is_initialized():
        all_reduce_sum(values)  # each row is filled by exactly one rank: the sum is that value, exactly
    keys = np.array([data.key(i) for i in range(n)], dtype=np.int64)
    return ReferenceLogps(keys=keys, values=values.cpu().numpy())


class WithReferenceModel:
    """The trained engine, with a frozen reference engine run first on every forward: the batch's
    `ref_logps` (chosen then rejected, [2P]) come from it, then the trained engine's forward sees
    the batch exactly as if they had been precomputed. Every other call (backward, step, save and
    load of the state, generate) goes to the trained engine only, so the reference is never saved
    and never touches optimizer, gradient or RNG state (eval mode, no autograd: no dropout draws)."""

    def __init__(self, *, engine: Any, reference: Any) -> None:
        self.engine, self.reference = engine, reference
        self.module: nn.Module = engine.module

    def _with_reference(self, batch: Any) -> Any:
        if batch.ref_logps is not None:
            return batch
        logps = self.reference.eval_forward(dataclasses.replace(batch, logps_only=True))
        return batch.with_reference(logps.float())

    def forward(self, batch: Any) -> torch.Tensor:
        return self.engine.forward(self._with_reference(batch))

    def eval_forward(self, batch: Any) -> torch.Tensor:
        if batch.logps_only:  # a log-prob pass of the trained model itself
            return self.engine.eval_forward(batch)
        return self.engine.eval_forward(self._with_reference(batch))

    def backward(self, loss: torch.Tensor, *, last_micro: bool) -> None:
        self.engine.backward(loss, last_micro=last_micro)

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, max_new_tokens: int,
                 eos_token_id: int | None, pad_token_id: int) -> torch.Tensor:
        return self.engine.generate(input_ids, attention_mask, max_new_tokens=max_new_tokens,
                                    eos_token_id=eos_token_id, pad_token_id=pad_token_id)

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        return self.engine.clip_grad_norm(max_norm)

    def step(self, *, lr: float, skip: torch.Tensor) -> None:
        self.engine.step(lr=lr, skip=skip)

    def save_state(self, directory: Path) -> None:
        self.engine.save_state(directory)  # the reference is rebuilt from the model's weights, not saved

    def load_state(self, directory: Path) -> None:
        self.engine.load_state(directory)
