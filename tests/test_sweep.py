"""`ftcluster sweep` (Ray Tune) and the multirun table.

1. Pure logic: Hydra sweep syntax -> Tune domains (Hydra's own parser), the points checked before
   any trial, invalid points and unknown keys named, the results table ranked from run dirs.
2. End to end through the real CLI on Ray's local cluster (CPU, gloo, 2-worker trials of the
   embedded tiny model): a 3-trial random sweep with ASHA over a wide learning-rate range, its
   driver SIGKILLed after the first finished trial and started again (finished trials are not
   re-run); a trial that crashes once is retried from its checkpoint (W&B offline: the retry
   continues the trial's W&B run); a grid multirun on the local launcher writes the same table.
   On the real one-node Slurm (tests/test_slurm.py's fixture): a sweep submitted as one job
   finishes with its table.

Wall time here (2 cores shared, load average ~20): the fast tier ~30 s; end to end: the ASHA
sweep with its kill and restart 9.5 min, the retry 5 min, the multirun 2.5 min, Slurm 3 min
(each trial's Ray Train start dominates; an idle 2-core box is several times faster).
"""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import cli_env, committed_steps, events, explain, records, run_cli
from ftcluster.config import ConfigError

TINY = ["eval.max_batches=2", "eval.num_prompts=0", "train.micro_batch_size=4", "data.max_seq_len=128"]


def ray_sweep_env() -> dict[str, str]:
    """The CLI's environment for a sweep on its own local Ray: no spot nodes here, so no Ray Train
    preemption-watcher actor per trial (one process less to start; as tests/test_ray.py's cluster)."""
    return cli_env(RAY_TRAIN_ENABLE_PREEMPTION_WATCHER="0")


# --- 1. pure logic ------------------------------------------------------------------------------

def test_hydra_sweep_syntax_becomes_tune_domains() -> None:
    from ray.tune.search.sample import Categorical, Float, LogUniform, Uniform

    from ftcluster.launch.space import check_points, parse_space, tune_space
    from ftcluster.sweep import split_overrides

    plain, space = split_overrides(["train.max_steps=5", "optim.lr=tag(log,interval(1e-5,1e-3))",
                                    "optim.weight_decay=interval(0,0.1)", "peft.rank=choice(8,16,32)",
                                    "optim.warmup_steps=range(0,100,step=50)", "seed=1,2"])
    assert plain == ["train.max_steps=5"]
    dims = parse_space(space)
    tune = tune_space(dims, grid=False)
    assert isinstance(tune["optim.lr"], Float) and isinstance(tune["optim.lr"].get_sampler(), LogUniform)
    assert (tune["optim.lr"].lower, tune["optim.lr"].upper) == (1e-5, 1e-3)
    assert isinstance(tune["optim.weight_decay"].get_sampler(), Uniform)
    assert isinstance(tune["peft.rank"], Categorical) and tune["peft.rank"].categories == [8, 16, 32]
    assert tune["optim.warmup_steps"].categories == [0, 50]
    assert tune["seed"].categories == [1, 2]
    # Every bound and every value is a point to check; a discrete space is checked as the whole grid.
    points = check_points(dims)
    assert {"optim.lr": 1e-3, "optim.weight_decay": 0.0, "peft.rank": 8, "optim.warmup_steps": 0, "seed": 1} in points
    assert {p["peft.rank"] for p in points} == {8, 16, 32}
    grid = parse_space({"peft.rank": "choice(8,16)", "seed": "range(0,3)"})
    assert len(check_points(grid)) == 6
    assert tune_space(grid, grid=True)["peft.rank"] == {"grid_search": [8, 16]}
    with pytest.raises(ConfigError, match=r"sweep.params.optim.lr: sweep.search=grid needs choice"):
        tune_space(parse_space({"optim.lr": "interval(0.1,0.2)"}), grid=True)
    with pytest.raises(ConfigError, match=r"sweep.params.peft: .*group choices"):
        parse_space({"peft": "choice(none,lora)"})
    with pytest.raises(ConfigError, match=r"sweep.params.optim.lr: '0.1' is one value"):
        parse_space({"optim.lr": "0.1"})


