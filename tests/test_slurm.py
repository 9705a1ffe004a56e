"""launcher=slurm.

1. Rendering, no Slurm: scripts for 4 nodes x 8 GPUs in both modes pass `bash -n`, hold the
   directives, and, run by bash with stand-ins for srun/scontrol/python (a mock: this box has one
   node and no GPU), issue the expected srun lines; the stop/requeue logic of the batch shell.
2. The stop agreement without Slurm: 2 local ranks, SIGUSR1 to rank 1 only, both stop after the
   same step with a committed checkpoint.
3. The real Slurm (slurm/local-cluster.sh; started here if it is not running), on CPU, through the
   real CLI: the issue's job commits step 8 (mode=ray, the default); `scancel --signal=USR1 --batch`
   part-way leads to checkpoint, requeue and resume (mode=ray); a plain scancel saves a checkpoint
   first (mode=torchrun); a failing job exits non-zero with its error in the run dir; a multirun
   submits one job per point. All jobs are submitted up front and run side by side; a background
   thread signals each signalled job once it is ready for it (USR1: its batch shell has set its
   trap; SIGTERM: a step is logged). Each wait's budget counts from when the job started (or was
   queued), and a failure shows the job's state, the queue and the tails of its output.

Wall time on a loaded 2-core box: the Slurm part takes 3-4 minutes (the Ray jobs dominate)."""
from __future__ import annotations

import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import pytest
import yaml

from conftest import REPO, cli_env, committed_steps, compose_job, events, explain, losses, records, run_cli, train_ok

TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
            "PREEMPTED"}
CPU_JOB = ["launcher=slurm", "launcher.nodes=1", "launcher.gpus_per_node=0", "peft=lora"]


# --- 1. rendering (no Slurm) ---------------------------------------------------------------------

_job = compose_job


BIG = ["launcher=slurm", "launcher.nodes=4", "launcher.gpus_per_node=8", "launcher.cpus_per_task=96",
       "launcher.mem=0", "launcher.partition=gpu", "launcher.account=proj", "launcher.qos=high",
       "launcher.time=2-00:00:00", "launcher.constraint='h100&ib'", "launcher.exclusive=true",
       "launcher.signal_grace_s=600", "launcher.max_requeues=5",
       "launcher.sbatch_extra=['--reservation=big','#SBATCH --mail-type=END']",
       "+launcher.env.NCCL_SOCKET_IFNAME=ib0", "+launcher.env.NCCL_DEBUG=WARN",
       "launcher.setup='module load cuda/12.4'"]

STUB_SRUN = r"""#!/bin/bash
echo "srun $*" >>"$STUB_LOG"
while [[ $# -gt 0 && $1 == -* ]]; do shift; done   # drop srun's own options, run the command
exec "$@"
"""
STUB_SCONTROL = r"""#!/bin/bash
echo "scontrol $*" >>"$STUB_LOG"
case "$1 $2" in
  "show hostnames") printf 'gpu%03d\n' 1 2 3 4 ;;
  "show node") echo "NodeName=$3 Arch=x86_64 NodeAddr=10.1.0.$((10#${3#gpu})) NodeHostName=$3" ;;
esac
exit 0
"""
# Stands in for the Python of the compute nodes: `ray start --block` waits to be stopped; the
# training entry behaves as $STUB_MODE says.
STUB_PYTHON = r"""#!/bin/bash
echo "python $*" >>"$STUB_LOG"
if [[ " $* " == *" ray.scripts.scripts start "* ]]; then
  trap 'exit 0' TERM; while :; do sleep 0.1; done
fi
if [[ " $* " == *" ftcluster.launch.slurm_job ray "* ]]; then  # as the real driver: after both Ray steps are up
  for ((i = 0; i < 100; i++)); do (($(grep -c 'ray.scripts.scripts start' "$STUB_LOG") >= 2)) && break; sleep 0.1; done
fi
case $STUB_MODE in
  ok) exit 0 ;;
  fail) exit 3 ;;
  saved) echo "step 5 /ckpt/step_5" >"$FTCLUSTER_PREEMPT_SAVED"; exit 0 ;;
  preempt)  # the ranks: stop once asked (the request file), after a committed checkpoint
    echo started >"$STUB_LOG.started"
    for ((i = 0; i < 200; i++)); do
      if [[ -e $FTCLUSTER_PREEMPT_REQUEST ]]; then echo "step 7 /ckpt/step_7" >"$FTCLUSTER_PREEMPT_SAVED"; exit 0; fi
      sleep 0.1
    done
    exit 9 ;;
esac
"""


