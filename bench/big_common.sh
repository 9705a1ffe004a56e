# Sourced by bench/big_*.sh (issue 7: 70B-405B loading, QLoRA, adapter checkpoints, export).
# Writes small results under $OUT (it comes back); big files (models, checkpoints) go under $WORK.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
WORK=${WORK:-/tmp/big}; mkdir -p "$WORK"
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, transformers, peft, bitsandbytes as b; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'bitsandbytes', b.__version__)"
  free -g | head -2; df -h "$WORK" | tail -1
} 2>&1 | tee -a "$OUT/env.txt"

# SMOKE=1: the same commands on a tiny model of the same architecture (a CPU check of the scripts).
SMOKE_ARGS=()
[ "${SMOKE:-0}" = 1 ] && SMOKE_ARGS=(model.vocab_size=512 model.hidden_size=64 model.intermediate_size=128
  model.num_layers=2 model.num_heads=4 model.num_kv_heads=2 data.max_seq_len=64)

# train NAME TIMEOUT_S overrides...: one `ftcluster train`, its log in $OUT/NAME.log, run dir in $WORK/NAME.
train() {
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo "== $name: python3 -m ftcluster train $* ${SMOKE_ARGS[*]} run.dir=$WORK/$name" | tee -a "$OUT/commands.txt"
  timeout "$limit" python3 -m ftcluster train "$@" "${SMOKE_ARGS[@]}" run.dir="$WORK/$name" > "$OUT/$name.log" 2>&1
  local rc=$?
  cp "$WORK/$name/metrics.jsonl" "$OUT/$name.metrics.jsonl" 2>/dev/null
  for f in "$WORK/$name"/logs/rank*.error; do [ -f "$f" ] && cp "$f" "$OUT/$name.$(basename "$f")"; done
  local status=ok
  if [ $rc -ne 0 ]; then
    if grep -rqs -E "OutOfMemoryError|CUDA out of memory" "$OUT/$name.log" "$WORK/$name/logs"; then status=oom
    elif [ $rc -eq 124 ]; then status=timeout; else status=error; fi
  fi
  printf '%s\t%s\t%s\t%ss\n' "$name" "$status" "$rc" "$((SECONDS - t0))" | tee -a "$OUT/status.tsv"
  [ "$status" = ok ] || tail -25 "$OUT/$name.log"
  [ "$status" = ok ]
}

# train_then_resume NAME STEPS overrides...: train STEPS steps with a checkpoint at STEPS, then the same
# command to STEPS+2 (a resume from the adapter-only checkpoint); checkpoint sizes and the report
# row under $OUT.
train_then_resume() {
  local name=$1 steps=$2; shift 2
  train "$name" 420 "$@" checkpoint.every_steps="$steps" train.max_steps="$steps"
  train "$name" 240 "$@" checkpoint.every_steps="$steps" train.max_steps=$((steps + 2))
  du -sh "$WORK/$name/checkpoints"/step_* 2>&1 | tee -a "$OUT/checkpoint_sizes.txt"
  python3 bench/big_report.py "$OUT/report.jsonl" "$WORK/$name" | tee "$OUT/summary.md"
}

# The 70B runs' common job: Llama-3.1-70B shape, random weights, LoRA r=16 on every linear, synthetic
# data, micro-batch 1, activation checkpointing, bf16.
BIG70=(model=llama3_70b peft.rank=16 peft.alpha=32 data=synthetic data.synthetic_samples=64
       train.micro_batch_size=1 train.activation_checkpointing=true train.dtype=bf16
       optim.lr=1e-4 optim.warmup_steps=0 logger=none)
