#!/usr/bin/env bash
# Issue 12 (evaluation) on one H200: Llama-3.1-8B shape (random weights), LoRA r=16, bf16, seq 4096.
#  1. training and held-out evaluation in one run: data=synthetic with data.eval_samples=32, so the
#     eval loss pass runs over 32 full 4k rows (eval.micro_batch_size=4) between training steps;
#     the record's eval_tokens_per_s is compared with the training tokens/s of the same run.
#  2. generation: 8 prompts, 64 new tokens each (greedy, KV cache), from the same 8B model, timed by
#     the eval record's eval_generate_seconds (the embedded tiny tokenizer renders the prompts), at
#     three evaluations (steps 0, 1, 2: the first call includes CUDA warm-up), with and without
#     activation checkpointing in training.
# Run on the device machine from the repo root:  bash bench/eval_8b.sh   (writes under $OUT)
set -euo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
TOK=$PWD/ftcluster/assets/tiny-llama
common=(model=llama3_8b peft=lora peft.rank=16 peft.alpha=32 train.micro_batch_size=1 train.activation_checkpointing=true
        optim.lr=1e-4 checkpoint.enabled=false logger=none eval.at_start=false)
python3 -m ftcluster train "${common[@]}" data=synthetic data.max_seq_len=4096 data.eval_samples=32 \
  eval.micro_batch_size=4 eval.every_steps=6 train.max_steps=12 run.dir="$OUT/eval_loss" 2>&1 | grep -v Token | tail -6
for ac in true false; do
python3 -m ftcluster train "${common[@]}" train.activation_checkpointing=$ac eval.at_start=true model.tokenizer="$TOK" \
  data.max_seq_len=4096 eval.max_batches=1 \
  'eval.prompts=[What is 2+2?,Name the capital of France.,Reverse the word apple.,How many letters are in banana?,Say hello politely.,Convert 3 km to meters.,Count to five.,Tell me a short fact about the moon.]' \
  eval.max_new_tokens=64 eval.every_steps=1 train.max_steps=2 run.dir="$OUT/eval_gen_ac_$ac" 2>&1 | grep -v Token | tail -3
done
python3 - "$OUT" <<'PY'
import json, sys, statistics
out = sys.argv[1]
def recs(run): return [json.loads(l) for l in open(f"{out}/{run}/metrics.jsonl") if l.strip()]
r = recs("eval_loss")
train = [x["tokens_per_s"] for x in r if "loss" in x][2:]  # steps 3-12: past warm-up
ev = [x for x in r if x.get("event") == "eval"]
gen = {ac: [x["eval_generate_seconds"] for x in recs(f"eval_gen_ac_{ac}") if x.get("event") == "eval"]
       for ac in ("true", "false")}
rows = [("training tokens/s (steps 3-12, median)", f"{statistics.median(train):,.0f}"),
        ("eval tokens/s (median of %d evals)" % len(ev), f"{statistics.median(x['eval_tokens_per_s'] for x in ev):,.0f}"),
        ("eval / training", f"{statistics.median(x['eval_tokens_per_s'] for x in ev) / statistics.median(train):.2f}x"),
        ("generation: prompts x new tokens", "8 x 64"),
        ("generation seconds at steps 0, 1, 2 (activation checkpointing on)", ", ".join(map(str, gen["true"]))),
        ("generation seconds at steps 0, 1, 2 (activation checkpointing off)", ", ".join(map(str, gen["false"])))]
text = "| measure | value |\n| --- | --- |\n" + "\n".join(f"| {a} | {b} |" for a, b in rows)
open(f"{out}/eval_8b.md", "w").write(text + "\n")
print(text)
PY
