"""`build_dataset`: data.path -> tokenised samples (token ids + supervised mask), with counts.

Tokenisation runs once through `datasets.map` (batched, `data.num_proc` workers, cached on disk as
memory-mapped Arrow), so a large dataset never sits in Python memory. Every raw row produces one
output row with a status; dropped rows are skipped through an index array rather than a second
`filter` pass, which keeps the counts and the raw row number of every sample traceable.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import datasets
import numpy as np
from datasets.fingerprint import Hasher

from ftcluster.config import DataConfig
from ftcluster.data import formats
from ftcluster.data.errors import DataError, RowError
from ftcluster.data.sources import Source, check_json_file, load_rows, resolve

log = logging.getLogger(__name__)

# Bump when the tokenised output for the same input changes, so stale `datasets` caches are not reused.
_CACHE_VERSION = 1
# Random streams, kept apart so the data order and synthetic tokens never share one.
SYNTHETIC_STREAM = 1

KEPT, TRUNCATED, DROPPED_OVERLENGTH, DROPPED_NO_SUPERVISION = 0, 1, 2, 3

_FEATURES = datasets.Features({
    "input_ids": datasets.Sequence(datasets.Value("int32")),
    "supervised": datasets.Sequence(datasets.Value("bool")),
    "row": datasets.Value("int64"),
    "status": datasets.Value("int8"),
    "length": datasets.Value("int32"),  # tokens before truncation
    "targets": datasets.Value("int32"),  # supervised tokens after the first (see DataStats)
})


@dataclass(frozen=True)
class DataStats:
    rows_read: int
    kept: int
    dropped_overlength: int
    dropped_no_supervision: int
    """Rows with no supervised token left (no assistant turn, or truncated away)."""
    truncated: int
    """Kept rows cut to max_seq_len (rows truncated to nothing supervised count as dropped instead)."""
    tokens: int
    """Tokens in kept samples, after truncation."""
    supervised_tokens: int
    """Next-token targets in kept samples: supervised tokens other than the first of a sample,
    which nothing predicts. Equals the number of labels != -100."""


class TokenizedData:
    """Usable samples 0..len-1. `data[i]` is `(input_ids int64[T], supervised bool[T])`."""

    def __init__(self, *, samples: Any, stats: DataStats) -> None:
        self._samples = samples
        self.stats = stats

    def __len__(self) -> int:
        return len(self._samples)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        return self._samples[i]

    def where(self, i: int) -> str:
        """Where sample i came from (`file:line`, `file: row N`, or `synthetic sample N`)."""
        return self._samples.where(i)

    def raw_row(self, i: int) -> dict | None:
        """The raw row sample i was tokenised from (its configured fields), or None (synthetic)."""
        return self._samples.raw_row(i)

    def lengths(self) -> np.ndarray:
        """Tokens of every sample (int64[len]), read without touching the token ids (packing plans rows from these)."""
        return self._samples.lengths()

    def subset(self, indices: np.ndarray) -> "TokenizedData":
        """Samples `indices` of this data, in that order, as their own TokenizedData (a view)."""
        return TokenizedData(samples=_Subset(self._samples, np.asarray(indices, dtype=np.int64)), stats=self.stats)


class _Subset:
    def __init__(self, base: Any, indices: np.ndarray) -> None:
        self._base, self._indices = base, indices

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        return self._base[int(self._indices[i])]

    def where(self, i: int) -> str:
        return self._base.where(int(self._indices[i]))

    def raw_row(self, i: int) -> dict | None:
        return self._base.raw_row(int(self._indices[i]))

    def lengths(self) -> np.ndarray:
        return self._base.lengths()[self._indices]


class _ArrowSamples:
    def __init__(self, *, rows: datasets.Dataset, keep: np.ndarray, source: Source, raw: datasets.Dataset,
                 lengths: np.ndarray) -> None:
        self._lengths = lengths
        self._rows = rows.select_columns(["input_ids", "supervised"]).with_format("numpy")
        self._raw_row = rows.select_columns(["row"])
        self._keep = keep
        self._source = source
        self._raw = raw  # memory-mapped Arrow: read only for generation prompts

    def __len__(self) -> int:
        return len(self._keep)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        r = self._rows[int(self._keep[i])]
        return r["input_ids"].astype(np.int64), r["supervised"].astype(bool)

    def where(self, i: int) -> str:
        return self._source.locate(self._raw_row[int(self._keep[i])]["row"])

    def raw_row(self, i: int) -> dict | None:
        return dict(self._raw[int(self._raw_row[int(self._keep[i])]["row"])])

    def lengths(self) -> np.ndarray:
        return self._lengths


class _SyntheticSamples:
    """Random tokens made on access from (seed, index): nothing is held in memory, and sample i
    is the same whatever the world size or the order it is read in."""

    def __init__(self, *, count: int, seq_len: int, vocab_size: int, seed: int) -> None:
        self._count, self._seq_len, self._vocab_size, self._seed = count, seq_len, vocab_size, seed

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        if not -self._count <= i < self._count:
            raise IndexError(f"sample {i} out of range for {self._count} samples")
        i %= self._count
        rng = np.random.default_rng([self._seed, SYNTHETIC_STREAM, i])
        ids = rng.integers(0, self._vocab_size, size=self._seq_len, dtype=np.int64)
        return ids, np.ones(self._seq_len, dtype=bool)

    def where(self, i: int) -> str:
        return f"synthetic sample {i}"

    def raw_row(self, i: int) -> dict | None:
        return None

    def lengths(self) -> np.ndarray:
        return np.full(self._count, self._seq_len, dtype=np.int64)


def build_dataset(cfg: DataConfig, *, tokenizer: Any, seed: int, vocab_size: int | None = None) -> TokenizedData:
    """Load, validate and tokenise `cfg.path` (or make synthetic samples). `tokenizer` may be None
    only for `format=synthetic`, which needs `vocab_size` instead. Raises DataError on bad input."""
    if cfg.format == "synthetic":
        if vocab_size is None or vocab_size < 1:
            raise DataError("data.format=synthetic needs the model's vocab_size")
        samples = _SyntheticSamples(count=cfg.synthetic_samples, seq_len=cfg.max_seq_len, vocab_size=vocab_size, seed=seed)
        n = cfg.synthetic_samples
        stats = DataStats(rows_read=n, kept=n, dropped_overlength=0, dropped_no_supervision=0, truncated=0,
                          tokens=n * cfg.max_seq_len, supervised_tokens=n * (cfg.max_seq_len - 1))
        return TokenizedData(samples=samples, stats=stats)
    if tokenizer is None:
        raise DataError(f"data.format={cfg.format} needs a tokenizer (model.tokenizer or model.path)")

    source = resolve(cfg.path)
    raw = load_rows(source, split=cfg.split)
    if len(raw) == 0:
        raise DataError(f"data.path: no rows in {cfg.path}")
    for column, key in formats.required_fields(cfg):
        if column not in raw.column_names:
            raise DataError(f"{source.locate(0)}: missing field {column!r} (data.{key}); "
                            f"the rows have fields {', '.join(raw.column_names)}")
    encoder = formats.build_encoder(cfg, tokenizer=tokenizer)
    needed = [c for c, _ in formats.required_fields(cfg)] + [c for c in formats.optional_fields(cfg) if c in raw.column_names]
    raw = raw.select_columns(needed)
    try:
        rows = _tokenize(raw, cfg=cfg, encoder=encoder, source=source, tokenizer=tokenizer)
    except RowError as e:
        raise DataError(f"{source.locate(e.row)}: {e.message}") from None
    except UnicodeDecodeError as e:
        # The datasets JSON reader keeps invalid UTF-8 as bytes and fails only when a row is read:
        # find the file and line ourselves.
        if source.loader == "json":
            for f in source.files:
                check_json_file(f)
        raise DataError(f"data.path: {cfg.path}: not valid UTF-8 ({e.reason})") from None

    counts = rows.select_columns(["status", "length", "targets"]).with_format("numpy")[:]
    status = counts["status"]
    kept_mask = status <= TRUNCATED
    stats = DataStats(
        rows_read=len(rows),
        kept=int(kept_mask.sum()),
        dropped_overlength=int((status == DROPPED_OVERLENGTH).sum()),
        dropped_no_supervision=int((status == DROPPED_NO_SUPERVISION).sum()),
        truncated=int((status == TRUNCATED).sum()),
        tokens=int(counts["length"][kept_mask].clip(max=cfg.max_seq_len).sum()),
        supervised_tokens=int(counts["targets"][kept_mask].sum()),
    )
    _log_drops(rows, status=status, source=source, cfg=cfg)
    if stats.kept == 0:
        raise DataError(f"data.path: no usable samples in {cfg.path}: all {stats.rows_read} rows were dropped "
                        f"({stats.dropped_overlength} over data.max_seq_len={cfg.max_seq_len}, "
                        f"{stats.dropped_no_supervision} with no supervised token)")
    lengths = counts["length"][kept_mask].clip(max=cfg.max_seq_len).astype(np.int64)
    return TokenizedData(samples=_ArrowSamples(rows=rows, keep=np.flatnonzero(kept_mask), source=source, raw=raw,
                                               lengths=lengths), stats=stats)


def _tokenize(raw: datasets.Dataset, *, cfg: DataConfig, encoder: formats.Encoder, source: Source,
              tokenizer: Any) -> datasets.Dataset:
    # Our own fingerprint (instead of datasets hashing the closure) so the cache key is explicit:
    # the raw rows, the tokenizer, and every setting that changes the output.
    fingerprint = Hasher.hash((
        _CACHE_VERSION, raw._fingerprint, tokenizer, cfg.format, cfg.chat_template, cfg.max_seq_len,
        cfg.overlength, formats.required_fields(cfg), formats.optional_fields(cfg), cfg.row_char_cap()))
    cache_file = None
    if source.saved_dir is not None:
        # datasets would write its cache next to the saved files; keep the user's folder untouched.
        cache_file = os.path.join(datasets.config.HF_DATASETS_CACHE, "ftcluster", f"tokenized-{fingerprint}.arrow")
        os.makedirs(os.path.dirname(cache_file), exist_ok=True)
    return raw.map(
        _encode_batch,
        fn_kwargs={"encoder": encoder, "max_seq_len": cfg.max_seq_len, "overlength": cfg.overlength,
                   "fields": formats.text_fields(cfg), "max_row_chars": cfg.row_char_cap()},
        batched=True,
        with_indices=True,
        remove_columns=raw.column_names,
        features=_FEATURES,
        num_proc=cfg.num_proc if cfg.num_proc > 1 else None,
        new_fingerprint=fingerprint,
        cache_file_name=cache_file,
        desc="Tokenizing",
    )


def _encode_batch(batch: dict[str, list], rows: list[int], *, encoder: formats.Encoder, max_seq_len: int,
                  overlength: str, fields: list[str], max_row_chars: int) -> dict[str, list]:
    out: dict[str, list] = {k: [] for k in _FEATURES}
    # The row cap, before the tokenizer sees anything (one huge line must not exhaust host memory):
    # over data.max_row_chars a row is cut (truncate), or counts as over-length (drop, error).
    over_chars = set()
    for i, row in enumerate(rows):
        if formats.cap_row_chars(batch, i, fields=fields, cap=max_row_chars, cut=overlength == "truncate"):
            if overlength == "error":
                raise RowError(row, f"more than data.max_row_chars={max_row_chars} characters of text "
                                    "(data.overlength=error; use truncate or drop)")
            if overlength == "drop":
                over_chars.add(i)
    # Rows dropped by the cap are never encoded: they get empty ids and the over-length status.
    read = [i for i in range(len(rows)) if i not in over_chars]
    encoded = iter(encoder({k: [v[i] for i in read] for k, v in batch.items()}, [rows[i] for i in read]))
    for i, row in enumerate(rows):
        ids, mask = ([], []) if i in over_chars else next(encoded)
        length, status = len(ids), KEPT
        if i in over_chars:
            status = DROPPED_OVERLENGTH
        elif length > max_seq_len:
            if overlength == "error":
                raise RowError(row, f"{length} tokens, more than data.max_seq_len={max_seq_len} "
                                    "(data.overlength=error; use truncate or drop)")
            if overlength == "drop":
                status = DROPPED_OVERLENGTH
            else:
                ids, mask, status = ids[:max_seq_len], mask[:max_seq_len], TRUNCATED
        # Token 0 is never a target (nothing precedes it), so it does not count as supervision.
        targets = sum(mask[1:])
        if status != DROPPED_OVERLENGTH and targets == 0:
            status = DROPPED_NO_SUPERVISION
        if status >= DROPPED_OVERLENGTH:
            ids, mask, targets = [], [], 0  # not stored: dropped rows are only counted
        out["input_ids"].append(ids)
        out["supervised"].append(mask)
        out["row"].append(row)
        out["status"].append(status)
        out["length"].append(length)
        out["targets"].append(targets)
    return out


def _log_drops(rows: datasets.Dataset, *, status: np.ndarray, source: Source, cfg: DataConfig) -> None:
    for code, what in ((DROPPED_OVERLENGTH, f"longer than data.max_seq_len={cfg.max_seq_len}"),
                       (DROPPED_NO_SUPERVISION, "with no supervised token"),
                       (TRUNCATED, f"truncated to data.max_seq_len={cfg.max_seq_len}")):
        hits = np.flatnonzero(status == code)
        if len(hits):
            first = rows.select_columns(["row"])[int(hits[0])]["row"]
            verb = "kept" if code == TRUNCATED else "dropped"
            log.warning("%s %d samples %s (first: %s)", verb, len(hits), what, source.locate(first))


def check_enough_samples(data: TokenizedData, *, micro_batch_size: int, grad_accum: int, world_size: int) -> None:
    """Fail before step 1 if the data cannot fill one global batch."""
    global_batch = micro_batch_size * grad_accum * world_size
    if len(data) < global_batch:
        raise DataError(
            f"data.path: {len(data)} usable samples, fewer than one global batch of {global_batch} "
            f"(train.micro_batch_size={micro_batch_size} x train.grad_accum={grad_accum} x world size {world_size}); "
            f"add data or lower the batch size")
