#!/usr/bin/env bash
# Issue 18's GPU checks that are not speed claims, in one device command after bench/perf.sh
# (same machine, from the repo root, .whl carried; see ../shared/device/README.md):
#   1. tests/test_gpu.py's runs: no host sync inside training steps (debug.sync_check) on the
#      default packed job and LoRA with offloaded checkpointing, and the check catching a deliberate
#      sync (debug.sync_at_step);
#   2. bench/plan_check.sh: the planner's predicted peak against measured max_memory_reserved
#      (ROWS: which of its rows, at least 10);
#   3. the "bf16 path" reference for perf.sh's ours_auto: the same 8B job and data with Liger off
#      and the same micro-batches (REF_STEPS steps), whose losses perf's auto run must match
#      within bf16 noise (compared by bench/compare_losses.py when perf's losses are at hand).
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export TORCH_CUDA_ARCH_LIST=9.0
# The device image has no pytest: tests/test_gpu.py's runs, by hand. A cold machine spends most
# of a minute compiling Triton/flex-attention kernels before the first step (2026-12-02: three
# 45-s timeouts), hence SYNC_TIMEOUT.
B="train.max_steps=10 train.log_every=4 debug.sync_check=true eval.every_steps=0 eval.at_start=false checkpoint.enabled=false logger=none"
for c in "default|" "lora-offload|peft=lora train.activation_checkpointing=offload" "catch|debug.sync_at_step=5"; do
  n=${c%%|*}; o=${c#*|}
  timeout "${SYNC_TIMEOUT:-150}" python3 -m ftcluster train $B $o run.dir="$OUT/sync_$n" > "$OUT/sync_$n.log" 2>&1
  echo "$n rc=$? logged_steps=$(grep -c '"loss"' "$OUT/sync_$n/metrics.jsonl" 2>/dev/null) $(grep -o 'synchroniz[^.]*' "$OUT/sync_$n.log" | head -1)" \
    | tee -a "$OUT/sync.txt"
done  # expected: default and lora-offload rc=0 logged_steps=3; catch rc!=0 with "synchronizing ..."
OUT="$OUT/plan" ONLY="${ROWS:-1 2 3 5 6 7 8 9 10 12}" timeout "${PLAN_TIMEOUT:-300}" bash bench/plan_check.sh 2>&1 | tail -20
timeout 200 python3 -m ftcluster train model=llama3_8b peft=lora data=synthetic data.synthetic_samples=512 data.max_seq_len=4096 \
  train.global_batch_size=8 logger=none checkpoint.enabled=false eval.every_steps=0 eval.at_start=false data.eval_path=null \
  train.max_steps="${REF_STEPS:-10}" model.liger=false train.activation_checkpointing=none train.micro_batch_size=4 \
  run.dir="$OUT/ours_ref_bf16" 2>&1 | grep -E "^step|rror" | tail -3
find "$OUT" -name '*.log' -size +200k -delete
