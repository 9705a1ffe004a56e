"""Write a chat JSONL whose token lengths follow published statistics of a public instruction set.

Only the lengths matter for a throughput benchmark, so the text is made of whole-word tokens of
the given tokenizer (ftcluster's embedded tiny tokenizer is enough) drawn at random, with turn
lengths drawn from log-normal distributions whose means are the published ones:

* `short` (Alpaca-like, single turn): Stanford Alpaca, 52,002 instances, 1 round, mean prompt
  27.8 and mean completion 64.6 tokens (Llama tokenizer), Table 1 of Wang et al., "How Far Can
  Camels Go? Exploring the State of Instruction Tuning on Open Resources", NeurIPS 2023 Datasets
  and Benchmarks, arXiv:2306.04751.
* `long` (UltraChat-like, multi-turn): UltraChat, about 1.47M dialogues, 3.85 turns (user +
  assistant pairs) per dialogue and 1,467.4 tokens per dialogue on average, Table 1 of Ding et
  al., "Enhancing Chat Language Models by Scaling High-quality Instructional Conversations",
  EMNLP 2023, arXiv:2305.14233. We match the dialogue length: 1,467.4 / 7.7 utterances = 190.6
  tokens per utterance on average. (The figures were taken from the papers' tables as cited;
  the dataset cards do not repeat them. Check them against the PDFs before quoting a result.)

The papers publish means, not spreads: the log-normal sigmas below are our assumption (0.6 for
prompts, 0.8 for completions, 0.9 per utterance: right-skewed, a median about 0.7 of the mean),
and the number of turns is 1 + Poisson(2.85) (mean 3.85). The script prints the realised length
statistics (rendered with the chat template, as ftcluster and the peer tokenise them) so a run
records what it trained on. Deterministic by --seed.

    python bench/make_chat_lengths.py --kind short --n 4000 --out /tmp/chat_short.jsonl \
        --tokenizer ftcluster/assets/tiny-llama
"""
from __future__ import annotations

import argparse
import json
import math

import numpy as np

KINDS = {
    # turns: fixed or 1 + Poisson(extra); (mean, sigma) of user and assistant utterance tokens
    "short": {"turns": (1, 0.0), "user": (27.8, 0.6), "assistant": (64.6, 0.8)},
    # 1,467.4 tokens per dialogue over 3.85 x 2 utterances: 190.6 per utterance on average
    "long": {"turns": (1, 2.85), "user": (1467.4 / 7.7, 0.9), "assistant": (1467.4 / 7.7, 0.9)},
}


def lognormal(rng: np.random.Generator, mean: float, sigma: float) -> int:
    """A log-normal draw with the given mean (mu = ln(mean) - sigma^2 / 2), at least 1."""
    return max(1, int(round(rng.lognormal(math.log(mean) - sigma * sigma / 2, sigma))))


def word_pool(tok) -> list[str]:  # type: ignore[no-untyped-def]
    """Tokens that are a space and letters: each decodes to one word that re-encodes to one token."""
    pool = []
    for piece, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]):
        if piece.startswith("Ġ") and piece[1:].isalpha():
            word = piece[1:]
            if len(tok(" " + word, add_special_tokens=False)["input_ids"]) == 1:
                pool.append(word)
    if len(pool) < 20:
        raise SystemExit("the tokenizer has too few whole-word tokens for this generator")
    return pool


def make(kind: str, *, n: int, seed: int, tok) -> list[dict]:  # type: ignore[no-untyped-def]
    spec, rng, pool = KINDS[kind], np.random.default_rng(seed), word_pool(tok)
    rows = []
    for _ in range(n):
        base, extra = spec["turns"]
        turns = base + (int(rng.poisson(extra)) if extra else 0)
        messages = []
        for _ in range(turns):
            for role in ("user", "assistant"):
                k = lognormal(rng, *spec[role])
                messages.append({"role": role, "content": " ".join(rng.choice(pool, size=k)).strip()})
        rows.append({"messages": messages})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kind", choices=sorted(KINDS), required=True)
    ap.add_argument("--n", type=int, default=4000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokenizer", required=True, help="a local tokenizer directory (with a chat template)")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(a.tokenizer, local_files_only=True)
    rows = make(a.kind, n=a.n, seed=a.seed, tok=tok)
    with open(a.out, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    texts = [tok.apply_chat_template(r["messages"], tokenize=False) for r in rows]
    lengths = np.array([len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"]])
    stats = {"kind": a.kind, "n": a.n, "seed": a.seed, "median": int(np.median(lengths)),
             "mean": round(float(lengths.mean()), 1), "p90": int(np.percentile(lengths, 90)),
             "max": int(lengths.max()), "over_4096": int((lengths > 4096).sum())}
    print(json.dumps(stats))


if __name__ == "__main__":
    main()
