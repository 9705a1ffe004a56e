#!/usr/bin/env bash
# Issue 2 baseline: Llama-3.1-8B shape (random weights), LoRA r=16 on all linear layers, bf16,
# activation checkpointing, seq 4096, micro-batch 1, one H200, FSDP2 (world size 1), next to the
# peer baseline (plain transformers + peft, ../shared/bench/peer_lora.py copied to .peer/) in the
# same command. Run on the device machine from the repo root:
#   bash bench/spine_8b_lora.sh      (writes under $OUT)
set -euo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
(cd "$OUT" && python3 "$OLDPWD/.peer/peer_lora.py" lora4k) 2>&1 | tail -3
for steps in 14; do
  python3 -m ftcluster train model=llama3_8b peft=lora peft.rank=16 peft.alpha=32 data=synthetic \
    data.max_seq_len=4096 train.micro_batch_size=1 train.activation_checkpointing=true \
    train.max_steps=$steps optim.lr=1e-4 checkpoint.enabled=false run.dir="$OUT/ours_fsdp2_lora4k" 2>&1 | tail -4
done
python3 bench/summarize.py "$OUT/ours_fsdp2_lora4k" "$OUT/peer_lora.jsonl" | tee "$OUT/summary.md"
