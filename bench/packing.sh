#!/usr/bin/env bash
# Issue 13 (sequence packing) on one H200, in one command: Llama-3.1-8B shape (random weights),
# LoRA r=16, bf16, Liger kernels, no activation checkpointing, seq 4096, on two generated chat sets
# whose lengths follow published statistics (bench/make_chat_lengths.py: `short` Alpaca-like,
# `long` UltraChat-like), each run on the same file and tokenizer (the embedded tiny one: only
# lengths matter for speed):
#   ours_packed     data.packing=true, micro-batches of 2 rows of up to 4096 tokens (flex attention,
#                   document mask)
#   ours_unpacked   data.packing=false, micro-batches of 4 samples padded to the longest
#   peer            ../shared/bench/peer_lora.py chat_padded and chat_padded_noac_liger (copied to
#                   the git-ignored .peer/ and carried): transformers + peft, 4 samples padded
# plus ours on synthetic full 4096-token rows at the packed run's settings (micro-batch 2), the
# ceiling packing is measured against. tokens/s counts real (non-pad) tokens; ours is the median
# over the logged steps after warm-up (bench/summarize.py --skip), the peer's its timed window.
# Run on the device machine from the repo root:  bash bench/packing.sh   (writes under $OUT)
# CPU check of the command line in seconds (tiny model, 256-token rows):  TINY=1 bash bench/packing.sh
set -euo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
TOK=$PWD/ftcluster/assets/tiny-llama
if [ "${TINY:-0}" = 1 ]; then
  MODEL=(model=tiny); SEQ=256; STEPS=5; SKIP=2; N=300; export TINY=1
else
  MODEL=(model=llama3_8b model.liger=true); SEQ=4096; STEPS=24; SKIP=4; N=4000
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
fi
common=("${MODEL[@]}" peft=lora peft.rank=16 peft.alpha=32 train.activation_checkpointing=false optim.lr=1e-4
        checkpoint.enabled=false logger=none eval.every_steps=0 eval.at_start=false data.eval_path=null
        train.max_steps=$STEPS data.max_seq_len=$SEQ)
train() { python3 -m ftcluster train "${common[@]}" "$@" 2>&1 | grep -E "^packing|^step $STEPS:|Error|error" | tail -3; }
for set in short long; do
  data="$OUT/chat_$set.jsonl"
  python3 bench/make_chat_lengths.py --kind $set --n $N --out "$data" --tokenizer "$TOK" | tee "$OUT/chat_$set.stats.json"
  chat=(data=jsonl data.format=messages data.path="$data" model.tokenizer="$TOK")
  train "${chat[@]}" data.packing=true train.micro_batch_size=2 run.dir="$OUT/ours_packed_$set"
  train "${chat[@]}" data.packing=false train.micro_batch_size=4 run.dir="$OUT/ours_unpacked_$set"
  mkdir -p "$OUT/peer_$set"
  (cd "$OUT/peer_$set" && OUT="$OUT/peer_$set" PEER_DATA="$data" PEER_TOKENIZER="$TOK" python3 "$OLDPWD/.peer/peer_lora.py" \
     chat_padded chat_padded_noac_liger 2>&1 | tail -1)
done
train data=synthetic data.synthetic_samples=256 train.micro_batch_size=2 run.dir="$OUT/ours_synthetic_full"
python3 - "$OUT" "$SKIP" <<'PY'
import json, statistics, sys
from pathlib import Path
out, skip = Path(sys.argv[1]), int(sys.argv[2])
def ours(run):
    recs = [json.loads(l) for l in (out / run / "metrics.jsonl").read_text().splitlines() if l.strip()]
    steps = [r for r in recs if "loss" in r][skip:]
    pack = next((r for r in recs if r.get("event") == "packing"), {})
    return {"tok_s": statistics.median(r["tokens_per_s_per_gpu"] for r in steps),
            "peak": max(r.get("mem_gib") or 0 for r in steps), "fill": statistics.median(r["row_fill"] for r in steps),
            "mfu": statistics.median(r["mfu"] for r in steps) if steps[0].get("mfu") is not None else None,
            "spr": pack.get("samples_per_row")}
def peer(s, name):
    rows = [json.loads(l) for l in (out / f"peer_{s}" / "peer_lora.jsonl").read_text().splitlines() if l.strip()]
    r = next(r for r in rows if r["name"] == name)
    return {"tok_s": r.get("tok_s", float("nan")), "peak": r.get("peak_gib"), "fill": None, "mfu": r.get("mfu_datasheet"),
            "spr": None, "error": r.get("error")}
full = ours("ours_synthetic_full")
lines = ["| set | run | real tokens/s | vs peer chat_padded | vs chat_padded_noac_liger | vs synthetic full rows "
         "| row fill | samples/row | MFU | peak GiB |", "|" + " --- |" * 10]
checks = []
for s in ("short", "long"):
    st = json.loads((out / f"chat_{s}.stats.json").read_text())
    runs = {"ours packed": ours(f"ours_packed_{s}"), "ours unpacked (padded)": ours(f"ours_unpacked_{s}"),
            "peer chat_padded": peer(s, "chat_padded"), "peer chat_padded_noac_liger": peer(s, "chat_padded_noac_liger")}
    pp, pn = runs["peer chat_padded"]["tok_s"], runs["peer chat_padded_noac_liger"]["tok_s"]
    for name, r in runs.items():
        f = lambda v, d=0: "-" if v is None else f"{v:,.{d}f}"  # noqa: E731
        lines.append(f"| {s} (median {st['median']}, mean {st['mean']}, p90 {st['p90']}) | {name} | {f(r['tok_s'])} | "
                     f"{r['tok_s'] / pp:.2f}x | {r['tok_s'] / pn:.2f}x | {r['tok_s'] / full['tok_s']:.0%} | "
                     f"{f(r['fill'], 3)} | {f(r['spr'], 2)} | {f(r['mfu'], 3)} | {f(r['peak'], 1)} |")
    packed = runs["ours packed"]["tok_s"]
    if s == "short":
        checks += [("short: packed >= 4x peer chat_padded", packed / pp, 4.0),
                   ("short: packed >= 2x chat_padded_noac_liger", packed / pn, 2.0),
                   ("short: packed >= 85% of synthetic full rows", packed / full["tok_s"], 0.85)]
    else:
        checks += [("long: packed >= 1.5x chat_padded_noac_liger", packed / pn, 1.5)]
mfu = "-" if full["mfu"] is None else f"{full['mfu']:.3f}"
lines.append(f"| synthetic | ours, full rows (mb 2) | {full['tok_s']:,.0f} | | | 100% | 1.000 | 1.00 | {mfu} | "
             f"{full['peak']:.1f} |")
lines += ["", "| target | measured | needed | met |", "| --- | --- | --- | --- |"]
lines += [f"| {n} | {v:.2f} | {t} | {'yes' if v >= t else 'NO'} |" for n, v, t in checks]
text = "\n".join(lines)
(out / "packing.md").write_text(text + "\n")
print(text)
PY
