"""train(job, run_dir): what every rank runs. The whole training loop is readable here.

data -> model (meta) -> PEFT -> activation checkpointing -> parallelize (shard, materialise,
optimizer) -> resume -> loop (accumulate, token-weighted loss, clip, non-finite guard, step,
log, checkpoint). Launchers only decide where this runs.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable
from pathlib import Path

import torch
import yaml

from ftcluster.checkpoint import CheckpointManager, rng_state, set_rng_state
from ftcluster.config import JobConfig
from ftcluster.distributed import Dist, all_reduce_sum, barrier, broadcast_object, init_distributed, shutdown
from ftcluster.metrics import PEAK_FLOPS_PER_GPU, MetricsLogger, flops_per_token, host_rss_gib, start_wandb
from ftcluster.longlora import attended_span
from ftcluster.model import (IGNORE_INDEX, CausalLMWithLoss, apply_peft, build_hf_config, build_meta_model,
                             count_params, decoder_layer_classes, materialize)
from ftcluster.optim import lr_at
from ftcluster.preemption import NONE, PREEMPT, REASONS, TERMINATED_EXIT_CODE, StopRequests
from ftcluster.parallel import parallelize

log = logging.getLogger("ftcluster")


class NonFiniteError(RuntimeError):
    pass


class InjectedFailure(RuntimeError):
    """Raised by the debug.fail_at_step test hook."""


@dataclass(kw_only=True)
class _Window:
    """Throughput window between two log points."""
    t0: float
    tokens_at_t0: float = 0.0
    steps: int = 0
    fpt_sum: float = 0.0


@dataclass(kw_only=True)
class Progress:
    step: int = 0
    tokens_seen: int = 0


def train(job: JobConfig, run_dir: Path, *, on_log: Callable[[dict], None] | None = None) -> None:
    """Entry point on every rank (the environment holds RANK/WORLD_SIZE/... from the launcher).

    `on_log` only observes: every rank calls it with each logged step's record (the values written
    to metrics.jsonl, the same number of calls on every rank). Launchers use it to mirror metrics
    (the Ray launcher forwards them to `ray.train.report`); train() knows nothing of them."""
    d = init_distributed()
    _setup_logging(run_dir, d)
    stops = StopRequests(is_main=d.is_main)  # from here on SIGUSR1/SIGTERM only set a flag
    if not d.is_main:
        import datasets

        datasets.disable_progress_bars()
    try:
        _train(job, Path(run_dir), d, on_log=on_log, stops=stops)
    finally:
        stops.close()
        shutdown()


def _train(job: JobConfig, run_dir: Path, d: Dist, *, on_log: Callable[[dict], None] | None,
           stops: StopRequests) -> None:
    from ftcluster.data import DistributedBatches, build_dataset, check_enough_samples

    torch.manual_seed(job.seed)
    tcfg = job.train
    global_batch = tcfg.micro_batch_size * tcfg.grad_accum * d.world_size
    log.info("rank %d/%d on %s; global batch %d = %d x %d x %d", d.rank, d.world_size, d.device,
             global_batch, tcfg.micro_batch_size, tcfg.grad_accum, d.world_size)

    # --- data (first: bad data must fail before anything expensive) ---
    hf_config = build_hf_config(job.model)
    tokenizer = _load_tokenizer(job) if job.data.format != "synthetic" else None
    # Local rank 0 of each host tokenises first and fills the datasets cache; the others then read it.
    if d.local_rank != 0:
        barrier()
    data = build_dataset(job.data, tokenizer=tokenizer, seed=job.seed, vocab_size=hf_config.vocab_size)
    if d.local_rank == 0:
        barrier()
    check_enough_samples(data, micro_batch_size=tcfg.micro_batch_size, grad_accum=tcfg.grad_accum,
                         world_size=d.world_size)
    pad_id = _pad_id(tokenizer)
    if tokenizer is not None and len(tokenizer) > hf_config.vocab_size:
        raise ValueError(f"model.tokenizer: {len(tokenizer)} tokens but the model's vocab_size is {hf_config.vocab_size}")

    # --- model: meta skeleton -> PEFT -> activation checkpointing -> loss head -> shard + fill ---
    hf_model = build_meta_model(job.model, hf_config)
    layer_classes = decoder_layer_classes(hf_model)
    trained = apply_peft(hf_model, job)
    if tcfg.activation_checkpointing:
        # Per decoder layer, before sharding; non-reentrant so frozen inputs need no grad hack.
        hf_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    module = CausalLMWithLoss(model=trained, hf_model=hf_model, chunk_size=tcfg.loss_chunk_size,
                              fused_linear_ce=job.model.liger)
    counts = count_params(module)

    init_device: list[str] = []  # where the backend made the weights (host memory under CPU offload)

    def _materialize(m: torch.nn.Module, device: torch.device) -> None:
        init_device.append(device.type)
        stats = materialize(m, cfg=job.model, seed=job.seed, device=device)  # type: ignore[arg-type]
        log.info("weights: %d tensors loaded from %s, %d initialised from seed %d", stats["loaded"],
                 job.model.path or "-", stats["initialised"], job.seed)

    rss_before_load, t_load = host_rss_gib()[0], time.perf_counter()
    engine = parallelize(module, job=job, dist=d, materialize=_materialize, layer_classes=layer_classes)
    module.train()
    log.info("parameters: %s total, %s trainable (%s)", f"{counts.total:,}", f"{counts.trainable:,}", job.peft.method)

    # --- resume ---
    ckpt = CheckpointManager(run_dir, keep_last=job.checkpoint.keep_last, dist_info=d)
    batches = DistributedBatches(data, micro_batch_size=tcfg.micro_batch_size, rank=d.rank, world_size=d.world_size,
                                 seed=job.seed, shuffle=job.data.shuffle, pad_id=pad_id, max_seq_len=job.data.max_seq_len)
    progress = Progress()
    torch.manual_seed(job.seed + d.rank)  # dropout streams differ per rank
    source = ckpt.resolve(job.resume)
    logger_run_id = None
    if source is not None:
        loaded = ckpt.load(source, engine=engine)
        progress = Progress(step=loaded.meta["step"], tokens_seen=loaded.meta["tokens_seen"])
        batches.load_state_dict(loaded.meta["data"])
        logger_run_id = loaded.meta.get("logger_run_id")
        if loaded.rank_state is not None:
            set_rng_state(loaded.rank_state["rng"])
        else:  # other world size: fresh per-rank streams, still deterministic
            torch.manual_seed(job.seed + d.rank + 1_000_003 * progress.step)
        log.info("resumed from %s (step %d, world size %d -> %d)", source, progress.step,
                 loaded.meta["world_size"], d.world_size)

    # --- monitoring (rank 0) ---
    config_yaml = (run_dir / "config.yaml").read_text() if (run_dir / "config.yaml").is_file() else ""
    wandb_run = None
    if d.is_main and job.logger.kind == "wandb" and job.logger.mode != "disabled":
        wandb_run, logger_run_id = start_wandb(run_dir=run_dir, logger_cfg=job.logger, run_name=job.run.name,
                                               run_id=logger_run_id or _saved_wandb_id(run_dir),
                                               config=yaml.safe_load(config_yaml) or {})
        (run_dir / "wandb_run_id").write_text(logger_run_id)
    logger_run_id = broadcast_object(logger_run_id)
    metrics = MetricsLogger(run_dir=run_dir, enabled=d.is_main, start_step=progress.step,
                            max_steps=tcfg.max_steps, wandb_run=wandb_run)
    # Host memory after building, loading (and resuming): each rank's resident set before loading
    # and its peak so far, gathered (collective) so rank 0 records every rank's.
    host = _gather_host_rss(d, before=rss_before_load)
    host["load_seconds"] = round(time.perf_counter() - t_load, 2)  # shard + materialise (+ resume)
    if source is not None:
        metrics.event("resume", step=progress.step, checkpoint=str(source), world_size=d.world_size, **host)
    else:
        metrics.event("start", step=0, world_size=d.world_size, params=counts.total, trainable=counts.trainable,
                      samples=len(data), dropped=data.stats.dropped_overlength + data.stats.dropped_no_supervision,
                      **host)

    n_layers = int(hf_config.num_hidden_layers)
    hidden = int(hf_config.hidden_size)
    n_frozen = counts.frozen - (counts.embedding if not _embedding_trainable(module) else 0)
    n_train = counts.trainable - (counts.embedding if _embedding_trainable(module) else 0)
    on_gpu = d.device_type == "cuda"
    dev = d.device

    # Device-side accumulators: read by the host only at log and checkpoint points.
    tokens_seen = torch.zeros((), dtype=torch.float64, device=dev)
    window = _Window(t0=time.perf_counter())
    pending_bad = torch.zeros((), dtype=torch.bool, device=dev)

    def save(step: int) -> None:
        _check_finite(pending_bad, step)
        data_state = batches.state_dict()
        rank_state = {"rng": rng_state(), "data": data_state}
        meta = {"tokens_seen": progress.tokens_seen + int(tokens_seen.item()), "data": data_state,
                "logger_run_id": logger_run_id,
                # For `ftcluster export`: whether the frozen base is in the checkpoint, and on which
                # device type seeded weights were generated (CPU and CUDA generators differ).
                "adapter_only": job.checkpoint.adapter_only, "init_device": init_device[0]}
        kill_in_save = _kill_job if job.debug.kill_in_save_at_step == step else None
        secs = ckpt.save(step=step, engine=engine, rank_state=rank_state,
                         meta=meta, config_yaml=config_yaml, before_commit=kill_in_save)
        metrics.event("checkpoint", step=step, seconds=round(secs, 3))
        if job.debug.kill_at_step == step and d.is_main:
            _kill_job()

    # --- the loop ---
    stop = NONE
    while progress.step < tcfg.max_steps:
        step = progress.step + 1
        micro = [batches.next_microbatch() for _ in range(tcfg.grad_accum)]
        # Token counts come from CPU tensors (no device sync); one all-reduce makes them global.
        local = torch.tensor([sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in micro),
                              sum(int(b["num_tokens"]) for b in micro)], dtype=torch.float64)
        span = max(b["input_ids"].shape[1] for b in micro)
        counts_dev = all_reduce_sum(local.pin_memory().to(dev, non_blocking=True) if on_gpu else local)
        # Loss = (sum of token losses over all micro-batches and ranks) / (global supervised tokens).
        # Backends average gradients over ranks, hence the world_size factor.
        supervised = counts_dev[0].clamp(min=1)
        scale = (d.world_size / supervised).to(torch.float32)
        loss_sum = torch.zeros((), dtype=torch.float32, device=dev)
        for b in micro:
            ids = b["input_ids"].to(dev, non_blocking=True)
            labels = b["labels"].to(dev, non_blocking=True)
            loss = engine.forward(ids, labels)
            if job.debug.nan_at_step == step and d.rank == job.debug.nan_rank:
                loss = loss * float("nan")  # test hook: a non-finite loss on one rank
            engine.backward(loss * scale)
            loss_sum += loss.detach()
        grad_norm = engine.clip_grad_norm(tcfg.grad_clip)
        global_loss = all_reduce_sum(loss_sum) / supervised
        bad = ~(torch.isfinite(global_loss) & torch.isfinite(grad_norm))  # identical on every rank
        lr = lr_at(step, cfg=job.optim, max_steps=tcfg.max_steps)
        engine.step(lr=lr, skip=bad)
        pending_bad |= bad
        tokens_seen += counts_dev[1]
        progress.step = step
        window.steps += 1
        window.fpt_sum += flops_per_token(n_frozen=n_frozen, n_trainable=n_train, n_layers=n_layers,
                                          hidden=hidden, attn_span=attended_span(hf_config, span))

        _maybe_inject_failure(job, run_dir, d, step)

        last = step == tcfg.max_steps
        if step % tcfg.log_every == 0 or last:
            # Preemption (SIGUSR1 or the request file) or SIGTERM on any rank: all ranks agree on it
            # here (one all-reduce of a flag), at log points only, so a stop waits at most
            # train.log_every steps and costs no extra stall inside the steps.
            stop_dev = stops.agreed(dev) if not last else torch.zeros((), dtype=torch.int32, device=dev)
            # The one host sync of a logged step: everything the log and the stop need, in one copy.
            loss_v, gnorm_v, bad_v, tok_v, stop_v = torch.stack(
                [global_loss.double(), grad_norm.double(), pending_bad.double(), tokens_seen,
                 stop_dev.double()]).tolist()
            stop = int(stop_v)
            if bad_v:
                _check_finite(pending_bad, step, loss=loss_v, grad_norm=gnorm_v)
            elapsed = max(time.perf_counter() - window.t0, 1e-9)
            tps = (tok_v - window.tokens_at_t0) / elapsed  # real (non-pad) tokens, all ranks
            fpt = window.fpt_sum / window.steps  # mean model FLOPs per token over the window
            mfu = (tps * fpt / (PEAK_FLOPS_PER_GPU * d.world_size)) if on_gpu else None
            record = {"step": step, "loss": loss_v, "lr": lr, "grad_norm": gnorm_v,
                      "tokens_per_s": tps, "tokens_per_s_per_gpu": tps / d.world_size, "mfu": mfu,
                      "tokens_seen": progress.tokens_seen + int(tok_v)}
            if on_gpu:
                record["mem_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30
                record["mem_reserved_gib"] = torch.cuda.max_memory_reserved(dev) / 2**30
            metrics.step(record)
            if on_log is not None:
                on_log(dict(record))
            window = _Window(t0=time.perf_counter(), tokens_at_t0=tok_v)

        every = job.checkpoint.every_steps
        saved = job.checkpoint.enabled and (last or (every and step % every == 0))
        if saved:
            t_save = time.perf_counter()
            save(step)
            window.t0 += time.perf_counter() - t_save  # checkpoint time is not training throughput

        # An agreed stop request: checkpoint unless this step just did, and stop.
        if stop:
            if job.checkpoint.enabled and not saved:
                save(step)
            break

    if stop:
        newest = ckpt.latest() if job.checkpoint.enabled else None
        log.info("stopped after step %d (%s); %s", progress.step, REASONS[stop],
                 f"checkpoint {newest}" if newest else "no checkpoint (checkpoint.enabled=false)")
        metrics.event("preempted" if stop == PREEMPT else "terminated", step=progress.step,
                      checkpoint=str(newest) if newest else None)
        if stop == PREEMPT:
            stops.acknowledge(step=progress.step, checkpoint=newest)  # the Slurm job requeues on this
        metrics.close()
        barrier()
        if stop == PREEMPT:
            return  # a clean stop: resume=auto continues from the checkpoint
        raise SystemExit(TERMINATED_EXIT_CODE)

    host = _gather_host_rss(d, before=rss_before_load)
    metrics.event("end", step=progress.step, tokens_seen=progress.tokens_seen + int(tokens_seen.item()),
                  host_rss_peak_gib=host["host_rss_peak_gib"], host_rss_peak_gib_per_rank=host["host_rss_peak_gib_per_rank"])
    metrics.close()
    barrier()


def _gather_host_rss(d: Dist, *, before: float) -> dict:
    """Collective: every rank's host RSS before model loading and its peak so far (GiB)."""
    t = torch.zeros(d.world_size, 2, dtype=torch.float64, device=d.device)
    t[d.rank, 0] = before
    t[d.rank, 1] = host_rss_gib()[1]
    rows = all_reduce_sum(t).tolist()
    return {"host_rss_before_load_gib": round(max(r[0] for r in rows), 4),
            "host_rss_peak_gib": round(max(r[1] for r in rows), 4),
            "host_rss_peak_gib_per_rank": [round(r[1], 4) for r in rows]}


