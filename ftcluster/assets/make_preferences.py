"""Generate the embedded preference demo (`data=sample_preferences`, used by `objective=dpo`).

Run with::

    python -m ftcluster.assets.make_preferences

It (re)writes, next to this file, ``data/sample_preferences.jsonl`` (600 pairs) and
``data/sample_preferences_eval.jsonl`` (100 held-out pairs from another seed, no prompt shared
with a training pair), in the chat preference format::

    {"messages": [prompt turns], "chosen": [{"role": "assistant", ...}], "rejected": [...]}

Prompts and correct answers come from the sample chat tasks (make_assets.py). The chosen answer is
always the correct, well-formed one; the rejected one is, in equal parts, (a) the same sentence with
a wrong value, (b) its words in reverse order, or (c) cut short and trailed by "...". (b) and (c)
are learnable even by the randomly initialised tiny model (they are malformed in ways a language
model sees token by token), (a) needs knowledge, so held-out reward accuracy rises well above 0.5
without reaching 1. Deterministic: running it twice writes byte-identical files.
"""
from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path

from ftcluster.assets.make_assets import SYSTEM_PROMPTS, _sample_task

DATA_DIR = Path(__file__).resolve().parent / "data"
TRAIN_FILE = DATA_DIR / "sample_preferences.jsonl"
EVAL_FILE = DATA_DIR / "sample_preferences_eval.jsonl"
TRAIN_SEED, EVAL_SEED = 4321, 8765
NUM_TRAIN, NUM_EVAL = 600, 100


def _wrong_value(answer: str, rng: random.Random) -> str | None:
    """The answer with its last number changed, or None if it has no number."""
    numbers = list(re.finditer(r"\d+", answer))
    if not numbers:
        return None
    m = numbers[-1]
    value = int(m.group()) + rng.choice([-3, -2, -1, 1, 2, 3, 10])
    return answer[:m.start()] + str(abs(value)) + answer[m.end():]


def _rejected(answer: str, rng: random.Random) -> str:
    words = answer.split()
    kind = rng.randrange(3)
    if kind == 0 and (wrong := _wrong_value(answer, rng)) is not None and wrong != answer:
        return wrong
    if kind <= 1 and len(words) > 1:
        return " ".join(reversed(words))
    cut = max(1, len(words) // 2)
    out = " ".join(words[:cut]) + " ..."
    return out if out != answer else answer + " ... ..."


def make_pairs(n: int, *, seed: int, skip_prompts: frozenset[str] = frozenset()) -> list[dict]:
    rng = random.Random(seed)
    out: list[dict] = []
    while len(out) < n:
        q, a = _sample_task(rng)
        prompt = []
        if rng.random() < 0.3:
            prompt.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        prompt.append({"role": "user", "content": q})
        key = json.dumps(prompt, sort_keys=True)
        bad = _rejected(a, rng)
        if key in skip_prompts or bad == a:
            continue
        out.append({"messages": prompt, "chosen": [{"role": "assistant", "content": a}],
                    "rejected": [{"role": "assistant", "content": bad}]})
    return out


def _write(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def main() -> int:
    train = make_pairs(NUM_TRAIN, seed=TRAIN_SEED)
    seen = frozenset(json.dumps(r["messages"], sort_keys=True) for r in train)
    held = make_pairs(NUM_EVAL, seed=EVAL_SEED, skip_prompts=seen)
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    _write(TRAIN_FILE, train)
    _write(EVAL_FILE, held)
    print(f"wrote {len(train)} pairs to {TRAIN_FILE} and {len(held)} to {EVAL_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
