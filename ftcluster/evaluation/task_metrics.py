"""Task metrics of generation samples against their references: exact match after SQuAD-style
normalisation, and ROUGE-L F1 from the maintained `rouge-score` package (not re-implemented)."""
from __future__ import annotations

import re
import string


def normalise(text: str) -> str:
    """Lowercase, drop punctuation and the articles a/an/the, collapse whitespace (SQuAD's rule)."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def score(samples: list[dict]) -> dict[str, float]:
    """eval_exact_match and eval_rougeL over the samples that have a reference."""
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        raise RuntimeError("eval.task_metrics: needs the rouge-score package: pip install 'ftcluster[eval]'") from None
    pairs = [(s["completion"], s["reference"]) for s in samples if s.get("reference") is not None]
    if not pairs:
        return {}
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    em = sum(normalise(c) == normalise(r) for c, r in pairs) / len(pairs)
    rouge = sum(scorer.score(r, c)["rougeL"].fmeasure for c, r in pairs) / len(pairs)
    return {"eval_exact_match": em, "eval_rougeL": rouge}
