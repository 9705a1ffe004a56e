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
