"""The training loop: build, step, log, evaluate, save, stop. `Trainer.fit` reads in a screen.

The trainer calls an objective (the loss and its normaliser), an engine (forward, backward,
clip, step: FSDP2 or DeepSpeed behind one protocol), the checkpoint manager (cadence, commit,
resume), the metrics logger and the fault injector, and knows none of their insides.

Host syncs: none inside a step. Token counts come from CPU tensors; every device value the log
and the stop agreement need is copied to the host in one transfer at a log point, and the
non-finite flag is also read before each checkpoint (a bad step must never be saved).
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from typing import Any, Callable, Iterator

import torch

from ftcluster.checkpoint import CheckpointManager, RNGState
from ftcluster.config import JobConfig
from ftcluster.data.batch import Batch
from ftcluster.distributed import Dist, all_reduce_sum, barrier
from ftcluster.evaluation.evaluator import EvalTracker, Evaluator, Verdict
from ftcluster.faults import Faults
from ftcluster.metrics import MetricsLogger, ThroughputWindow, gather_host_rss, gpu_memory
from ftcluster.optim import lr_at
from ftcluster.parallel import Engine
from ftcluster.preemption import StopReason, StopRequests
from ftcluster.profiling import StepProfiler

log = logging.getLogger("ftcluster")


class NonFiniteError(RuntimeError):
    pass


@dataclasses.dataclass(kw_only=True)
class TrainProgress:
    """Steps done and real tokens seen. Tokens accumulate on the device (no sync per step) on top
    of what earlier segments of the run saw; read on the host only at log and save points."""
    step: int = 0
    tokens_before: int = 0
    tokens: torch.Tensor = dataclasses.field(default_factory=lambda: torch.zeros((), dtype=torch.float64))

    def tokens_seen(self) -> int:
        return self.tokens_before + int(self.tokens.item())

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "tokens_seen": self.tokens_seen()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.tokens_before = int(state["step"]), int(state["tokens_seen"])
        self.tokens.zero_()


@dataclasses.dataclass(kw_only=True)
class StepValues:
    """Device tensors of the last step (read at a log point) and the sticky non-finite flag."""
    loss: torch.Tensor
    grad_norm: torch.Tensor
    lr: float
    bad: torch.Tensor
    """True once any step since the last check was non-finite (its update was skipped)."""
    first_bad: torch.Tensor
    """[step, loss, grad_norm] of the first non-finite step (float64, zeros while none): the error
    names that step, not the log point that noticed it."""
    stats: torch.Tensor | None = None
    """The objective's own metric sums of the last step on this rank (None for SFT)."""