def _check_finite(pending_bad: torch.Tensor, step: int, *, loss: float | None = None, grad_norm: float | None = None) -> None:
    if bool(pending_bad.item()):
        detail = "" if loss is None else f" (loss={loss}, grad_norm={grad_norm})"
        msg = (f"non-finite loss or gradient at or before step {step}{detail}: that step's update was "
               "not applied and no checkpoint was written after it; lower optim.lr or check the data")
        # Every rank reaches this at the same step (the flag is global). Log first, then meet at a
        # barrier, so that whichever rank the launcher reports, every rank has recorded the stop.
        log.error(msg)
        barrier()
        raise NonFiniteError(msg)


def _maybe_inject_failure(job: JobConfig, run_dir: Path, d: Dist, step: int) -> None:
    """debug.fail_at_step: rank fail_rank raises once; a marker in the run dir stops a retry from
    raising again (so recovery can be tested)."""
    if job.debug.fail_at_step != step or d.rank != job.debug.fail_rank:
        return
    marker = run_dir / f".debug_failed_at_step_{step}"
    if marker.exists():
        return
    marker.write_text(f"rank {d.rank}\n")
    raise InjectedFailure(f"debug.fail_at_step={step}: injected failure on rank {d.rank}")


def _kill_job() -> None:
    """Test hooks debug.kill_*: SIGKILL our whole process group (launcher and every local rank)."""
    import signal

    log.info("debug: killing the job's process group with SIGKILL")
    os.killpg(os.getpgid(0), signal.SIGKILL)


def _embedding_trainable(module: torch.nn.Module) -> bool:
    return any(p.requires_grad for n, p in module.named_parameters() if "embed_tokens" in n)


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


def _setup_logging(run_dir: Path, d: Dist) -> None:
    """Every rank logs to <run.dir>/logs/rank<r>.log; rank 0 also to the console."""
    logs = Path(run_dir) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    fmt = logging.Formatter(f"%(asctime)s rank{d.rank} %(levelname)s %(message)s")
    root = logging.getLogger("ftcluster")
    root.setLevel(logging.INFO)
    root.handlers.clear()
    fh = logging.FileHandler(logs / f"rank{d.rank}.log")
    fh.setFormatter(fmt)
    root.addHandler(fh)
    if d.is_main:
        sh = logging.StreamHandler(sys.stdout)
        sh.setFormatter(logging.Formatter("%(message)s"))
        root.addHandler(sh)
    root.propagate = False
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # bitsandbytes (imported by peft) warns at import on CPUs with AVX512-BF16 that an optional
    # hub-downloaded kernel package is missing; we never download kernels, so the warning is noise.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
