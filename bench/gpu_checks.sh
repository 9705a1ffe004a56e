#!/usr/bin/env bash
# Issue 18's GPU checks, in one device command (same machine as bench/perf.sh, from the repo root,
# .whl_lite carried; see ../shared/device/README.md), everything gathered into at most 8 files of
# $OUT (the device returns no more):
#   1. bench/sync_check.sh (tests/test_gpu.py's runs, by hand): no host sync inside training steps
#      (debug.sync_check) on the default job, LoRA, the FP8 base and without Liger, and the check
#      catching a deliberate sync (debug.sync_at_step) -> sync.txt;
#   2. QLoRA's cost: bench/perf.sh's ours_auto and ours_qlora_auto rows (both with the auto layout)
#      -> perf.md, ours_auto.metrics.jsonl, ours_qlora_auto.metrics.jsonl;
#   3. the "bf16 path" reference for ours_auto (perf.sh's ref_bf16 row: the same 8B job and data with
#      Liger and the fused LoRA linear off and the same micro-batches), whose losses ours_auto must
#      match within bf16 noise (bench/compare_losses.py) -> ref_bf16.metrics.jsonl;
#   4. bench/linear_ce_check.py (the sync-free fused linear cross-entropy against Liger's own and
#      torch, 8B shape) -> linear_ce_check.json; the default job's profile (perf.sh ours_profile)
#      -> profile_ops.txt, profile_summary.json.
# The planner's table (bench/plan_check.sh) takes a device command of its own (about 5 minutes):
#   OUT=$OUT bash bench/plan_check.sh
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export TORCH_CUDA_ARCH_LIST=9.0
python3 bench/linear_ce_check.py > "$OUT/linear_ce_check.json" 2> "$OUT/linear_ce_check.err"; tail -c 1500 "$OUT/linear_ce_check.json"; tail -5 "$OUT/linear_ce_check.err"
OUT=$OUT bash bench/sync_check.sh
PEERS=0 UNSLOTH=0 MAIN_STEPS=${MAIN_STEPS:-20} SHORT_STEPS=${SHORT_STEPS:-10} RUNS="ours_auto ours_qlora_auto ours_profile ref_bf16" \
  bash bench/perf.sh > "$OUT/perf_stdout.txt" 2>&1
python3 bench/compare_losses.py "$OUT/ref_bf16" "$OUT/ours_auto" 2>&1 | tail -25 > "$OUT/sync.txt.losses"; cat "$OUT/sync.txt.losses" >> "$OUT/sync.txt"
# Gather as we go (at most 8 files come back; a command cut by the device's limit keeps what is here).
for n in ours_auto ours_qlora_auto ref_bf16; do cp "$OUT/$n/metrics.jsonl" "$OUT/$n.metrics.jsonl" 2>/dev/null; done
cp "$OUT/ours_profile/profile/rank0_ops.txt" "$OUT/profile_ops.txt" 2>/dev/null
cp "$OUT/ours_profile/profile/rank0_summary.json" "$OUT/profile_summary.json" 2>/dev/null
find "$OUT" -mindepth 1 -maxdepth 1 ! -name sync.txt ! -name perf.md ! -name '*.metrics.jsonl' ! -name 'profile_*' \
  ! -name linear_ce_check.json -exec rm -rf {} +
cat "$OUT/perf.md" 2>/dev/null