def _stubs(tmp: Path) -> Path:
    bin_dir = tmp / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", STUB_SRUN), ("scontrol", STUB_SCONTROL), ("python", STUB_PYTHON)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return bin_dir


def _render(tmp: Path, *overrides: str) -> tuple[Path, Path, Path]:
    """Render into tmp/run/slurm/submit-1 with the stub python; returns (script, run dir, stub bin)."""
    from ftcluster.launch.slurm import render

    bin_dir = _stubs(tmp)
    run_dir, submit_dir = tmp / "run", tmp / "run/slurm/submit-1"
    submit_dir.mkdir(parents=True)
    job = _job(*overrides, f"launcher.python={bin_dir / 'python'}")
    (submit_dir / "config.yaml").write_text("{}\n")
    script = submit_dir / "job.sbatch"
    script.write_text(render(job, run_dir=run_dir, submit_dir=submit_dir, workdir=tmp))
    return script, run_dir, bin_dir


def _run_script(script: Path, bin_dir: Path, mode: str, *, restart: int | None = None,
                usr1_after_start: bool = False) -> tuple[int, list[str], str]:
    log = bin_dir.parent / "stub.log"
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "STUB_LOG": str(log), "STUB_MODE": mode, "HOME": str(bin_dir.parent),
           "SLURM_JOB_ID": "1234", "SLURM_JOB_NODELIST": "gpu[001-004]", "SLURM_JOB_NUM_NODES": "4",
           "SLURM_CPUS_PER_TASK": "96"}
    if restart is not None:
        env["SLURM_RESTART_COUNT"] = str(restart)
    p = subprocess.Popen(["bash", str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if usr1_after_start:
        deadline = time.time() + 30
        while not Path(f"{log}.started").exists():
            assert time.time() < deadline and p.poll() is None, "the stand-in ranks never started"
            time.sleep(0.05)
        p.send_signal(signal.SIGUSR1)
    out, _ = p.communicate(timeout=60)
    return p.returncode, log.read_text().splitlines() if log.exists() else [], out


@pytest.mark.parametrize("mode", ["torchrun", "ray"])
def test_rendered_4x8_script(mode: str, tmp_path: Path) -> None:
    script, run_dir, bin_dir = _render(tmp_path, *BIG, f"launcher.mode={mode}")
    text = script.read_text()
    subprocess.run(["bash", "-n", str(script)], check=True)
    directives = re.findall(r"^#SBATCH (.*)$", text, flags=re.M)
    for d in ("--nodes=4", "--gpus-per-node=8", "--ntasks-per-node=1", "--cpus-per-task=96", "--mem=0",
              "--partition=gpu", "--account=proj", "--qos=high", "--time=2-00:00:00", "--constraint=h100&ib",
              "--exclusive", "--requeue", "--open-mode=append", "--signal=B:USR1@600", "--reservation=big",
              "--mail-type=END", f"--output={run_dir}/slurm/submit-1/slurm-%j.out", f"--chdir={tmp_path}",
              "--job-name=ftc-default"):
        assert d in directives, (d, directives)
    body = text[text.index("\n", text.rindex("#SBATCH")):]
    assert "#SBATCH" not in body and not re.search(r"\{\{\w+\}\}", text)
    assert "export NCCL_SOCKET_IFNAME=ib0" in text and "export NCCL_DEBUG=WARN" in text
    assert "module load cuda/12.4" in text and "FTC_MAX_REQUEUES=5" in text

    rc, log, out = _run_script(script, bin_dir, "ok")
    assert rc == 0, out
    srun = [ln for ln in log if ln.startswith("srun ")]
    py = [ln for ln in log if ln.startswith("python ") and "slurm_job" in ln]
    assert len(py) == 1, log
    cfg = f"{run_dir}/slurm/submit-1/config.yaml"
    if mode == "torchrun":
        assert srun == ["srun --nodes=4 --ntasks=4 --ntasks-per-node=1 --cpus-per-task=96 --kill-on-bad-exit=1 "
                        f"{bin_dir}/python -u -m ftcluster.launch.slurm_job torchrun {cfg} --run-dir {run_dir} "
                        "--nnodes 4 --rdzv-endpoint 10.1.0.1:21234 --rdzv-id 1234.0"], log
    else:
        sub = run_dir / "slurm/submit-1"
        ray = (f"bash {sub}/ray-node.1234.0.sh {sub}/ray-stop.1234.0 {run_dir}/logs/ray/1234.0 {bin_dir}/python -m "
               "ray.scripts.scripts start --block --disable-usage-stats --num-gpus=8 --temp-dir=/tmp/ray-ftc-1234")
        # Both Ray steps start in the background: either may log first.
        assert sorted(srun) == sorted([
            f"srun --nodes=1 --ntasks=1 --nodelist=gpu001 --overlap {ray} --head --port=41234 --dashboard-port=41235",
            f"srun --nodes=3 --ntasks=3 --ntasks-per-node=1 --exclude=gpu001 --overlap {ray} --address=10.1.0.1:41234"]), log
        # The Ray steps ended on the stop file (the stand-in Ray ignores nothing, so a TERM would
        # show as the fallback line); the job's own files are gone.
        assert "did not stop within" not in out, out
        assert not list(sub.glob("ray-stop.*")) and not list(sub.glob("ray-node.*")), list(sub.iterdir())
        assert py == [f"python -u -m ftcluster.launch.slurm_job ray {cfg} --run-dir {run_dir} --address 10.1.0.1:41234 "
                      "--nodes 4 --wait-s 300"], log
        assert not list((run_dir / "slurm/submit-1").glob("ray-token.*")), "the job's Ray token must be removed"
    assert not [ln for ln in log if "requeue" in ln]
    assert "training finished" in out


def test_script_requeues_after_the_preemption_checkpoint(tmp_path: Path) -> None:
    script, run_dir, bin_dir = _render(tmp_path, *BIG, "launcher.mode=torchrun")
    rc, log, out = _run_script(script, bin_dir, "preempt", usr1_after_start=True)
    assert rc == 0, out
    assert "USR1: asking every rank to checkpoint and stop" in out
    assert (run_dir / "slurm/submit-1/preempt-request.1234.0").exists()
    assert log[-1] == "scontrol requeue 1234", log  # the last thing the job does
    assert "requeueing job 1234 (requeue 1 of 5)" in out


@pytest.mark.parametrize("mode,restart,expect_rc", [("saved", 5, 75), ("fail", 0, 3), ("fail", 2, 3)])
def test_script_exit_status(mode: str, restart: int, expect_rc: int, tmp_path: Path) -> None:
    """max_requeues reached: no requeue, exit 75. A failed training: its exit status, no requeue."""
    script, _, bin_dir = _render(tmp_path, *BIG, "launcher.mode=ray")
    rc, log, out = _run_script(script, bin_dir, mode, restart=restart)
    assert rc == expect_rc, out
    assert not [ln for ln in log if "requeue" in ln], log
    if mode == "saved":
        assert "not requeueing: launcher.max_requeues=5 reached" in out
    else:
        assert "training failed (exit 3)" in out


@pytest.mark.slow
def test_dry_run_renders_without_submitting(tmp_path: Path) -> None:
    run = tmp_path / "X"
    p = run_cli("train", *CPU_JOB, "launcher.dry_run=true", f"run.dir={run}", cwd=tmp_path)
    assert p.returncode == 0, explain(p)
    assert "#SBATCH --requeue" in p.stdout and "nothing submitted" in p.stdout
    assert (run / "slurm/dry-run/job.sbatch").is_file() and (run / "slurm/dry-run/config.yaml").is_file()
    assert not list((run / "slurm").glob("submit-*"))


@pytest.mark.slow
def test_the_job_runs_the_saved_config_unchanged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Inside the allocation the saved resolved config loads back to the JobConfig the driver validated."""
    from ftcluster.compose import load_saved_job
    from ftcluster.launch.slurm_job import for_this_run

    run = tmp_path / "X"
    args = [*CPU_JOB, "launcher.mode=torchrun", "optim.lr=1e-4", "+launcher.env.NCCL_DEBUG=INFO", "resume=never",
            f"run.dir={run}"]
    p = run_cli("train", *args, "launcher.dry_run=true", cwd=tmp_path)
    assert p.returncode == 0, explain(p)
    job = load_saved_job(run / "slurm/dry-run/config.yaml")
    assert job == _job(*args, "launcher.dry_run=true")
    assert for_this_run(job) is job
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # a requeued run always continues from the newest checkpoint
    assert for_this_run(job).resume == "auto"


@pytest.mark.slow
@pytest.mark.parametrize("override,key", [("launcher.mode=mpi", "launcher.mode"),
                                          ("launcher.time=5", "launcher.signal_grace_s"),
                                          ("+launcher.env.HF_TOKEN=x", "launcher.env.HF_TOKEN"),
                                          ("launcher.sbatch_extra=['reservation=big']", "launcher.sbatch_extra[0]"),
                                          # Ray Train restarts inside the allocation need resume=auto.
                                          ("launcher.ray_max_failures=2 resume=never",
                                           "resume: 'never' with launcher.ray_max_failures=2")])
def test_config_errors_name_the_key(override: str, key: str, tmp_path: Path) -> None:
    p = run_cli("train", *CPU_JOB, *override.split(), "launcher.dry_run=true", f"run.dir={tmp_path / 'X'}", cwd=tmp_path)
    assert p.returncode == 2 and key in p.stderr, explain(p)


# --- 2. the stop agreement without Slurm ----------------------------------------------------------

def _pids_holding(path: Path) -> list[int]:
    """Processes with `path` open (rank r keeps logs/rank<r>.log open)."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if any(os.readlink(fd) == str(path) for fd in (d / "fd").iterdir()):
                found.append(int(d.name))
        except OSError:
            continue
    return found


@pytest.mark.slow
def test_usr1_on_one_rank_stops_every_rank_after_the_same_step(tmp_path: Path) -> None:
    run, saved = tmp_path / "X", tmp_path / "saved"
    env = cli_env(FTCLUSTER_PREEMPT_SAVED=str(saved))
    p = subprocess.Popen([sys.executable, "-m", "ftcluster", "train", "launcher.nproc_per_node=2", "peft=lora",
                          "train.max_steps=400", "checkpoint.every_steps=0", f"run.dir={run}"],
                         cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 240
        while not losses(run):
            assert p.poll() is None and time.time() < deadline, p.communicate()[0][-3000:]
            time.sleep(0.2)
        rank1 = _pids_holding(run / "logs/rank1.log")
        assert len(rank1) == 1, rank1
        os.kill(rank1[0], signal.SIGUSR1)  # rank 1 only: rank 0 learns of it through the all-reduce
        out, _ = p.communicate(timeout=240)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, out[-3000:]
    stop = events(run, "preempted")
    assert len(stop) == 1, out[-3000:]
    step = stop[0]["step"]
    assert step < 400 and committed_steps(run) == [step]
    meta = json.loads((run / f"checkpoints/step_{step}/meta.json").read_text())
    assert meta["world_size"] == 2 and meta["step"] == step
    assert saved.read_text().startswith(f"step {step} ")
    assert not events(run, "end") and max(losses(run)) == step


# --- 3. the real Slurm ----------------------------------------------------------------------------

LOCAL_CLUSTER_NAME = "local"
"""ClusterName in the slurm.conf slurm/local-cluster.sh writes."""


def _cluster_name() -> str | None:
    p = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=30)
    m = re.search(r"^ClusterName\s*=\s*(\S+)", p.stdout, re.MULTILINE)
    return m.group(1) if m else None


def _slurm_up() -> bool:
    if shutil.which("sinfo") is None:
        return False
    p = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True, timeout=30)
    return p.returncode == 0 and any(s.rstrip("*") in ("idle", "mixed", "allocated", "completing")
                                     and not s.endswith("*") for s in p.stdout.split())


@pytest.fixture(scope="module")
def slurm() -> None:
    """The one-node local Slurm: running already (CI's .ci/run starts it), or started here."""
    if _slurm_up():
        # Submit only to the one-node Slurm slurm/local-cluster.sh makes (ClusterName=local), never to
        # a real cluster that happens to be reachable from this machine.
        name = _cluster_name()
        if name != LOCAL_CLUSTER_NAME:
            msg = f"SLURM TESTS REFUSED: the running Slurm is cluster {name!r}, not slurm/local-cluster.sh's"
            pytest.fail(msg) if os.environ.get("CI") else pytest.skip(msg)
        return
    if os.environ.get("CI"):  # CI's .ci/run starts Slurm: a Slurm that is not up there is a failure
        pytest.fail("Slurm is not up although CI started it (slurm/local-cluster.sh start)")
    if os.geteuid() != 0:
        pytest.skip("SLURM TESTS SKIPPED: no running Slurm and not root, so slurm/local-cluster.sh cannot start one")
    if shutil.which("sinfo") is None and shutil.which("apt-get") is None:
        pytest.skip("SLURM TESTS SKIPPED: Slurm is not installed and apt-get is unavailable to install it")
    p = subprocess.run(["bash", str(REPO / "slurm/local-cluster.sh"), "start"], capture_output=True, text=True,
                       timeout=900)
    assert p.returncode == 0 and _slurm_up(), f"slurm/local-cluster.sh start failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"


RUN_S = 900
"""How long a job may run (each run of it, from its StartTime) before a test gives up on it. The
module's jobs share 2 oversubscribed CPUs with each other and with the other pytest worker: each
Ray job alone takes ~1-2 min to log its first step there, so the budget counts from when the job
really started, never from when it was submitted."""
PENDING_S = 900
"""How long a job may wait in the queue (from its SubmitTime, which a requeue resets)."""


JOB_TEST_TIMEOUT_S = 2 * (PENDING_S + 2 * RUN_S)
"""pytest-timeout for a test that waits on the module's jobs (the fixture's setup counts in the
first one): above every budget a job's wait allows, so a slow job fails with job_report, not a
timeout's stack dump."""


def job_info(job_id: str) -> dict[str, str]:
    """`scontrol show job` as a dict (JobState, Reason, ExitCode, Restarts, SubmitTime, StartTime, ...)."""
    p = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, timeout=30)
    return dict(re.findall(r"(\w+)=(\S+)", p.stdout))


