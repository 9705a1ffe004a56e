"""Preference pairs: files -> tokenised (prompt, chosen, rejected) -> pair micro-batches.

Two row formats, read through `datasets` like every other data file (JSONL/JSON/Parquet, lists,
globs, folders, saved datasets):

* `data.format=messages`: `{"messages": [prompt turns], "chosen": [assistant turn(s)],
  "rejected": [...]}` rendered with the chat template; the response is what rendering the whole
  conversation adds after the prompt rendered with the generation prompt (checked token prefix).
* `data.format=prompt_completion`: `{"prompt": "...", "chosen": "...", "rejected": "..."}` encoded as
  SFT encodes prompt/completion: bos + prompt, response + eos.

Field names are `data.messages_field` / `data.prompt_field`, `data.chosen_field`, `data.rejected_field`.
Loss is on response tokens only. A sequence (prompt + the longer response) over data.max_seq_len is,
by `data.overlength`: `truncate`d (the prompt first, keeping its end, down to one token; then both
responses, keeping their start), `drop`ped, or an `error`. Bad rows (a missing or empty response,
chosen identical to rejected) fail naming file:line.

A micro-batch holds whole pairs: rows [0, P) are the P chosen sequences and rows [P, 2P) the
rejected ones of the same pairs, in one forward (right-padded, no packing, so no attention crosses
sequences). `PreferenceBatches` hands out pairs exactly as `DistributedBatches` hands out samples
(one pair is one position of the global order), so a pair is never split across ranks or
micro-batches and the order is the same at every world size.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Optional

import datasets
import numpy as np
import pyarrow.compute as pc
import torch
from datasets.fingerprint import Hasher

from ftcluster.config import DataConfig
from ftcluster.data import formats
from ftcluster.data.batch import IGNORE_INDEX, Batch
from ftcluster.data.batches import DistributedBatches
from ftcluster.data.errors import DataError, RowError
from ftcluster.data.sources import Source, load_rows, resolve

_CACHE_VERSION = 1
KEPT, TRUNCATED, DROPPED_OVERLENGTH = 0, 1, 2

_FEATURES = datasets.Features({
    "prompt": datasets.Sequence(datasets.Value("int32")),
    "chosen": datasets.Sequence(datasets.Value("int32")),
    "rejected": datasets.Sequence(datasets.Value("int32")),
    "row": datasets.Value("int64"),
    "status": datasets.Value("int8"),
})

Pair = tuple[np.ndarray, np.ndarray, np.ndarray]
"""(prompt ids, chosen response ids, rejected response ids), int64."""


@dataclass(frozen=True, kw_only=True)
class PreferenceBatch(Batch):
    """A micro-batch of `num_pairs` whole pairs: rows [0, P) chosen, rows [P, 2P) rejected.
    `labels` supervise the response tokens only; `num_supervised` counts both responses' targets."""

    num_pairs: int
    """Pairs in the batch (the preference loss's normaliser); 0 for a rank's empty eval batch."""
    keys: tuple[int, ...]
    """Each pair's key (its raw row), which the precomputed reference log-probs are stored under."""
    ref_logps: Optional[torch.Tensor] = None
    """Float32 [2P] reference log-probs (chosen then rejected) when precomputed; None otherwise."""
    logps_only: bool = False
    """The reference pass: the objective returns the per-row log-probs [2P] instead of a loss."""

    def to(self, device: torch.device, *, non_blocking: bool = True) -> "PreferenceBatch":
        ref = None if self.ref_logps is None else self.ref_logps.to(device, non_blocking=non_blocking)
        return dataclasses.replace(self, input_ids=self.input_ids.to(device, non_blocking=non_blocking),
                                   labels=self.labels.to(device, non_blocking=non_blocking), ref_logps=ref)

    def pin_memory(self) -> "PreferenceBatch":
        ref = None if self.ref_logps is None else self.ref_logps.pin_memory()
        return dataclasses.replace(self, input_ids=self.input_ids.pin_memory(), labels=self.labels.pin_memory(),
                                   ref_logps=ref)

    def with_reference(self, ref_logps: torch.Tensor) -> "PreferenceBatch":
        return dataclasses.replace(self, ref_logps=ref_logps)


@dataclass(frozen=True)
class PreferenceStats:
    rows_read: int
    kept: int
    dropped_overlength: int
    truncated: int
    tokens: int = 0
    """Tokens of the kept pairs' two sequences (prompt + chosen, prompt + rejected), after truncation."""
    dropped_no_supervision: int = 0
    """Always 0: a pair without a response is a bad row (an error), not a drop."""


