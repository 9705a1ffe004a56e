#!/usr/bin/env bash
# Issue 18: the memory planner's prediction against measured peaks, on one H200 in one command.
# Llama-3.2-1B shape (model=llama32_1b, random weights), world size 1, synthetic data, 4 steps per
# run, each with an explicit layout (micro-batch, checkpointing mode, liger), spanning LoRA / QLoRA /
# full fine-tune, seq 4k-64k, none / selective / full / offload, micro-batch 1-4, FSDP2 and ZeRO-3.
# For each run `ftcluster plan <same overrides> --json` gives the prediction (reserved, the peak of
# torch.cuda.max_memory_reserved); the measurement is the largest `mem_reserved_gib` in the run's
# metrics.jsonl (allocated `mem_gib` alongside). Writes $OUT/plan_check.md (and .json).
# Run on the device machine from the repo root:  bash bench/plan_check.sh        (~5 minutes: 13 runs of ~20 s)
# CPU check of the command lines in seconds (model=tiny, short rows, no measurement):  TINY=1 bash bench/plan_check.sh
# ONLY="3 7" runs only those rows (numbers as in the table); BUDGET_S=200 starts none after 200 s.
# Note: until ftcluster/model/checkpointing.py lands, selective and offload train as `full`
# (the measured peak is then full's); the plan predicts the intended behaviour.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if [ "${TINY:-0}" = 1 ]; then
  MODEL=(model=tiny model.liger=false); DIV=64; export DS_ACCELERATOR=cpu CUDA_VISIBLE_DEVICES=""
else
  MODEL=(model=llama32_1b); DIV=1
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
fi
GPU_GIB=${GPU_GIB:-141}
common=("${MODEL[@]}" data=synthetic logger=none checkpoint.enabled=false eval.every_steps=0 eval.at_start=false
        data.eval_path=null train.max_steps=4 train.log_every=1 train.grad_accum=1 optim.lr=1e-4)
# name | overrides (seq is divided by DIV in TINY mode; liger is forced off there)
ROWS=(
  "lora_4k_none_mb1|peft=lora seq=4096 mb=1 ac=none liger=true"
  "lora_4k_none_mb4|peft=lora seq=4096 mb=4 ac=none liger=true"
  "lora_4k_sel2_mb2|peft=lora seq=4096 mb=2 ac=selective every=2 liger=true"
  "lora_8k_full_mb2_noliger|peft=lora seq=8192 mb=2 ac=full liger=false"
  "lora_16k_offload_mb1|peft=lora seq=16384 mb=1 ac=offload liger=true"
  "lora_64k_full_mb1|peft=lora seq=65536 mb=1 ac=full liger=true"
  "qlora_4k_none_mb2|peft=qlora seq=4096 mb=2 ac=none liger=true"
  "qlora_16k_full_mb1|peft=qlora seq=16384 mb=1 ac=full liger=true"
  "full_4k_none_mb1|peft=none seq=4096 mb=1 ac=none liger=true"
  "full_4k_full_mb4_noliger|peft=none seq=4096 mb=4 ac=full liger=false"
  "full_8k_sel4_mb1|peft=none seq=8192 mb=1 ac=selective every=4 liger=true"
  "zero3_lora_4k_full_mb2|peft=lora seq=4096 mb=2 ac=full liger=true parallel=zero3"
  "zero3_full_4k_none_mb1|peft=none seq=4096 mb=1 ac=none liger=true parallel=zero3"
)
i=0
for row in "${ROWS[@]}"; do
  i=$((i + 1))
  if [ -n "${ONLY:-}" ] && ! [[ " $ONLY " == *" $i "* ]]; then continue; fi
  # BUDGET_S: start no row after this many seconds (the table of the rows run is still written).
  if [ -n "${BUDGET_S:-}" ] && [ "$SECONDS" -ge "$BUDGET_S" ]; then echo "== $i skipped: BUDGET_S"; continue; fi
  name=${row%%|*}; spec=${row#*|}
  ov=(); every=""
  for kv in $spec; do
    k=${kv%%=*}; v=${kv#*=}
    case $k in
      seq) seq=$((v / DIV)); ov+=(data.max_seq_len=$seq) ;;
      mb) ov+=(train.micro_batch_size=$v data.synthetic_samples=$((4 * v + 4))) ;;
      ac) ov+=(train.activation_checkpointing=$v) ;;
      every) ov+=(train.activation_checkpointing_every=$v) ;;
      liger) [ "${TINY:-0}" = 1 ] || ov+=(model.liger=$v) ;;
      *) ov+=("$kv") ;;
    esac
  done
  dir="$OUT/$i-$name"; mkdir -p "$dir"
  echo "== $i $name: ${ov[*]}"
  printf '%s\n' "${ov[@]}" > "$dir/overrides.txt"
  # The plan runs on the CPU beside the training run (the GPU's host has cores to spare): no added wall time.
  ( python3 -m ftcluster plan "${common[@]}" "${ov[@]}" --gpu-gib "$GPU_GIB" --json > "$dir/plan.json" 2> "$dir/plan.err" \
    || { echo "plan $i failed:"; tail -n 3 "$dir/plan.err"; } ) &
  timeout "${RUN_TIMEOUT:-120}" python3 -m ftcluster train "${common[@]}" "${ov[@]}" run.dir="$dir/run" > "$dir/train.log" 2>&1 \
    || { echo "train failed (rc $?):"; tail -n 3 "$dir/train.log"; }
