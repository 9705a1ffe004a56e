#!/usr/bin/env bash
# Issue 18's GPU checks, in one device command (same machine as bench/perf.sh, from the repo root,
# .whl_lite carried; see ../shared/device/README.md), everything gathered into at most 8 files of
# $OUT (the device returns no more):
#   1. tests/test_gpu.py's runs, by hand (the device image has no pytest): no host sync inside
#      training steps (debug.sync_check) on the default job (packed, tiny model, fused LoRA and
#      Liger on), and the check catching a deliberate sync (debug.sync_at_step) -> sync.txt;
#   2. QLoRA's cost: bench/perf.sh's ours_auto and ours_qlora_auto rows (both with the auto layout)
#      -> perf.md, ours_auto.metrics.jsonl, ours_qlora_auto.metrics.jsonl;
#   3. the "bf16 path" reference for ours_auto: the same 8B job and data with Liger and the fused
#      LoRA linear off and the same micro-batches, whose losses ours_auto must match within bf16
#      noise (bench/compare_losses.py) -> ref.metrics.jsonl;
#   4. bench/linear_ce_check.py (the sync-free fused linear cross-entropy against Liger's own and
#      torch, 8B shape) -> linear_ce_check.json; the default job's profile (perf.sh ours_profile)
#      -> profile_ops.txt, profile_summary.json.
# The planner's table (bench/plan_check.sh) takes a device command of its own (about 5 minutes):
#   OUT=$OUT bash bench/plan_check.sh
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export TORCH_CUDA_ARCH_LIST=9.0
# A cold machine spends most of a minute compiling Triton/flex-attention kernels before the first
# step (2026-12-02: three 45-s timeouts), hence SYNC_TIMEOUT.
B="train.max_steps=10 train.log_every=4 debug.sync_check=true eval.every_steps=0 eval.at_start=false checkpoint.enabled=false logger=none"
python3 bench/linear_ce_check.py > "$OUT/linear_ce_check.json" 2> "$OUT/linear_ce_check.err"; tail -c 1500 "$OUT/linear_ce_check.json"; tail -5 "$OUT/linear_ce_check.err"
# Liger's own fused linear cross-entropy (liger-kernel 0.8.5) reads a count with .item() in every
# forward (2026-12-03, bench/RESULTS.md); ours (ftcluster/liger.py) does not. "noliger" checks the
# step without any Liger kernel, "lora" the fused LoRA node (the default job is a full fine-tune), and "catch" adds a deliberate sync that the check must catch.
for c in ${SYNC_CASES:-"default|" "lora|peft=lora" "fp8|peft=lora peft.fp8_base=true" "noliger|model.liger=false" "catch|debug.sync_at_step=5"}; do
  n=${c%%|*}; o=${c#*|}
  timeout "${SYNC_TIMEOUT:-150}" python3 -m ftcluster train $B $o run.dir="$OUT/sync_$n" > "$OUT/sync_$n.log" 2>&1
  rc=$?
  { echo "$n rc=$rc logged_steps=$(grep -c '"loss"' "$OUT/sync_$n/metrics.jsonl" 2>/dev/null)" \
         "layout: $(grep -o '"micro_batch_size".*"fused": [a-z]*' "$OUT/sync_$n/metrics.jsonl" 2>/dev/null | head -1)"
    grep -iE "synchroniz|Error" "$OUT/sync_$n.log" | head -3; } | tee -a "$OUT/sync.txt"
done  # expected: default and noliger rc=0 logged_steps=3; catch rc!=0 naming the synchronizing operation
PEERS=0 UNSLOTH=0 MAIN_STEPS=${MAIN_STEPS:-20} SHORT_STEPS=${SHORT_STEPS:-10} RUNS="ours_auto ours_qlora_auto ours_profile" \
  bash bench/perf.sh > "$OUT/perf_stdout.txt" 2>&1
timeout 200 python3 -m ftcluster train model=llama3_8b peft=lora data=synthetic data.synthetic_samples=512 data.max_seq_len=4096 \
  train.global_batch_size=8 logger=none checkpoint.enabled=false eval.every_steps=0 eval.at_start=false data.eval_path=null \
  train.max_steps="${REF_STEPS:-20}" model.liger=false peft.fused=false train.activation_checkpointing=none train.micro_batch_size=4 \
  run.dir="$OUT/ref" 2>&1 | grep -E "^step|rror" | tail -3
python3 bench/compare_losses.py "$OUT/ref" "$OUT/ours_auto" 2>&1 | tail -25 > "$OUT/sync.txt.losses"; cat "$OUT/sync.txt.losses" >> "$OUT/sync.txt"
# Gather as we go (at most 8 files come back; a command cut by the device's limit keeps what is here).
for n in ours_auto ours_qlora_auto ref; do cp "$OUT/$n/metrics.jsonl" "$OUT/$n.metrics.jsonl" 2>/dev/null; done
cp "$OUT/ours_profile/profile/rank0_ops.txt" "$OUT/profile_ops.txt" 2>/dev/null
cp "$OUT/ours_profile/profile/rank0_summary.json" "$OUT/profile_summary.json" 2>/dev/null
find "$OUT" -mindepth 1 -maxdepth 1 ! -name sync.txt ! -name perf.md ! -name '*.metrics.jsonl' ! -name 'profile_*' \
  ! -name linear_ce_check.json -exec rm -rf {} +
cat "$OUT/perf.md" 2>/dev/null
