#!/usr/bin/env bash
# Issue 14 (preference training) on one H200: Llama-3.1-8B shape (random weights), LoRA r=16, bf16,
# activation checkpointing, FSDP2 world size 1, prompt + response = 2,048 tokens per sequence.
#  1. sft:    objective=sft on the pairs' sequences as rows (prompt + chosen, prompt + rejected),
#             micro-batch 2 rows: the tokens of one DPO pair per step.
#  2. dpo:    objective=dpo (sigmoid), micro-batch 1 pair (the same 2 rows in one forward), reference
#             = the same model with its adapters disabled (one extra no-grad forward per step).
#  3. simpo:  objective=dpo objective.loss=simpo (reference-free): no reference forward.
# Same data order (data.shuffle=false), same steps; medians of steps 3-12 (past warm-up). tokens/s
# counts real tokens of both sequences; the step-time ratio is SFT tokens/s over DPO tokens/s
# (issue: the reference forward should cost at most ~1.6x SFT's step time).
# Run on the device machine from the repo root:  bash bench/dpo_8b.sh   (writes under $OUT)
# CPU smoke test of the command line (tiny shape, seconds):  SMOKE=1 OUT=/tmp/dpo_smoke bash bench/dpo_8b.sh
set -euo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
TOK=$PWD/ftcluster/assets/tiny-llama
if [[ "${SMOKE:-0}" == 1 ]]; then
  shape=(model=llama3_8b model.vocab_size=1024 model.hidden_size=64
         model.intermediate_size=128 model.num_layers=2 model.num_heads=4 model.num_kv_heads=2)
  prompt=120; response=6; steps=4
else
  shape=(model=llama3_8b); prompt=1535; response=511; steps=12
fi
python3 bench/dpo_pairs.py "$OUT/data" --pairs 32 --prompt-tokens $prompt --response-tokens $response
common=("${shape[@]}" model.tokenizer="$TOK" peft=lora peft.rank=16 peft.alpha=32 train.activation_checkpointing=true
        optim.lr=1e-5 checkpoint.enabled=false logger=none data=jsonl data.format=prompt_completion
        data.max_seq_len=$((prompt + response + 2)) data.shuffle=false train.max_steps=$steps eval.num_prompts=0)
python3 -m ftcluster train "${common[@]}" train.micro_batch_size=2 data.path="$OUT/data/sft.jsonl" \
  run.dir="$OUT/sft" 2>&1 | grep -v Token | tail -3
python3 -m ftcluster train "${common[@]}" objective=dpo train.micro_batch_size=1 data.path="$OUT/data/pairs.jsonl" \
  run.dir="$OUT/dpo" 2>&1 | grep -v Token | tail -3
python3 -m ftcluster train "${common[@]}" objective=dpo objective.loss=simpo objective.beta=2.0 train.micro_batch_size=1 \
  data.path="$OUT/data/pairs.jsonl" run.dir="$OUT/simpo" 2>&1 | grep -v Token | tail -3
python3 - "$OUT" <<'PY'
import json, statistics, sys
out = sys.argv[1]
def steps(run): return [json.loads(l) for l in open(f"{out}/{run}/metrics.jsonl") if l.strip() and '"loss"' in l][2:]
def med(rs, k): return statistics.median(r[k] for r in rs) if rs and all(r.get(k) is not None for r in rs) else None
def fmt(v, spec): return "n/a" if v is None else format(v, spec)
runs = {run: steps(run) for run in ("sft", "dpo", "simpo")}
sft_tps = med(runs["sft"], "tokens_per_s")
lines = ["| run | tokens/s | step time vs SFT | peak GiB allocated | reserved GiB | last loss |", "| --- | --- | --- | --- | --- | --- |"]
for run, rs in runs.items():
    tps = med(rs, "tokens_per_s")
    lines.append(f"| {run} | {fmt(tps, ',.0f')} | {fmt(sft_tps / tps if tps else None, '.2f')}x | "
                 f"{fmt(max((r.get('mem_gib') or 0) for r in rs) or None, '.2f')} | "
                 f"{fmt(max((r.get('mem_reserved_gib') or 0) for r in rs) or None, '.2f')} | {rs[-1]['loss']:.4f} |")
text = "\n".join(lines)
open(f"{out}/dpo_8b.md", "w").write(text + "\n")
print(text)
PY
