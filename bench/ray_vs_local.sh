#!/usr/bin/env bash
# Issue 4: what launcher=ray costs. The Llama-3.1-8B-shaped LoRA job (random weights, seq 4096,
# micro-batch 1, activation checkpointing, FSDP2 over 2 ranks) on 2 H200s, twice in one command:
# through launcher=local (torch elastic, 2 ranks) and through launcher=ray (Ray Train TorchTrainer,
# 2 GPU workers; Ray started inside this command by launcher.address=local), then tokens/s per GPU
# of each (median of steps 4-20) and the ratio. Both runs get OMP_NUM_THREADS=8.
#
# On the device machine (nvidia-h200-x2), from the repo root, carrying .whl (../shared/device/README.md):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD || exit; bash bench/ray_vs_local.sh
# Writes under $OUT: gpu.txt, local_lora8b/, ray_lora8b/, *.log, summary.md.
set -euo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
# NVLink multicast stays off on the shared machine (device README); Ray workers inherit these.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export OMP_NUM_THREADS=8 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=disabled   # a private, in-command Ray instance
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, ray, transformers; print('torch', torch.__version__, 'ray', ray.__version__, 'transformers', transformers.__version__, 'gpus', torch.cuda.device_count())" | tee -a "$OUT/gpu.txt"

JOB=(model=llama3_8b peft=lora data=synthetic data.max_seq_len=4096 train.micro_batch_size=1
     train.activation_checkpointing=true checkpoint.enabled=false train.max_steps=20)

t0=$SECONDS
python3 -m ftcluster train "${JOB[@]}" launcher=local launcher.nproc_per_node=2 \
  run.dir="$OUT/local_lora8b" > "$OUT/local.log" 2>&1 || { tail -40 "$OUT/local.log"; exit 1; }
t_local=$((SECONDS - t0)); tail -3 "$OUT/local.log"

t0=$SECONDS
python3 -m ftcluster train "${JOB[@]}" launcher=ray launcher.address=local launcher.num_workers=2 \
  launcher.gpus_per_worker=1 launcher.cpus_per_worker=8 \
  run.dir="$OUT/ray_lora8b" > "$OUT/ray.log" 2>&1 || { grep -v PlacementGroupCleaner "$OUT/ray.log" | tail -60; exit 1; }
t_ray=$((SECONDS - t0)); grep -v PlacementGroupCleaner "$OUT/ray.log" | grep -A3 "pre-flight ok" | head -4
grep -v PlacementGroupCleaner "$OUT/ray.log" | tail -4

python3 bench/summarize.py "$OUT/local_lora8b" "$OUT/ray_lora8b" | tee "$OUT/summary.md"
T_LOCAL=$t_local T_RAY=$t_ray python3 - "$OUT/summary.md" <<'EOF' | tee -a "$OUT/summary.md"
import json, os, sys
rows = {r["name"]: r for r in map(json.loads, (l for l in open(sys.argv[1]) if l.startswith("{")))}
loc, ray = rows["local_lora8b"]["tok_s_per_gpu"], rows["ray_lora8b"]["tok_s_per_gpu"]
print(f"\nray / local tokens/s per GPU: {ray / loc:.4f} (overhead {100 * (1 - ray / loc):+.2f}%)")
print(f"wall seconds, whole command incl. start-up: local {os.environ['T_LOCAL']}, ray {os.environ['T_RAY']}")
same = rows["local_lora8b"]["losses"] == rows["ray_lora8b"]["losses"]
print(f"same losses for steps 4-20: {same}")
EOF
