"""train(job, run_dir): what every rank runs. Launchers only decide where this runs.

data -> `build_module` (meta skeleton, PEFT, activation checkpointing, loss head) -> parallelize
(shard, materialise, optimizer) -> resume -> `Trainer.fit` (ftcluster/trainer.py: the loop).
Returns why it stopped; the launcher's rank entry turns that into the exit code.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from ftcluster.checkpoint import CheckpointManager, Loaded, RNGState
from ftcluster.config import JobConfig
from ftcluster.console import console_every, start_block, wandb_location
from ftcluster.distributed import Dist, barrier, broadcast_object, init_distributed, shutdown
from ftcluster.evaluation.evaluator import EvalTracker, Evaluator
from ftcluster.faults import Faults
from ftcluster.layout import Layout, apply_layout, resolve_layout
from ftcluster.longlora import attended_span
from ftcluster.metrics import FlopsModel, MetricsLogger, ThroughputWindow, gather_host_rss, host_rss_gib, start_wandb
from ftcluster.model import BuiltModule, build_module, materialize
from ftcluster.objectives import build_objective
from ftcluster.parallel import Engine, parallelize
from ftcluster.preemption import StopReason, StopRequests
from ftcluster.profiling import StepProfiler
from ftcluster.trainer import Trainer, TrainProgress

log = logging.getLogger("ftcluster")


def train(job: JobConfig, run_dir: Path, *, on_log: Callable[[dict], None] | None = None) -> StopReason:
    """Entry point on every rank (the environment holds RANK/WORLD_SIZE/... from the launcher).
    `job` is the resolved, validated config the driver made; nothing is re-read from the run dir.

    `on_log` only observes: every rank calls it with each logged step's record (the values written
    to metrics.jsonl, the same number of calls on every rank). Launchers use it to mirror metrics
    (the Ray launcher forwards them to `ray.train.report`); train() knows nothing of them."""
    d = init_distributed()
    _setup_logging(run_dir, d, level=job.log.level)
    stops = StopRequests(is_main=d.is_main)  # from here on SIGUSR1/SIGTERM only set a flag
    if not d.is_main:
        import datasets

        datasets.disable_progress_bars()  # always: one rank's bars are enough even at log.level=debug
    try:
        return build_trainer(job, Path(run_dir), d, stops=stops, on_log=on_log).fit()
    finally:
        stops.close()
        shutdown()


@dataclasses.dataclass(kw_only=True)
class ModelFacts:
    """How the trained module was built, for `ftcluster export` (saved, never restored): whether the
    frozen base is in the checkpoint, and on which device type seeded weights were generated (CPU
    and CUDA generators differ, so an export must rebuild them on the same type)."""
    adapter_only: bool
    init_device: str = "cpu"

    def state_dict(self) -> dict[str, Any]:
        return {"adapter_only": self.adapter_only, "init_device": self.init_device}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass  # facts about this process's build, not state to continue from


@dataclasses.dataclass(kw_only=True)
class LoggerRun:
    """The W&B run id, so a resumed run continues the same W&B run."""
    run_id: str | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.run_id = state.get("run_id")


def build_trainer(job: JobConfig, run_dir: Path, d: Dist, *, stops: StopRequests,
                  on_log: Callable[[dict], None] | None) -> Trainer:
    torch.manual_seed(job.seed)
    asked = job  # the user's config (with `auto`), saved in checkpoints
    layout = resolve_layout(job, world_size=d.world_size, nodes=_nodes(d), device_type=d.device_type,
                            free_gib=_min_free_gib(d))
    job = apply_layout(job, layout)  # a copy with the auto knobs filled in; everything below reads it
    t = job.train
    log.info("rank %d/%d on %s; global batch %d = %d x %d x %d", d.rank, d.world_size, d.device,
             t.micro_batch_size * t.grad_accum * d.world_size, t.micro_batch_size, t.grad_accum, d.world_size)
    data, eval_data, tokenizer, pad_id = _build_data(job, d, run_dir)  # first: bad data fails before anything expensive
    batches, collators, packing = _build_batches(job, d, data=data, eval_data=eval_data, pad_id=pad_id)
    objective = build_objective(job)
    built = build_module(job, objective=objective, packed=packing is not None)
    facts = ModelFacts(adapter_only=job.checkpoint.adapter_only)
    rss_before_load, t_load = host_rss_gib()[0], time.perf_counter()
    engine = _parallelize(job, d, built, facts)
    built.module.train()
    if job.objective.kind == "dpo" and job.objective.reference_source(job.peft.method) == "model":
        engine = _with_reference_model(job, d, engine, objective=objective, packed=packing is not None)
    c = built.counts
    log.info("parameters: %s total, %s trainable (%s)", f"{c.total:,}", f"{c.trainable:,}", job.peft.method)

    progress = TrainProgress(tokens=torch.zeros((), dtype=torch.float64, device=d.device))
    logger_run = LoggerRun()
    tracker = EvalTracker(cfg=job.eval)
    state = {"progress": progress, "data": batches, "logger": logger_run, "model": facts, "eval": tracker}
    ckpt = CheckpointManager(run_dir, cfg=job.checkpoint, dist_info=d)
    loaded = _resume(job, d, ckpt, engine, state)
    reference_events = _prepare_reference(job, d, run_dir, engine=engine, collators=collators, resumed=loaded is not None)

    wandb_run = _start_wandb(job, d, run_dir, logger_run)
    metrics = MetricsLogger(run_dir=run_dir, enabled=d.is_main, start_step=progress.step, max_steps=t.max_steps,
                            wandb_run=wandb_run, console_every=console_every(max_steps=t.max_steps,
                                                                             log_every=t.log_every, level=job.log.level))
    # Host memory after building, loading (and resuming): each rank's resident set before loading
    # and its peak so far, gathered (collective) so rank 0 records every rank's.
    host = gather_host_rss(rank=d.rank, world_size=d.world_size, device=d.device, before=rss_before_load)
    host["load_seconds"] = round(time.perf_counter() - t_load, 2)  # shard + materialise (+ resume)
    for rejected in ckpt.rejected:  # resume=auto skipped a checkpoint that failed verification
        metrics.event("checkpoint_rejected", step=progress.step, **rejected.as_event())
    if loaded is not None:
        metrics.event("resume", step=progress.step, checkpoint=str(loaded.path), world_size=d.world_size, **host)
    else:
        metrics.event("start", step=0, world_size=d.world_size, params=c.total, trainable=c.trainable,
                      samples=len(data), dropped=data.stats.dropped_overlength + data.stats.dropped_no_supervision,
                      packing=packing is not None, **host)
    metrics.event("layout", step=progress.step, **{k: v for k, v in layout.event().items() if k != "event"})
    if packing is not None:  # at the start and at every resume: the rows this run trains on
        metrics.event("packing", step=progress.step, **packing)
    if hasattr(data, "mix_report"):
        metrics.event("data_mix", step=progress.step, sources=data.mix_report(seed=job.seed, epoch=batches.epoch))
    for fields in reference_events:
        metrics.event("reference", step=progress.step, **fields)
    evaluator = None if eval_data is None else Evaluator(
        job=job, rank=d.rank, world_size=d.world_size, device=d.device, data=eval_data, tokenizer=tokenizer,
        pad_id=pad_id, run_dir=run_dir, collator=collators.get("eval"))
    if evaluator is None and job.eval.every_steps:
        log.warning("eval.every_steps=%d but no held-out data (data.eval_path, data.eval_fraction or data.eval_samples): "
                    "nothing is evaluated", job.eval.every_steps)
    if evaluator is not None:
        log.info("evaluation: %d held-out samples, %d batches per rank, %d prompts", len(eval_data),
                 evaluator.batches.num_batches, len(evaluator.prompts))
    _print_start(job, d, metrics, built=built, data=data, eval_data=eval_data, run_dir=run_dir, loaded=loaded,
                 wandb_run=wandb_run, packing=packing, layout=layout)
    throughput = ThroughputWindow(flops=_flops_model(built), world_size=d.world_size, on_gpu=d.device_type == "cuda")
    return Trainer(job=job, dist=d, engine=engine, batches=batches, objective=objective, ckpt=ckpt, metrics=metrics,
                   throughput=throughput, progress=progress, stops=stops, faults=Faults(job.debug, rank=d.rank, run_dir=run_dir),
                   saved_state=state, config_yaml=resolved_config_yaml(asked), rss_before_load=rss_before_load,
                   on_log=on_log, evaluator=evaluator, tracker=tracker,
                   profiler=StepProfiler(first=job.debug.profile_from_step, count=job.debug.profile_steps,
                                         out_dir=run_dir / "profile", rank=d.rank, device_type=d.device_type))


def _print_start(job: JobConfig, d: Dist, metrics: MetricsLogger, *, built: BuiltModule, data: Any, eval_data: Any,
                 run_dir: Path, loaded: Loaded | None, wandb_run: Any, packing: dict | None, layout: Layout) -> None:
    """Rank 0: the console's start block (ftcluster.console.start_block)."""
    if not d.is_main:
        return
    t, c, st = job.train, built.counts, data.stats
    ev = job.eval
    eval_line = (f"{len(eval_data)} held-out samples, every {ev.every_steps or '-'} steps" if eval_data is not None
                 else "none (data.eval_fraction, data.eval_samples or data.eval_path to add held-out data)")
    ck = job.checkpoint
    checkpoints = (f"every {ck.every_steps} steps, keep {ck.keep_last}, in {run_dir / 'checkpoints'}" if ck.enabled
                   else "off (checkpoint.enabled=false)")
    peft = job.peft.method if job.peft.method == "none" else f"{job.peft.method} r={job.peft.rank}"
    lines = start_block(
        run_dir=run_dir, resumed_from=str(loaded.path) if loaded is not None else None,
        step=loaded.step if loaded is not None else 0,
        model=job.model.path or f"{job.model.arch} shape (model.init={job.model.init})",
        params=c.total, trainable=c.trainable, peft="full fine-tune" if peft == "none" else peft,
        world_size=d.world_size, device=d.device_type, backend=job.parallel.backend,
        global_batch=f"{t.micro_batch_size * t.grad_accum * d.world_size} = {t.micro_batch_size} x {t.grad_accum} "
                     f"accum x {d.world_size} ranks", dtype=t.dtype,
        data=job.data.path or job.data.format, samples=len(data), mean_len=st.tokens / max(st.kept, 1),
        max_seq_len=job.data.max_seq_len, dropped=st.dropped_overlength + st.dropped_no_supervision,
        truncated=st.truncated, eval_line=eval_line, checkpoints=checkpoints,
        wandb=wandb_location(kind=job.logger.kind, mode=job.logger.mode, run=wandb_run), packing=packing,
        layout=layout.describe(), layout_why=layout.why)
    for line in lines:
        metrics.print(line)