def job_state(job_id: str) -> tuple[str, str, int]:
    """(state, exit code 'rc:signal', restarts) from `scontrol show job`."""
    f = job_info(job_id)
    return f.get("JobState", "?"), f.get("ExitCode", "?"), int(f.get("Restarts", "0"))


def _since(stamp: str | None) -> float | None:
    """Seconds since a Slurm time stamp (2026-12-02T10:12:52, this host's local time)."""
    try:
        return time.time() - time.mktime(time.strptime(stamp or "", "%Y-%m-%dT%H:%M:%S"))
    except ValueError:
        return None


def _tail(path: Path, lines: int) -> str:
    if not path.is_file():
        return f"--- {path}: missing"
    return f"--- {path} (last {lines} lines):\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def job_report(job_id: str, run: Path | None) -> str:
    """What a Slurm test failure shows: the job's state and times, the whole queue (who was running
    beside it), the load, and the tails of the job's output and rank 0's log."""
    f = job_info(job_id)
    keys = ("JobState", "Reason", "ExitCode", "Restarts", "SubmitTime", "StartTime", "EndTime", "RunTime")
    lines = ["job " + job_id + ": " + " ".join(f"{k}={f.get(k, '?')}" for k in keys)]
    q = subprocess.run(["squeue", "-h", "-o", "%i %j %T %M %r"], capture_output=True, text=True, timeout=30)
    lines += ["--- squeue (id name state time reason):", q.stdout.rstrip() or "(empty)",
              f"--- load average: {' '.join(f'{x:.1f}' for x in os.getloadavg())}"]
    if run is not None:
        lines += [_tail(run / f"slurm/submit-1/slurm-{job_id}.out", 40), _tail(run / "logs/rank0.log", 15)]
    return "\n".join(lines)


