#!/usr/bin/env bash
# Issue 7 (d): an 8B-shape Llama (Llama-3.1-8B shapes, random bf16 weights) written to local disk in
# Hugging Face format shard by shard (16 GB; never a whole model in memory), loaded by the sharded
# loader on TWO GPUs (each rank reads only its slices; peak host RAM per rank recorded), trained a
# few LoRA steps, exported merged (fp32 safetensors shards, 32 GB) with `ftcluster export --merge`,
# reloaded by transformers and compared logit by logit with the trained model.
#   bash bench/big_8b_load_export_2gpu.sh      (results under $OUT; big files under $WORK, ~50 GB)
# If one command would pass 10 minutes, split it on a warm machine ($WORK survives between calls):
#   PHASES=make bash bench/big_8b_load_export_2gpu.sh; PHASES="train export check" bash ...
source "$(dirname "$0")/big_common.sh"
MODEL=$WORK/llama8b_hf; RUN=llama8b_lora_2gpu
PHASES=${PHASES:-make train export check}
has() { [[ " $PHASES " == *" $1 "* ]]; }
t0=$SECONDS
if has make && [ ! -f "$MODEL/model.safetensors.index.json" ]; then
  python3 bench/big_make_hf.py "$MODEL" ${SMOKE:+--tiny --shard-bytes 2e5} 2>&1 | tee "$OUT/make_hf.log"
  echo "make_hf: $((SECONDS - t0)) s" | tee -a "$OUT/timings.txt"
fi
has train || { echo "phases: $PHASES"; exit 0; }
rm -rf "$WORK/$RUN" "$WORK/merged"
train $RUN 300 model=local model.path="$MODEL" peft=lora peft.rank=16 peft.alpha=32 data=synthetic \
  data.synthetic_samples=64 data.max_seq_len=2048 train.micro_batch_size=1 train.activation_checkpointing=true \
  train.dtype=bf16 optim.lr=1e-3 optim.warmup_steps=0 logger=none launcher.nproc_per_node=2 train.max_steps=4 \
  checkpoint.every_steps=4 || exit 1
has export || exit 0
t0=$SECONDS
python3 -m ftcluster export "$WORK/$RUN" "$WORK/merged" --merge --dtype fp32 2>&1 | tail -4 | tee "$OUT/export.log"
echo "export_merged_fp32: $((SECONDS - t0)) s" | tee -a "$OUT/timings.txt"
ls -la "$WORK/merged" | tee -a "$OUT/export.log"
has check || exit 0
t0=$SECONDS
python3 bench/big_check_logits.py "$WORK/$RUN" "$WORK/merged" "$OUT/logits.json" 2>&1 | tail -3
echo "check_logits: $((SECONDS - t0)) s" | tee -a "$OUT/timings.txt"
python3 bench/big_report.py --skip 1 "$OUT/report.jsonl" "$WORK/$RUN" | tee "$OUT/summary.md"
cat "$OUT/timings.txt" "$OUT/logits.json"
