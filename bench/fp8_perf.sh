#!/usr/bin/env bash
# Issue 18: the frozen base in FP8 (peft.fp8_base=true, ftcluster/fp8.py) against the bf16 default
# and the best hand-tuned peer, in one device command on one H200 (from the repo root, .whl_lite and
# .peer carried; install line in bench/perf.sh), then its losses against the bf16 path and the sync
# check of the LoRA and FP8 steps. At most 8 files come back; they are gathered into $OUT:
#   perf.md                 bench/perf.sh's table (peers lora4k_noac_liger_mbs2/_mbs4, ours_auto, ours_fp8)
#   losses.md               bench/compare_losses.py: ref (bf16 path) vs ours_auto vs ours_fp8, 20 steps
#   sync.txt                bench/sync_check.sh on the tiny model with peft=lora, and with peft.fp8_base=true
#   *.metrics.jsonl         ours_auto, ours_fp8, ref_bf16 (perf.sh rows)
#   tail.txt                the last lines of every run's output (errors)
# DEADLINE_S (default 560) skips what would not finish inside the device's 10-minute call.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export TORCH_CUDA_ARCH_LIST=9.0
DEADLINE_S=${DEADLINE_S:-560}
left() { [ $((DEADLINE_S - SECONDS)) -gt "$1" ]; }
PEERS=${PEERS:-1} UNSLOTH=0 PEER_CONFIGS=${PEER_CONFIGS:-"lora4k_noac_liger_mbs2 lora4k_noac_liger_mbs4"} PEER_TIMEOUT=${PEER_TIMEOUT:-200} \
  MAIN_STEPS=20 RUNS=${RUNS:-"ours_fp8 ours_auto ref_bf16"} OUT=$OUT/perf bash bench/perf.sh > "$OUT/perf_stdout.txt" 2>&1
cp "$OUT/perf/perf.md" "$OUT/perf.md" 2>/dev/null
python3 bench/compare_losses.py "$OUT/perf/ref_bf16" "$OUT/perf/ours_auto" "$OUT/perf/ours_fp8" > "$OUT/losses.md" 2>&1
if left 60; then
  OUT=$OUT SYNC_TIMEOUT=$(( (DEADLINE_S - SECONDS - 10) / 2 )) bash bench/sync_check.sh "lora|peft=lora" "fp8|peft=lora peft.fp8_base=true" > /dev/null
else
  echo "sync check skipped: device time" >> "$OUT/sync.txt"
fi
cp "$OUT/perf/ours_auto/metrics.jsonl" "$OUT/ours_auto.metrics.jsonl" 2>/dev/null
cp "$OUT/perf/ours_fp8/metrics.jsonl" "$OUT/ours_fp8.metrics.jsonl" 2>/dev/null
cp "$OUT/perf/ref_bf16/metrics.jsonl" "$OUT/ref_bf16.metrics.jsonl" 2>/dev/null
{ for f in "$OUT/perf_stdout.txt" "$OUT"/sync_*.log; do echo "== $f"; grep -vE "^step [0-9]+/[0-9]+ " "$f" | tail -25; done; } > "$OUT/tail.txt" 2>&1
find "$OUT" -mindepth 1 -maxdepth 1 ! -name perf.md ! -name losses.md ! -name sync.txt ! -name '*.metrics.jsonl' ! -name tail.txt \
  -exec rm -rf {} +
cat "$OUT/perf.md" "$OUT/sync.txt"; tail -4 "$OUT/losses.md"
