"""Markdown report of bench/longlora_s2_vs_full.sh: S2-Attn vs full attention, the peer at 32k,
and the longest context per attention.

usage: python3 bench/longlora_report.py OUT_DIR [OUT_DIR...]   (each holds status.tsv, run dirs)

Step time = tokens per step / median tokens/s over the timed steps (the first step, warm-up, is
not timed when a run has more than one). MFU uses DESIGN.md's convention (LoRA: 4*N_frozen +
6*N_lora + 12*L*d*S_attn, S_attn = the group size G under S2-Attn, the sequence length otherwise;
activation-checkpoint recompute not counted). "FLOP ratio" is full / S2 model FLOPs per token at
that length, the speed-up the FLOP count predicts. Peak memory: torch.cuda.max_memory_allocated.
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

PEAK = 989e12


def load_run(run_dir: Path) -> dict | None:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    steps = [r for r in map(json.loads, filter(str.strip, path.read_text().splitlines())) if "loss" in r]
    if not steps:
        return None
    timed = steps[1:] if len(steps) > 1 else steps
    tps = statistics.median(r["tokens_per_s"] for r in timed)
    mfu = [r["mfu"] for r in timed if r.get("mfu") is not None]
    return {"tok_s": tps, "mfu": statistics.median(mfu) if mfu else None, "timed": len(timed),
            "fpt": statistics.median(m * PEAK / r["tokens_per_s"] for m, r in zip(mfu, timed)) if mfu else None,
            "peak": max(r.get("mem_gib") or 0 for r in steps), "reserved": max(r.get("mem_reserved_gib") or 0 for r in steps),
            "loss": steps[-1]["loss"]}


def fmt(v, spec: str = ".2f") -> str:  # type: ignore[no-untyped-def]
    return "-" if v is None else format(v, spec)


def main(dirs: list[Path]) -> None:
    rows, peers, maxctx = [], [], []
    for out in dirs:
        status = out / "status.tsv"
        for line in status.read_text().splitlines() if status.is_file() else []:
            name, attn, seq, steps, st, rc, secs = line.split("\t")
            r = {"name": name, "attn": attn, "seq": int(seq), "status": st, "secs": int(secs)}
            m = load_run(out / name) if st == "ok" else None
            if m:
                r.update(m, step_s=int(seq) / m["tok_s"])
            rows.append(r)
        peer = out / "peer_lora.jsonl"
        peers += [json.loads(x) for x in peer.read_text().splitlines() if x.strip()] if peer.is_file() else []
        mc = out / "maxctx.tsv"
        maxctx += [x.split("\t") for x in mc.read_text().splitlines() if x.strip()] if mc.is_file() else []
    env = [(d / "env.txt").read_text().strip() for d in dirs if (d / "env.txt").is_file()]
    kernel = [json.loads(x) for d in dirs if (d / "kernel.jsonl").is_file()
              for x in (d / "kernel.jsonl").read_text().splitlines() if x.startswith("{")]
    print("# LongLoRA S2-Attn vs full attention, Llama-3.1-8B shape, one GPU\n")
    if env:
        print("```\n" + env[0] + "\n```\n")
    print("| run | attention | tokens | status | timed steps | step s | tokens/s | MFU | peak GiB | reserved GiB | wall s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['name']} | {r['attn']} | {r['seq']} | {r['status']} | {r.get('timed', '-')} | {fmt(r.get('step_s'))} | "
              f"{fmt(r.get('tok_s'), '.0f')} | {fmt(r.get('mfu'), '.3f')} | {fmt(r.get('peak'))} | {fmt(r.get('reserved'))} | {r['secs']} |")
    ok = {(r["attn"], r["seq"]): r for r in rows if "step_s" in r and not r["name"].startswith("maxctx")
          and not r["name"].endswith("noliger")}
    seqs = sorted({s for _, s in ok})
    if seqs:
        print("\n## S2-Attn speed-up (same run, same machine)\n")
        print("| tokens | full step s | S2 step s | speed-up | FLOP ratio | full peak GiB | S2 peak GiB |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for s in seqs:
            f, g = ok.get(("full", s)), ok.get(("s2", s))
            if f and g:
                flop = f["fpt"] / g["fpt"] if f.get("fpt") and g.get("fpt") else None
                print(f"| {s} | {f['step_s']:.2f} | {g['step_s']:.2f} | {f['step_s'] / g['step_s']:.2f}x | {fmt(flop) + 'x' if flop else '-'} | "
                      f"{f['peak']:.2f} | {g['peak']:.2f} |")
        print("\nS2 runs are peft=longlora: they also train embeddings and norms in fp32 (about 8 GiB more for the "
              "embedding table, its gradient and AdamW state at 8B), so the memory difference is not attention alone.")
    if kernel:
        print("\n## Attention alone (fwd + bwd, one layer, flash SDPA), bench/longlora_kernel.py\n")
        print("| tokens | G | full s | S2 s | speed-up | full peak GiB | S2 peak GiB |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for k in kernel:
            print(f"| {k['n']} | {k['group']} | {k.get('full_s')} | {k.get('s2_s')} | {k.get('speedup', '-')} | "
                  f"{k.get('full_peak_gib', '-')} | {k.get('s2_peak_gib', '-')} |")
    for p in peers:
        print(f"\n## Peer baseline `{p.get('name')}` (plain transformers + peft + Liger)\n")
        if p.get("error"):
            print(f"error: {p['error']}")
            continue
        print(f"step {p['step_s']:.2f} s, {p['tok_s']:.0f} tokens/s, MFU {p['mfu_datasheet']:.3f}, peak {p.get('peak_gib')} GiB")
        ours = ok.get(("full", p["seq"]))
        if ours:
            ratio = ours["step_s"] / p["step_s"]
            verdict = "no slower (passes)" if ratio <= 1.0 else "SLOWER (fails the issue's gate)"
            print(f"\nours, full attention at {p['seq']}: {ours['step_s']:.2f} s/step = {ratio:.3f}x the peer's step time: {verdict}")
        nol = next((r for r in rows if r["name"] == f"full_{p['seq'] // 1024}k_noliger" and "step_s" in r), None)
        if nol:
            print(f"ours without Liger at {p['seq']}: {nol['step_s']:.2f} s/step = {nol['step_s'] / p['step_s']:.3f}x the peer's")
    if maxctx:
        print("\n## Longest context that trains (one optimizer step) on this GPU\n")
        print("| attention | longest OK (tokens) | first OOM (tokens) |")
        print("| --- | --- | --- |")
        for _, attn, lo, hi in maxctx:
            first = hi.split("=")[1]
            print(f"| {attn} | {lo.split('=')[1]} | {first if first != '0' else 'none up to MAXCTX_LIMIT'} |")


if __name__ == "__main__":
    main([Path(a) for a in sys.argv[1:]] or [Path(".")])
