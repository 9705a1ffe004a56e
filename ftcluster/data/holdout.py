"""Held-out evaluation data: a file of its own (`data.eval_path`) or a deterministic split of the
training samples (`data.eval_fraction` / `data.eval_samples`).

The split is a function of the seed and the number of usable samples only: a permutation from its
own random stream (apart from the data order's), whose first k samples are held out. So it is the
same on every rank and for every world size, and never overlaps the samples trained on. It is
recorded in `<run.dir>/eval_split.json` when the run starts; a resumed run evaluates on the
recorded samples (and refuses to continue if the data no longer matches the record).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ftcluster.config import DataConfig
from ftcluster.data.dataset import TokenizedData, build_dataset
from ftcluster.data.errors import DataError

EVAL_SPLIT_STREAM = 2
"""Random stream of the hold-out permutation (0: data order, 1: synthetic tokens)."""
SPLIT_FILE = "eval_split.json"


def build_train_and_eval(cfg: DataConfig, *, tokenizer: Any, seed: int, vocab_size: int | None,
                         run_dir: Path, is_main: bool,
                         builder: Callable[..., Any] = build_dataset) -> tuple[TokenizedData, TokenizedData | None]:
    """(training data, evaluation data or None). Raises DataError naming the key or file:line.
    `builder`: `build_dataset` (samples) or `preference.build_preference_dataset` (pairs)."""
    if cfg.sources:  # several datasets mixed by weight (SFT samples only: compose refuses a mix of pairs)
        from ftcluster.data.mixing import build_mix

        data = build_mix(cfg, tokenizer=tokenizer, seed=seed)
    else:
        data = builder(cfg, tokenizer=tokenizer, seed=seed, vocab_size=vocab_size)
    if cfg.eval_path is not None:
        held = builder(dataclasses.replace(cfg, path=cfg.eval_path, sources=[]), tokenizer=tokenizer, seed=seed,
                       vocab_size=vocab_size)
        _refuse_overlap(data, held)
        return data, held
    if not cfg.has_eval:
        return data, None
    n = len(data)
    k = cfg.eval_samples if cfg.eval_samples > 0 else int(round(cfg.eval_fraction * n))
    key = "data.eval_samples" if cfg.eval_samples > 0 else "data.eval_fraction"
    if k < 1:
        raise DataError(f"{key}: holds out no sample of {n} (the eval set would be empty); raise it")
    if k >= n:
        raise DataError(f"{key}: holds out {k} of {n} samples, leaving none to train on")
    eval_idx = _recorded_or_new(run_dir, n=n, k=k, seed=seed, is_main=is_main)
    mask = np.ones(n, dtype=bool)
    mask[eval_idx] = False
    return data.subset(np.flatnonzero(mask)), data.subset(eval_idx)


def holdout_indices(*, n: int, k: int, seed: int) -> np.ndarray:
    """The k held-out sample indices (sorted) of n usable samples, for this seed."""
    perm = np.random.default_rng([seed, EVAL_SPLIT_STREAM]).permutation(n)
    return np.sort(perm[:k])


def _recorded_or_new(run_dir: Path, *, n: int, k: int, seed: int, is_main: bool) -> np.ndarray:
    path = Path(run_dir) / SPLIT_FILE
    if path.is_file():
        rec = json.loads(path.read_text())
        if rec.get("num_samples") != n or len(rec.get("eval_indices", [])) != k:
            raise DataError(f"data.eval_fraction: {path} records a split of {rec.get('num_samples')} samples "
                            f"({len(rec.get('eval_indices', []))} held out); the data now has {n} ({k} held out): "
                            "resume needs the same data and split (or start a new run.dir)")
        return np.asarray(rec["eval_indices"], dtype=np.int64)
    idx = holdout_indices(n=n, k=k, seed=seed)
    if is_main:
        tmp = path.with_name(f".{SPLIT_FILE}.{os.getpid()}")
        tmp.write_text(json.dumps({"num_samples": n, "seed": seed, "eval_indices": idx.tolist()}))
        os.replace(tmp, path)
    return idx


def _digest(sample: tuple) -> bytes:
    """Digest of a sample's token ids (a preference pair: prompt, chosen and rejected together)."""
    parts = sample[:1] if len(sample) == 2 else sample  # (ids, supervised) or (prompt, chosen, rejected)
    h = hashlib.blake2b(digest_size=16)
    for ids in parts:
        h.update(np.ascontiguousarray(ids, dtype=np.int64).tobytes())
        h.update(b"|")
    return h.digest()


def _refuse_overlap(train: TokenizedData, held: TokenizedData) -> None:
    """An eval file must not contain a training sample (identical tokens): its loss would be no
    held-out measure. One pass over both, by digest of the token ids."""
    held_digests = {_digest(held[i]): i for i in range(len(held))}
    hits = [(i, held_digests[d]) for i in range(len(train)) if (d := _digest(train[i])) in held_digests]
    if hits:
        i, j = hits[0]
        raise DataError(f"data.eval_path: {len(hits)} eval sample(s) also in the training data, e.g. "
                        f"{held.where(j)} = {train.where(i)}; held-out data must not overlap training")
