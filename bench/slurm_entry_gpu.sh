#!/usr/bin/env bash
# The Slurm launcher's in-allocation entry (python -m ftcluster.launch.slurm_job) on one GPU host,
# without Slurm (the device machine has none): what one node of a job does, with the environment
# the batch script would give it. Checks, on NCCL with every GPU of the host:
#   torchrun mode: preemption request file -> every rank stops after the same step -> committed
#                  checkpoint + the "saved" file; a requeued run (SLURM_RESTART_COUNT=1) resumes and
#                  finishes; SIGTERM to every process (as scancel does) -> best-effort checkpoint.
#   ray mode:      a local `ray start --head`, then the same request-file stop through Ray Train.
# Usage (repo root, wheels as in ../shared/device/README.md): bench/slurm_entry_gpu.sh OUT_DIR
set -uo pipefail
out=${1:?usage: $0 OUT_DIR}
mkdir -p "$out"
gpus=$(python3 -c 'import torch; print(torch.cuda.device_count())')
w=/tmp/ftc-slurm-gpu
rm -rf "$w"
mkdir -p "$w"
log() { printf '%s %s\n' "$(date +%T)" "$*" | tee -a "$out/summary.txt"; }
events() { python3 -c 'import json,sys; print([ (r["event"], r.get("step")) for r in map(json.loads, open(sys.argv[1])) if "event" in r])' "$1/metrics.jsonl"; }
wait_step() { # run dir, seconds, pid: until metrics.jsonl has a logged step (or the pid is gone)
  local i
  for ((i = 0; i < $2 * 5; i++)); do
    grep -q '"loss"' "$1/metrics.jsonl" 2>/dev/null && return 0
    kill -0 "$3" 2>/dev/null || return 1
    sleep 0.2
  done
  return 1
}
render() { # run dir, extra overrides...: the resolved config a submission would save
  local run=$1; shift
  python3 -m ftcluster train launcher=slurm launcher.dry_run=true launcher.gpus_per_node="$gpus" logger=none \
    peft=lora train.max_steps="${STEPS:-1500}" checkpoint.every_steps=0 run.dir="$run" "$@" >"$run.render.log" 2>&1 ||
    { cat "$run.render.log"; exit 1; }
}
log "host $(hostname), $gpus GPU(s), torch $(python3 -c 'import torch; print(torch.__version__)')"

# --- torchrun mode: request file ---
run=$w/torchrun
render "$run" launcher.mode=torchrun
cfg=$run/slurm/dry-run/config.yaml
export FTCLUSTER_PREEMPT_REQUEST=$w/request.0 FTCLUSTER_PREEMPT_SAVED=$w/saved.0
python3 -u -m ftcluster.launch.slurm_job torchrun "$cfg" --run-dir "$run" --nnodes 1 \
  --rdzv-endpoint 127.0.0.1:29555 --rdzv-id gpu.0 >"$out/torchrun-0.log" 2>&1 &
pid=$!
wait_step "$run" 240 "$pid" || log "FAIL: no step logged"
touch "$FTCLUSTER_PREEMPT_REQUEST"
wait $pid; rc=$?
log "torchrun preempt: exit $rc, saved: $(cat "$FTCLUSTER_PREEMPT_SAVED" 2>/dev/null || echo MISSING)"
log "  events $(events "$run")"
log "  checkpoint meta $(cat "$run"/checkpoints/step_*/meta.json 2>/dev/null | python3 -c 'import json,sys; m=json.load(sys.stdin); print({k: m[k] for k in ("step","world_size")})')"

# --- torchrun mode: the requeued run resumes and finishes ---
export SLURM_RESTART_COUNT=1 FTCLUSTER_PREEMPT_REQUEST=$w/request.1 FTCLUSTER_PREEMPT_SAVED=$w/saved.1
python3 -u -m ftcluster.launch.slurm_job torchrun "$cfg" --run-dir "$run" --nnodes 1 \
  --rdzv-endpoint 127.0.0.1:29556 --rdzv-id gpu.1 >"$out/torchrun-1.log" 2>&1
rc=$?
log "torchrun resume: exit $rc, events $(events "$run" | cut -c1-300)"
log "  committed $(ls "$run/checkpoints")"
unset SLURM_RESTART_COUNT

# --- torchrun mode: SIGTERM to every process (a plain scancel) ---
run=$w/term
render "$run" launcher.mode=torchrun
export FTCLUSTER_PREEMPT_REQUEST=$w/request.t FTCLUSTER_PREEMPT_SAVED=$w/saved.t
setsid python3 -u -m ftcluster.launch.slurm_job torchrun "$run/slurm/dry-run/config.yaml" --run-dir "$run" \
  --nnodes 1 --rdzv-endpoint 127.0.0.1:29557 --rdzv-id gpu.t >"$out/term.log" 2>&1 &
pid=$!
wait_step "$run" 240 "$pid" || log "FAIL: no step logged"
kill -TERM -- -"$pid"
wait $pid; rc=$?
log "torchrun SIGTERM: exit $rc, events $(events "$run" | cut -c1-300), committed $(ls "$run/checkpoints" 2>/dev/null)"

# --- ray mode: request file through Ray Train ---
run=$w/ray
render "$run" launcher.mode=ray
export RAY_AUTH_MODE=disabled RAY_ADDRESS=127.0.0.1:6399 FTCLUSTER_PREEMPT_REQUEST=$w/request.r FTCLUSTER_PREEMPT_SAVED=$w/saved.r
setsid python3 -m ray.scripts.scripts start --head --block --port=6399 --num-gpus="$gpus" --include-dashboard=false \
  --disable-usage-stats --temp-dir=/tmp/ray-ftc-gpu >"$out/ray-head.log" 2>&1 &
head=$!
python3 -u -m ftcluster.launch.slurm_job ray "$run/slurm/dry-run/config.yaml" --run-dir "$run" \
  --address 127.0.0.1:6399 --nodes 1 --wait-s 120 >"$out/ray.log" 2>&1 &
pid=$!
wait_step "$run" 300 "$pid" || log "FAIL: no step logged"
touch "$FTCLUSTER_PREEMPT_REQUEST"
wait $pid; rc=$?
log "ray preempt: exit $rc, saved: $(cat "$FTCLUSTER_PREEMPT_SAVED" 2>/dev/null || echo MISSING)"
log "  events $(events "$run" | cut -c1-300), committed $(ls "$run/checkpoints" 2>/dev/null)"
kill -TERM -- -"$head" 2>/dev/null
sleep 3
kill -KILL -- -"$head" 2>/dev/null
cat "$out/summary.txt"
