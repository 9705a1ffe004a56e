"""Losses of two or more ftcluster runs side by side, step by step, with the relative difference of
each run to the first (the baseline).

usage: python bench/compare_losses.py BASELINE_RUN_DIR OTHER_RUN_DIR...
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def losses(run_dir: Path) -> dict[int, float]:
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in recs if "loss" in r}


def main() -> None:
    runs = [Path(p) for p in sys.argv[1:]]
    if len(runs) < 2:
        raise SystemExit(__doc__)
    table = [losses(r) for r in runs]
    base = table[0]
    print("| step | " + " | ".join(r.name for r in runs) + " | " + " | ".join(f"rel diff {r.name}" for r in runs[1:]) + " |")
    print("| --- " * (2 * len(runs)) + "|")
    worst = [0.0] * (len(runs) - 1)
    for step in sorted(base):
        vals = [t.get(step) for t in table]
        rel = []
        for i, v in enumerate(vals[1:]):
            d = abs(v - base[step]) / abs(base[step]) if v is not None else float("nan")
            worst[i] = max(worst[i], d) if v is not None else worst[i]
            rel.append(f"{d:.2e}")
        print(f"| {step} | " + " | ".join("-" if v is None else f"{v:.5f}" for v in vals) + " | " + " | ".join(rel) + " |")
    for r, w in zip(runs[1:], worst):
        print(f"max relative loss difference {r.name} vs {runs[0].name}: {w:.2e}")


if __name__ == "__main__":
    main()