def _nodes(d: Dist) -> int:
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", d.world_size))
    return max(1, d.world_size // max(per_node, 1))


def _min_free_gib(d: Dist) -> float | None:
    """The smallest free GPU memory over the ranks (one all-reduce), so every rank plans alike."""
    if d.device_type != "cuda":
        return None
    free = torch.tensor(float(torch.cuda.mem_get_info(d.device)[0]), device=d.device)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(free, op=torch.distributed.ReduceOp.MIN)
    return float(free.item()) / 2**30


def _build_data(job: JobConfig, d: Dist, run_dir: Path):  # type: ignore[no-untyped-def]
    """Tokenised training and held-out data (local rank 0 of each host first, filling the datasets
    cache that the others then read), the tokenizer and the pad id; checks the training data is
    enough for one global batch."""
    from ftcluster.data import build_dataset, check_enough_samples
    from ftcluster.data.holdout import build_train_and_eval
    from ftcluster.model import build_hf_config

    vocab_size = build_hf_config(job.model).vocab_size
    tokenizer = _load_tokenizer(job) if job.data.format != "synthetic" else None
    if d.local_rank != 0:
        barrier()
    builder = build_dataset
    if job.objective.kind == "dpo":
        from ftcluster.data.preference import build_preference_dataset as builder
    data, eval_data = build_train_and_eval(job.data, tokenizer=tokenizer, seed=job.seed, vocab_size=vocab_size,
                                           run_dir=run_dir, is_main=d.is_main, builder=builder)
    if d.local_rank == 0:
        barrier()
    check_enough_samples(data, micro_batch_size=job.train.micro_batch_size, grad_accum=job.train.grad_accum,
                         world_size=d.world_size)
    if tokenizer is not None and len(tokenizer) > vocab_size:
        raise ValueError(f"model.tokenizer: {len(tokenizer)} tokens but the model's vocab_size is {vocab_size}")
    return data, eval_data, tokenizer, _pad_id(tokenizer)


def _build_batches(job: JobConfig, d: Dist, *, data: Any, eval_data: Any,
                   pad_id: int) -> tuple[Any, dict[str, Any], dict | None]:
    """This rank's micro-batches (samples packed or one per row, or whole preference pairs), the
    collators of the training and held-out pairs (which carry precomputed reference log-probs), and
    the packing statistics of the first epoch (None unpacked). Fails before step 1 if one global
    batch of rows cannot be filled."""
    from ftcluster.data import DataError, DistributedBatches
    from ftcluster.data.packing import PackedBatches, resolve_packing

    t, cfg = job.train, job.data
    if job.objective.kind == "dpo":
        from ftcluster.data.preference import PairCollator, PreferenceBatches

        collators = {"train": PairCollator(data=data, pad_id=pad_id, max_seq_len=cfg.max_seq_len)}
        if eval_data is not None:
            collators["eval"] = PairCollator(data=eval_data, pad_id=pad_id, max_seq_len=cfg.max_seq_len)
        batches = PreferenceBatches(data, collator=collators["train"], micro_batch_size=t.micro_batch_size,
                                    rank=d.rank, world_size=d.world_size, seed=job.seed, shuffle=cfg.shuffle)
        return batches, collators, None
    common = dict(micro_batch_size=t.micro_batch_size, rank=d.rank, world_size=d.world_size, seed=job.seed,
                  shuffle=cfg.shuffle, pad_id=pad_id, max_seq_len=cfg.max_seq_len)
    pack, why = resolve_packing(cfg, data)
    if not pack:
        log.info("packing: off (%s); one right-padded row per sample", why)
        return DistributedBatches(data, **common), {}, None
    batches = PackedBatches(data, window=cfg.packing_window, **common)
    stats = batches.stats(0)
    log.info("packing: on (%s): %d samples in %d rows of up to %d tokens, fill %.1f%%, %.2f samples/row; "
             "train.micro_batch_size counts rows; evaluation is not packed", why, stats.samples, stats.rows,
             cfg.max_seq_len, 100 * stats.fill, stats.samples_per_row)
    global_batch = t.micro_batch_size * t.grad_accum * d.world_size
    if stats.rows < global_batch:
        raise DataError(f"data.path: {stats.samples} samples pack into {stats.rows} rows, fewer than one global batch "
                        f"of {global_batch} rows (train.micro_batch_size={t.micro_batch_size} x train.grad_accum="
                        f"{t.grad_accum} x world size {d.world_size}); add data, lower the batch size, or set "
                        "data.packing=false")
    return batches, {}, {"why": why, "max_seq_len": cfg.max_seq_len, **stats.as_event()}


def _prepare_reference(job: JobConfig, d: Dist, run_dir: Path, *, engine: Engine, collators: dict[str, Any],
                       resumed: bool) -> list[dict]:
    """objective.reference=precompute: the reference log-probs of every training and held-out pair,
    computed before step 1 (or read back on resume). Returns the events to record."""
    if job.objective.kind != "dpo" or job.objective.reference_source(job.peft.method) != "precompute":
        return []
    from ftcluster.objectives.reference import prepare_reference, reference_path

    events = []
    for split, collator in collators.items():
        t0 = time.perf_counter()
        table, computed = prepare_reference(
            engine=engine, collator=collator, split=split, run_dir=run_dir, rank=d.rank, world_size=d.world_size,
            device=d.device, micro_batch_size=job.eval.micro_batch_size or job.train.micro_batch_size,
            resumed=resumed, is_main=d.is_main)
        events.append({"split": split, "pairs": len(table.keys), "computed": computed,
                       "seconds": round(time.perf_counter() - t0, 2), "path": str(reference_path(run_dir, split))})
    return events


def _parallelize(job: JobConfig, d: Dist, built: BuiltModule, facts: ModelFacts) -> Engine:
    def fill(module: torch.nn.Module, device: torch.device, shard_view) -> None:  # type: ignore[no-untyped-def]
        facts.init_device = device.type  # where the backend made the weights (host memory under CPU offload)
        stats = materialize(module, cfg=job.model, seed=job.seed, device=device, shard_view=shard_view)
        log.info("weights: %d tensors loaded from %s, %d initialised from seed %d", stats["loaded"],
                 job.model.path or "-", stats["initialised"], job.seed)

    return parallelize(built.module, layers=built.layers, job=job, dist=d, materialize=fill)


def _with_reference_model(job: JobConfig, d: Dist, engine: Engine, *, objective: Any, packed: bool) -> Engine:
    """objective.reference=model: a frozen copy of the model (`build_module(frozen=True)`), sharded by
    the same backend and filled from the same weights as the trained one (model.path or the seed's
    init), run before each forward (ftcluster/objectives/reference.py). Never checkpointed: a
    resumed run rebuilds it from those weights, so the reference stays the untrained model."""
    from ftcluster.objectives.reference import WithReferenceModel
    from ftcluster.parallel import parallelize_frozen

    ref = build_module(job, objective=objective, packed=packed, frozen=True)

    def fill(module: torch.nn.Module, device: torch.device, shard_view) -> None:  # type: ignore[no-untyped-def]
        stats = materialize(module, cfg=job.model, seed=job.seed, device=device, shard_view=shard_view)
        log.info("reference model: %d tensors loaded from %s, %d initialised from seed %d (a frozen sharded copy)",
                 stats["loaded"], job.model.path or "-", stats["initialised"], job.seed)

    frozen = parallelize_frozen(ref.module, layers=ref.layers, job=job, dist=d, materialize=fill)
    return WithReferenceModel(engine=engine, reference=frozen)


def _resume(job: JobConfig, d: Dist, ckpt: CheckpointManager, engine: Engine, state: dict[str, Any]) -> Loaded | None:
    torch.manual_seed(job.seed + d.rank)  # dropout streams differ per rank
    source = ckpt.resolve(job.resume)
    if source is None:
        return None
    loaded = ckpt.load(source, engine=engine, state=state, rank_state={"rng": RNGState()})
    if not loaded.rank_state_restored:  # other world size: fresh per-rank streams, still deterministic
        torch.manual_seed(job.seed + d.rank + 1_000_003 * loaded.step)
    log.info("resumed from %s (step %d, world size %d -> %d)", source, loaded.step, loaded.world_size, d.world_size)
    return loaded


def _start_wandb(job: JobConfig, d: Dist, run_dir: Path, logger_run: LoggerRun):  # type: ignore[no-untyped-def]
    """Rank 0 starts (or continues, same id) the W&B run; every rank learns its id."""
    import yaml

    wandb_run = None
    if d.is_main and job.logger.kind == "wandb" and job.logger.mode != "disabled":
        wandb_run, logger_run.run_id = start_wandb(run_dir=run_dir, logger_cfg=job.logger, run_name=job.run.name,
                                                   run_id=logger_run.run_id or _saved_wandb_id(run_dir),
                                                   config=yaml.safe_load(resolved_config_yaml(job)) or {})
        (run_dir / "wandb_run_id").write_text(logger_run.run_id)
    logger_run.run_id = broadcast_object(logger_run.run_id)
    return wandb_run


def _flops_model(built: BuiltModule) -> FlopsModel:
    c, hf_config = built.counts, built.hf_model.config
    emb_trainable = any(p.requires_grad for n, p in built.module.named_parameters() if "embed_tokens" in n)
    return FlopsModel(n_frozen=c.frozen - (0 if emb_trainable else c.embedding),
                      n_trainable=c.trainable - (c.embedding if emb_trainable else 0),
                      n_layers=int(hf_config.num_hidden_layers), hidden=int(hf_config.hidden_size),
                      attended_span=lambda width: attended_span(hf_config, width))


def resolved_config_yaml(job: JobConfig) -> str:
    """The resolved config as YAML, secrets redacted: saved in every checkpoint and sent to W&B."""
    import yaml
    from omegaconf import OmegaConf

    from ftcluster.compose import redact

    return yaml.safe_dump(redact(OmegaConf.to_container(OmegaConf.structured(job))), sort_keys=False)


def _load_tokenizer(job: JobConfig):  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    path = job.model.tokenizer or job.model.path
    return AutoTokenizer.from_pretrained(path, trust_remote_code=job.model.trust_remote_code, local_files_only=True)


def _pad_id(tokenizer) -> int:  # type: ignore[no-untyped-def]
    if tokenizer is None:
        return 0
    pid = tokenizer.pad_token_id
    return int(pid if pid is not None else tokenizer.eos_token_id)


def _saved_wandb_id(run_dir: Path) -> str | None:
    p = run_dir / "wandb_run_id"
    return p.read_text().strip() if p.is_file() else None


def _setup_logging(run_dir: Path, d: Dist, *, level: str) -> None:
    """Every rank logs to <run.dir>/logs/rank<r>.log; rank 0 also to the console: warnings there at
    log.level=info (the start block, progress and summary are the console's), everything at debug.
    Third-party warnings and log records go to the file only (ftcluster/console.py)."""
    from ftcluster.console import file_handler, is_verbose, route_third_party

    fh = file_handler(Path(run_dir) / "logs" / f"rank{d.rank}.log", prefix=f"rank{d.rank}")
    root = logging.getLogger("ftcluster")
    root.setLevel(logging.INFO)
    root.handlers.clear()
    root.addHandler(fh)
    if d.is_main:
        sh = logging.StreamHandler(sys.stdout)
        sh.setFormatter(logging.Formatter("%(message)s"))
        sh.setLevel(logging.INFO if is_verbose(level) else logging.WARNING)
        root.addHandler(sh)
    root.propagate = False
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    route_third_party(fh, level=level, configure_libraries=True)
