"""Summarise issue-7 big-model runs: tokens/s, MFU, peak GPU memory, peak host RAM, load and
checkpoint times, from each run dir's metrics.jsonl (rank 0 records every rank's host RSS).

usage: python bench/big_report.py [--skip N] OUT_JSON RUN_DIR...
The first N logged steps of each run (default 2: warm-up, allocator growth) are left out of the
median tokens/s. Prints one JSON line per run and a markdown table; writes the rows to OUT_JSON.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def summarize(run: Path, skip: int) -> dict:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return {"run": run.name, "error": "no metrics.jsonl"}
    recs = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    # A resumed run appends to the same file: throughput is taken from the first process only.
    cut = next((i for i, r in enumerate(recs) if r.get("event") == "resume"), len(recs))
    steps = [r for r in recs[:cut] if "loss" in r]
    ev = {}
    for r in recs:
        if "event" in r:
            ev.setdefault(r["event"], []).append(r)
    timed = steps[skip:] or steps
    med = lambda k: statistics.median(r[k] for r in timed if r.get(k) is not None) if timed else None  # noqa: E731
    first = (ev.get("start") or ev.get("resume") or [{}])[0]
    end = (ev.get("end") or [{}])[-1]
    row = {
        "run": run.name,
        "world_size": first.get("world_size"),
        "steps": len(steps),
        "losses": [round(r["loss"], 4) for r in steps],
        "tok_s_per_gpu": round(med("tokens_per_s_per_gpu"), 1) if timed else None,
        "mfu": round(med("mfu"), 4) if timed and timed[0].get("mfu") is not None else None,
        "gpu_peak_gib": round(max((r.get("mem_gib") or 0) for r in steps), 2) if steps else None,
        "gpu_reserved_gib": round(max((r.get("mem_reserved_gib") or 0) for r in steps), 2) if steps else None,
        "host_rss_peak_gib": max([e["host_rss_peak_gib"] for e in ev.get("end", []) if "host_rss_peak_gib" in e]
                                 or [first.get("host_rss_peak_gib") or 0]),
        "host_rss_peak_gib_per_rank": end.get("host_rss_peak_gib_per_rank", first.get("host_rss_peak_gib_per_rank")),
        "host_rss_after_load_gib": first.get("host_rss_peak_gib"),
        "load_seconds": first.get("load_seconds"),
        "checkpoint_seconds": [c["seconds"] for c in ev.get("checkpoint", [])],
        "resumed_from_step": (ev.get("resume") or [{}])[0].get("step"),
        "resume_load_seconds": (ev.get("resume") or [{}])[0].get("load_seconds"),
        "resumed_losses": [round(r["loss"], 4) for r in recs[cut:] if "loss" in r],
        "params": first.get("params"),
        "trainable": first.get("trainable"),
    }
    if not steps:
        row["error"] = "no steps logged (see the run's log)"
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip", type=int, default=2)
    ap.add_argument("out")
    ap.add_argument("runs", nargs="+")
    a = ap.parse_args()
    rows = [summarize(Path(r), a.skip) for r in a.runs]
    Path(a.out).write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    for r in rows:
        print(json.dumps(r))
    print("| run | GPUs | steps | tokens/s/GPU | MFU | GPU peak GiB (reserved) | host RSS peak GiB (after load) "
          "| load s | ckpt s | resume load s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['run']} | {r.get('world_size')} | {r.get('steps')} | {r.get('tok_s_per_gpu')} | {r.get('mfu')} | "
              f"{r.get('gpu_peak_gib')} ({r.get('gpu_reserved_gib')}) | {r.get('host_rss_peak_gib')} "
              f"({r.get('host_rss_after_load_gib')}) | {r.get('load_seconds')} | {r.get('checkpoint_seconds')} | "
              f"{r.get('resume_load_seconds')} |")


if __name__ == "__main__":
    main()
