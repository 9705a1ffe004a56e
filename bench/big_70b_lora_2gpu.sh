#!/usr/bin/env bash
# Issue 7 (b): Llama-3.1-70B shape, random weights, bf16 LoRA r=16 (no quantisation), FSDP2 over
# TWO H200s, sequence 4096, activation checkpointing; an adapter-only checkpoint (checkpoint
# seconds) and a resume of it (load seconds in the resume event).
#   bash bench/big_70b_lora_2gpu.sh           (results under $OUT; STEPS, SEQ override)
source "$(dirname "$0")/big_common.sh"
train_then_resume lora70b_2gpu "${STEPS:-8}" "${BIG70[@]}" peft=lora data.max_seq_len="${SEQ:-4096}" \
  launcher.nproc_per_node=2
