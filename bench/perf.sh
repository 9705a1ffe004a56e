#!/usr/bin/env bash
# Issue 18 (fast by default), one command on one H200: the peers and ftcluster on the same 8B LoRA
# job (Llama-3.1-8B shape, random weights, LoRA r=16 on all linear layers, bf16, seq 4096,
# synthetic rows), in this order:
#   peer   ../shared/bench/peer_lora.py lora4k lora4k_noac_liger_mbs2 lora4k_noac_liger_mbs4 qlora4k
#          (copied to the git-ignored .peer/ and carried)
#   unsloth ../shared/bench/unsloth_peer.py uns_gc_mb1 uns_nogc_mb4 (wheels in the git-ignored .uns/,
#          made by ../shared/device/make-unsloth-wheels.sh .uns and carried; it installs into its own
#          target because it needs datasets<5)
#   ours   `ftcluster train model=llama3_8b peft=lora data=synthetic data.max_seq_len=4096
#          train.global_batch_size=8` with NO performance setting (the auto layout), then the same
#          with train.memory_budget_gib=17 (Unsloth's default recipe peaks at 16.7 GiB; if the plan
#          finds nothing that fits, the refusal is the result) and 24, then peft=qlora (auto layout),
#          then the auto layout with peft.fused=true (the fused LoRA linear, off by default until
#          this row shows it faster).
# The carry limit (64 MiB) does not hold .whl (ray is 42 MiB) and .uns together: carry .whl_lite
# (.whl without ray; nothing here needs Ray) and .uns. On the device, from the repo root:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl_lite/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD; export TORCH_CUDA_ARCH_LIST=9.0; bash bench/perf.sh
# Whole, it runs past the device's 10-minute limit (2026-12-02: the peers alone took 300 s), so
# PEERS=1|0, UNSLOTH=1|0, PEER_CONFIGS and RUNS (which of our rows: ours_auto ours_budget17
# ours_budget24 ours_qlora_auto ours_auto_fused ours_auto_compile ours_compile_noliger
# ours_offload_mb1 ours_fp8 ours_profile ref_bf16) pick the
# parts of one command; MAIN_STEPS/SHORT_STEPS shorten the runs. Each command's table compares only
# the rows it ran: a ratio needs both sides measured in the same command.
# Unsloth needs a tokenizer whose vocabulary covers the model's 128,256 ids (UNS_TOKENIZER; the
# embedded tiny one, 1,024 tokens, probably caused a device-side assert there).
# It writes $OUT/perf.md (the table and the target checks) and prints it; paste it into
# bench/RESULTS.md. tokens/s: ours = median of the logged steps after warm-up (bench/summarize.py
# --skip), the peers' = their timed window. CPU check of the command lines (tiny model, no peers):
#   TINY=1 bash bench/perf.sh
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
TOK=$PWD/ftcluster/assets/tiny-llama
if [ "${TINY:-0}" = 1 ]; then
  MODEL=(model=tiny); SEQ=256; MAIN=4; SHORT=3; SKIP=1
else
  MODEL=(model=llama3_8b); SEQ=4096; MAIN=${MAIN_STEPS:-20}; SHORT=${SHORT_STEPS:-10}; SKIP=3
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
fi
# PEERS / UNSLOTH (1 or 0) and RUNS (which of our rows) pick the parts, so that the whole fits the
# device's 10-minute calls as two or three commands; each command's table compares only the rows
# it ran (the ratios need both sides in one command).
PART=${PART:-all}
PEERS=${PEERS:-$([ "$PART" = ours ] && echo 0 || echo 1)}
UNSLOTH=${UNSLOTH:-$PEERS}
RUNS=${RUNS:-$([ "$PART" = peers ] && echo "" || echo "ours_auto ours_budget17 ours_budget24 ours_qlora_auto ours_auto_fused")}
if [ "${TINY:-0}" != 1 ] && [ "$PEERS" = 1 ]; then
  (cd "$OUT" && OUT="$OUT" timeout "${PEER_TIMEOUT:-300}" python3 "$OLDPWD/.peer/peer_lora.py" \
     ${PEER_CONFIGS:-lora4k lora4k_noac_liger_mbs2 lora4k_noac_liger_mbs4 qlora4k} > "$OUT/peer_lora.log" 2>&1
   grep SUMMARY "$OUT/peer_lora.log")
