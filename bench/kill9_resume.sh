#!/usr/bin/env bash
# The issue's exact command, killed with SIGKILL (whole process group) once step_8 is committed,
# then started again with the same command; compared with an uninterrupted run.
set -u
rm -rf "ref_$1" "X_$1"
CMD=(ftcluster train launcher.nproc_per_node=2 "parallel=$1" peft=lora train.max_steps=12 checkpoint.every_steps=4)
"${CMD[@]}" run.dir=$PWD/ref_$1 > ref_$1.log 2>&1
setsid "${CMD[@]}" run.dir=$PWD/X_$1 > x1_$1.log 2>&1 &
pid=$!
while [ ! -f X_$1/checkpoints/step_8/meta.json ]; do sleep 0.005; done
kill -9 -- -$pid; wait $pid; echo "killed: exit $? ; last logged step: $(grep -c '"loss"' X_$1/metrics.jsonl); committed: $(ls X_$1/checkpoints)"
"${CMD[@]}" run.dir=$PWD/X_$1 > x2_$1.log 2>&1; echo "restart exit $?"
python3 - "$1" <<'PY'
import json, sys
p = sys.argv[1]
def losses(d):
    out = {}
    for l in open(f"{d}/metrics.jsonl"):
        r = json.loads(l)
        if "loss" in r: out[r["step"]] = r["loss"]
    return out
a, b = losses(f"ref_{p}"), losses(f"X_{p}")
print(p, "steps 9-12 ref:", [a[s] for s in range(9, 13)])
print(p, "steps 9-12 resumed:", [b[s] for s in range(9, 13)])
print(p, "identical:", all(a[s] == b[s] for s in range(9, 13)))
PY
