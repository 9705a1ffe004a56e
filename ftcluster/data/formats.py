"""Row formats -> (token ids, supervised mask), one batch of rows at a time.

Each encoder is called by `datasets.map` with a batch (column name -> list of values) and the
global raw row indices, and returns one `(ids, mask)` pair per row, where `mask[t]` says whether
token t is a training target. Strings of a whole batch are tokenised in one call (the fast
tokenizer batches in Rust). Bad rows raise `RowError(row, message)`; the caller turns the row into
`file:line`.
"""
from __future__ import annotations

from typing import Any, Callable

from ftcluster.config import DataConfig
from ftcluster.data.errors import DataError, RowError

Encoded = tuple[list[int], list[bool]]
Encoder = Callable[[dict[str, list], list[int]], list[Encoded]]

CHAT_ROLES = ("system", "user", "assistant", "tool")

ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def required_fields(cfg: DataConfig) -> list[tuple[str, str]]:
    """(column, config key) pairs a format needs; checked once before tokenising."""
    return {
        "messages": [(cfg.messages_field, "messages_field")],
        "prompt_completion": [(cfg.prompt_field, "prompt_field"), (cfg.completion_field, "completion_field")],
        "alpaca": [(cfg.instruction_field, "instruction_field"), (cfg.output_field, "output_field")],
        "text": [(cfg.text_field, "text_field")],
    }[cfg.format]


def optional_fields(cfg: DataConfig) -> list[str]:
    return [cfg.input_field] if cfg.format == "alpaca" else []


def build_encoder(cfg: DataConfig, *, tokenizer: Any) -> Encoder:
    if cfg.format == "messages":
        if cfg.chat_template is None and not getattr(tokenizer, "chat_template", None):
            raise DataError(
                "data.chat_template: the tokenizer has no chat template; set data.chat_template to a Jinja "
                "template, or use data.format=prompt_completion, alpaca or text"
            )
        return ChatEncoder(tokenizer=tokenizer, chat_template=cfg.chat_template, field=cfg.messages_field)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError(f"data.format={cfg.format} needs an end-of-sequence token, and the tokenizer has none")
    if cfg.format == "prompt_completion":
        return PromptCompletionEncoder(tokenizer=tokenizer, prompt_field=cfg.prompt_field,
                                       completion_field=cfg.completion_field)
    if cfg.format == "alpaca":
        return AlpacaEncoder(tokenizer=tokenizer, instruction_field=cfg.instruction_field,
                             input_field=cfg.input_field, output_field=cfg.output_field)
    if cfg.format == "text":
        return TextEncoder(tokenizer=tokenizer, field=cfg.text_field)
    raise AssertionError(cfg.format)


def leading_special_ids(tokenizer: Any) -> list[int]:
    """The ids the tokenizer puts before text (bos for Llama, nothing for Qwen). Found by probing,
    because `add_special_tokens=True` may also append tokens (eos) that we place ourselves."""
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for i in range(len(full) - len(bare) + 1):
        if full[i:i + len(bare)] == bare:
            return list(full[:i])
    return []


def _string(batch: dict[str, list], field: str, i: int, row: int, *, optional: bool = False) -> str:
    value = batch[field][i] if field in batch else None
    if value is None:
        if optional:
            return ""
        raise RowError(row, f"missing field {field!r}")
    if not isinstance(value, str):
        raise RowError(row, f"field {field!r} must be a string; got {type(value).__name__}")
    return value


