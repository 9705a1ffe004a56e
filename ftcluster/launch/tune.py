"""`ftcluster sweep`: Ray Tune drives trials that are each the same train() through Ray Train.

    driver (this process, light: a login node will do)     each trial (a Tune function trial)
    --------------------------------------------------     ----------------------------------
    Tuner(search: random | grid | Optuna TPE,              trial config = base + point (typed and
          scheduler: FIFO | ASHA, FailureConfig)             validated again), own run dir, own seed
    restore: Tuner.can_restore / Tuner.restore             TorchTrainer(worker_main) as launcher=ray
    TrialRecorder: Tune's verdict per trial (trial.json)   reads its metrics.jsonl, tune.report()s
    ASHA's stop -> the trial's early-stop request file       each eval record (Tune ranks on them)
    results.csv / results.md / curves.png, the best trial

    <sweep dir>/ (run.dir)   config.yaml (the base), sweep.json (the space, metric, mode),
      trial_<id>/            a run dir per trial (config.yaml, trial.json, metrics.jsonl, checkpoints/)
      tune/                  Ray Tune's experiment state (what `Tuner.restore` continues from)
      results.csv, results.md, curves.png   (ftcluster.report; `ftcluster report SWEEP_DIR` redraws)

Early stopping keeps work: Tune would stop a trial by killing its actor, and the Ray Train workers
with it, mid-step. The ASHA decision is turned into a request instead (`GracefulASHA`): rank 0
sees the file at its next log point, every rank agrees, a checkpoint commits, an `early_stopped`
event is written and the trial returns as finished. Checkpoints stay ftcluster's (the checkpoint
manager's commit and retention); a retried or restored trial resumes from its run dir
(resume=auto), so Tune needs no copy of them.
"""
from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

from ftcluster.config import ConfigError, JobConfig, RayLauncherConfig
from ftcluster.launch.space import parse_space, point_of, trial_job, trial_seed, tune_space
from ftcluster.preemption import EARLY_STOP_REQUEST_ENV

# <sweep dir>/sweep.json: the space, metric and mode (the report reads them; marks a sweep dir for
# the Slurm job entry); <trial run dir>/trial.json: the trial's id, point and Tune's verdict.
from ftcluster.report import SWEEP_FILE, TRIAL_FILE  # noqa: E402 - the report reads what the sweep writes
EARLY_STOP_FILE = "early-stop-request"
TUNE_DIR = "tune"
TRIAL_CPU = 0.01
"""Logical CPUs of a Tune trial itself: it only waits (and reads a file); its Ray Train workers hold
the trial's resources. (Tune refuses an empty request.)"""
POLL_S = 1.0
"""How often a trial reads its metrics.jsonl for new eval records to report to Tune."""


def check(job: JobConfig) -> None:
    """What a sweep needs beyond its trials' own checks, before anything starts."""
    s = job.sweep
    if not s.params:
        raise ConfigError("sweep.params: the search space is empty; give sweep overrides such as "
                          "optim.lr='tag(log,interval(1e-5,1e-3))' or set sweep.params")
    if not job.data.has_eval:
        raise ConfigError(f"sweep.metric: {s.metric} needs held-out data: set data.eval_path, data.eval_fraction "
                          "or data.eval_samples")
    if s.scheduler == "asha" and job.eval.every_steps < 1:
        raise ConfigError("sweep.scheduler: asha compares trials at evaluations; set eval.every_steps >= 1")
    if s.search == "optuna":
        import importlib.util

        if importlib.util.find_spec("optuna") is None:
            raise ConfigError("sweep.search: optuna needs the optuna package: pip install 'ftcluster[sweep]'")
    parse_space(s.params)


def trial_dir(sweep_dir: Path, trial_id: str) -> Path:
    return Path(sweep_dir) / f"trial_{trial_id}"


# --- the driver ---------------------------------------------------------------------------------

def run_sweep(job: JobConfig, sweep_dir: Path) -> int:
    """Run (or continue) the sweep on the Ray cluster launcher.address names; the exit code."""
    from ftcluster.launch import ray as _ray_defaults  # noqa: F401 - sets Ray Train's environment first

    import ray

    cfg: RayLauncherConfig = job.launcher
    started = False
    if not ray.is_initialized():
        if cfg.address == "local":
            per_trial = (1 if cfg.num_workers == "auto" else int(cfg.num_workers)) * max(1, cfg.cpus_per_worker)
            ray.init(num_cpus=per_trial * job.sweep.max_concurrent_trials + 1, include_dashboard=False,
                     logging_level="WARNING")
        else:
            ray.init(address=cfg.address, logging_level="WARNING")
        started = True
    try:
        return _tune(job, Path(sweep_dir))
    finally:
        if started:
            ray.shutdown()