class PreferenceData:
    """Usable pairs 0..len-1. `data[i]` is a `Pair`; `key(i)` its raw row (stable whatever the
    world size or hold-out split)."""

    def __init__(self, *, rows: Any, keep: np.ndarray, source: Source, raw: Any, stats: PreferenceStats,
                 cfg: DataConfig) -> None:
        self._rows = rows.select_columns(["prompt", "chosen", "rejected"]).with_format("numpy")
        self._row_ids = np.asarray(rows.select_columns(["row"]).with_format("numpy")[:]["row"], dtype=np.int64)
        self._keep, self._source, self._raw, self.stats, self._cfg = keep, source, raw, stats, cfg

    def __len__(self) -> int:
        return len(self._keep)

    def __getitem__(self, i: int) -> Pair:
        r = self._rows[int(self._keep[i])]
        return r["prompt"].astype(np.int64), r["chosen"].astype(np.int64), r["rejected"].astype(np.int64)

    def key(self, i: int) -> int:
        return int(self._row_ids[int(self._keep[i])])

    def where(self, i: int) -> str:
        return self._source.locate(self.key(i))

    def raw_row(self, i: int) -> dict | None:
        """The row as a chat / prompt-completion sample with the chosen answer (for generation prompts)."""
        raw, c = dict(self._raw[self.key(i)]), self._cfg
        if c.format == "messages":
            chosen = raw.get(c.chosen_field)
            chosen = [{"role": "assistant", "content": chosen}] if isinstance(chosen, str) else list(chosen or [])
            return {c.messages_field: list(raw.get(c.messages_field) or []) + chosen}
        return {c.prompt_field: raw.get(c.prompt_field), c.completion_field: raw.get(c.chosen_field)}

    def subset(self, indices: np.ndarray) -> "PreferenceData":
        out = object.__new__(PreferenceData)
        out.__dict__.update(self.__dict__)
        out._keep = self._keep[np.asarray(indices, dtype=np.int64)]
        return out


def build_preference_dataset(cfg: DataConfig, *, tokenizer: Any, seed: int = 0,
                             vocab_size: int | None = None) -> PreferenceData:
    """Load, validate and tokenise preference pairs from `cfg.path`. Raises DataError naming file:line."""
    del seed, vocab_size  # the signature of build_dataset (holdout.build_train_and_eval calls either)
    if tokenizer is None:
        raise DataError("objective=dpo needs a tokenizer (model.tokenizer or model.path)")
    source = resolve(cfg.path)
    raw = load_rows(source, split=cfg.split)
    if len(raw) == 0:
        raise DataError(f"data.path: no rows in {cfg.path}")
    columns = [(cfg.messages_field if cfg.format == "messages" else cfg.prompt_field,
                "messages_field" if cfg.format == "messages" else "prompt_field"),
               (cfg.chosen_field, "chosen_field"), (cfg.rejected_field, "rejected_field")]
    for column, key in columns:
        if column not in raw.column_names:
            raise DataError(f"{source.locate(0)}: missing field {column!r} (data.{key}); "
                            f"the rows have fields {', '.join(raw.column_names)}")
    raw = raw.select_columns([c for c, _ in columns])
    encoder = PairEncoder(cfg=cfg, tokenizer=tokenizer)
    fingerprint = Hasher.hash((_CACHE_VERSION, raw._fingerprint, tokenizer, cfg.format, cfg.chat_template,
                               cfg.max_seq_len, cfg.overlength, [c for c, _ in columns]))
    cache_file = None
    if source.saved_dir is not None:  # keep the user's saved-dataset folder untouched
        cache_file = os.path.join(datasets.config.HF_DATASETS_CACHE, "ftcluster", f"pairs-{fingerprint}.arrow")
        os.makedirs(os.path.dirname(cache_file), exist_ok=True)
    try:
        rows = raw.map(_encode_batch, fn_kwargs={"encoder": encoder, "max_seq_len": cfg.max_seq_len,
                                                 "overlength": cfg.overlength},
                       batched=True, with_indices=True, remove_columns=raw.column_names, features=_FEATURES,
                       num_proc=cfg.num_proc if cfg.num_proc > 1 else None, new_fingerprint=fingerprint,
                       cache_file_name=cache_file, desc="Tokenizing pairs")
    except RowError as e:
        raise DataError(f"{source.locate(e.row)}: {e.message}") from None
    status = np.asarray(rows.select_columns(["status"]).with_format("numpy")[:]["status"])
    kept = np.flatnonzero(status <= TRUNCATED)
    lengths = {c: np.asarray(pc.list_value_length(rows.data.column(c)).to_numpy(zero_copy_only=False))[kept]
               for c in ("prompt", "chosen", "rejected")}
    stats = PreferenceStats(rows_read=len(rows), kept=len(kept), dropped_overlength=int((status == DROPPED_OVERLENGTH).sum()),
                            truncated=int((status == TRUNCATED).sum()),
                            tokens=int((2 * lengths["prompt"] + lengths["chosen"] + lengths["rejected"]).sum()))
    if stats.kept == 0:
        raise DataError(f"data.path: no usable pairs in {cfg.path}: all {stats.rows_read} were longer than "
                        f"data.max_seq_len={cfg.max_seq_len} (data.overlength=drop)")
    return PreferenceData(rows=rows, keep=kept, source=source, raw=raw, stats=stats, cfg=cfg)