def job_overdue(job_id: str, info: dict[str, str], *, run_s: float, pending_s: float) -> str | None:
    """Why a job that has not ended is past its budget (None while it is not): running longer than
    run_s since this run started, or queued longer than pending_s since it was (re)submitted."""
    state = info.get("JobState", "?")
    if state in ("RUNNING", "COMPLETING"):
        ran = _since(info.get("StartTime"))
        if ran is not None and ran > run_s:
            return f"still {state} {ran:.0f} s after it started (budget {run_s:.0f} s)"
    else:  # PENDING, REQUEUED, CONFIGURING, ...
        waited = _since(info.get("SubmitTime"))
        if waited is not None and waited > pending_s:
            return f"still {state} {waited:.0f} s after it was submitted (budget {pending_s:.0f} s)"
    return None


def wait_job(job_id: str, *, run: Path | None = None, run_s: float = RUN_S,
             pending_s: float = PENDING_S) -> tuple[str, str, int]:
    """Wait for the job to end; past its budget (job_overdue), fail with job_report."""
    while True:
        info = job_info(job_id)
        state = (info.get("JobState", "?"), info.get("ExitCode", "?"), int(info.get("Restarts", "0")))
        if state[0] in TERMINAL:
            return state
        why = job_overdue(job_id, info, run_s=run_s, pending_s=pending_s)
        assert why is None, f"job {job_id} {why}\n{job_report(job_id, run)}"
        time.sleep(1)