def _tokenize(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []


class ChatEncoder:
    """`messages` rows rendered with the chat template; loss on assistant turns only.

    Assistant spans come from prefix differences: for assistant turn k, messages[:k] rendered with
    the generation prompt is the prefix, messages[:k+1] is prefix + reply; the tokens between (reply
    content and end-of-turn token) are supervised. This needs no knowledge of the template, but
    only works if each rendering is a token prefix of the full conversation, which is checked.
    """

    def __init__(self, *, tokenizer: Any, chat_template: str | None, field: str) -> None:
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.field = field

    def _render(self, messages: list[dict], row: int, *, generation_prompt: bool) -> str:
        try:
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=generation_prompt, chat_template=self.chat_template)
        except Exception as e:  # Jinja errors, raise_exception() in the template
            raise RowError(row, f"chat template failed: {type(e).__name__}: {e}") from None

    def __call__(self, batch: dict[str, list], rows: list[int]) -> list[Encoded]:
        texts: list[str] = []
        plans: list[tuple[int, int]] = []  # per row: (index of its full text, number of assistant turns)
        for i, row in enumerate(rows):
            messages = check_messages(batch[self.field][i], row=row, field=self.field)
            plans.append((len(texts), sum(m["role"] == "assistant" for m in messages)))
            texts.append(self._render(messages, row, generation_prompt=False))
            for k, m in enumerate(messages):
                if m["role"] == "assistant":
                    texts.append(self._render(messages[:k], row, generation_prompt=True))
                    texts.append(self._render(messages[:k + 1], row, generation_prompt=False))
        ids = _tokenize(self.tokenizer, texts)
        out = []
        for row, (start, turns) in zip(rows, plans):
            full = ids[start]
            mask = [False] * len(full)
            for j in range(turns):
                prefix, with_reply = ids[start + 1 + 2 * j], ids[start + 2 + 2 * j]
                if not (_is_prefix(prefix, with_reply) and _is_prefix(with_reply, full)):
                    raise RowError(row, (
                        f"the chat template lacks the prefix property at assistant turn {j + 1}: rendering the "
                        "conversation up to a reply is not a token prefix of the whole conversation (the "
                        "template rewrites earlier turns), so assistant tokens cannot be located; set "
                        "data.chat_template to a template that renders turns independently"))
                for t in range(len(prefix), len(with_reply)):
                    mask[t] = True
            out.append((list(full), mask))
        return out


def check_messages(value: Any, *, row: int, field: str) -> list[dict]:
    """A non-empty list of {role, content} with a known role and string content. Keys that are
    None are dropped: Arrow fills keys present in other rows with None, and templates test
    `is defined`."""
    if value is None:
        raise RowError(row, f"missing field {field!r}")
    if not isinstance(value, list) or not value:
        raise RowError(row, f"field {field!r} must be a non-empty list of {{role, content}} objects; got {_brief(value)}")
    out = []
    for k, m in enumerate(value):
        if not isinstance(m, dict):
            raise RowError(row, f"{field}[{k}] must be an object with role and content; got {_brief(m)}")
        if m.get("role") not in CHAT_ROLES:
            raise RowError(row, f"{field}[{k}].role must be one of {', '.join(CHAT_ROLES)}; got {m.get('role')!r}")
        if not isinstance(m.get("content"), str):
            raise RowError(row, f"{field}[{k}].content must be a string; got {_brief(m.get('content'))}")
        out.append({key: v for key, v in m.items() if v is not None})
    return out


def _brief(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:60]}{'...' if len(text) > 60 else ''}"


def _is_prefix(a: list[int], b: list[int]) -> bool:
    return len(a) <= len(b) and b[:len(a)] == a


class PromptCompletionEncoder:
    """bos + prompt (not supervised), completion + eos (supervised). Prompt and completion are
    tokenised separately, so the boundary is exact; put any separating space in the data."""

    def __init__(self, *, tokenizer: Any, prompt_field: str, completion_field: str) -> None:
        self.tokenizer = tokenizer
        self.prompt_field = prompt_field
        self.completion_field = completion_field
        self.bos = leading_special_ids(tokenizer)
        self.eos = tokenizer.eos_token_id

    def __call__(self, batch: dict[str, list], rows: list[int]) -> list[Encoded]:
        prompts = [_string(batch, self.prompt_field, i, row) for i, row in enumerate(rows)]
        completions = [_string(batch, self.completion_field, i, row) for i, row in enumerate(rows)]
        return [_join(self.bos + p, c + [self.eos])
                for p, c in zip(_tokenize(self.tokenizer, prompts), _tokenize(self.tokenizer, completions))]


