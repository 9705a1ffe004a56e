#!/usr/bin/env bash
# Issue 7 (a): Llama-3.1-70B shape, random weights created directly into the (world-1) FSDP2
# shards on the GPU, QLoRA (NF4 + double quantisation, bf16 compute, LoRA r=16 on every linear),
# sequence 4096, activation checkpointing, ONE H200. Then an adapter-only checkpoint and a resume.
#   bash bench/big_70b_qlora_1gpu.sh          (results under $OUT; STEPS, SEQ override)
source "$(dirname "$0")/big_common.sh"
STEPS=${STEPS:-8}; SEQ=${SEQ:-4096}
COMMON=(model=llama3_70b peft=qlora peft.rank=16 peft.alpha=32 data=synthetic data.synthetic_samples=64
        data.max_seq_len=$SEQ train.micro_batch_size=1 train.activation_checkpointing=true train.dtype=bf16
        optim.lr=1e-4 optim.warmup_steps=0 logger=none launcher.nproc_per_node=1 checkpoint.every_steps=$STEPS)
train qlora70b_1gpu 420 "${COMMON[@]}" train.max_steps=$STEPS
# Resume the same run for 2 more steps: rebuilds the NF4 base from the seed, loads adapters + optimizer.
train qlora70b_1gpu 240 "${COMMON[@]}" train.max_steps=$((STEPS + 2))
du -sh "$WORK/qlora70b_1gpu/checkpoints"/step_* 2>&1 | tee -a "$OUT/checkpoint_sizes.txt"
python3 bench/big_report.py "$OUT/report.jsonl" "$WORK/qlora70b_1gpu" | tee "$OUT/summary.md"
