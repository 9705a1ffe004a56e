#!/usr/bin/env bash
# Issue 18's "no host sync in the step" on a GPU (tests/test_gpu.py's cases, run by hand: the device
# image has no pytest): each case trains the embedded default (tiny model) for 10 steps with
# debug.sync_check=true (steps 3-10 under torch.cuda.set_sync_debug_mode("error")) and appends one
# line to $OUT/sync.txt: rc, logged steps, the layout, and any synchronizing operation named.
#   bash bench/sync_check.sh ["NAME|OVERRIDES" ...]     (default: every case below)
# Expected: rc=0 and logged_steps=3 for all but `catch`, which must fail naming the synchronizing
# operation (debug.sync_at_step adds one). SYNC_TIMEOUT: seconds per case (a cold machine spends most
# of a minute compiling Triton/flex-attention kernels before the first step).
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
B="train.max_steps=10 train.log_every=4 debug.sync_check=true eval.every_steps=0 eval.at_start=false checkpoint.enabled=false logger=none"
# Liger's own fused linear cross-entropy (liger-kernel 0.8.5) reads a count with .item() in every
# forward (2026-12-03, bench/RESULTS.md); ours (ftcluster/liger.py) does not. "noliger" checks the
# step without any Liger kernel, "lora" the fused LoRA node (the default job is a full fine-tune),
# "fp8" the FP8 base, and "catch" adds a deliberate sync that the check must catch.
[ $# -gt 0 ] || set -- "default|" "lora|peft=lora" "fp8|peft=lora peft.fp8_base=true" "noliger|model.liger=false" \
  "catch|debug.sync_at_step=5"
for c in "$@"; do
  n=${c%%|*}; o=${c#*|}
  timeout "${SYNC_TIMEOUT:-150}" python3 -m ftcluster train $B $o run.dir="$OUT/sync_$n" > "$OUT/sync_$n.log" 2>&1
  rc=$?
  { echo "$n rc=$rc logged_steps=$(grep -c '"loss"' "$OUT/sync_$n/metrics.jsonl" 2>/dev/null)" \
         "layout: $(grep -o '"micro_batch_size".*"fused": [a-z]*' "$OUT/sync_$n/metrics.jsonl" 2>/dev/null | head -1)"
    grep -iE "synchroniz|Error" "$OUT/sync_$n.log" | head -3; } | tee -a "$OUT/sync.txt"
done
