#!/usr/bin/env bash
# Issue 7 (a): Llama-3.1-70B shape, random weights created directly into the (world-1) FSDP2
# shards on the GPU, QLoRA (NF4 + double quantisation, bf16 compute, LoRA r=16 on every linear),
# sequence 4096, activation checkpointing, ONE H200. Then an adapter-only checkpoint and a resume
# (rebuilds the NF4 base from the seed, loads adapters + optimizer).
#   bash bench/big_70b_qlora_1gpu.sh          (results under $OUT; STEPS, SEQ override)
source "$(dirname "$0")/big_common.sh"
train_then_resume qlora70b_1gpu "${STEPS:-8}" "${BIG70[@]}" peft=qlora data.max_seq_len="${SEQ:-4096}" \
  launcher.nproc_per_node=1
