"""Summarise benchmark runs: ftcluster metrics.jsonl files and peer_lora.py JSON lines, side by side.

usage: python bench/summarize.py [--skip N] RUN_DIR_OR_JSONL...
For an ftcluster run dir, the first N logged steps (warm-up, default 3) are skipped and the median
step is reported; a peer_lora.jsonl is reported as written (it already skips warm-up).
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def summarize_run(run_dir: Path, skip: int) -> dict:
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in recs if "loss" in r][skip:]
    if not steps:
        return {"name": run_dir.name, "error": "no steps logged"}
    med = lambda k: statistics.median(r[k] for r in steps if r.get(k) is not None)  # noqa: E731
    return {"name": run_dir.name, "steps": len(steps), "tok_s_per_gpu": round(med("tokens_per_s_per_gpu"), 1),
            "mfu": round(med("mfu"), 4) if steps[0].get("mfu") is not None else None,
            "peak_gib": round(max(r.get("mem_gib") or 0 for r in steps), 2),
            "reserved_gib": round(max(r.get("mem_reserved_gib") or 0 for r in steps), 2),
            "losses": [round(r["loss"], 4) for r in steps]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip", type=int, default=3)
    ap.add_argument("paths", nargs="+")
    a = ap.parse_args()
    rows = []
    for p in map(Path, a.paths):
        if p.is_dir():
            rows.append(summarize_run(p, a.skip))
        elif p.is_file():
            for line in p.read_text().splitlines():
                r = json.loads(line)
                rows.append({"name": "peer:" + r["name"], "tok_s_per_gpu": r.get("tok_s"), "mfu": r.get("mfu_datasheet"),
                             "peak_gib": r.get("peak_gib"), "error": r.get("error")})
    for r in rows:
        print(json.dumps(r))
    print("| run | tokens/s/GPU | MFU | peak GiB |")
    print("| --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['name']} | {r.get('tok_s_per_gpu')} | {r.get('mfu')} | {r.get('peak_gib')} |")


if __name__ == "__main__":
    main()