def _job_ids(out: str) -> list[str]:
    return re.findall(r"submitted Slurm job (\d+)", out)


class Jobs:
    """Every Slurm job of this module, submitted at once, plus the signals sent to them."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.ids: dict[str, str] = {}
        self.runs: dict[str, Path] = {}
        self.out: dict[str, str] = {}
        self.signalled: dict[str, int] = {}  # name -> the last logged step seen when the signal went
        self.errors: dict[str, list[str]] = {}  # job name -> what went wrong signalling it
        self._threads: list[threading.Thread] = []

    def submit(self, jobs: dict[str, list[str]]) -> dict[str, Callable[[], None]]:
        """Start `ftcluster train <args> run.dir=<root>/<name>` for every job at once (each submission
        is some CPU-seconds of imports: one after another, the last jobs would start a minute
        later); returns, per job, the call that waits for its submission and records its id."""
        procs = {name: subprocess.Popen([sys.executable, "-m", "ftcluster", "train", *args, f"run.dir={self.root / name}"],
                                        cwd=self.root, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True) for name, args in jobs.items()}

        def done(name: str) -> None:
            out, err = procs[name].communicate(timeout=600)
            p = subprocess.CompletedProcess(procs[name].args, procs[name].returncode, out, err)
            assert p.returncode == 0 and _job_ids(out), explain(p)
            self.ids[name], self.runs[name], self.out[name] = _job_ids(out)[0], self.root / name, out

        return {name: functools.partial(done, name) for name in jobs}

    def wait(self, name: str, **budget: float) -> tuple[str, str, int]:
        return wait_job(self.ids[name], run=self.runs[name], **budget)

    def signal_when(self, name: str, scancel_args: list[str], ready: str) -> None:
        """A background thread sends `scancel <scancel_args>` to the job once it is ready: `ready` is
        "trap" (its batch shell has set its signal traps: the job output's first line, which the
        template prints after them) or "step" (a first step logged: the ranks' handlers are set).
        What goes wrong is recorded with job_report for the test that checks the job."""
        run, job_id = self.runs[name], self.ids[name]
        out = run / f"slurm/submit-1/slurm-{job_id}.out"

        def is_ready() -> bool:
            if ready == "trap":
                return out.is_file() and f"job {job_id} (run 0)" in out.read_text(errors="replace")
            return bool(losses(run))

        def go() -> None:
            t0 = time.time()
            try:
                while not is_ready():
                    info = job_info(job_id)
                    why = ("ended" if info.get("JobState") in TERMINAL else
                           job_overdue(job_id, info, run_s=RUN_S, pending_s=PENDING_S))
                    if why:
                        self.errors.setdefault(name, []).append(
                            f"not signalled: job {job_id} {why} before it was ready ({ready!r}), "
                            f"{time.time() - t0:.0f} s after submission\n{job_report(job_id, run)}")
                        return
                    time.sleep(0.3)
                self.signalled[name] = max(losses(run), default=0)
                subprocess.run(["scancel", *scancel_args, job_id], check=True, timeout=30)
            except Exception as e:  # noqa: BLE001 - reported by the test that needs it
                self.errors.setdefault(name, []).append(f"{e!r}\n{job_report(job_id, run)}")

        t = threading.Thread(target=go, daemon=True)
        t.start()
        self._threads.append(t)


USR1_STEPS = 12
"""The requeue test's run: USR1 reaches its batch shell before the first step (as soon as the shell
has set its trap), so the stop comes at the first log point (step 1) whatever the load, and the
resumed run trains steps 2-12 (checkpoints every 6) for the comparison with an uninterrupted run."""


@pytest.fixture(scope="module")
def jobs(slurm: None, tmp_path_factory: pytest.TempPathFactory) -> Jobs:
    j = Jobs(tmp_path_factory.mktemp("slurm"))
    submitted = j.submit({
        # The job (mode=ray, the default).
        "done": [*CPU_JOB, "train.max_steps=8", "checkpoint.every_steps=4"],
        # USR1 to the batch shell -> checkpoint -> requeue -> resume (mode=ray).
        "usr1": [*CPU_JOB, f"train.max_steps={USR1_STEPS}", f"checkpoint.every_steps={USR1_STEPS // 2}"],
        # A plain scancel (SIGTERM to every process), once a step is logged (the ranks' handlers
        # are set): best-effort checkpoint, then the end. 400 steps is only the margin for the
        # signal to land (the job stops a step or two after its first one).
        "term": [*CPU_JOB, "launcher.mode=torchrun", "train.max_steps=400", "checkpoint.every_steps=0"],
        "fail": [*CPU_JOB, "launcher.mode=torchrun", "train.max_steps=4", "debug.fail_at_step=2", "debug.fail_rank=0"],
        # A multirun: one job per point (run dirs sweep/0, sweep/1).
        "sweep": ["-m", "optim.lr=1e-3,3e-3", *CPU_JOB, "launcher.mode=torchrun", "train.max_steps=2",
                  "checkpoint.every_steps=2"],
    })
    submitted["done"]()
    submitted["usr1"]()
    j.signal_when("usr1", ["--signal=USR1", "--batch"], ready="trap")
    # A second submission to a run dir whose job still lives is refused (both would write its checkpoints).
    again = run_cli("train", *CPU_JOB, f"train.max_steps={USR1_STEPS}", f"run.dir={j.runs['usr1']}", cwd=j.root)
    j.out["usr1-again"] = f"{again.returncode}\n{again.stderr}"
    submitted["term"]()
    j.signal_when("term", [], ready="step")
    submitted["fail"]()
    submitted["sweep"]()
    return j


@pytest.mark.slow
@pytest.mark.timeout(JOB_TEST_TIMEOUT_S)
def test_job_trains_to_a_committed_checkpoint(jobs: Jobs) -> None:
    """The issue's command: prints a job id and ends with a committed step-8 checkpoint."""
    run, job_id = jobs.runs["done"], jobs.ids["done"]
    assert f"submitted Slurm job {job_id}" in jobs.out["done"] and "slurm-" in jobs.out["done"]
    state, code, restarts = jobs.wait("done")
    out = run / f"slurm/submit-1/slurm-{job_id}.out"
    assert (state, code, restarts) == ("COMPLETED", "0:0", 0), out.read_text()[-4000:]
    assert committed_steps(run) == [4, 8]
    assert sorted(losses(run)) == list(range(1, 9))
    assert {p.name for p in (run / "slurm/submit-1").iterdir()} >= {"job.sbatch", "config.yaml", "job_id", out.name}
    assert (run / "slurm/submit-1/config.yaml").read_text() == (run / "config.yaml").read_text()
    assert "training finished" in out.read_text() and (run / "logs/rank0.log").is_file()
    # A clean end: the Ray steps stopped by themselves (no srun TERM, so no cancelled or killed
    # step), the last line is the success line, and no node kept the job's Ray files in /tmp.
    lines = out.read_text().splitlines()
    assert lines[-1].endswith("] training finished"), lines[-20:]
    bad = [ln for ln in lines if "srun: error" in ln or "CANCELLED" in ln or "Killed" in ln]
    assert not bad, bad
    assert not Path(f"/tmp/ray-ftc-{job_id}").exists()
    # Ray's own output is kept in the run dir: the head's `ray start` log and its session logs.
    ray_logs = run / f"logs/ray/{job_id}.0"
    assert "Ray runtime started" in next(ray_logs.glob("*.log")).read_text(), list(ray_logs.iterdir())
    assert any(p.is_dir() and list(p.glob("raylet*")) for p in ray_logs.iterdir()), list(ray_logs.iterdir())


