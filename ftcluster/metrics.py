"""What a run reports: metrics.jsonl, the console progress bar, Weights & Biases. Rank 0 only.

Numbers (DESIGN.md): tokens/s counts real (non-pad) input tokens. MFU divides achieved model FLOPs
by 989e12 per GPU (H100/H200 dense bf16). Model FLOPs per token: full fine-tuning
6*N + 12*L*d*S; adapters 4*N_frozen + 6*N_trainable + 12*L*d*S, with N excluding the input
embedding table and S the attended span (the padded sequence length of the batch; the group size
under S2-Attn in training: ftcluster.longlora.attended_span). Packed rows (data.packing): each
sample's own length (or the S2 group when shorter), averaged over real tokens.
"""
from __future__ import annotations

import json
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

PEAK_FLOPS_PER_GPU = 989e12


def flops_per_token(*, n_frozen: int, n_trainable: int, n_layers: int, hidden: int, attn_span: int) -> float:
    """Model FLOPs per token (forward + backward), embedding table excluded by the caller."""
    return 4 * n_frozen + 6 * n_trainable + 12 * n_layers * hidden * attn_span


@dataclass(kw_only=True)
class FlopsModel:
    """The DESIGN.md formula's constants for one model: N split into frozen and trainable (input
    embedding table excluded), layers L, width d; `attended_span` maps a batch width to S_attn."""
    n_frozen: int
    n_trainable: int
    n_layers: int
    hidden: int
    attended_span: Callable[[int], int]

    def per_token(self, width: int) -> float:
        return flops_per_token(n_frozen=self.n_frozen, n_trainable=self.n_trainable, n_layers=self.n_layers,
                               hidden=self.hidden, attn_span=self.attended_span(width))

    def per_token_packed(self, seq_lens: list[int], width: int) -> float:
        """Mean model FLOPs per real token of packed rows of `width`: each sample's tokens attend
        its own span (its length, or the S2 group when shorter), not the row's."""
        cap = self.attended_span(width)
        tokens = sum(seq_lens)
        span_tokens = sum(n * min(n, cap) for n in seq_lens)  # sum over tokens of the attended span
        base = flops_per_token(n_frozen=self.n_frozen, n_trainable=self.n_trainable, n_layers=self.n_layers,
                               hidden=self.hidden, attn_span=0)
        return base + 12 * self.n_layers * self.hidden * span_tokens / max(tokens, 1)


@dataclass(kw_only=True)
class ThroughputWindow:
    """tokens/s and MFU between two log points, from host clocks and the token count read at the
    log point's one host sync. Time spent checkpointing or evaluating is `exclude`d."""
    flops: FlopsModel
    world_size: int
    on_gpu: bool
    t0: float = field(default_factory=time.perf_counter)
    tokens_at_t0: float = 0.0
    steps: int = 0
    fpt_sum: float = 0.0

    real: int = 0
    slots: int = 0

    def add_step(self, *, batches: list[Any]) -> None:
        """One optimizer step's micro-batches (host facts only). Unpacked rows count the padded
        width as every token's span (the convention so far); packed rows each sample's own."""
        self.steps += 1
        if batches[0].packed:
            lens = [n for b in batches for row in b.seq_lens for n in row]
            self.fpt_sum += self.flops.per_token_packed(lens, max(b.width for b in batches))
        else:
            self.fpt_sum += self.flops.per_token(max(b.width for b in batches))
        self.real += sum(b.num_tokens for b in batches)
        self.slots += sum(b.input_ids.numel() for b in batches)

    def exclude(self, seconds: float) -> None:
        self.t0 += seconds

    def read(self, tokens_total: float) -> dict[str, float | None]:
        """The window's rates (real tokens over all ranks), then start the next window."""
        now = time.perf_counter()
        tps = (tokens_total - self.tokens_at_t0) / max(now - self.t0, 1e-9)
        fpt = self.fpt_sum / max(self.steps, 1)  # mean model FLOPs per token over the window
        mfu = (tps * fpt / (PEAK_FLOPS_PER_GPU * self.world_size)) if self.on_gpu else None
        fill = self.real / max(self.slots, 1)  # this rank's real tokens / row positions (padding efficiency)
        self.t0, self.tokens_at_t0, self.steps, self.fpt_sum, self.real, self.slots = now, tokens_total, 0, 0.0, 0, 0
        return {"tokens_per_s": tps, "tokens_per_s_per_gpu": tps / self.world_size, "mfu": mfu,
                "row_fill": round(fill, 4)}


