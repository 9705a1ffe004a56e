#!/usr/bin/env bash
# Issue 7 (b): Llama-3.1-70B shape, random weights, bf16 LoRA r=16 (no quantisation), FSDP2 over
# TWO H200s, sequence 4096, activation checkpointing; an adapter-only checkpoint (checkpoint
# seconds) and a resume of it (load seconds in the resume event).
#   bash bench/big_70b_lora_2gpu.sh           (results under $OUT; STEPS, SEQ override)
source "$(dirname "$0")/big_common.sh"
STEPS=${STEPS:-8}; SEQ=${SEQ:-4096}
COMMON=(model=llama3_70b peft=lora peft.rank=16 peft.alpha=32 data=synthetic data.synthetic_samples=64
        data.max_seq_len=$SEQ train.micro_batch_size=1 train.activation_checkpointing=true train.dtype=bf16
        optim.lr=1e-4 optim.warmup_steps=0 logger=none launcher.nproc_per_node=2 checkpoint.every_steps=$STEPS)
train lora70b_2gpu 420 "${COMMON[@]}" train.max_steps=$STEPS
train lora70b_2gpu 240 "${COMMON[@]}" train.max_steps=$((STEPS + 2))
du -sh "$WORK/lora70b_2gpu/checkpoints"/step_* 2>&1 | tee -a "$OUT/checkpoint_sizes.txt"
python3 bench/big_report.py "$OUT/report.jsonl" "$WORK/lora70b_2gpu" | tee "$OUT/summary.md"