@pytest.mark.slow
@pytest.mark.timeout(JOB_TEST_TIMEOUT_S)
def test_usr1_checkpoints_requeues_and_resumes(jobs: Jobs) -> None:
    run, job_id = jobs.runs["usr1"], jobs.ids["usr1"]
    n = USR1_STEPS
    # Meanwhile (the job waits for its CPU share anyway): the same job uninterrupted, on the local
    # launcher, one rank as on the one CPU node.
    ref = jobs.root / "usr1-reference"
    train_ok("peft=lora", f"train.max_steps={n}", f"checkpoint.every_steps={n // 2}", run=ref, cwd=jobs.root)
    state, code, restarts = jobs.wait("usr1", run_s=2 * RUN_S)  # two runs: the first, the requeued one
    out = (run / f"slurm/submit-1/slurm-{job_id}.out").read_text()
    assert not jobs.errors.get("usr1"), "\n".join(jobs.errors["usr1"])
    assert (state, code, restarts) == ("COMPLETED", "0:0", 1), job_report(job_id, run)
    stopped = events(run, "preempted")
    assert len(stopped) == 1 and stopped[0]["step"] >= jobs.signalled["usr1"], (stopped, jobs.signalled)
    step = stopped[0]["step"]
    assert step < n, "the signal came too late to test anything"
    resumed = events(run, "resume")
    assert len(resumed) == 1 and resumed[0]["step"] == step
    assert f"checkpoints/step_{step}" in resumed[0]["checkpoint"]
    assert sorted(losses(run)) == list(range(1, n + 1)) and events(run, "end")[0]["step"] == n
    # The requeued run continued the same training: its losses are the uninterrupted run's, step by
    # step (float noise allowed for the different thread counts).
    want, got = losses(ref), losses(run)
    assert [got[s] for s in range(1, n + 1)] == pytest.approx([want[s] for s in range(1, n + 1)], rel=1e-5)
    assert committed_steps(run) == [n // 2, n]
    assert f"requeueing job {job_id} (requeue 1 of 3)" in out and f"job {job_id} (run 1)" in out
    assert (run / f"slurm/submit-1/preempt-saved.{job_id}.0").read_text().startswith(f"step {step} ")
    rc, err = jobs.out["usr1-again"].split("\n", 1)
    # The run-dir lock (held by the running job) refuses it first; the launcher check is behind it.
    assert rc == "2" and f"Slurm job {job_id}" in err and ("still uses" in err or "in use by another run" in err), err
    assert not (run / "slurm/submit-2").exists()


@pytest.mark.slow
@pytest.mark.timeout(JOB_TEST_TIMEOUT_S)
def test_scancel_saves_a_checkpoint_before_the_job_ends(jobs: Jobs) -> None:
    run, job_id = jobs.runs["term"], jobs.ids["term"]
    state, code, restarts = jobs.wait("term")
    out = (run / f"slurm/submit-1/slurm-{job_id}.out").read_text()
    assert not jobs.errors.get("term"), "\n".join(jobs.errors["term"])
    assert state == "CANCELLED" and restarts == 0, (state, code, out[-4000:])
    stopped = events(run, "terminated")
    assert len(stopped) == 1, out[-4000:]
    step = stopped[0]["step"]
    assert jobs.signalled["term"] <= step < 400
    assert committed_steps(run) == [step]  # checkpoint.every_steps=0: only the SIGTERM one
    assert not events(run, "end")
    # A stop on SIGTERM is not a crash: no "training failed", no error file.
    assert "training failed" not in out and not list((run / "logs").glob("rank*.error")), out[-4000:]


@pytest.mark.slow
@pytest.mark.timeout(JOB_TEST_TIMEOUT_S)
def test_failing_job_exits_nonzero_with_its_error_in_the_run_dir(jobs: Jobs) -> None:
    run, job_id = jobs.runs["fail"], jobs.ids["fail"]
    state, code, restarts = jobs.wait("fail")
    out = (run / f"slurm/submit-1/slurm-{job_id}.out").read_text()
    assert state == "FAILED" and code == "1:0" and restarts == 0, (state, code, out[-4000:])
    err = (run / "logs/rank0.error").read_text()
    assert "Traceback" in err and "InjectedFailure" in err, err
    assert "training failed" in out and "rank 0: " in out
    assert committed_steps(run) == []


@pytest.mark.slow
@pytest.mark.timeout(JOB_TEST_TIMEOUT_S)
def test_multirun_submits_one_job_per_point(jobs: Jobs) -> None:
    out = jobs.out["sweep"]
    ids = _job_ids(out)
    assert len(ids) == 2 and len(set(ids)) == 2, out
    sweep = jobs.root / "sweep"
    for n, (job_id, lr) in enumerate(zip(ids, (1e-3, 3e-3))):
        run = sweep / str(n)
        assert f"run dir {run}" in out
        assert (run / "slurm/submit-1/job_id").read_text().strip() == job_id
        state, code, _ = wait_job(job_id, run=run)
        assert (state, code) == ("COMPLETED", "0:0"), (run / f"slurm/submit-1/slurm-{job_id}.out").read_text()[-3000:]
        assert committed_steps(run) == [2]
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        assert cfg["optim"]["lr"] == lr and cfg["run"]["dir"] == str(run)
    assert (sweep / "multirun.yaml").is_file()
    assert not records(sweep)  # the sweep dir itself is no run dir