done
wait  # the last plans
python3 - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
rows, lines = [], ["| # | config | steps | predicted reserved GiB | measured reserved GiB | error % | predicted allocated GiB | measured allocated GiB | error % |",
                   "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
def err(p, m):
    return f"{100 * (p - m) / m:+.1f}" if p is not None and m else "n/a"
def f(x):
    return "n/a" if x is None else f"{x:.2f}"
for d in sorted((p for p in out.iterdir() if p.is_dir() and (p / "overrides.txt").exists()), key=lambda p: int(p.name.split("-")[0])):
    plan = json.loads((d / "plan.json").read_text()) if (d / "plan.json").stat().st_size else {}
    m = d / "run" / "metrics.jsonl"
    recs = [json.loads(l) for l in m.read_text().splitlines() if l.strip()] if m.exists() else []
    steps = [r for r in recs if "loss" in r]
    res = max((r.get("mem_reserved_gib") or 0 for r in steps), default=0) or None
    alloc = max((r.get("mem_gib") or 0 for r in steps), default=0) or None
    pr, pa = plan.get("total_gib"), plan.get("allocated_gib")
    cfg = " ".join((d / "overrides.txt").read_text().split())
    rows.append({"run": d.name, "overrides": cfg, "predicted_reserved_gib": pr, "measured_reserved_gib": res,
                 "predicted_allocated_gib": pa, "measured_allocated_gib": alloc, "steps": len(steps)})
    lines.append(f"| {d.name.split('-')[0]} | `{cfg}` | {len(steps)} | {f(pr)} | {f(res)} | {err(pr, res)} | {f(pa)} | {f(alloc)} | {err(pa, alloc)} |")
errs = [abs(r["predicted_reserved_gib"] - r["measured_reserved_gib"]) / r["measured_reserved_gib"]
        for r in rows if r["predicted_reserved_gib"] and r["measured_reserved_gib"]]
if errs:
    lines.append(f"\nReserved: {sum(e <= 0.10 for e in errs)}/{len(errs)} within ±10%, worst {100 * max(errs):.1f}%.")
text = "\n".join(lines)
print(text)
(out / "plan_check.md").write_text(text + "\n")
(out / "plan_check.json").write_text(json.dumps(rows, indent=1) + "\n")
PY