class PairEncoder:
    """A batch of raw rows -> one `(prompt, chosen, rejected)` id lists per row (RowError on a bad row)."""

    def __init__(self, *, cfg: DataConfig, tokenizer: Any) -> None:
        self.cfg, self.tokenizer = cfg, tokenizer
        if cfg.format == "messages":
            if cfg.chat_template is None and not getattr(tokenizer, "chat_template", None):
                raise DataError("data.chat_template: the tokenizer has no chat template; set data.chat_template, "
                                "or use data.format=prompt_completion")
        elif tokenizer.eos_token_id is None:
            raise DataError("data.format=prompt_completion needs an end-of-sequence token, and the tokenizer has none")
        self.bos = formats.leading_special_ids(tokenizer)

    def __call__(self, batch: dict[str, list], rows: list[int]) -> list[tuple[list[int], list[int], list[int]]]:
        return self._chat(batch, rows) if self.cfg.format == "messages" else self._plain(batch, rows)

    def _responses(self, batch: dict[str, list], i: int, row: int) -> tuple[Any, Any]:
        c = self.cfg
        out = []
        for field in (c.chosen_field, c.rejected_field):
            value = batch[field][i]
            if value is None:
                raise RowError(row, f"missing field {field!r} (data.{'chosen' if field == c.chosen_field else 'rejected'}_field)")
            if isinstance(value, str) or c.format != "messages":
                if not isinstance(value, str):
                    raise RowError(row, f"field {field!r} must be a string; got {type(value).__name__}")
                if not value.strip():
                    raise RowError(row, f"field {field!r} is an empty response")
            else:
                turns = formats.check_messages(value, row=row, field=field)
                if not all(m["role"] == "assistant" for m in turns):
                    raise RowError(row, f"field {field!r} must hold assistant turns only")
                if not any(m["content"].strip() for m in turns):
                    raise RowError(row, f"field {field!r} is an empty response")
                value = turns
            out.append(value)
        if out[0] == out[1]:
            raise RowError(row, f"chosen and rejected responses are identical ({c.chosen_field!r} == {c.rejected_field!r})")
        return out[0], out[1]

    def _render(self, messages: list[dict], row: int, *, generation_prompt: bool) -> str:
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt,
                                                      chat_template=self.cfg.chat_template)
        except Exception as e:  # Jinja errors, raise_exception() in the template
            raise RowError(row, f"chat template failed: {type(e).__name__}: {e}") from None

    def _chat(self, batch: dict[str, list], rows: list[int]) -> list:
        texts: list[str] = []
        for i, row in enumerate(rows):
            prompt = formats.check_messages(batch[self.cfg.messages_field][i], row=row, field=self.cfg.messages_field)
            chosen, rejected = self._responses(batch, i, row)
            as_turns = [[{"role": "assistant", "content": r}] if isinstance(r, str) else r for r in (chosen, rejected)]
            texts += [self._render(prompt, row, generation_prompt=True),
                      self._render(prompt + as_turns[0], row, generation_prompt=False),
                      self._render(prompt + as_turns[1], row, generation_prompt=False)]
        ids = formats._tokenize(self.tokenizer, texts)
        out = []
        for k, row in enumerate(rows):
            prompt, full_c, full_r = ids[3 * k:3 * k + 3]
            if full_c[:len(prompt)] != prompt or full_r[:len(prompt)] != prompt:
                raise RowError(row, "the chat template lacks the prefix property: the prompt rendered with the "
                                    "generation prompt is not a token prefix of prompt + response; set data.chat_template")
            out.append((list(prompt), list(full_c[len(prompt):]), list(full_r[len(prompt):])))
        return out

    def _plain(self, batch: dict[str, list], rows: list[int]) -> list:
        prompts, responses = [], []
        for i, row in enumerate(rows):
            prompts.append(formats._string(batch, self.cfg.prompt_field, i, row))
            responses += list(self._responses(batch, i, row))
        p_ids, r_ids = formats._tokenize(self.tokenizer, prompts), formats._tokenize(self.tokenizer, responses)
        eos = [self.tokenizer.eos_token_id]
        return [(self.bos + p, r_ids[2 * k] + eos, r_ids[2 * k + 1] + eos) for k, p in enumerate(p_ids)]


