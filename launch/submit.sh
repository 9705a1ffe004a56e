#!/usr/bin/env bash
# Submit an ftcluster training run to a running Ray cluster with `ray job submit`.
#
#   launch/submit.sh [--address URL] [--submission-id ID] [--no-wait] [--dry-run] OVERRIDE...
#
#   launch/submit.sh --address http://127.0.0.1:8265 \
#       model=llama3_8b model.path=/shared/models/Llama-3.1-8B peft=lora \
#       data=jsonl data.path=/shared/data/train.jsonl \
#       launcher.num_workers=16 launcher.max_failures=3 run.dir=/shared/runs/llama8b-lora
#
# What reaches the cluster:
# - the code and the YAML groups: this checkout (ftcluster/ and conf/) is the job's runtime-env
#   working_dir, so the driver and every worker run exactly this tree (pre-flight compares a
#   digest of the ftcluster sources across workers);
# - the config: the OVERRIDEs, passed to `python -m ftcluster train launcher=ray
#   launcher.address=auto ...` on the head node, where the driver composes and validates it once
#   and ships the resolved config to the workers;
# - the environment: FTCLUSTER_*, HF_*, TRANSFORMERS_*, WANDB_*, NCCL_*, TORCH_*, PYTORCH_*, DS_*,
#   TOKENIZERS_*, OMP_NUM_THREADS variables set here, minus secret-looking names (tokens, keys: the job's runtime env is visible
#   in Ray's dashboard). Put secrets on the nodes (e.g. ~/.netrc for W&B).
#
# run.dir must be an absolute path on a filesystem every node sees (e.g. /shared/runs/NAME);
# submitting the same command again continues the run from its newest checkpoint (resume=auto).
# --address defaults to $RAY_ADDRESS, else http://127.0.0.1:8265 (`ray dashboard launch/ray-cluster.yaml`
# tunnels the head's dashboard there). A token-authenticated cluster needs RAY_AUTH_TOKEN here too.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
address=${RAY_ADDRESS:-http://127.0.0.1:8265}
submission_id=""
wait=1
dry_run=0
overrides=()
while [ $# -gt 0 ]; do
  case "$1" in
    --address) address=$2; shift 2 ;;
    --address=*) address=${1#*=}; shift ;;
    --submission-id) submission_id=$2; shift 2 ;;
    --submission-id=*) submission_id=${1#*=}; shift ;;
    --no-wait) wait=0; shift ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
    --) shift; overrides+=("$@"); break ;;
    *) overrides+=("$1"); shift ;;
  esac
done

run_dir=""
for o in "${overrides[@]}"; do
  case "$o" in run.dir=*) run_dir=${o#run.dir=} ;; launcher=*|launcher.address=*)
    echo "submit.sh: $o is set by this script (launcher=ray launcher.address=auto)" >&2; exit 2 ;;
  esac
done
case "$run_dir" in
  /*) ;;
  *) echo "submit.sh: give run.dir=/ABSOLUTE/PATH on a filesystem every node sees (got '${run_dir}')" >&2; exit 2 ;;
esac
[ -n "$submission_id" ] || submission_id="ftcluster-$(basename "$run_dir")-$(date +%Y%m%d-%H%M%S)"

# The runtime environment: working_dir (this checkout, without run outputs and build debris) and
# the forwarded variables, as JSON.
runtime_env=$(REPO="$repo" python3 - <<'EOF'
import json, os, re
# Keep in step with ftcluster/launch/ray/plan.py FORWARD_ENV_PREFIXES (tests/test_ray.py checks).
prefixes = ("FTCLUSTER_", "HF_", "TRANSFORMERS_", "WANDB_", "NCCL_", "TORCH_", "PYTORCH_", "DS_", "TOKENIZERS_",
            "OMP_NUM_THREADS", "CUDA_LAUNCH_BLOCKING")
secret = re.compile(r"(^|[_\-.])(key|token|secret|password|passwd|credentials?|auth)s?($|[_\-.])", re.I)
env = {k: v for k, v in os.environ.items() if k.startswith(prefixes) and not secret.search(k)}
print(json.dumps({
    "working_dir": os.environ["REPO"],
    "excludes": [".git", "runs", "outputs", "build", "*.egg-info", "__pycache__", ".pytest_cache", ".peer", "wandb"],
    "env_vars": env,
}))
EOF
)

entry=(python -m ftcluster train launcher=ray launcher.address=auto "${overrides[@]}")
# The entrypoint is one shell command line on the head: quote every argument.
entry_str=$(printf '%q ' "${entry[@]}")
cmd=(ray job submit --address "$address" --submission-id "$submission_id" --runtime-env-json "$runtime_env")
[ "$wait" = 1 ] || cmd+=(--no-wait)
cmd+=(-- "$entry_str")

if [ "$dry_run" = 1 ]; then
  printf '%q ' "${cmd[@]}"; echo
  exit 0
fi
echo "submit.sh: job $submission_id -> $address; run dir $run_dir" >&2
exec "${cmd[@]}"