fi
if [ "${TINY:-0}" != 1 ] && [ "$UNSLOTH" = 1 ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site_uns .uns/*.whl \
    .whl_lite/bitsandbytes-*.whl 2>/dev/null
  (cd "$OUT" && OUT="$OUT" PYTHONPATH=/tmp/site_uns timeout 330 python3 "$OLDPWD/.uns/unsloth_peer.py" "${UNS_TOKENIZER:-$TOK}" \
     ${UNS_CONFIGS:-uns_gc_mb1 uns_nogc_mb4} > "$OUT/unsloth.log" 2>&1; grep '^{' "$OUT/unsloth.log"; tail -c 3000 "$OUT/unsloth.log" > "$OUT/unsloth_tail.log")
fi
common=("${MODEL[@]}" peft=lora data=synthetic data.synthetic_samples=512 data.max_seq_len=$SEQ train.global_batch_size=8
        logger=none checkpoint.enabled=false eval.every_steps=0 eval.at_start=false data.eval_path=null)
ours() {  # ours NAME STEPS OVERRIDES...
  local name=$1 steps=$2; shift 2
  timeout 420 python3 -m ftcluster train "${common[@]}" train.max_steps="$steps" run.dir="$OUT/$name" "$@" 2>&1 \
    | grep -E "^  memory|^              auto|^step $steps/|rror" | head -12
}
declare -A ARGS=([ours_auto]="$MAIN|" [ours_budget17]="$SHORT|train.memory_budget_gib=17"
  [ours_budget24]="$SHORT|train.memory_budget_gib=24" [ours_qlora_auto]="$SHORT|peft=qlora"
  [ours_auto_fused]="$MAIN|peft.fused=true"  # keep peft.fused off by default unless its row wins
  [ours_auto_compile]="$MAIN|model.compile=true" [ours_compile_noliger]="$MAIN|model.compile=true model.liger=false"
  [ours_offload_mb1]="$SHORT|train.activation_checkpointing=offload train.micro_batch_size=1"  # the 17-GiB layout, forced
  [ours_fp8]="$MAIN|peft.fp8_base=true"  # the frozen base in FP8 (ftcluster/fp8.py), opt-in
  [ours_profile]="8|debug.profile_steps=2 debug.profile_from_step=6"  # where the auto layout's step time goes
  # The "bf16 path" whose losses the default must match (bench/compare_losses.py): no Liger, peft's
  # LoRA forward, no checkpointing, mb 4 (the 8B default's micro-batch); tokens/s not a target.
  [ref_bf16]="$MAIN|model.liger=false peft.fused=false train.activation_checkpointing=none train.micro_batch_size=4")
for r in $RUNS; do
  a=${ARGS[$r]}; steps=${a%%|*}; o=${a#*|}
  ours "$r" "$steps" $o | tee "$OUT/$r.txt"
done
find "$OUT" -name '*_trace.json.gz' -size +30M -delete  # too big to come back from the device; the tables stay
[ -f "$OUT/ours_profile/profile/rank0_summary.json" ] && head -c 1500 "$OUT/ours_profile/profile/rank0_summary.json"
python3 - "$OUT" "$SKIP" <<'PY'
import json, statistics, sys
from pathlib import Path
out, skip = Path(sys.argv[1]), int(sys.argv[2])

def ours(name):
    f = out / name / "metrics.jsonl"
    if not f.is_file():
        return {"error": "no run"}
    recs = [json.loads(l) for l in f.read_text().splitlines() if l.strip()]
    steps = [r for r in recs if "loss" in r][skip:]
    lay = next((r for r in recs if r.get("event") == "layout"), {})
    if not steps:
        return {"error": "no steps", "layout": lay}
    return {"tok_s": statistics.median(r["tokens_per_s_per_gpu"] for r in steps), "layout": lay,
            "peak": max(r.get("mem_gib") or 0 for r in steps), "reserved": max(r.get("mem_reserved_gib") or 0 for r in steps),
            "mfu": statistics.median(r["mfu"] for r in steps) if steps[0].get("mfu") is not None else None,
            "losses": [round(r["loss"], 4) for r in recs if "loss" in r]}

def peers(fname):
    f = out / fname
    return {r["name"]: r for r in map(json.loads, f.read_text().splitlines())} if f.is_file() else {}

p, u = peers("peer_lora.jsonl"), peers("unsloth_peer.jsonl")
tok = lambda d, k: (d.get(k) or {}).get("tok_s")  # noqa: E731
runs = {n: ours(n) for n in ("ours_auto", "ours_budget17", "ours_budget24", "ours_qlora_auto", "ours_auto_fused",
                             "ours_auto_compile", "ours_compile_noliger", "ours_offload_mb1", "ours_fp8", "ref_bf16")}
def lay(r):
    l = r.get("layout") or {}
    if not l:
        return "-"
    ac = l["activation_checkpointing"] + (f" {l['activation_checkpointing_every']}" if l["activation_checkpointing"] == "selective" else "")
    return f"mb {l['micro_batch_size']} x {l['grad_accum']}, ac {ac}, liger {'on' if l['liger'] else 'off'}"
f = lambda v, d=0: "-" if v is None else f"{v:,.{d}f}"  # noqa: E731
lines = ["| run | layout | tokens/s | LoRA-MFU | peak GiB (allocated) | reserved GiB |", "| --- | --- | --- | --- | --- | --- |"]
for name, r in {**{f"peer {k}": v for k, v in p.items()}, **{f"unsloth {k}": v for k, v in u.items()}}.items():
    lines.append(f"| {name} | {r.get('error', '')[:60]} | {f(r.get('tok_s'))} | {f(r.get('mfu_datasheet'), 3)} | {f(r.get('peak_gib'), 1)} | - |")
for name, r in runs.items():
    lines.append(f"| {name} | {lay(r)} {r.get('error', '')} | {f(r.get('tok_s'))} | {f(r.get('mfu'), 3)} | {f(r.get('peak'), 1)} | {f(r.get('reserved'), 1)} |")
a, b, q = runs["ours_auto"].get("tok_s"), runs["ours_budget17"].get("tok_s"), runs["ours_qlora_auto"].get("tok_s")
best_noac = max([v for v in (tok(p, "lora4k_noac_liger_mbs2"), tok(p, "lora4k_noac_liger_mbs4")) if v] or [None], key=lambda v: v or 0)
checks = [("auto >= 2.0x peer lora4k", a, tok(p, "lora4k"), 2.0),
          ("auto >= 1.25x best of peer noac_liger_mbs2/_mbs4", a, best_noac, 1.25),
          ("auto >= 1.1x Unsloth uns_nogc_mb4", a, tok(u, "uns_nogc_mb4"), 1.1),
          ("budget 17 GiB >= 1.0x Unsloth uns_gc_mb1", b, tok(u, "uns_gc_mb1"), 1.0),
          ("budget 24 GiB vs Unsloth uns_gc_mb1 (16.7 GiB)", runs["ours_budget24"].get("tok_s"), tok(u, "uns_gc_mb1"), 1.0),
          ("QLoRA auto >= 0.9x LoRA auto", q, a, 0.9),
          ("peft.fused=true vs auto (> 1: make it the default)", runs["ours_auto_fused"].get("tok_s"), a, 1.0),
          ("offload mb 1 (forced) vs Unsloth uns_gc_mb1", runs["ours_offload_mb1"].get("tok_s"), tok(u, "uns_gc_mb1"), 1.0),
          ("model.compile=true vs auto", runs["ours_auto_compile"].get("tok_s"), a, 1.0),
          ("model.compile=true model.liger=false vs auto", runs["ours_compile_noliger"].get("tok_s"), a, 1.0),
          ("peft.fp8_base=true vs auto", runs["ours_fp8"].get("tok_s"), a, 1.0),
          ("peft.fp8_base=true >= 1.25x best of peer noac_liger_mbs2/_mbs4", runs["ours_fp8"].get("tok_s"), best_noac, 1.25),
          ("peft.fp8_base=true >= 1.1x Unsloth uns_nogc_mb4", runs["ours_fp8"].get("tok_s"), tok(u, "uns_nogc_mb4"), 1.1)]
lines += ["", "| target | ours | baseline | ratio | needed | met |", "| --- | --- | --- | --- | --- | --- |"]
for name, x, base, need in checks:
    ratio = x / base if x and base else None
    lines.append(f"| {name} | {f(x)} | {f(base)} | {f(ratio, 2)} | {need} | {'-' if ratio is None else ('yes' if ratio >= need else 'no')} |")
peak17 = runs["ours_budget17"].get("reserved")
lines.append(f"| budget 17 GiB: peak reserved <= 17 | {f(peak17, 2)} GiB | | | 17 | {'-' if peak17 is None else ('yes' if peak17 <= 17 else 'no')} |")
peak_off = runs["ours_offload_mb1"].get("reserved")
lines.append(f"| offload mb 1 (forced): peak reserved <= 17 | {f(peak_off, 2)} GiB | | | 17 | {'-' if peak_off is None else ('yes' if peak_off <= 17 else 'no')} |")
peak24 = runs["ours_budget24"].get("reserved")
lines.append(f"| budget 24 GiB: peak reserved <= 24 | {f(peak24, 2)} GiB | | | 24 | {'-' if peak24 is None else ('yes' if peak24 <= 24 else 'no')} |")
refusal = (out / "ours_budget17.txt").read_text().strip() if (out / "ours_budget17.txt").is_file() else ""
if "error" in refusal.lower():
    lines += ["", "train.memory_budget_gib=17: " + refusal.splitlines()[-1]]
text = "\n".join(lines)
(out / "perf.md").write_text(text + "\n")
(out / "perf_losses.json").write_text(json.dumps({k: v.get("losses") for k, v in runs.items()}))
print(text)
PY
