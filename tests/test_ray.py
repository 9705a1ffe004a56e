"""launcher=ray: the real Ray (one local cluster, `ray start --head` once for this module) and the
real CLI in a subprocess with `launcher.address=auto` (RAY_ADDRESS names the test cluster), on the
embedded tiny model with 2 CPU workers over gloo. Plus the pre-flight checks and the planner as
pure functions (no cluster).

Wall time on a loaded 2-core box: the Ray runs take 30-70 s each; keep their number small."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import cli_env, committed_steps, events, explain, losses, run_cli, third_party_lines, train_ok

RAY_JOB = ["launcher=ray", "launcher.address=auto", "launcher.num_workers=2", "peft=lora", "train.max_steps=10",
           "checkpoint.every_steps=2"]


# --- pure logic: planner, pre-flight, environment forwarding (no cluster) ----------------------------

def _facts(rank: int, **over) -> dict:
    f = {"rank": rank, "local_rank": rank, "node_rank": 0, "world_size": 2,
         "env": {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "10.0.0.1",
                 "MASTER_PORT": "1234"},
         "pg_rank": rank, "pg_world_size": 2, "host": "node-a", "ip": "10.0.0.1", "pid": 100 + rank,
         "cuda_visible_devices": None, "ray_gpu_ids": [], "cuda_device_count": 0, "launch_id": "L1",
         "config_yaml_sha": "abc", "missing_paths": [],
         "versions": {"torch": "2.13", "transformers": "5", "ray": "2.60", "ftcluster": "0.1", "python": "3.11"},
         "cwd": "/work"}
    f.update(over)
    return f


def test_preflight_accepts_agreeing_workers() -> None:
    from ftcluster.launch.ray import check_preflight

    assert check_preflight([_facts(0), _facts(1)], expected_world=2, launch_id="L1", gpus_per_worker=0) == []


@pytest.mark.parametrize("over, expect", [
    ({"launch_id": None}, "worker rank 1 (host node-b, ip 10.0.0.2, local rank 0, pid 101): cannot see the run dir"),
    ({"launch_id": "OTHER"}, "worker rank 1 (host node-b, ip 10.0.0.2, local rank 0, pid 101): the run dir belongs to another launch"),
    ({"pg_world_size": 1}, "worker rank 1 (host node-b, ip 10.0.0.2, local rank 0, pid 101): world size disagrees"),
    ({"config_yaml_sha": "zzz"}, "worker rank 1 (host node-b, ip 10.0.0.2, local rank 0, pid 101): sees a different config.yaml"),
    ({"missing_paths": ["data.path: /data/x.jsonl"]}, "worker rank 1 (host node-b, ip 10.0.0.2, local rank 0, pid 101): cannot see data.path: /data/x.jsonl"),
    ({"versions": {"torch": "2.12", "transformers": "5", "ray": "2.60", "ftcluster": "0.1", "python": "3.11"}},
     "worker rank 1 (host node-b, ip 10.0.0.2, local rank 0, pid 101): torch 2.12, but rank 0 has 2.13"),
    ({"env": {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2"}}, "worker rank 1 (host node-b, ip 10.0.0.2, local rank 0, pid 101): rank disagrees"),
])
def test_preflight_mismatch_names_the_worker(over: dict, expect: str) -> None:
    from ftcluster.launch.ray import check_preflight

    second = _facts(1, host="node-b", ip="10.0.0.2", local_rank=0, env={"RANK": "1", "LOCAL_RANK": "0", "WORLD_SIZE": "2"})
    second.update(over)
    problems = check_preflight([_facts(0), second], expected_world=2, launch_id="L1", gpus_per_worker=0)
    assert any(p.startswith(expect) for p in problems), problems
    assert not any("worker rank 0" in p for p in problems), problems


def test_preflight_gpu_checks() -> None:
    """A mock of what two GPU workers on one node would report (there is no GPU here)."""
    from ftcluster.launch.ray import check_preflight

    ok = [_facts(r, cuda_visible_devices="2,5", ray_gpu_ids=[g], cuda_device_count=2) for r, g in ((0, "2"), (1, "5"))]
    assert check_preflight(ok, expected_world=2, launch_id="L1", gpus_per_worker=1) == []
    # Ray's CUDA_VISIBLE_DEVICES sharing turned off: worker 1 sees one device but has LOCAL_RANK 1.
    unshared = [_facts(0, cuda_visible_devices="2", ray_gpu_ids=["2"], cuda_device_count=1),
                _facts(1, cuda_visible_devices="5", ray_gpu_ids=["5"], cuda_device_count=1)]
    problems = check_preflight(unshared, expected_world=2, launch_id="L1", gpus_per_worker=1)
    assert len(problems) == 1 and problems[0].startswith("worker rank 1 (host node-a") and "cuda:1" in problems[0]
    no_cuda = [ok[0], _facts(1, cuda_visible_devices="", ray_gpu_ids=["5"], cuda_device_count=0)]
    problems = check_preflight(no_cuda, expected_world=2, launch_id="L1", gpus_per_worker=1)
    assert len(problems) == 1 and "worker rank 1" in problems[0] and "no CUDA device" in problems[0]


def test_plan_workers_resolves_auto() -> None:
    from ftcluster.config import ConfigError, RayLauncherConfig
    from ftcluster.launch.ray import plan_workers

    auto = RayLauncherConfig()
    p = plan_workers(auto, {"CPU": 64.0, "GPU": 8.0})
    assert (p.num_workers, p.gpus_per_worker, p.backend) == (8, 1, "nccl")
    assert p.resources_per_worker == {"CPU": 1, "GPU": 1}
    p = plan_workers(auto, {"CPU": 4.0})
    assert (p.num_workers, p.gpus_per_worker, p.backend, p.resources_per_worker) == (1, 0, "gloo", {"CPU": 1})
    p = plan_workers(RayLauncherConfig(num_workers=2, gpus_per_worker=0, cpus_per_worker=3), {"CPU": 4.0, "GPU": 8.0})
    assert (p.num_workers, p.backend, p.resources_per_worker) == (2, "gloo", {"CPU": 3})
    with pytest.raises(ConfigError, match="launcher.num_workers"):
        plan_workers(RayLauncherConfig(gpus_per_worker=1), {"CPU": 4.0})


def test_forwarded_env_skips_secrets() -> None:
    from ftcluster.launch.ray import forwarded_env

    env = {"HF_HOME": "/h", "HF_TOKEN": "s", "WANDB_API_KEY": "s", "WANDB_MODE": "offline", "NCCL_DEBUG": "INFO",
           "PATH": "/bin", "CUDA_VISIBLE_DEVICES": "0", "OMP_NUM_THREADS": "1"}
    assert forwarded_env(env) == {"HF_HOME": "/h", "WANDB_MODE": "offline", "NCCL_DEBUG": "INFO", "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_config_errors_name_the_key(workdir: Path) -> None:
    p = run_cli("train", "launcher=ray", "launcher.gpus_per_worker=2", cwd=workdir)
    assert p.returncode == 2 and "launcher.gpus_per_worker" in p.stderr, explain(p)
    p = run_cli("train", "launcher=ray", "launcher.max_failures=1", "resume=never", cwd=workdir)
    assert p.returncode == 2 and "resume: 'never' with launcher.max_failures=1" in p.stderr, explain(p)


def test_cluster_yaml_passes_rays_schema() -> None:
    import yaml
    from ray.autoscaler._private.util import prepare_config, validate_config

    from conftest import REPO

    cfg = prepare_config(yaml.safe_load((REPO / "launch/ray-cluster.yaml").read_text()))
    validate_config(cfg)  # raises on unknown or missing fields
    assert cfg["available_node_types"]["gpu_worker"]["node_config"]["InstanceType"].startswith(("p5", "p4", "g6"))
    assert any("/shared" in c for c in cfg["initialization_commands"])


def test_submit_wrapper_ships_tree_config_and_env(tmp_path: Path) -> None:
    """launch/submit.sh --dry-run: the `ray job submit` command it would run (no job server here:
    the test cluster has no dashboard)."""
    import shlex

    from conftest import REPO

    env = dict(os.environ, HF_HOME="/shared/hf", HF_TOKEN="secret", WANDB_API_KEY="secret", NCCL_DEBUG="INFO")
    p = subprocess.run(["bash", str(REPO / "launch/submit.sh"), "--dry-run", "--address", "http://head:8265",
                        "peft=lora", "launcher.num_workers=16", "run.dir=/shared/runs/r1"],
                       env=env, capture_output=True, text=True, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    argv = shlex.split(p.stdout)
    assert argv[:5] == ["ray", "job", "submit", "--address", "http://head:8265"]
    runtime_env = json.loads(argv[argv.index("--runtime-env-json") + 1])
    assert runtime_env["working_dir"] == str(REPO) and ".git" in runtime_env["excludes"]
    from ftcluster.launch.ray import forwarded_env

    assert runtime_env["env_vars"] == forwarded_env(env)  # the same rule as launcher=ray's own forwarding
    assert runtime_env["env_vars"]["HF_HOME"] == "/shared/hf" and "HF_TOKEN" not in runtime_env["env_vars"]
    entry = shlex.split(argv[argv.index("--") + 1])
    assert entry == ["python", "-m", "ftcluster", "train", "launcher=ray", "launcher.address=auto", "peft=lora",
                     "launcher.num_workers=16", "run.dir=/shared/runs/r1"]
    bad = subprocess.run(["bash", str(REPO / "launch/submit.sh"), "--dry-run", "run.dir=runs/r1"], env=env,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "run.dir=/ABSOLUTE/PATH" in bad.stderr


# --- the real Ray --------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_env(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """One local Ray cluster for every Ray test here: `ray start --head --block` in its own process
    group (stopped by that group's id afterwards; never `ray stop`, which would stop every Ray on the
    host). Its own port and temp dir (short: Ray's socket paths must stay under 108 bytes), no token
    auth (a private test cluster), 4 logical CPUs (counters, not cores)."""
    port = _free_port()
    temp = tempfile.mkdtemp(prefix="ftc-ray-", dir="/tmp")
    env = cli_env(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    log_path = tmp_path_factory.mktemp("ray") / "head.log"
    with open(log_path, "w") as log:
        head = subprocess.Popen([sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
                                 f"--port={port}", "--num-cpus=4", "--num-gpus=0", "--include-dashboard=false",
                                 "--disable-usage-stats", f"--temp-dir={temp}"],
                                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 180
        while "block forever" not in log_path.read_text():
            if head.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"ray start --head failed:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        # No spot nodes here: skip Ray Train's preemption-watcher actor (one process less per run).
        yield cli_env(RAY_AUTH_MODE="disabled", RAY_ADDRESS=f"127.0.0.1:{port}", RAY_TRAIN_ENABLE_PREEMPTION_WATCHER="0")
    finally:
        for sig, wait in ((signal.SIGTERM, 3), (signal.SIGKILL, 10)):  # SIGTERM alone drains for 30 s
            try:
                os.killpg(head.pid, sig)  # the group `start_new_session` made: this cluster only
            except ProcessLookupError:
                break
            try:
                head.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def reference(ray_env: dict, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    """The issue's job, undisturbed: 2 Ray workers to a committed step-10 checkpoint."""
    cwd = tmp_path_factory.mktemp("ray_ref")
    p = train_ok(*RAY_JOB, run=cwd / "X", cwd=cwd, env=ray_env, timeout=300)
    return cwd / "X", p


@pytest.mark.slow
def test_two_workers_commit_step_10(reference: tuple[Path, subprocess.CompletedProcess]) -> None:
    run, p = reference
    assert committed_steps(run) == [8, 10]
    assert sorted(losses(run)) == list(range(1, 11))
    meta = json.loads((run / "checkpoints/step_10/meta.json").read_text())
    assert meta["step"] == 10 and meta["world_size"] == 2
    pre = json.loads((run / "logs/preflight.json").read_text())
    assert pre["world_size"] == 2 and [w["rank"] for w in pre["workers"]] == [0, 1]
    assert [w["local_rank"] for w in pre["workers"]] == [0, 1]
    for name in ("rank0.log", "rank1.log", "rank1.out"):
        assert (run / "logs" / name).is_file(), name
    out = p.stdout + p.stderr
    assert "pre-flight ok" in out and "rank 1: host" in out
    assert "ftcluster: done in" in out and "0 restart(s): step 10, loss" in out
    # Metrics reached Ray Train's controller (newest record per round, so maybe fewer than 10 reports).
    assert "step report(s), the last for step 10" in out
    reports = json.loads((run / "logs/ray_reports.json").read_text())
    assert 1 <= reports["reports"] <= 10 and reports["last"]["step"] == 10
    assert reports["last"]["loss"] == losses(run)[10]
    assert f"checkpoints {run / 'checkpoints'}" in out and "(newest: step_10)" in out
    # The quiet console (issue 16): no Ray controller / PreemptionWatcher lines, no colour codes,
    # each of rank 0's lines once (Ray Train's print patch doubled them); Ray's lines are in the logs.
    assert third_party_lines(out) == [], out[-4000:]
    assert out.count("step 10/10: loss") == 1 and out.count("pre-flight ok") == 1, out[-4000:]
    assert (run / "logs/driver.log").is_file()


@pytest.mark.slow
def test_injected_failure_recovers_with_identical_losses(reference: tuple[Path, subprocess.CompletedProcess],
                                                         ray_env: dict, tmp_path: Path) -> None:
    run = tmp_path / "X"
    p = run_cli("train", *RAY_JOB, "launcher.max_failures=1", "debug.fail_at_step=5", f"run.dir={run}",
                cwd=tmp_path, env=ray_env, timeout=300)
    assert p.returncode == 0, explain(p)
    out = p.stdout + p.stderr
    assert "1 restart(s): step 10" in out and "rank 1: InjectedFailure: debug.fail_at_step=5" in out, explain(p)
    assert [e["step"] for e in events(run, "resume")] == [4]  # the newest committed checkpoint before step 5
    assert committed_steps(run) == [8, 10]
    ref, got = losses(reference[0]), losses(run)  # last logged value per step
    assert [got[s] for s in range(5, 11)] == [ref[s] for s in range(5, 11)]
    assert "InjectedFailure" in (run / "logs/rank1.error").read_text()
    failures = [json.loads(line) for line in (run / "logs/ray_failures.jsonl").read_text().splitlines()]
    assert len(failures) == 1 and failures[0]["restart"] and "InjectedFailure" in failures[0]["errors"]["1"]


@pytest.fixture(scope="module")
def failed_run(ray_env: dict, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess, Path]:
    cwd = tmp_path_factory.mktemp("ray_fail")
    run = cwd / "X"
    p = run_cli("train", *RAY_JOB, "launcher.max_failures=0", "debug.fail_at_step=5", f"run.dir={run}",
                cwd=cwd, env=ray_env, timeout=300)
    return run, p, cwd


@pytest.mark.slow
def test_no_retries_exits_nonzero_naming_the_worker(failed_run: tuple[Path, subprocess.CompletedProcess, Path]) -> None:
    run, p, _ = failed_run
    assert p.returncode == 1, explain(p)
    assert "training failed on 1 Ray worker(s)" in p.stderr and "0 restart(s)" in p.stderr, explain(p)
    assert "rank 1 (host " in p.stderr and "InjectedFailure: debug.fail_at_step=5: injected failure on rank 1" in p.stderr
    assert committed_steps(run) == [2, 4]
    assert "Traceback" in (run / "logs/rank1.error").read_text()


@pytest.mark.slow
def test_restarted_driver_continues_the_run(failed_run: tuple[Path, subprocess.CompletedProcess, Path],
                                            reference: tuple[Path, subprocess.CompletedProcess], ray_env: dict) -> None:
    run, first, cwd = failed_run
    assert first.returncode == 1, explain(first)
    p = run_cli("train", *RAY_JOB, "launcher.max_failures=0", "debug.fail_at_step=5", f"run.dir={run}",
                cwd=cwd, env=ray_env, timeout=300)  # the same command again
    assert p.returncode == 0, explain(p)
    assert [e["step"] for e in events(run, "resume")] == [4]
    ref, got = losses(reference[0]), losses(run)
    assert [got[s] for s in range(1, 11)] == [ref[s] for s in range(1, 11)]
    assert committed_steps(run) == [8, 10]


@pytest.mark.slow
def test_sigkilled_worker_is_replaced_and_the_run_recovers(reference: tuple[Path, subprocess.CompletedProcess],
                                                           ray_env: dict, tmp_path: Path) -> None:
    """A worker process dies without a Python exception (kill -9, as the OOM killer does): Ray
    notices the dead actor, restarts the group, and training resumes from the newest checkpoint."""
    run = tmp_path / "X"
    cmd = [sys.executable, "-m", "ftcluster", "train", *RAY_JOB, "launcher.max_failures=1", f"run.dir={run}"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=ray_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 240
        while not (committed_steps(run) and max(losses(run), default=0) >= 3):
            assert proc.poll() is None and time.time() < deadline, "the run ended before the kill"
            time.sleep(0.1)
        pid = [w["pid"] for w in json.loads((run / "logs/preflight.json").read_text())["workers"] if w["rank"] == 1][0]
        os.kill(pid, signal.SIGKILL)  # rank 1's Ray worker process (started by this test's cluster)
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-4000:]
    assert "1 restart(s): step 10" in out, out[-4000:]
    failures = [json.loads(line) for line in (run / "logs/ray_failures.jsonl").read_text().splitlines()]
    assert len(failures) == 1 and "1" in failures[0]["errors"], failures
    resumed = events(run, "resume")
    assert len(resumed) == 1 and resumed[0]["step"] in (2, 4, 6, 8)
    ref, got = losses(reference[0]), losses(run)
    assert [got[s] for s in range(1, 11)] == [ref[s] for s in range(1, 11)]