class Trainer:
    """Built by `ftcluster.train.build_trainer`; `fit()` runs the loop and says why it stopped."""

    def __init__(self, *, job: JobConfig, dist: Dist, engine: Engine, batches: Any, objective: Any,
                 ckpt: CheckpointManager, metrics: MetricsLogger, throughput: ThroughputWindow,
                 progress: TrainProgress, stops: StopRequests, faults: Faults, saved_state: dict[str, Any],
                 config_yaml: str, rss_before_load: float, on_log: Callable[[dict], None] | None,
                 profiler: StepProfiler, evaluator: Evaluator | None = None,
                 tracker: EvalTracker | None = None) -> None:
        self.job, self.d, self.engine, self.batches, self.objective = job, dist, engine, batches, objective
        self.ckpt, self.metrics, self.throughput, self.progress = ckpt, metrics, throughput, progress
        self.stops, self.faults, self.on_log = stops, faults, on_log
        self.saved_state = saved_state  # global Stateful objects the checkpoint holds (progress, data, ...)
        self.config_yaml = config_yaml
        self.rss_before_load = rss_before_load  # GiB, for the end record's host-memory figures
        self.evaluator, self.tracker = evaluator, tracker  # None without held-out data
        self.profiler = profiler  # debug.profile_steps (a no-op when off)
        self._first_step = progress.step  # 0, or the step this segment resumed at
        self.values = StepValues(loss=self._zero(), grad_norm=self._zero(), lr=0.0,
                                 bad=torch.zeros((), dtype=torch.bool, device=dist.device),
                                 first_bad=torch.zeros(3, dtype=torch.float64, device=dist.device))

    def _zero(self) -> torch.Tensor:
        return torch.zeros((), dtype=torch.float32, device=self.d.device)

    # --- the loop -------------------------------------------------------------------------------

    def fit(self) -> StopReason:
        max_steps = self.job.train.max_steps
        if (self.progress.step == 0 and self.job.eval.at_start) or self.progress.step >= max_steps:
            # The base model's metrics before any update; or a run resumed at its last step
            # (nothing to train): evaluate the checkpoint as it is.
            self.maybe_eval(self.progress.step, last=True)
        while self.progress.step < max_steps:
            step = self.progress.step + 1
            with self.profiler.step(step), self._sync_check(step):
                self.train_step(step)
            self.faults.after_step(step)
            last = step == max_steps
            stop = self.maybe_log(step, last=last)
            verdict = self.maybe_eval(step, last=last)
            saved = self.maybe_save(step, last=last, best=verdict.improved)
            if verdict.early_stop and stop == StopReason.FINISHED:
                stop = StopReason.EARLY_STOPPED
            if stop != StopReason.FINISHED:
                if not saved and self.job.checkpoint.enabled:
                    self.save(step)  # an agreed stop request: checkpoint unless this step just did
                return self.stop(stop, requested=not verdict.early_stop)
        return self.finish()

    @contextlib.contextmanager
    def _sync_check(self, step: int) -> Iterator[None]:
        """debug.sync_check: a host sync inside this step raises (CUDA only). The first two steps of
        a segment create optimizer state and warm caches and run unchecked; the log, eval and save
        points (which sync by design) run after the step, outside this block."""
        on = (self.job.debug.sync_check and self.d.device_type == "cuda" and step > self._first_step + 2)
        if not on:
            yield
            return
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode("default")

    # --- one optimizer step ---------------------------------------------------------------------

    def train_step(self, step: int) -> None:
        """Accumulate `grad_accum` micro-batches, clip, and apply the update unless non-finite."""
        job, d, engine = self.job, self.d, self.engine
        micro: list[Batch] = [self.batches.next_microbatch() for _ in range(job.train.grad_accum)]
        # Normaliser and real-token counts are host integers; one all-reduce makes them global.
        local = torch.tensor([sum(self.objective.normaliser(b) for b in micro), sum(b.num_tokens for b in micro)],
                             dtype=torch.float64)
        on_gpu = d.device_type == "cuda"
        counts = all_reduce_sum(local.pin_memory().to(d.device, non_blocking=True) if on_gpu else local)
        # Loss = (sum of unit losses over all micro-batches and ranks) / (global units).
        # Backends average gradients over ranks, hence the world_size factor.
        units = counts[0].clamp(min=1)
        scale = (d.world_size / units).to(torch.float32)
        loss_sum = self._zero()
        for i, batch in enumerate(micro):
            loss = self.faults.loss(engine.forward(batch.to(d.device)), step=step)
            engine.backward(loss * scale, last_micro=i == len(micro) - 1)
            loss_sum += loss.detach()
        grad_norm = engine.clip_grad_norm(job.train.grad_clip)
        global_loss = all_reduce_sum(loss_sum) / units
        # DPO's rewards and log-probs: this rank's device sums of the step (None for SFT), summed over
        # ranks only at log points (maybe_log), not with a collective in every step.
        stats = self.objective.take_stats()
        bad = ~(torch.isfinite(global_loss) & torch.isfinite(grad_norm))  # identical on every rank
        lr = lr_at(step, cfg=job.optim, max_steps=job.train.max_steps)
        engine.step(lr=lr, skip=bad)
        v = self.values
        first = torch.where(bad & ~v.bad, torch.stack([torch.full_like(v.first_bad[0], step), global_loss.double(),
                                                      grad_norm.double()]), v.first_bad)
        self.values = StepValues(loss=global_loss, grad_norm=grad_norm, lr=lr, bad=v.bad | bad, first_bad=first,
                                 stats=stats)
        self.progress.tokens += counts[1]
        self.progress.step = step
        self.throughput.add_step(batches=micro)

    # --- log, evaluate, save --------------------------------------------------------------------

    def maybe_log(self, step: int, *, last: bool) -> StopReason:
        """At log points: one host sync for the record and the all-rank stop agreement. Stop
        requests (preemption, SIGTERM) are agreed here only, so a stop waits at most
        train.log_every steps and costs nothing inside the steps."""
        if step % self.job.train.log_every != 0 and not last:
            return StopReason.FINISHED
        dev = self.d.device
        stop_dev = self.stops.agreed(dev) if not last else torch.zeros((), dtype=torch.int32, device=dev)
        v = self.values
        scalars = torch.stack([v.loss.double(), v.grad_norm.double(), v.bad.double(), self.progress.tokens.to(dev),
                               stop_dev.double()])
        values = torch.cat([scalars, all_reduce_sum(v.stats)]).tolist() if v.stats is not None else scalars.tolist()
        loss, gnorm, bad, tokens, stop = values[:5]
        if bad:
            self._check_finite(step)
        record = {"step": step, "loss": loss, "lr": v.lr, "grad_norm": gnorm,
                  **(self.objective.describe(values[5:]) if v.stats is not None else {}),
                  **self.throughput.read(tokens), "tokens_seen": self.progress.tokens_before + int(tokens),
                  **gpu_memory(dev)}
        self.metrics.step(record)
        if self.on_log is not None:
            self.on_log(dict(record))
        return StopReason(int(stop))

    def maybe_eval(self, step: int, *, last: bool) -> Verdict:
        """At eval points (every eval.every_steps, the end, and step 0): held-out loss, samples,
        task metrics; the best value and early stopping. Collective; its time is not training's."""
        if self.evaluator is None or not self.evaluator.due(step, last=last):
            return Verdict()
        t0 = time.perf_counter()
        record = self.evaluator.run(engine=self.engine, objective=self.objective, step=step)
        self.metrics.eval(record)
        if self.evaluator.last_samples and record.get("eval_generated"):
            self.metrics.table("samples", columns=["step", "prompt", "completion", "reference"],
                               rows=[[step, s["prompt"], s["completion"], s.get("reference")]
                                     for s in self.evaluator.last_samples], step=step)
        metric = self.job.eval.metric
        if metric not in record:
            raise KeyError(f"eval.metric: {metric!r} is not in the eval record ({', '.join(sorted(record))}); "
                           "task metrics need eval.task_metrics=true")
        verdict = self.tracker.update(record[metric], step=step)
        if verdict.early_stop:
            self.metrics.event("early_stop", step=step, metric=metric, best=self.tracker.best,
                               best_step=self.tracker.best_step)
        self.throughput.exclude(time.perf_counter() - t0)
        return verdict

    def maybe_save(self, step: int, *, last: bool, best: bool = False) -> bool:
        """At checkpoint points, and (checkpoint.keep_best) whenever an evaluation set a new best."""
        best = best and self.job.checkpoint.keep_best and step > 0
        if not (self.ckpt.due(step, last=last) or best):
            return False
        t0 = time.perf_counter()
        self.save(step, best=best)
        self.throughput.exclude(time.perf_counter() - t0)  # checkpoint time is not training throughput
        return True

    def save(self, step: int, *, best: bool = False) -> None:
        self._check_finite(step)
        mark = {"metric": self.job.eval.metric, "value": self.tracker.best} if best and self.tracker else None
        secs = self.ckpt.save(step=step, engine=self.engine, state=self.saved_state, rank_state={"rng": RNGState()},
                              config_yaml=self.config_yaml, before_commit=self.faults.before_commit(step), best=mark)
        self.metrics.event("checkpoint", step=step, seconds=round(secs, 3))
        self.faults.after_save(step)

    def _check_finite(self, step: int) -> None:
        if not bool(self.values.bad.item()):
            return
        first, loss, grad_norm = self.values.first_bad.tolist()
        msg = (f"non-finite loss or gradient at step {int(first)} (loss={loss}, grad_norm={grad_norm}; noticed "
               f"after step {step}): that step's update was not applied and no checkpoint was written after "
               "it; lower optim.lr or check the data")
        # Every rank reaches this at the same step (the flag is global). Log first, then meet at a
        # barrier, so that whichever rank the launcher reports, every rank has recorded the stop.
        log.error(msg)
        barrier()
        raise NonFiniteError(msg)

    # --- the end --------------------------------------------------------------------------------

    def stop(self, reason: StopReason, *, requested: bool = True) -> StopReason:
        """An agreed stop request or early stopping, after its checkpoint: record it and hand the
        reason back. `requested`: the stop came from outside (a signal, a request file), not from
        this run's own eval.early_stopping."""
        if reason == StopReason.EARLY_STOPPED:
            if requested:  # a sweep scheduler (ASHA) asked: the trial ends as finished, stopped early
                newest = self.ckpt.latest() if self.job.checkpoint.enabled else None
                self.metrics.event("early_stopped", step=self.progress.step, by="request",
                                   checkpoint=str(newest) if newest else None)
            return self.finish(reason)
        newest = self.ckpt.latest() if self.job.checkpoint.enabled else None
        log.info("stopped after step %d (%s); %s", self.progress.step, reason.name.lower(),
                 f"checkpoint {newest}" if newest else "no checkpoint (checkpoint.enabled=false)")
        name = {StopReason.PREEMPTED: "preempted", StopReason.INTERRUPTED: "interrupted"}.get(reason, "terminated")
        self.metrics.event(name, step=self.progress.step,
                           checkpoint=str(newest) if newest else None)
        if reason == StopReason.PREEMPTED:
            self.stops.acknowledge(step=self.progress.step, checkpoint=newest)  # the Slurm job requeues on this
        self.metrics.close()
        barrier()
        return reason

    def finish(self, reason: StopReason = StopReason.FINISHED) -> StopReason:
        host = gather_host_rss(rank=self.d.rank, world_size=self.d.world_size, device=self.d.device,
                               before=self.rss_before_load)
        self.metrics.event("end", step=self.progress.step, tokens_seen=self.progress.tokens_seen(),
                           host_rss_peak_gib=host["host_rss_peak_gib"],
                           host_rss_peak_gib_per_rank=host["host_rss_peak_gib_per_rank"])
        self.metrics.close()
        if self.d.is_main:
            self._report()
        barrier()
        return reason

    def _report(self) -> None:
        """Rank 0, at the end: the last generated sample, then the run summary (summary.json, the
        report PNG, a short table). Observation only: a failure here is logged, not raised, so it
        cannot turn a finished training run into a failed one."""
        samples = self.evaluator.last_samples if self.evaluator is not None else []
        if samples:
            s = samples[0]
            print(f"sample (step {self.progress.step}): {s['prompt']!r} -> {s['completion']!r}", flush=True)
        try:
            from ftcluster.report import report_run

            report_run(self.ckpt.dir.parent, console=self.metrics.console)
        except Exception as e:  # noqa: BLE001 - see the docstring
            log.warning("could not write the run report: %s: %s", type(e).__name__, e)
