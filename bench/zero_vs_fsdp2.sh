#!/usr/bin/env bash
# Issue 3 GPU criterion: DeepSpeed ZeRO-3 and FSDP2 on the same jobs, same machine, same command:
#   lora8b  Llama-3.1-8B shape (random weights), LoRA r=16 on all linear layers, seq 4096, micro-batch 1,
#           activation checkpointing, 20 steps
#   full1b  Llama-3.2-1B shape (1.24B parameters, tied embeddings), full fine-tune, seq 4096,
#           micro-batch 1, activation checkpointing, 20 steps
# each on 2 GPUs (launcher.nproc_per_node=2) with parallel=fsdp2 and parallel=zero3. Writes the run
# dirs, summary.md (tokens/s/GPU, MFU, peak memory of rank 0) and losses.md (losses side by side,
# relative difference to FSDP2) under $OUT. Run on the device machine from the repo root:
#   bash bench/zero_vs_fsdp2.sh [lora8b|full1b|all]      (default: all)
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
WHICH=${1:-all}
# DeepSpeed's op builder (it probes its ops at start) breaks on torch's default 9.0a arch list.
export TORCH_CUDA_ARCH_LIST=9.0
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, deepspeed; print('torch', torch.__version__, 'deepspeed', deepspeed.__version__)" 2>&1 | tail -1 | tee -a "$OUT/gpu.txt"

COMMON=(launcher.nproc_per_node=2 data=synthetic data.max_seq_len=4096 train.micro_batch_size=1
        train.activation_checkpointing=true checkpoint.enabled=false train.max_steps=20 seed=0)
declare -A JOB
JOB[lora8b]="model=llama3_8b peft=lora peft.rank=16 peft.alpha=32 optim.lr=1e-4"
JOB[full1b]="model=llama32_1b peft=none optim.lr=2e-5"

jobs=(lora8b full1b); [ "$WHICH" != all ] && jobs=("$WHICH")
dirs=()
for job in "${jobs[@]}"; do
  for par in fsdp2 zero3; do
    dir="$OUT/${job}_${par}"
    echo "=== $job parallel=$par"
    # shellcheck disable=SC2086
    python3 -m ftcluster train "${COMMON[@]}" ${JOB[$job]} parallel=$par run.dir="$dir" > "$OUT/${job}_${par}.log" 2>&1
    echo "exit $?"; tail -3 "$OUT/${job}_${par}.log"
    dirs+=("$dir")
  done
done
python3 bench/summarize.py "${dirs[@]}" | tee "$OUT/summary.md"
for job in "${jobs[@]}"; do
  python3 bench/compare_losses.py "$OUT/${job}_fsdp2" "$OUT/${job}_zero3" | tee -a "$OUT/losses.md"
done