@pytest.mark.parametrize("overrides,key", [
    (["peft=lora", "peft.rank=choice(0,8)"], r"peft\.rank: must be >= 1; got 0 \(sweep point peft\.rank=0\)"),
    (["optim.lr=tag(log,interval(1e-4,1e-1))", "optim.foo=choice(1,2)"], r"optim\.foo: not a key of the config"),
    (["optim.warmup_steps=interval(0,10)"], r"optim\.warmup_steps: .*could not be converted to Integer"),
])
def test_invalid_point_or_unknown_key_fails_naming_it(overrides: list[str], key: str, tmp_path: Path) -> None:
    from ftcluster.sweep import check_sweep_points, compose_sweep

    with pytest.raises(ConfigError, match=key):
        _, job = compose_sweep([*overrides, f"run.dir={tmp_path}"])
        check_sweep_points(job, sweep_dir=tmp_path)


def _fake_trial(root: Path, name: str, *, lr: float, evals: list[tuple[int, float]], closing: list[dict]) -> None:
    d = root / name
    d.mkdir(parents=True)
    lines = [{"event": "start", "step": 0, "world_size": 2, "time": 100.0}]
    for step, value in evals:
        lines += [{"step": step, "loss": value + 0.1, "tokens_per_s": 1000.0},
                  {"event": "eval", "step": step, "eval_loss": value, "time": 100.0 + step}]
    lines += closing
    (d / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (d / "trial.json").write_text(json.dumps({"trial": name, "params": {"optim.lr": lr}, "tune_status": "TERMINATED"}))


def test_results_table_ranks_trials_by_their_own_metrics(tmp_path: Path) -> None:
    from ftcluster.report import sweep_rows, write_sweep_report

    (tmp_path / "sweep.json").write_text(json.dumps({"metric": "eval_loss", "mode": "min"}))
    _fake_trial(tmp_path, "trial_a", lr=1e-1, evals=[(2, 5.0), (4, 6.0)],
                closing=[{"event": "early_stopped", "step": 4, "time": 110.0}, {"event": "end", "step": 4, "time": 110.0}])
    _fake_trial(tmp_path, "trial_b", lr=1e-3, evals=[(2, 4.0), (4, 3.0), (6, 3.5)],
                closing=[{"event": "end", "step": 6, "time": 120.0}])
    _fake_trial(tmp_path, "trial_c", lr=1e-4, evals=[(2, 6.5)], closing=[])  # still running (or killed)
    rows = write_sweep_report(tmp_path)
    assert [r["trial"] for r in rows] == ["trial_b", "trial_a", "trial_c"]
    assert [(r["status"], r["best"], r["best_step"], r["final"]) for r in rows] == [
        ("finished", 3.0, 4, 3.5), ("early_stopped", 5.0, 2, 6.0), ("running", 6.5, 2, 6.5)]
    with open(tmp_path / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [(t["trial"], float(t["optim.lr"]), float(t["best_eval_loss"])) for t in table] == [
        ("trial_b", 1e-3, 3.0), ("trial_a", 1e-1, 5.0), ("trial_c", 1e-4, 6.5)]
    md = (tmp_path / "results.md").read_text()
    assert md.index("trial_b") < md.index("trial_a") and "1 trial(s) stopped early" in md
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert sweep_rows(tmp_path) == rows  # the report reads files only: again, the same


class _Trial:
    """Stands in for a Tune Trial: ASHA reads only its id (and its config when logging)."""

    def __init__(self, trial_id: str) -> None:
        self.trial_id = trial_id
        self.config: dict = {}


def test_asha_stop_becomes_a_request_never_a_kill(tmp_path: Path) -> None:
    from ftcluster.launch.tune import EARLY_STOP_FILE, GracefulASHA, trial_dir

    asha = GracefulASHA(sweep_dir=str(tmp_path), time_attr="step", max_t=8, grace_period=2, reduction_factor=2)
    assert asha.set_search_properties("eval_loss", "min")
    good, bad = _Trial("t_00000"), _Trial("t_00001")
    for t in (good, bad):
        asha.on_trial_add(None, t)
    assert asha.on_trial_result(None, good, {"step": 2, "eval_loss": 1.0}) == asha.CONTINUE
    assert not trial_dir(tmp_path, good.trial_id).exists()
    # Plain ASHA would STOP the worse trial here (and Tune would kill it): a request file instead.
    assert asha.on_trial_result(None, bad, {"step": 2, "eval_loss": 5.0}) == asha.CONTINUE
    request = trial_dir(tmp_path, bad.trial_id) / EARLY_STOP_FILE
    assert request.read_text().startswith("step 2 eval_loss 5.0")
    assert asha.on_trial_result(None, bad, {"step": 3, "eval_loss": 9.0}) == asha.CONTINUE  # until it stops itself
    # At max_t ASHA says STOP for every trial: the trial is ending by itself, so no request.
    assert asha.on_trial_result(None, good, {"step": 8, "eval_loss": 0.5}) == asha.CONTINUE
    assert not trial_dir(tmp_path, good.trial_id).exists()


def test_early_stop_request_file_is_a_stop_early_request_of_the_main_rank(monkeypatch: pytest.MonkeyPatch,
                                                                         tmp_path: Path) -> None:
    from ftcluster.preemption import EARLY_STOP, EARLY_STOP_REQUEST_ENV, NONE, StopReason, StopRequests

    request = tmp_path / "early-stop-request"
    monkeypatch.setenv(EARLY_STOP_REQUEST_ENV, str(request))
    main, other = StopRequests(is_main=True), StopRequests(is_main=False)
    try:
        assert main.local() == NONE
        request.write_text("step 5\n")
        assert (main.local(), other.local()) == (EARLY_STOP, NONE)  # rank 0 looks; the all-reduce tells the rest
        assert StopReason(EARLY_STOP) == StopReason.EARLY_STOPPED  # the trainer's stop reason: checkpoint, exit 0
    finally:
        other.close()
        main.close()


def test_optuna_search_suggests_points_of_the_space(tmp_path: Path) -> None:
    """sweep.search=optuna is Ray Tune's Optuna integration (TPE), seeded, behind the concurrency limit."""
    pytest.importorskip("optuna")
    from ftcluster.launch.space import parse_space, tune_space
    from ftcluster.launch.tune import _searcher
    from ftcluster.sweep import compose_sweep

    _, job = compose_sweep(["sweep=optuna", "optim.lr=tag(log,interval(1e-4,1e-1))", "peft=lora",
                            "peft.rank=choice(8,16)", "sweep.max_concurrent_trials=2", f"run.dir={tmp_path}"])
    searcher = _searcher(job)
    assert type(searcher).__name__ == "ConcurrencyLimiter" and searcher.max_concurrent == 2
    assert searcher.set_search_properties("eval_loss", "min", tune_space(parse_space(job.sweep.params), grid=False))
    points = [searcher.suggest(f"t{i}") for i in range(3)]
    assert points[2] is None  # the third waits for one of the two running trials
    for point in points[:2]:
        assert 1e-4 <= point["optim.lr"] <= 1e-1 and point["peft.rank"] in (8, 16)
    again = _searcher(job)
    again.set_search_properties("eval_loss", "min", tune_space(parse_space(job.sweep.params), grid=False))
    assert again.suggest("t0") == points[0]  # seeded by job.seed: the same sweep samples the same points


# --- 2. end to end ------------------------------------------------------------------------------

def _trial_dirs(sweep: Path) -> list[Path]:
    return sorted(p for p in sweep.glob("trial_*") if p.is_dir() and p.name != "trial_check")


def _table(sweep: Path) -> list[dict]:
    with open(sweep / "results.csv") as f:
        return list(csv.DictReader(f))


def _wait_for_finished_trial(proc: subprocess.Popen, sweep: Path, timeout: float) -> Path:
    """The first trial Tune has recorded as TERMINATED (trial.json), once the next trial has logged
    (by then Tune has saved its experiment state with the first one finished: it saves every
    second, TUNE_GLOBAL_CHECKPOINT_S), while the driver still runs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        dirs = _trial_dirs(sweep)
        done = [d for d in dirs if (d / "trial.json").is_file()
                and json.loads((d / "trial.json").read_text()).get("tune_status") == "TERMINATED"]
        if done and any((d / "metrics.jsonl").is_file() for d in dirs if d != done[0]):
            return done[0]
        time.sleep(0.5)
    raise AssertionError(f"no trial finished within {timeout} s (driver exit {proc.poll()})")


@pytest.mark.slow
@pytest.mark.cluster
def test_asha_sweep_killed_and_continued(tmp_path: Path) -> None:
    """The issue's sweep, small: 3 trials x 2 workers, ASHA on eval_loss over lr in [1e-4, 3e-1]
    (log); the driver is SIGKILLed after the first finished trial, while the second runs, and
    started again. Three trials are the fewest that show all of it: the first finishes before the
    kill, the second is interrupted and continued, and the third (seeded: lr 1.4e-4) is worse at
    every evaluation than the second, so ASHA stops it at a rung (each trial costs ~35 s of Ray
    start and teardown on an idle 2-core box, twice that in the suite)."""
    sweep = tmp_path / "sweep"
    args = ["sweep", "optim.lr=tag(log,interval(1e-4,3e-1))", "sweep.num_samples=3", "sweep.scheduler=asha",
            "launcher.address=local", "launcher.num_workers=2", "eval.every_steps=2", "train.max_steps=8",
            "checkpoint.every_steps=4", *TINY, f"run.dir={sweep}"]
    first = subprocess.Popen([sys.executable, "-m", "ftcluster", *args], cwd=tmp_path, env=ray_sweep_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    done = _wait_for_finished_trial(first, sweep, timeout=400)
    before = (done / "metrics.jsonl").read_bytes()
    os.killpg(first.pid, signal.SIGKILL)  # kill -9 of the driver (and the Ray cluster it started)
    first.communicate()
    second = run_cli(*args, cwd=tmp_path, timeout=900, env=ray_sweep_env())
    assert second.returncode == 0, explain(second)
    assert "continuing the sweep" in second.stdout
    trials = _trial_dirs(sweep)
    assert len(trials) == 3, trials
    assert (done / "metrics.jsonl").read_bytes() == before  # the finished trial was not run again
    assert len(events(done, "start")) == 1

    rows = _table(sweep)
    assert len(rows) == 3
    ranked = [float(r["best_eval_loss"]) for r in rows]
    assert ranked == sorted(ranked)
    for row in rows:  # the table is each trial's own metrics.jsonl
        evals = {e["step"]: e["eval_loss"] for e in events(Path(row["run_dir"]), "eval")}
        assert float(row["best_eval_loss"]) == min(evals.values())
        assert int(row["best_step"]) == min(evals, key=evals.get)
        assert float(row["final_eval_loss"]) == evals[max(evals)]
        assert row["status"] in ("finished", "early_stopped"), row
    stopped = [r for r in rows if r["status"] == "early_stopped"]
    assert stopped, rows
    for row in stopped:  # ended at a step boundary with a committed checkpoint, not killed
        run = Path(row["run_dir"])
        ev = events(run, "early_stopped")[-1]
        assert int(row["steps"]) == ev["step"] < 8
        assert ev["step"] in committed_steps(run)
        assert events(run, "end")[-1]["step"] == ev["step"]
    assert (sweep / "results.md").is_file() and (sweep / "curves.png").is_file()
    assert f"best trial: {rows[0]['trial']}" in second.stdout
    export_line = next(line for line in second.stdout.splitlines() if line.startswith("export it: ftcluster export"))

    out = tmp_path / "best_export"
    exported = run_cli("export", rows[0]["best_checkpoint"], str(out), cwd=tmp_path)
    assert exported.returncode == 0, explain(exported)
    assert any(out.glob("*.safetensors")), list(out.iterdir())
    assert rows[0]["best_checkpoint"] in export_line

    (sweep / "results.md").unlink()
    redraw = run_cli("report", str(sweep), cwd=tmp_path)
    assert redraw.returncode == 0, explain(redraw)
    assert (sweep / "results.md").is_file() and _table(sweep) == rows


@pytest.mark.slow
@pytest.mark.cluster
def test_crashed_trial_is_retried_from_its_checkpoint_and_continues_its_wandb_run(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    p = run_cli("sweep", "sweep=grid", "optim.lr=choice(3e-3)", "sweep.max_failures=1",
                "sweep.name=retry",
                "launcher.address=local", "launcher.num_workers=2", "train.max_steps=6", "eval.every_steps=3",
                "checkpoint.every_steps=2", "debug.fail_at_step=5", "logger=wandb", *TINY, f"run.dir={sweep}",
                cwd=tmp_path, timeout=600, env=ray_sweep_env())
    assert p.returncode == 0, explain(p)
    (trial,) = _trial_dirs(sweep)
    resumed = events(trial, "resume")
    assert [e["step"] for e in resumed] == [4], resumed  # from the newest checkpoint before the crash
    assert "injected failure" in (trial / "logs" / "rank1.error").read_text()
    steps = [r["step"] for r in records(trial) if "loss" in r and "event" not in r]
    assert steps[-1] == 6 and steps.count(1) == 1  # not started over
    (row,) = _table(sweep)
    assert row["status"] == "finished" and float(row["optim.lr"]) == 3e-3
    runs = sorted((trial / "wandb").glob("offline-run-*"))
    run_id = (trial / "wandb_run_id").read_text().strip()
    assert len(runs) == 2 and all(r.name.endswith(run_id) for r in runs), runs  # one W&B run, continued
    cfg = (trial / "config.yaml").read_text()
    assert "group: retry" in cfg and "optim.lr: choice(3e-3)" in cfg  # the group, and the space in every run


@pytest.mark.slow
def test_grid_multirun_on_the_local_launcher_writes_the_table(tmp_path: Path) -> None:
    multi = tmp_path / "multi"
    p = run_cli("train", "-m", "optim.lr=1e-3,1e-2", "train.max_steps=3", "eval.every_steps=3", *TINY,
                f"run.dir={multi}", cwd=tmp_path, timeout=600)
    assert p.returncode == 0, explain(p)
    rows = _table(multi)
    assert sorted(float(r["optim.lr"]) for r in rows) == [1e-3, 1e-2]  # the varying override only
    assert "train.max_steps" not in rows[0]
    for row in rows:
        evals = [e["eval_loss"] for e in events(Path(row["run_dir"]), "eval")]
        assert float(row["best_eval_loss"]) == min(evals)
    assert (multi / "results.md").is_file() and (multi / "curves.png").is_file()


# --- the real Slurm: one allocation runs the whole sweep ------------------------------------------

from test_slurm import _job_ids, slurm, wait_job  # noqa: E402,F401 - the one-node Slurm fixture and helpers


@pytest.mark.slow
def test_slurm_sweep_is_one_job_that_finishes_with_its_table(slurm: None, tmp_path: Path) -> None:  # noqa: F811
    sweep = tmp_path / "sweep"
    p = run_cli("sweep", "launcher=slurm", "launcher.nodes=1", "launcher.gpus_per_node=0", "sweep=grid",
                "optim.lr=choice(1e-3,1e-2)", "train.max_steps=4", "eval.every_steps=2", *TINY, f"run.dir={sweep}",
                cwd=tmp_path)
    assert p.returncode == 0, explain(p)
    ids = _job_ids(p.stdout)
    assert len(ids) == 1, p.stdout  # one allocation for the whole sweep
    state, code, _ = wait_job(ids[0], run=sweep)
    out = (sweep / f"slurm/submit-1/slurm-{ids[0]}.out").read_text()
    assert (state, code) == ("COMPLETED", "0:0"), out[-4000:]
    rows = _table(sweep)
    assert sorted(float(r["optim.lr"]) for r in rows) == [1e-3, 1e-2]
    assert all(r["status"] == "finished" and int(r["steps"]) == 4 for r in rows), rows
    assert "best trial: " in out and (sweep / "curves.png").is_file()
