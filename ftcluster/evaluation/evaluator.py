"""The evaluator the trainer calls at its eval points, and the tracker of the best value.

One evaluation (collective, every rank): held-out loss through the engine's evaluation forward,
then (optionally) greedy generation samples for the configured prompts and task metrics against
their references. Rank 0 writes the samples; the caller records the returned record.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import Any

import torch

from ftcluster.config import EvalConfig, JobConfig
from ftcluster.evaluation.loss import EvalBatches, eval_loss

log = logging.getLogger("ftcluster")


@dataclasses.dataclass(kw_only=True)
class Verdict:
    improved: bool = False
    """This evaluation set a new best `eval.metric`."""
    early_stop: bool = False
    """`eval.early_stopping.patience` evaluations in a row without improvement."""


@dataclasses.dataclass(kw_only=True)
class EvalTracker:
    """Best `eval.metric` so far and the evaluations since it improved (saved in checkpoints, so a
    resumed run keeps its early-stopping state)."""
    cfg: EvalConfig
    best: float | None = None
    best_step: int | None = None
    since_best: int = 0

    def update(self, value: float, *, step: int) -> Verdict:
        delta = self.cfg.early_stopping.min_delta
        better = (self.best is None or (value > self.best + delta if self.cfg.higher_is_better
                                        else value < self.best - delta)) and math.isfinite(value)
        if better:
            self.best, self.best_step, self.since_best = value, step, 0
        else:
            self.since_best += 1
        patience = self.cfg.early_stopping.patience
        return Verdict(improved=better, early_stop=bool(patience) and self.since_best >= patience)

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_step": self.best_step, "since_best": self.since_best}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_step, self.since_best = state["best"], state["best_step"], int(state["since_best"])


class Evaluator:
    def __init__(self, *, job: JobConfig, rank: int, world_size: int, device: torch.device, data: Any,
                 tokenizer: Any, pad_id: int, run_dir: Path, collator: Any = None) -> None:
        self.job, self.cfg, self.rank, self.device, self.run_dir = job, job.eval, rank, device, run_dir
        self.tokenizer = tokenizer
        self.batches = EvalBatches(data, micro_batch_size=self.cfg.micro_batch_size or job.train.micro_batch_size,
                                   max_batches=self.cfg.max_batches, rank=rank, world_size=world_size, pad_id=pad_id,
                                   max_seq_len=job.data.max_seq_len, collator=collator)
        self.prompts = _prompts(job, data=data, tokenizer=tokenizer)
        self.last_samples: list[dict] = []

    def due(self, step: int, *, last: bool) -> bool:
        every = self.cfg.every_steps
        return last or bool(every and step % every == 0)

    def run(self, *, engine: Any, objective: Any, step: int) -> dict[str, Any]:
        """Collective: the eval record of `step` (loss, perplexity, throughput, task metrics)."""
        record: dict[str, Any] = {"step": step, **eval_loss(engine, objective, self.batches, device=self.device)}
        if self.prompts:
            import time

            from ftcluster.evaluation.generate import generate_samples, write_samples

            t0 = time.perf_counter()
            samples = generate_samples(engine, tokenizer=self.tokenizer, prompts=self.prompts, data_cfg=self.job.data,
                                       max_new_tokens=self.cfg.max_new_tokens, device=self.device)
            self.last_samples = samples
            record["eval_generate_seconds"] = round(time.perf_counter() - t0, 3)
            record["eval_generated"] = len(samples)
            if self.rank == 0:
                write_samples(self.run_dir, step=step, samples=samples)
            if self.cfg.task_metrics:
                from ftcluster.evaluation.task_metrics import score

                record.update(score(samples))
        return record


def _prompts(job: JobConfig, *, data: Any, tokenizer: Any) -> list:
    """The prompts to generate from: configured ones, or the first `eval.num_prompts` eval samples'."""
    cfg = job.eval
    if tokenizer is None or not (cfg.prompts or cfg.prompts_path or cfg.num_prompts):
        return []
    from ftcluster.evaluation.prompts import load_prompts, prompts_from_rows

    if cfg.prompts or cfg.prompts_path:
        return load_prompts(cfg)
    rows = [r for r in (data.raw_row(i) for i in range(min(cfg.num_prompts, len(data)))) if r is not None]
    return prompts_from_rows(rows, job.data) if rows else []
