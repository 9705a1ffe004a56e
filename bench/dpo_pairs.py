"""Preference pairs of exact token lengths for bench/dpo_8b.sh, and the SFT rows of the same tokens.

    python3 bench/dpo_pairs.py OUT_DIR --pairs 64 --prompt-tokens 1535 --response-tokens 511

With the embedded tokenizer (ftcluster/assets/tiny-llama) and data.format=prompt_completion, each
sequence is bos + prompt + response + eos = prompt + response + 2 tokens (2,048 with the defaults).
Writes OUT_DIR/pairs.jsonl ({"prompt", "chosen", "rejected"}: the DPO run) and OUT_DIR/sft.jsonl
({"prompt", "completion"}: two rows per pair, prompt + chosen and prompt + rejected, so the SFT run
trains on exactly the tokens of one DPO step per two SFT rows). Text is random whole-word tokens of
the tokenizer, checked to re-tokenise to the requested lengths.
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from transformers import AutoTokenizer

TOKENIZER = Path(__file__).resolve().parent.parent / "ftcluster/assets/tiny-llama"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--pairs", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=1535)
    ap.add_argument("--response-tokens", type=int, default=511)
    args = ap.parse_args()
    tok = AutoTokenizer.from_pretrained(TOKENIZER, local_files_only=True)
    # Word tokens with a leading space (" the", " capital", ...): a run of them re-tokenises to itself.
    words = [w for w in (tok.decode([i]) for i in range(len(tok)))
             if w.startswith(" ") and w[1:].isalpha() and tok(w, add_special_tokens=False)["input_ids"] != []]
    words = [w for w in words if len(tok(w, add_special_tokens=False)["input_ids"]) == 1]
    rng = random.Random(0)

    def text(n: int) -> str:
        for _ in range(100):
            s = "".join(rng.choice(words) for _ in range(n))
            if len(tok(s, add_special_tokens=False)["input_ids"]) == n:
                return s
        raise RuntimeError(f"could not make a {n}-token text")

    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "pairs.jsonl", "w") as pf, open(args.out / "sft.jsonl", "w") as sf:
        for _ in range(args.pairs):
            p, c, r = text(args.prompt_tokens), text(args.response_tokens), text(args.response_tokens)
            pf.write(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n")
            sf.write(json.dumps({"prompt": p, "completion": c}) + "\n")
            sf.write(json.dumps({"prompt": p, "completion": r}) + "\n")
    print(f"{args.pairs} pairs of {args.prompt_tokens} + {args.response_tokens} (+2) tokens in {args.out}")


if __name__ == "__main__":
    main()
