#!/usr/bin/env bash
# Issue 18: the frozen base in FP8 (peft.fp8_base=true, ftcluster/fp8.py) against the bf16 default
# and the best hand-tuned peer, in one device command on one H200 (from the repo root, .whl_lite and
# .peer carried; install line in bench/perf.sh), then its losses against the bf16 path and the sync
# check of the LoRA and FP8 steps. At most 8 files come back; they are gathered into $OUT:
#   perf.md                 bench/perf.sh's table (peers lora4k_noac_liger_mbs2/_mbs4, ours_auto, ours_fp8)
#   losses.md               bench/compare_losses.py: ref (bf16 path) vs ours_auto vs ours_fp8, 20 steps
#   sync.txt                debug.sync_check on the tiny model with peft=lora, and with peft.fp8_base=true
#   *.metrics.jsonl         ours_auto, ours_fp8, ref
#   tail.txt                the last lines of every run's output (errors)
# DEADLINE_S (default 560) skips what would not finish inside the device's 10-minute call.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export TORCH_CUDA_ARCH_LIST=9.0
DEADLINE_S=${DEADLINE_S:-560}
left() { [ $((DEADLINE_S - SECONDS)) -gt "$1" ]; }
PEERS=${PEERS:-1} UNSLOTH=0 PEER_CONFIGS=${PEER_CONFIGS:-"lora4k_noac_liger_mbs2 lora4k_noac_liger_mbs4"} PEER_TIMEOUT=${PEER_TIMEOUT:-200} \
  MAIN_STEPS=20 RUNS=${RUNS:-"ours_fp8 ours_auto"} OUT=$OUT/perf bash bench/perf.sh > "$OUT/perf_stdout.txt" 2>&1
cp "$OUT/perf/perf.md" "$OUT/perf.md" 2>/dev/null
if left 110; then
  timeout $((DEADLINE_S - SECONDS - 60)) python3 -m ftcluster train model=llama3_8b peft=lora data=synthetic data.synthetic_samples=512 \
    data.max_seq_len=4096 train.global_batch_size=8 logger=none checkpoint.enabled=false eval.every_steps=0 eval.at_start=false \
    data.eval_path=null train.max_steps=20 model.liger=false peft.fused=false train.activation_checkpointing=none \
    train.micro_batch_size=4 run.dir="$OUT/ref" > "$OUT/ref.log" 2>&1
fi
python3 bench/compare_losses.py "$OUT/ref" "$OUT/perf/ours_auto" "$OUT/perf/ours_fp8" > "$OUT/losses.md" 2>&1
B="model=tiny train.max_steps=10 train.log_every=4 debug.sync_check=true eval.every_steps=0 eval.at_start=false checkpoint.enabled=false logger=none"
for c in "lora|peft=lora" "fp8|peft=lora peft.fp8_base=true"; do
  n=${c%%|*}; o=${c#*|}
  left 50 || { echo "$n skipped: device time" >> "$OUT/sync.txt"; continue; }
  timeout $((DEADLINE_S - SECONDS - 10)) python3 -m ftcluster train $B $o run.dir="$OUT/sync_$n" > "$OUT/sync_$n.log" 2>&1
  rc=$?
  { echo "$n rc=$rc logged_steps=$(grep -c '"loss"' "$OUT/sync_$n/metrics.jsonl" 2>/dev/null)" \
         "layout: $(grep -o '"micro_batch_size".*"fused": [a-z]*' "$OUT/sync_$n/metrics.jsonl" 2>/dev/null | head -1)"
    grep -iE "synchroniz|Error|fp8" "$OUT/sync_$n.log" | head -4; } >> "$OUT/sync.txt"
done
cp "$OUT/perf/ours_auto/metrics.jsonl" "$OUT/ours_auto.metrics.jsonl" 2>/dev/null
cp "$OUT/perf/ours_fp8/metrics.jsonl" "$OUT/ours_fp8.metrics.jsonl" 2>/dev/null
cp "$OUT/ref/metrics.jsonl" "$OUT/ref.metrics.jsonl" 2>/dev/null
{ for f in "$OUT/perf_stdout.txt" "$OUT/ref.log" "$OUT"/sync_*.log; do echo "== $f"; grep -vE "^step [0-9]+/[0-9]+ " "$f" | tail -25; done; } > "$OUT/tail.txt" 2>&1
find "$OUT" -mindepth 1 -maxdepth 1 ! -name perf.md ! -name losses.md ! -name sync.txt ! -name '*.metrics.jsonl' ! -name tail.txt \
  -exec rm -rf {} +
cat "$OUT/perf.md" "$OUT/sync.txt"; tail -4 "$OUT/losses.md"