def _tuner(job: JobConfig, sweep_dir: Path):  # type: ignore[no-untyped-def]
    from ray import tune

    s = job.sweep
    trainable = tune.with_resources(tune.with_parameters(run_trial, base=job, sweep_dir=str(sweep_dir),
                                                         driver_cwd=os.getcwd()),
                                    {"CPU": TRIAL_CPU})
    path = sweep_dir / TUNE_DIR
    if tune.Tuner.can_restore(str(path)):
        print(f"ftcluster: continuing the sweep in {sweep_dir} (Ray Tune restore: finished trials are kept, "
              "unfinished ones resume from their checkpoints)", flush=True)
        return tune.Tuner.restore(str(path), trainable, resume_unfinished=True, resume_errored=True)
    mode = "max" if s.higher_is_better else "min"
    return tune.Tuner(
        trainable,
        param_space=tune_space(parse_space(s.params), grid=s.search == "grid"),
        tune_config=tune.TuneConfig(metric=s.metric, mode=mode, search_alg=_searcher(job), scheduler=_scheduler(job, sweep_dir),
                                    num_samples=s.num_samples),  # concurrency: set on the searcher (_searcher)
        run_config=tune.RunConfig(name=TUNE_DIR, storage_path=str(sweep_dir),
                                  failure_config=tune.FailureConfig(max_failures=s.max_failures),
                                  callbacks=[TrialRecorder(sweep_dir=str(sweep_dir))], verbose=1),
    )


def _searcher(job: JobConfig):  # type: ignore[no-untyped-def]
    # Seeded: the same sweep samples the same points. The concurrency limit goes to the searcher
    # too: TuneConfig.max_concurrent_trials does not reach a BasicVariantGenerator passed in.
    n = job.sweep.max_concurrent_trials
    if job.sweep.search == "optuna":
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        return ConcurrencyLimiter(OptunaSearch(seed=job.seed), max_concurrent=n)
    from ray.tune.search import BasicVariantGenerator

    return BasicVariantGenerator(random_state=job.seed, max_concurrent=n)  # random and grid


def _scheduler(job: JobConfig, sweep_dir: Path):  # type: ignore[no-untyped-def]
    if job.sweep.scheduler == "fifo":
        return None
    return GracefulASHA(sweep_dir=str(sweep_dir), time_attr="step", max_t=job.train.max_steps,
                        grace_period=job.sweep.grace_evals * job.eval.every_steps,
                        reduction_factor=job.sweep.reduction_factor)


def _tune(job: JobConfig, sweep_dir: Path) -> int:
    # Tune saves its experiment state at most every TUNE_GLOBAL_CHECKPOINT_S (adaptive, >= 10 s by
    # default); a restart after kill -9 must know of every trial that finished, so save often:
    # the state is small.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # Tune's plain trial table, not the per-result log
    t0 = time.time()
    results = _tuner(job, sweep_dir).fit()
    from ftcluster.report import ReportError, print_sweep, write_sweep_report

    errors = sum(1 for r in results if r.error is not None)
    try:
        rows = write_sweep_report(sweep_dir)
    except ReportError as e:
        print(f"ftcluster: sweep finished but its table could not be written: {e}", file=sys.stderr)
        return 1
    print(f"ftcluster: sweep done in {time.time() - t0:.0f} s: {len(rows)} trial(s), {errors} failed", flush=True)
    print_sweep(sweep_dir, rows)
    return 1 if errors else 0


# --- Tune callbacks -----------------------------------------------------------------------------

def _update_trial_file(run_dir: Path, **fields: Any) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / TRIAL_FILE
    data = json.loads(path.read_text()) if path.is_file() else {}
    data.update(fields)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def _tune_classes():  # type: ignore[no-untyped-def]
    from ray.tune import Callback
    from ray.tune.schedulers import ASHAScheduler

    return Callback, ASHAScheduler


_Callback, _ASHA = _tune_classes()


class TrialRecorder(_Callback):
    """In the driver: Tune's verdict for each trial (finished or errored, with its error), kept in
    the trial's trial.json for the results table."""

    def __init__(self, *, sweep_dir: str) -> None:
        self.sweep_dir = Path(sweep_dir)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        _update_trial_file(trial_dir(self.sweep_dir, trial.trial_id), trial=trial.trial_id, tune_status="TERMINATED")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        err = getattr(trial, "error_file", None)
        _update_trial_file(trial_dir(self.sweep_dir, trial.trial_id), trial=trial.trial_id, tune_status="ERROR",
                           error_file=str(err) if err else None)


