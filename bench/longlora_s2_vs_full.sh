#!/usr/bin/env bash
# Issue 6: S2-Attn (peft=longlora, G = N/4) vs full attention (peft=lora, sdpa) on one H200.
# Llama-3.1-8B shape (model=llama3_8b, random weights), LoRA r=16 on all linear layers, bf16,
# activation checkpointing, data=synthetic, micro-batch 1, FSDP2 world size 1, no checkpoints.
#
#   bash bench/longlora_s2_vs_full.sh [PHASE...]      run from the repo root; results under $OUT
#
# Phases (default: all four, in this order; times are estimates for an H200, not readings):
#   gate         attention alone (bench/longlora_kernel.py: fwd+bwd of one layer, flash SDPA only),
#                then ours with full attention at 32k, `peer_lora.py lora32k_liger` (transformers +
#                peft + Liger; the issue's bar: ours must be no slower), S2-Attn at 32k, and ours
#                with full attention at 32k without Liger.                               ~5 min
#   sweep        S2-Attn and full attention at 16k and 64k.                              ~5 min
#   maxctx-s2    longest context that completes one optimizer step with S2-Attn: probes from
#                MAXCTX_START up (or down) by MAXCTX_STEP to the first OOM, then one probe
#                half-way.                                                               ~6 min
#   maxctx-full  the same with full attention; in the same command after maxctx-s2 it starts from
#                S2's answer (two probes, since activation memory barely depends on the attention);
#                alone, pass MAXCTX_START=<S2 longest> MAXCTX_STEP=<S2 first OOM - longest>.  ~6-10 min
# The device allows 10 minutes a command: run one or two phases per command (each command gets
# a fresh $OUT), keep each command's $OUT, then `python3 bench/longlora_report.py DIR...` over all.
#
# Every training run is its own process (an OOM ends that run only). Each phase appends to
# $OUT/status.tsv; bench/longlora_report.py turns status + metrics into $OUT/longlora_summary.md.
# Env: LIGER=true|false (Liger RMSNorm/SwiGLU/RoPE + fused linear CE in ours, model.liger; default
# true when liger_kernel imports), RUN_TIMEOUT (s, per run, default 900), MAXCTX_START (131072),
# MAXCTX_STEP (32768), MAXCTX_LIMIT (1048576, never probe beyond). SMOKE=1: a tiny model and short
# sequences (a CPU dry run of this script's logic; no numbers of any meaning).
set -uo pipefail   # no -e: a failed run is a result, not the end of the script
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
REPO=$(pwd)
RUN_TIMEOUT=${RUN_TIMEOUT:-900}
K=1024; [ "${SMOKE:-0}" = 1 ] && K=8   # one "k" of tokens; SMOKE=1: "32k" is 256 tokens
MAXCTX_START_SET=${MAXCTX_START:+1}
MAXCTX_START=${MAXCTX_START:-$((128 * K))}
MAXCTX_STEP=${MAXCTX_STEP:-$((32 * K))}
MAXCTX_LIMIT=${MAXCTX_LIMIT:-1048576}
PHASES=("$@"); [ ${#PHASES[@]} -eq 0 ] && PHASES=(gate sweep maxctx-s2 maxctx-full)

if [ -z "${LIGER:-}" ]; then
  if python3 -c "import liger_kernel.transformers" 2>/dev/null; then LIGER=true; else LIGER=false; fi
fi
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
  python3 -c "import liger_kernel, importlib.metadata as m; print('liger-kernel', m.version('liger-kernel'))" 2>&1 | tail -1
  echo "LIGER=$LIGER PYTORCH_CUDA_ALLOC_CONF=$PYTORCH_CUDA_ALLOC_CONF"
} | tee -a "$OUT/env.txt"

COMMON=(model=llama3_8b peft.rank=16 peft.alpha=32 data=synthetic data.synthetic_samples=8
        train.micro_batch_size=1 train.grad_accum=1 train.activation_checkpointing=true train.dtype=bf16
        train.log_every=1 optim.lr=1e-4 optim.warmup_steps=0 checkpoint.enabled=false logger=none)
if [ "${SMOKE:-0}" = 1 ]; then
  export TINY=1
  COMMON+=(model.vocab_size=512 model.hidden_size=64 model.intermediate_size=128 model.num_layers=2
           model.num_heads=4 model.num_kv_heads=2 model.max_position_embeddings=1024 train.dtype=fp32)
fi
S2=(peft=longlora)                                   # LoRA + embeddings/norms, S2-Attn, G = N/4
FULL=(peft=lora model.attn_implementation=sdpa)      # LoRA, full causal attention (SDPA / flash)

# run NAME ATTN SEQ STEPS [extra overrides...]: one training process; appends a status line.
run() {
  local name=$1 attn=$2 seq=$3 steps=$4; shift 4
  local method=("${FULL[@]}"); [ "$attn" = s2 ] && method=("${S2[@]}")
  # Past 131072 tokens: extend the context (llama3_8b now ships Llama-3.1's llama3 RoPE scaling,
  # which extend_context_to re-derives from the original 8192; the runs recorded in bench/RESULTS.md
  # predate that and used linear scaling; RoPE type does not change speed or memory).
  local ext=(); [ "$seq" -gt $((128 * K)) ] && ext=(model.rope_scaling_factor=null model.extend_context_to=$seq)
  rm -rf "$OUT/$name"
  local t0=$SECONDS
  timeout "$RUN_TIMEOUT" python3 -m ftcluster train "${COMMON[@]}" "${method[@]}" "${ext[@]}" \
    data.max_seq_len=$seq train.max_steps=$steps model.liger=$LIGER "$@" run.dir="$OUT/$name" \
    > "$OUT/$name.log" 2>&1
  local rc=$? status=ok
  if [ $rc -ne 0 ]; then
    if grep -rqs -E "OutOfMemoryError|CUDA out of memory" "$OUT/$name.log" "$OUT/$name/logs"; then status=oom
    elif [ $rc -eq 124 ]; then status=timeout
    else status=error; fi
  fi
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$attn" "$seq" "$steps" "$status" "$rc" "$((SECONDS - t0))" >> "$OUT/status.tsv"
  echo "== $name ($attn, $seq tokens, $steps steps): $status rc=$rc in $((SECONDS - t0)) s"
  [ "$status" = ok ] && grep -E "^step [0-9]+:" "$OUT/$name.log" | tail -2
  [ "$status" = error ] && tail -20 "$OUT/$name.log"
  [ "$status" = ok ]
}

# Longest context (one optimizer step) for ATTN: from MAXCTX_START up (or down) in MAXCTX_STEP
# steps to the first failure, then one probe half-way between the last success and it.
maxctx() {
  local attn=$1 lo=0 hi=0 seq=$MAXCTX_START
  while [ "$seq" -gt 0 ] && [ "$seq" -le "$MAXCTX_LIMIT" ]; do
    if run "maxctx_${attn}_$seq" "$attn" "$seq" 1; then
      lo=$seq; [ $hi -gt 0 ] && break; seq=$((seq + MAXCTX_STEP))
    else
      [ "$(tail -1 "$OUT/status.tsv" | cut -f5)" = oom ] || { echo "!! $attn $seq failed without OOM: stopping this search"; break; }
      hi=$seq; [ $lo -gt 0 ] && break; seq=$((seq - MAXCTX_STEP))
    fi
  done
  if [ $lo -gt 0 ] && [ $hi -gt 0 ] && [ $((hi - lo)) -gt $((16 * K)) ]; then
    local mid=$(( (lo + hi) / 2 / (8 * K) * (8 * K) ))
    run "maxctx_${attn}_$mid" "$attn" "$mid" 1 && lo=$mid || hi=$mid
  fi
  printf 'maxctx\t%s\tlongest_ok=%s\tfirst_oom=%s\n' "$attn" "$lo" "$hi" | tee -a "$OUT/maxctx.tsv"
}

for phase in "${PHASES[@]}"; do
  case $phase in
    gate)
      # Attention alone first (seconds; fails loudly if SDPA cannot use the flash kernel).
      [ "${SMOKE:-0}" = 1 ] || python3 bench/longlora_kernel.py 16384 32768 65536 2>&1 | tee -a "$OUT/kernel.jsonl"
      # The issue's gate: ours with full attention vs the peer at 32k; then S2 at 32k.
      run full_32k full $((32 * K)) 4
      if [ "${SMOKE:-0}" = 1 ]; then echo "== peer skipped (SMOKE)"
      else (cd "$OUT" && python3 "$REPO/.peer/peer_lora.py" lora32k_liger) 2>&1 | grep -v -E "^\s*$" | tail -3; fi
      run s2_32k s2 $((32 * K)) 4
      [ "$LIGER" = true ] && LIGER=false run full_32k_noliger full $((32 * K)) 4
      ;;
    sweep)
      run s2_16k s2 $((16 * K)) 5
      run full_16k full $((16 * K)) 5
      run s2_64k s2 $((64 * K)) 3
      run full_64k full $((64 * K)) 3
      ;;
    maxctx-s2) maxctx s2 ;;
    maxctx-full)
      # Same command after maxctx-s2: start where S2 stopped (memory hardly depends on the attention).
      if [ -z "${MAXCTX_START_SET:-}" ] && grep -q "^maxctx	s2	" "$OUT/maxctx.tsv" 2>/dev/null; then
        lo=$(grep "^maxctx	s2	" "$OUT/maxctx.tsv" | tail -1 | cut -f3 | cut -d= -f2)
        hi=$(grep "^maxctx	s2	" "$OUT/maxctx.tsv" | tail -1 | cut -f4 | cut -d= -f2)
        if [ "$lo" -gt 0 ] && [ "$hi" -gt "$lo" ]; then MAXCTX_START=$lo; MAXCTX_STEP=$((hi - lo)); fi
      fi
      maxctx full ;;
    *) echo "unknown phase $phase (gate | sweep | maxctx-s2 | maxctx-full)"; exit 2 ;;
  esac
done

python3 bench/summarize.py --skip 1 $(for d in "$OUT"/*/; do [ -f "$d/metrics.jsonl" ] && echo "$d"; done) \
  $( [ -f "$OUT/peer_lora.jsonl" ] && echo "$OUT/peer_lora.jsonl") > "$OUT/summarize.txt" 2>&1
python3 bench/longlora_report.py "$OUT" | tee "$OUT/longlora_summary.md"