class AlpacaEncoder:
    """The Stanford Alpaca prompt (the no-input variant when `input` is empty or absent), with
    output + eos supervised."""

    def __init__(self, *, tokenizer: Any, instruction_field: str, input_field: str, output_field: str) -> None:
        self.tokenizer = tokenizer
        self.instruction_field = instruction_field
        self.input_field = input_field
        self.output_field = output_field
        self.bos = leading_special_ids(tokenizer)
        self.eos = tokenizer.eos_token_id

    def __call__(self, batch: dict[str, list], rows: list[int]) -> list[Encoded]:
        prompts, outputs = [], []
        for i, row in enumerate(rows):
            instruction = _string(batch, self.instruction_field, i, row)
            extra = _string(batch, self.input_field, i, row, optional=True)
            template = ALPACA_PROMPT if extra.strip() else ALPACA_PROMPT_NO_INPUT
            prompts.append(template.format(instruction=instruction, input=extra))
            outputs.append(_string(batch, self.output_field, i, row))
        return [_join(self.bos + p, o + [self.eos])
                for p, o in zip(_tokenize(self.tokenizer, prompts), _tokenize(self.tokenizer, outputs))]


class TextEncoder:
    """bos + text + eos, every token supervised (continued pre-training)."""

    def __init__(self, *, tokenizer: Any, field: str) -> None:
        self.tokenizer = tokenizer
        self.field = field
        self.bos = leading_special_ids(tokenizer)
        self.eos = tokenizer.eos_token_id

    def __call__(self, batch: dict[str, list], rows: list[int]) -> list[Encoded]:
        texts = [_string(batch, self.field, i, row) for i, row in enumerate(rows)]
        out = []
        for ids in _tokenize(self.tokenizer, texts):
            full = self.bos + ids + [self.eos]
            out.append((full, [True] * len(full)))
        return out


def _join(unsupervised: list[int], supervised: list[int]) -> Encoded:
    return unsupervised + supervised, [False] * len(unsupervised) + [True] * len(supervised)


def text_fields(cfg: DataConfig) -> list[str]:
    """The columns a format renders, in the order the rendering places them (for the row cap)."""
    return {"messages": [cfg.messages_field], "prompt_completion": [cfg.prompt_field, cfg.completion_field],
            "alpaca": [cfg.instruction_field, cfg.input_field, cfg.output_field], "text": [cfg.text_field]}[cfg.format]


def cap_row_chars(batch: dict[str, list], i: int, *, fields: list[str], cap: int, cut: bool) -> bool:
    """Whether row i of the batch holds more than `cap` characters of text (string fields, and the
    contents of chat turns), counted in rendering order. With `cut`, the row is cut in place to
    `cap` characters: the field (or turn) that crosses the cap is cut, later ones emptied (chat:
    later turns left out), so the tokenizer never sees the whole of a huge row. Values of the wrong
    type are left for the encoder to report."""
    budget = cap
    over = False
    for f in fields:
        if f not in batch:
            continue
        v = batch[f][i]
        if isinstance(v, str):
            if len(v) > budget:
                over = True
                if cut:
                    batch[f][i] = v[:budget]
            budget = max(0, budget - len(v))
        elif isinstance(v, list):  # chat turns
            kept = []
            for turn in v:
                content = turn.get("content") if isinstance(turn, dict) else None
                if isinstance(content, str) and len(content) > budget:
                    over = True
                    if cut and budget > 0:
                        kept.append({**turn, "content": content[:budget]})
                    budget = 0
                    if cut:
                        break
                    continue
                kept.append(turn)
                budget -= len(content) if isinstance(content, str) else 0
            if cut and over:
                batch[f][i] = kept
    return over