def fit_pair(prompt: list[int], chosen: list[int], rejected: list[int], *, max_seq_len: int) -> tuple[list, list, list]:
    """Truncate a pair to max_seq_len per sequence: the prompt first (keeping its end, at least one
    token, which predicts the first response token), then both responses (keeping their start)."""
    longest = max(len(chosen), len(rejected))
    keep = max(1, min(len(prompt), max_seq_len - longest))
    prompt = prompt[len(prompt) - keep:]
    room = max_seq_len - len(prompt)
    return prompt, chosen[:room], rejected[:room]


def _encode_batch(batch: dict[str, list], rows: list[int], *, encoder: PairEncoder, max_seq_len: int,
                  overlength: str) -> dict[str, list]:
    out: dict[str, list] = {k: [] for k in _FEATURES}
    for row, (p, c, r) in zip(rows, encoder(batch, rows)):
        length, status = len(p) + max(len(c), len(r)), KEPT
        if length > max_seq_len:
            if overlength == "error":
                raise RowError(row, f"{length} tokens (prompt + longer response), more than data.max_seq_len="
                                    f"{max_seq_len} (data.overlength=error; use truncate or drop)")
            if overlength == "drop":
                status, p, c, r = DROPPED_OVERLENGTH, [], [], []
            else:
                (p, c, r), status = fit_pair(p, c, r, max_seq_len=max_seq_len), TRUNCATED
        for k, v in (("prompt", p), ("chosen", c), ("rejected", r), ("row", row), ("status", status)):
            out[k].append(v)
    return out


class PairCollator:
    """Whole pairs -> one PreferenceBatch (chosen rows, then rejected rows), with the precomputed
    reference log-probs of each pair when `reference` (set once they exist) holds them."""

    def __init__(self, *, data: PreferenceData, pad_id: int, max_seq_len: int, pad_to_multiple_of: int = 8) -> None:
        self.data, self.pad_id, self.max_seq_len, self.multiple = data, pad_id, max_seq_len, pad_to_multiple_of
        self.reference: Any = None  # a ReferenceLogps (ftcluster/objectives/reference.py), or None
        self.logps_only = False

    def __call__(self, samples: list[Pair], indices: list[int]) -> PreferenceBatch:
        seqs = [np.concatenate([p, c]) for p, c, _ in samples] + [np.concatenate([p, r]) for p, _, r in samples]
        starts = [len(p) for p, _, _ in samples] * 2
        longest = max(len(s) for s in seqs)
        if longest > self.max_seq_len:
            raise DataError(f"pair {indices[0]}: {longest} tokens, more than data.max_seq_len={self.max_seq_len}")
        width = min(-(-longest // self.multiple) * self.multiple, self.max_seq_len)
        ids = np.full((len(seqs), width), self.pad_id, dtype=np.int64)
        labels = np.full((len(seqs), width), IGNORE_INDEX, dtype=np.int64)
        for b, (s, start) in enumerate(zip(seqs, starts)):
            ids[b, :len(s)] = s
            labels[b, start - 1:len(s) - 1] = s[start:]  # shifted: position t predicts token t+1
        keys = tuple(self.data.key(i) for i in indices)
        ref = None if self.reference is None or self.logps_only else self.reference.lookup(keys)
        return PreferenceBatch(input_ids=torch.from_numpy(ids), labels=torch.from_numpy(labels),
                               num_tokens=sum(len(s) for s in seqs), num_supervised=int((labels != IGNORE_INDEX).sum()),
                               num_pairs=len(samples), keys=keys, ref_logps=ref, logps_only=self.logps_only)

    def empty(self) -> PreferenceBatch:
        """A batch that adds nothing (a rank with no pair left in the last eval window): one pair of
        pad rows with no supervised token."""
        ids = torch.full((2, self.multiple), self.pad_id, dtype=torch.long)
        ref = None if self.reference is None or self.logps_only else torch.zeros(2, dtype=torch.float32)
        return PreferenceBatch(input_ids=ids, labels=torch.full_like(ids, IGNORE_INDEX), num_tokens=0, num_supervised=0,
                               num_pairs=0, keys=(), ref_logps=ref, logps_only=self.logps_only)


class PreferenceBatches(DistributedBatches):
    """`DistributedBatches` over pairs: `micro_batch_size` pairs (2x as many rows) per micro-batch."""

    def __init__(self, data: PreferenceData, *, collator: PairCollator, micro_batch_size: int, rank: int,
                 world_size: int, seed: int, shuffle: bool) -> None:
        super().__init__(data, micro_batch_size=micro_batch_size, rank=rank, world_size=world_size, seed=seed,
                         shuffle=shuffle, pad_id=collator.pad_id, max_seq_len=collator.max_seq_len)
        self.collator = collator

    def _collate(self, samples: list, indices: list[int]) -> Batch:
        return self.collator(samples, indices)