class GracefulASHA(_ASHA):
    """Tune's ASHA, deciding as ever; a STOP before the last step becomes the trial's early-stop
    request (its ranks checkpoint and end at the next log point, see the module docstring) and the
    trial keeps reporting until then (ASHA has recorded it at the rung; later results are not judged)."""

    def __init__(self, *, sweep_dir: str, time_attr: str, max_t: int, grace_period: int,
                 reduction_factor: float) -> None:
        super().__init__(time_attr=time_attr, max_t=max_t, grace_period=grace_period,
                         reduction_factor=reduction_factor)
        self.sweep_dir = sweep_dir
        self.asked: set[str] = set()

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        # Never STOP: Tune would kill the trial's actor and its Ray Train run with it (no
        # checkpoint, no end record). At max_t (ASHA's own STOP there) the trial ends by itself.
        if trial.trial_id in self.asked:
            return self.CONTINUE
        decision = super().on_trial_result(tune_controller, trial, result)
        if decision == self.STOP and result.get("step", 0) < self._max_t:
            path = trial_dir(Path(self.sweep_dir), trial.trial_id) / EARLY_STOP_FILE
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(f"step {result.get('step')} {self.metric} {result.get(self.metric)}\n")
            self.asked.add(trial.trial_id)
            print(f"ftcluster: ASHA stops trial {trial.trial_id} at step {result.get('step')} ({self.metric} "
                  f"{result.get(self.metric):.4g}); it checkpoints at its next log point", flush=True)
        return self.CONTINUE


# --- each trial ---------------------------------------------------------------------------------

def run_trial(config: dict, *, base: JobConfig, sweep_dir: str, driver_cwd: str = "") -> None:
    """A Tune function trial: this point's job through Ray Train, its eval records reported to Tune.
    Raises when training fails, so Tune retries it (sweep.max_failures) from its checkpoints."""
    from ray import tune

    if driver_cwd and os.path.isdir(driver_cwd):
        # Relative paths in the config were validated from the driver's working directory; Tune
        # starts a trial in a directory of its own (and the Ray workers take this one, launcher=ray).
        os.chdir(driver_cwd)

    trial_id = tune.get_context().get_trial_id()
    index = int(trial_id.rsplit("_", 1)[-1]) if trial_id.rsplit("_", 1)[-1].isdigit() else 0
    run_dir = trial_dir(Path(sweep_dir), trial_id)
    point = point_of(config, parse_space(base.sweep.params))
    job = trial_job(base, point=point, run_dir=str(run_dir), name=f"{base.run.name}-{trial_id}",
                    seed=trial_seed(base, index))
    _prepare_trial_dir(job, run_dir, trial_id=trial_id, point=point)
    # Read by rank 0 of this trial's workers (forwarded with the FTCLUSTER_ environment).
    os.environ[EARLY_STOP_REQUEST_ENV] = str(run_dir / EARLY_STOP_FILE)
    outcome: dict[str, Any] = {}
    worker = threading.Thread(target=_train_trial, args=(job, run_dir, outcome), name="ftcluster-trial", daemon=True)
    worker.start()
    lines = 0
    while worker.is_alive():
        worker.join(POLL_S)
        lines = _report_evals(run_dir, lines)
    _report_evals(run_dir, lines)
    if outcome.get("code") != 0:
        raise RuntimeError(f"trial {trial_id} failed ({outcome.get('error') or 'exit ' + str(outcome.get('code'))}); "
                           f"logs in {run_dir / 'logs'}")


def _prepare_trial_dir(job: JobConfig, run_dir: Path, *, trial_id: str, point: dict) -> None:
    """The trial's run dir as the driver prepares one: logs/, the resolved config."""
    from ftcluster.train import resolved_config_yaml

    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(resolved_config_yaml(job))
    _update_trial_file(run_dir, trial=trial_id, params=point, seed=job.seed)


def _train_trial(job: JobConfig, run_dir: Path, outcome: dict) -> None:
    from ftcluster.launch.ray.launcher import run_workers

    try:
        outcome["code"] = run_workers(job, run_dir)
    except Exception as e:  # noqa: BLE001 - handed to the trial's thread, which raises it to Tune
        outcome["code"], outcome["error"] = 1, f"{type(e).__name__}: {e}"


def _report_evals(run_dir: Path, done: int) -> int:
    """tune.report every eval record of metrics.jsonl after line `done` (complete lines only);
    returns the lines read. The values Tune ranks by are the ones in the trial's own metrics.jsonl."""
    from ray import tune

    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return done
    text = path.read_text()
    lines = text.split("\n")[:-1]  # the last element: a line still being written, or ""
    loss = None
    for line in lines[done:]:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "loss" in rec and "event" not in rec:
            loss = rec["loss"]
        if rec.get("event") == "eval":
            metrics = {k: v for k, v in rec.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            metrics["step"] = int(rec["step"])
            if loss is not None:
                metrics["loss"] = loss
            tune.report(metrics)
    return len(lines)
