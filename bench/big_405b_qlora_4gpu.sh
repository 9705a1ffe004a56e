#!/usr/bin/env bash
# Issue 7 (c): Llama-3.1-405B shape, random weights, QLoRA (NF4 + double quantisation; the NF4
# state itself sharded by FSDP2 over the four GPUs: ~52 GiB per GPU), bf16 compute, LoRA r=16,
# sequence 4096 (SEQ), activation checkpointing, >= 5 optimizer steps on FOUR H200s.
#   bash bench/big_405b_qlora_4gpu.sh          (results under $OUT; STEPS, SEQ override)
source "$(dirname "$0")/big_common.sh"
STEPS=${STEPS:-6}; SEQ=${SEQ:-4096}
train qlora405b_4gpu 560 model=llama3_405b peft=qlora peft.rank=16 peft.alpha=32 data=synthetic \
  data.synthetic_samples=64 data.max_seq_len=$SEQ train.micro_batch_size=1 train.activation_checkpointing=true \
  train.dtype=bf16 optim.lr=1e-4 optim.warmup_steps=0 logger=none launcher.nproc_per_node=4 \
  train.max_steps=$STEPS checkpoint.enabled=false
python3 bench/big_report.py --skip 1 "$OUT/report.jsonl" "$WORK/qlora405b_4gpu" | tee "$OUT/summary.md"
