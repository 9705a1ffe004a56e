"""Prompts for generation samples: from the config (`eval.prompts`, `eval.prompts_path`) or from
the first eval samples, rendered exactly as training renders the text before an answer."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftcluster.config import DataConfig, EvalConfig
from ftcluster.data import formats
from ftcluster.data.errors import DataError, RowError


@dataclass(frozen=True, kw_only=True)
class Prompt:
    messages: list[dict] | None = None
    """Chat turns up to (not including) the answer."""
    text: str | None = None
    """A plain prompt (one user turn when the data is chat)."""
    reference: str | None = None
    """The expected answer, for task metrics."""


def load_prompts(cfg: EvalConfig) -> list[Prompt]:
    if cfg.prompts_path:
        return _read_prompt_file(Path(cfg.prompts_path))
    return [Prompt(text=p) for p in cfg.prompts]


def check_prompts_file(path: str) -> None:
    """Every line of a prompt file parses (no tokenizer needed). DataError naming file:line."""
    _read_prompt_file(Path(path))


def _read_prompt_file(path: Path) -> list[Prompt]:
    from ftcluster.data.sources import json_lines

    if not path.is_file():
        raise DataError(f"eval.prompts_path: no such file: {path}")
    out = [_prompt_of(row, where=f"{path}:{n}") for n, row in json_lines(str(path))]
    if not out:
        raise DataError(f"eval.prompts_path: {path} holds no prompt")
    return out


def _prompt_of(row: Any, *, where: str) -> Prompt:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object with \"messages\" or \"prompt\"")
    ref = row.get("reference")
    if ref is not None and not isinstance(ref, str):
        raise DataError(f"{where}: \"reference\" must be a string")
    if "messages" in row:
        try:
            messages = formats.check_messages(row["messages"], row=0, field="messages")
        except RowError as e:
            raise DataError(f"{where}: {e.message}") from None
        return Prompt(messages=messages, reference=ref)
    if isinstance(row.get("prompt"), str):
        return Prompt(text=row["prompt"], reference=ref)
    raise DataError(f"{where}: a prompt row needs \"messages\" (a list of turns) or \"prompt\" (a string)")


def prompts_from_rows(rows: list[dict], data_cfg: DataConfig) -> list[Prompt]:
    """Default prompts from raw eval rows: the part before the (last) answer, the answer as reference."""
    out: list[Prompt] = []
    for row in rows:
        if data_cfg.format == "messages":
            messages = [m for m in (row.get(data_cfg.messages_field) or []) if isinstance(m, dict)]
            last = max((k for k, m in enumerate(messages) if m.get("role") == "assistant"), default=None)
            if last:
                turns = [{k: v for k, v in m.items() if v is not None} for m in messages[:last]]
                out.append(Prompt(messages=turns, reference=messages[last].get("content")))
        elif data_cfg.format == "prompt_completion":
            out.append(Prompt(text=row.get(data_cfg.prompt_field), reference=row.get(data_cfg.completion_field)))
        elif data_cfg.format == "alpaca":
            extra = row.get(data_cfg.input_field) or ""
            template = formats.ALPACA_PROMPT if extra.strip() else formats.ALPACA_PROMPT_NO_INPUT
            out.append(Prompt(text=template.format(instruction=row.get(data_cfg.instruction_field), input=extra),
                              reference=row.get(data_cfg.output_field)))
    return out


def render_prompt(p: Prompt, *, tokenizer: Any, data_cfg: DataConfig) -> list[int]:
    """The token ids training puts before an answer: the chat template with the generation prompt
    for chat data; bos + the prompt text otherwise (as prompt_completion / alpaca encode it)."""
    chat = data_cfg.format == "messages" or p.messages is not None
    if chat and (data_cfg.chat_template or getattr(tokenizer, "chat_template", None)):
        messages = p.messages if p.messages is not None else [{"role": "user", "content": p.text or ""}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                             chat_template=data_cfg.chat_template)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    text = p.text if p.text is not None else "\n".join(m["content"] for m in p.messages or [])
    return formats.leading_special_ids(tokenizer) + list(tokenizer(text, add_special_tokens=False)["input_ids"])


def display(p: Prompt) -> str:
    """What a person reads as the prompt: the last user turn, or the text."""
    if p.messages:
        users = [m["content"] for m in p.messages if m.get("role") == "user"]
        return users[-1] if users else p.messages[-1]["content"]
    return p.text or ""
