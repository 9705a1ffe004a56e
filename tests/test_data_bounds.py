"""Issue 15, item 9: rows are bounded before tokenisation (data.max_row_chars), and invalid UTF-8
names file and line."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from ftcluster.config import DataConfig
from ftcluster.data import DataError, build_dataset
from test_data import _byte_tokenizer, _private_datasets_cache, enc, write_jsonl  # noqa: F401 - fixture

HUGE = 2_000_000  # characters: what must never reach the tokenizer


class Spy:
    """The tokenizer, recording the longest string it was asked to encode."""

    def __init__(self, tok) -> None:  # type: ignore[no-untyped-def]
        self.__dict__["tok"], self.__dict__["longest"] = tok, 0

    def __call__(self, texts, **kw):  # type: ignore[no-untyped-def]
        self.__dict__["longest"] = max([self.longest, *(len(t) for t in ([texts] if isinstance(texts, str) else texts))])
        return self.tok(texts, **kw)

    def apply_chat_template(self, conversation, **kw):  # type: ignore[no-untyped-def]
        text = self.tok.apply_chat_template(conversation, tokenize=False, **{k: v for k, v in kw.items() if k != "tokenize"})
        self.__dict__["longest"] = max(self.longest, len(text))
        return self.tok.apply_chat_template(conversation, **kw)

    def __getattr__(self, name):  # type: ignore[no-untyped-def]
        return getattr(self.tok, name)

    def __len__(self) -> int:
        return len(self.tok)


def test_text_row_over_the_cap_is_cut_before_the_tokenizer(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "short one"}, {"text": "x" * HUGE}])
    spy = Spy(_byte_tokenizer())
    data = build_dataset(DataConfig(path=path, format="text", max_seq_len=16), tokenizer=spy, seed=0)
    assert spy.longest <= 64 * 16, spy.longest
    assert len(data) == 2 and data[1][0].tolist() == ([spy.bos_token_id] + enc(spy.tok, "x" * 15)), "same as token truncation"


def test_drop_and_error_policies_apply_over_the_cap(tmp_path: Path) -> None:
    rows = [{"prompt": "p", "completion": "ok"}, {"prompt": "p", "completion": "y" * HUGE}]
    path = write_jsonl(tmp_path / "pc.jsonl", rows)
    spy = Spy(_byte_tokenizer())
    drop = build_dataset(DataConfig(path=path, format="prompt_completion", max_seq_len=64, overlength="drop",
                                    max_row_chars=1000), tokenizer=spy, seed=0)
    assert len(drop) == 1 and drop.stats.dropped_overlength == 1 and spy.longest <= 1000
    with pytest.raises(DataError, match=r"pc\.jsonl:2: more than data.max_row_chars=1000 characters"):
        build_dataset(DataConfig(path=path, format="prompt_completion", max_seq_len=64, overlength="error",
                                 max_row_chars=1000), tokenizer=spy, seed=0)


def test_chat_row_over_the_cap(tmp_path: Path) -> None:
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "z" * HUGE}]
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": turns}, {"messages": turns[:1] + [{"role": "assistant", "content": "ok"}]}])
    spy = Spy(_byte_tokenizer())
    data = build_dataset(DataConfig(path=path, format="messages", max_seq_len=32), tokenizer=spy, seed=0)
    assert len(data) == 2 and spy.longest < 64 * 32 + 200, spy.longest  # the cap plus the template's own text


def test_invalid_utf8_names_file_and_line(tmp_path: Path) -> None:
    p = tmp_path / "bad.jsonl"
    p.write_bytes(b'{"text": "fine"}\n{"text": "also fine"}\n{"text": "h\xff\xfei"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:3: not valid UTF-8"):
        build_dataset(DataConfig(path=str(p), format="text", max_seq_len=16), tokenizer=_byte_tokenizer(), seed=0)


def test_max_row_chars_validated() -> None:
    from ftcluster.config import ConfigError

    with pytest.raises(ConfigError, match=r"^data.max_row_chars:"):
        DataConfig(path="x", max_row_chars=0).validate()
    assert DataConfig(path="x", max_seq_len=100).row_char_cap() == 6400