def gpu_memory(device: torch.device) -> dict[str, float]:
    """Peak GPU memory so far (GiB): allocated and reserved by the caching allocator."""
    if device.type != "cuda":
        return {}
    return {"mem_gib": torch.cuda.max_memory_allocated(device) / 2**30,
            "mem_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30}


def gather_host_rss(*, rank: int, world_size: int, device: torch.device, before: float) -> dict:
    """Collective: every rank's host RSS before model loading and its peak so far (GiB), so that
    rank 0 records every rank's."""
    from ftcluster.distributed import all_reduce_sum

    t = torch.zeros(world_size, 2, dtype=torch.float64, device=device)
    t[rank, 0] = before
    t[rank, 1] = host_rss_gib()[1]
    rows = all_reduce_sum(t).tolist()
    return {"host_rss_before_load_gib": round(max(r[0] for r in rows), 4),
            "host_rss_peak_gib": round(max(r[1] for r in rows), 4),
            "host_rss_peak_gib_per_rank": [round(r[1], 4) for r in rows]}


class MetricsLogger:
    """Writes one JSON object per logged step (and per event) to <run.dir>/metrics.jsonl, drives a
    rich progress bar, and mirrors step metrics to W&B when configured. No-op on ranks other than 0."""

    def __init__(self, *, run_dir: Path, enabled: bool, start_step: int, max_steps: int,
                 wandb_run: Any = None, console_every: int = 1) -> None:
        self.enabled = enabled
        self.max_steps, self.console_every = max_steps, max(1, console_every)
        self._printed_step: int | None = None
        self.wandb_run = wandb_run
        self.path = run_dir / "metrics.jsonl"
        self._progress = None
        self._task = None
        if not enabled:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        from ftcluster.console import make_console

        self.console = make_console()
        self._progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                  TextColumn("{task.fields[status]}"), TimeElapsedColumn(), TextColumn("eta"),
                                  TimeRemainingColumn(), console=self.console, transient=False,
                                  disable=not self.console.is_terminal)
        self._progress.start()
        self._task = self._progress.add_task("train", total=max_steps, completed=start_step, status="")

    def _write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def step(self, record: dict) -> None:
        if not self.enabled:
            return
        self._write(record)
        acc = f" acc {record['rewards/accuracy']:.2f}" if "rewards/accuracy" in record else ""
        status = f"loss {record['loss']:.4f}{acc} lr {record['lr']:.2e} {record['tokens_per_s']:.0f} tok/s"
        if self._progress is not None:
            self._progress.update(self._task, completed=record["step"], status=status)
        if not self.console.is_terminal and self._console_due(record["step"]):
            # Logs, Slurm output files: one plain line per logged step, at most ~20 a run
            # (console_every; metrics.jsonl has every logged step).
            print(f"step {record['step']}/{self.max_steps}: {status} grad_norm {record['grad_norm']:.3f}", flush=True)
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in record.items() if k != "step" and v is not None}, step=record["step"])

    def _console_due(self, step: int) -> bool:
        due = self._printed_step is None or step % self.console_every == 0 or step >= self.max_steps
        self._printed_step = step if due else self._printed_step
        return due

    def print(self, line: str) -> None:
        """One of our lines on the console (above the progress bar in a terminal). Rank 0 only."""
        if not self.enabled:
            return
        if self._progress is not None and self.console.is_terminal:
            self._progress.console.print(line, highlight=False)
        else:
            print(line, flush=True)

    def eval(self, record: dict[str, Any]) -> None:
        """An evaluation: its own record kind in metrics.jsonl (`"event": "eval"`), one console line
        (not a second progress bar), and the eval_* metrics in W&B at the record's step."""
        if not self.enabled:
            return
        self._write({"event": "eval", **record, "time": time.time()})
        extra = "".join(f" {k.removeprefix('eval_')} {record[k]:.4f}" for k in
                        ("eval_rewards/accuracy", "eval_rewards/margin", "eval_exact_match", "eval_rougeL") if k in record)
        ppl = f" ppl {record['eval_ppl']:.2f}" if "eval_ppl" in record else ""
        line = (f"eval step {record['step']}: loss {record['eval_loss']:.4f}{ppl}{extra} "
                f"({record['eval_samples']} samples, {record['eval_tokens_per_s']:,.0f} tok/s)")
        self.print(line)
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in record.items() if k.startswith("eval_")}, step=record["step"])

    def table(self, name: str, *, columns: list[str], rows: list[list], step: int) -> None:
        """A W&B table (generation samples), when a W&B run is active; a no-op otherwise."""
        if not self.enabled or self.wandb_run is None:
            return
        import wandb

        self.wandb_run.log({name: wandb.Table(columns=columns, data=rows)}, step=step)

    def event(self, name: str, **fields: Any) -> None:
        if not self.enabled:
            return
        from ftcluster.console import event_line

        record = {"event": name, **fields, "time": time.time()}
        self._write(record)
        line = event_line(name, fields)
        if line is not None:
            self.print(line)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def start_wandb(*, run_dir: Path, logger_cfg, run_name: str, run_id: str | None, config: dict):  # type: ignore[no-untyped-def]
    """Start or continue (same id) a W&B run. `config` must already be redacted. Returns (run, id)."""
    import wandb

    os.environ.setdefault("WANDB_SILENT", "true")
    run_id = run_id or secrets.token_hex(4)
    # No code or git capture and no console capture: only the redacted config and our metrics leave.
    # No run metadata either: W&B's metadata record holds the command line (sys.argv: the Hydra
    # overrides, secret values included; spawned ranks inherit the driver's argv), the program
    # path, the host and the environment it ran in. `x_disable_meta` stops that record;
    # `program` replaces the argv-derived name; no job artifact (it would hold the entry point
    # and its arguments) and no requirements file.
    settings = wandb.Settings(save_code=False, disable_code=True, disable_git=True, console="off",
                              x_disable_meta=True, disable_job_creation=True, x_save_requirements=False,
                              program="ftcluster")
    run = wandb.init(project=logger_cfg.project, entity=logger_cfg.entity, group=logger_cfg.group,
                     tags=list(logger_cfg.tags) or None, name=logger_cfg.name or run_name, mode=logger_cfg.mode,
                     dir=str(run_dir), id=run_id, resume="allow", config=config, settings=settings)
    return run, run_id


def host_rss_gib() -> tuple[float, float]:
    """(current, peak) resident host memory of this process in GiB: VmRSS and VmHWM from
    /proc/self/status, or the peak from getrusage where /proc is missing. Resident file-mapped
    pages count too; the safetensors reader uses positioned reads, not mappings, for that reason."""
    try:
        fields = {}
        for line in open("/proc/self/status"):
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) / 2**20  # kB -> GiB
        return fields["VmRSS"], fields["VmHWM"]
    except (OSError, KeyError, ValueError):
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux
        return peak, peak
