"""Dataset mixing (`data.sources`): several datasets trained as one, deterministic by seed.

Each source is tokenised on its own (its path, format and field names; unset ones from `data.`)
and the samples are concatenated: sample i of the mix is sample i - offset_j of source j. What an
epoch of the mix holds (its *pool*) is fixed per source: `epochs=k` takes round(k x n_j) samples
(every sample floor(k) times, then a seeded subset for the fraction); weighted sources share the
weighted sources' total size in proportion to their weights (a seeded subset when a share is
below the source's size, repeats above). The pool is a function of (seed, epoch) only, so the
data order (a permutation of the pool), packing and the saved position stay world-size free.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from ftcluster.config import DataConfig, DataSourceConfig
from ftcluster.data.dataset import DataStats, TokenizedData, build_dataset

MIX_STREAM = 3
"""Random stream of a mix's per-epoch subsets (0: order, 1: synthetic tokens, 2: hold-out split)."""
_FIELDS = ("messages_field", "prompt_field", "completion_field", "instruction_field", "input_field", "output_field",
           "text_field")


def source_config(cfg: DataConfig, src: DataSourceConfig) -> DataConfig:
    """The `data.` config of one source: its path, format and fields over the shared settings."""
    fields = {f: getattr(src, f) for f in _FIELDS if getattr(src, f) is not None}
    return dataclasses.replace(cfg, path=src.path, format=src.format or cfg.format, sources=[], eval_path=None, **fields)


def build_mix(cfg: DataConfig, *, tokenizer: Any, seed: int) -> "MixedData":
    parts = [build_dataset(source_config(cfg, s), tokenizer=tokenizer, seed=seed) for s in cfg.sources]
    return MixedData(parts=parts, names=[s.path for s in cfg.sources], weights=[s.weight for s in cfg.sources],
                     epochs=[s.epochs for s in cfg.sources])


def mix_counts(sizes: list[int], *, weights: list[float | None], epochs: list[float | None]) -> list[int]:
    """Samples of each source in one mix epoch (see the module docstring); at least 1 each."""
    weighted = [j for j, e in enumerate(epochs) if e is None]
    w = {j: (weights[j] if weights[j] is not None else 1.0) for j in weighted}
    total_w, pool_w = sum(w.values()), sum(sizes[j] for j in weighted)
    return [max(1, round(epochs[j] * sizes[j]) if epochs[j] is not None else round(w[j] / total_w * pool_w))
            for j in range(len(sizes))]


class MixedData:
    """Samples of several TokenizedData as one (`data[i]`, `where`, `lengths`), plus the epoch pool."""

    def __init__(self, *, parts: list[TokenizedData], names: list[str], weights: list[float | None],
                 epochs: list[float | None]) -> None:
        self.parts, self.names = parts, names
        self.offsets = np.cumsum([0] + [len(p) for p in parts])
        self.counts = mix_counts([len(p) for p in parts], weights=weights, epochs=epochs)
        self.stats = DataStats(*(sum(getattr(p.stats, f.name) for p in parts)
                                 for f in dataclasses.fields(DataStats)))

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def epoch_size(self) -> int:
        return sum(self.counts)

    def _locate(self, i: int) -> tuple[int, int]:
        j = int(np.searchsorted(self.offsets, i, side="right")) - 1
        return j, i - int(self.offsets[j])

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        j, k = self._locate(int(i))
        return self.parts[j][k]

    def where(self, i: int) -> str:
        j, k = self._locate(int(i))
        return self.parts[j].where(k)

    def raw_row(self, i: int) -> dict | None:
        j, k = self._locate(int(i))
        return self.parts[j].raw_row(k)

    def lengths(self) -> np.ndarray:
        return np.concatenate([p.lengths() for p in self.parts])

    def epoch_pool(self, *, seed: int, epoch: int) -> np.ndarray:
        """Mix sample indices of `epoch` (unordered: the data order permutes them)."""
        pool = []
        for j, (part, count) in enumerate(zip(self.parts, self.counts)):
            n = len(part)
            full, rest = divmod(count, n)
            pick = np.random.default_rng([seed, MIX_STREAM, epoch, j]).permutation(n)[:rest]
            pool.append(self.offsets[j] + np.concatenate([np.tile(np.arange(n), full), np.sort(pick)]))
        return np.concatenate(pool).astype(np.int64)

    def mix_report(self, *, seed: int, epoch: int) -> list[dict[str, Any]]:
        """Realised proportions of `epoch`: samples and tokens per source, and their shares."""
        pool, lengths = self.epoch_pool(seed=seed, epoch=epoch), self.lengths()
        src = np.searchsorted(self.offsets, pool, side="right") - 1
        tokens = [int(lengths[pool[src == j]].sum()) for j in range(len(self.parts))]
        samples = [int((src == j).sum()) for j in range(len(self.parts))]
        return [{"path": self.names[j], "samples": samples[j], "tokens": tokens[j],
                 "sample_share": round(samples[j] / max(sum(samples), 1), 4),
                 "token_share": round(tokens[j] / max(sum(tokens), 1), 4)} for j in range(len(self.parts))]
