"""The console: what a run prints, and the one place that keeps third-party noise off it.

By default (`log.level=info`) the console shows ftcluster's own lines only: the start block, the
progress bar (or, outside a terminal, a plain line at most every ~5% of the run), events, and the
end-of-run summary. Everything else that a library prints on a healthy run is kept in the run dir's
logs instead of lost: `logs/rank<r>.log` for a rank, `logs/driver.log` for the driver process.
`log.level=debug` (`ftcluster train --verbose`) turns all of this off: every library prints as it
would, and ftcluster's detail lines (rank placement, weights loaded, ...) reach the console too.

The noise we know of, and how each is handled (the NOISE table, kept in this one module):

- Python warnings (DeepSpeed's and torch.distributed's FutureWarnings, transformers'
  `is_gradient_checkpointing` deprecation that peft triggers on every LoRA run, ...): captured by
  `logging.captureWarnings` and written to the process's log file only.
- datasets' progress bars ("Generating train split", "Tokenizing"): off at the source
  (`HF_DATASETS_DISABLE_PROGRESS_BARS`, inherited by every rank; `datasets.disable_progress_bars`).
- transformers', datasets', peft's and bitsandbytes' loggers (bitsandbytes' "kernels" message on
  CPUs with AVX512-BF16): their own console handlers removed, their records go to the log file.
- Ray: its driver-side loggers go to logs/driver.log; the colour codes of Ray's forwarded-output
  prefixes are off at the source (`RAY_COLOR_PREFIX=0`); output Ray forwards from processes other
  than the training workers (the Train controller's "Failed to query Ray Train Controller actor
  state", the PreemptionWatcher's error at shutdown, ...) cannot be silenced from here, so
  `ForwardedFilter` sends those lines to logs/driver.log while the training workers' lines (rank 0's:
  the others write to their own files) reach the console without Ray's prefix.
- Rich: outside a terminal nothing is wrapped at 80 columns (`make_console` soft-wraps), so a path is
  never split across lines.
"""
from __future__ import annotations

import io
import logging
import os
import re
import sys
import threading
from pathlib import Path
from typing import Any, TextIO

QUIET_ENV = {"HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "RAY_COLOR_PREFIX": "0"}
"""Set (unless the user set them) in the driver before any rank starts; ranks inherit them."""
THIRD_PARTY_LOGGERS = ("transformers", "datasets", "peft", "bitsandbytes", "accelerate", "filelock")
"""Loggers whose records go to the log file only (level WARNING) unless log.level=debug."""
RAY_LOGGERS = ("ray", "ray.train", "ray.tune", "ray.data", "ray.serve")
"""The Ray driver's loggers (Ray gives several their own console handler): logs/driver.log only."""
DRIVER_LOG = "driver.log"
RAY_WORKER_QUIET_ENV = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
"""Ray Train 2.60 patches `print` in its workers to also log each line through the root logger,
which Ray forwards to the driver a second time: every line of ours appeared twice. Off at the source."""


def is_verbose(level: str) -> bool:
    return level == "debug"


def make_console():  # type: ignore[no-untyped-def]
    """A rich Console for our lines: outside a terminal (a log file, a Slurm output file, Ray's
    forwarding pipe) it never wraps a line at its default 80 columns and prints no colour codes."""
    from rich.console import Console

    console = Console()
    if not console.is_terminal:
        console.soft_wrap = True
        console.no_color = True
    return console


def quiet_environment(level: str) -> None:
    """The driver, before any rank starts: switch off at the source what can be switched off by the
    environment the ranks inherit (the user's own settings win)."""
    if is_verbose(level):
        return
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)


def ray_worker_env(level: str) -> dict[str, str]:
    """Environment for Ray Train workers (their runtime env): the source switches above."""
    return {} if is_verbose(level) else {**QUIET_ENV, **RAY_WORKER_QUIET_ENV}


LIBRARY_LOGGING = ("datasets.utils.logging", "transformers.utils.logging")
"""Libraries that give their root logger its own console handler when first imported: imported
(configured) before routing, in the ranks, which import them anyway."""


def route_third_party(handler: logging.Handler, *, level: str, loggers: tuple[str, ...] = THIRD_PARTY_LOGGERS,
                      configure_libraries: bool = False) -> None:
    """Python warnings and the third-party loggers' records go to `handler` (a log file) only; at
    log.level=debug they go there and to the console as usual. `configure_libraries`: first let
    datasets and transformers add their own console handlers (at import), so that they are removed
    here rather than added after (a rank; the driver skips it: the imports cost seconds)."""
    logging.captureWarnings(not is_verbose(level))
    if configure_libraries and not is_verbose(level):
        import importlib

        for module in LIBRARY_LOGGING:
            try:
                importlib.import_module(module)._get_library_root_logger()
            except (ImportError, AttributeError):
                pass
    route_loggers(handler, level=level, names=("py.warnings", *loggers))
    if not is_verbose(level):
        # The source switch too: datasets' bars are tqdm, not log records. datasets reads the variable
        # when imported; one already imported is told directly (importing it here would cost seconds).
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
        if "datasets" in sys.modules:
            sys.modules["datasets"].disable_progress_bars()


def route_loggers(handler: logging.Handler, *, level: str, names: tuple[str, ...]) -> None:
    """These loggers write to `handler` (WARNING and up); their own console handlers go, unless debug."""
    for name in names:
        lg = logging.getLogger(name)
        if not is_verbose(level):
            lg.handlers.clear()
            lg.propagate = False
        if handler not in lg.handlers:
            lg.addHandler(handler)
        if lg.level == logging.NOTSET or lg.level < logging.WARNING:
            lg.setLevel(logging.WARNING)


def file_handler(path: Path, *, prefix: str) -> logging.Handler:
    path.parent.mkdir(parents=True, exist_ok=True)
    fh = logging.FileHandler(path)
    fh.setFormatter(logging.Formatter(f"%(asctime)s {prefix} %(levelname)s %(name)s: %(message)s"))
    return fh


class DriverLog:
    """The driver's third-party output, before the run dir exists (held in memory) and after
    (`attach`: written to logs/driver.log, the held records first)."""

    def __init__(self, *, level: str) -> None:
        from logging.handlers import MemoryHandler

        self.level = level
        # No target yet: `attach` gives it one and flushes what was held.
        self.handler = MemoryHandler(capacity=10_000, flushLevel=logging.CRITICAL + 1)
        self.handler.setLevel(logging.DEBUG)
        route_third_party(self.handler, level=level, loggers=THIRD_PARTY_LOGGERS)

    def attach(self, run_dir: Path) -> Path:
        path = run_dir / "logs" / DRIVER_LOG
        self.handler.setTarget(file_handler(path, prefix="driver"))
        self.handler.flush()
        self.handler.flushLevel = logging.DEBUG  # from now on every record is written at once
        return path

    def close(self) -> None:
        self.handler.flush()
        if self.handler.target is not None:
            self.handler.target.close()
        self.handler.close()


def quiet_ray_driver(run_dir: Path, *, level: str) -> None:
    """Around `ray.init` (before: Ray configured its loggers at import; after: init may add
    handlers): Ray's driver-side loggers write to logs/driver.log only."""
    if is_verbose(level):
        return
    global _RAY_HANDLER
    if _RAY_HANDLER is None or getattr(_RAY_HANDLER, "baseFilename", "") != str(run_dir / "logs" / DRIVER_LOG):
        _RAY_HANDLER = file_handler(run_dir / "logs" / DRIVER_LOG, prefix="driver")
    route_loggers(_RAY_HANDLER, level=level, names=RAY_LOGGERS)


_RAY_HANDLER: logging.Handler | None = None


# --- output Ray forwards from other processes ----------------------------------------------------

# Ray's prefix on a forwarded line: "(RayTrainWorker pid=123) text", "(pid=123, ip=10.0.0.2) text",
# "(TrainController pid=123) text"; a repeated line may end in "[repeated 3x across cluster]".
_RAY_PREFIX = re.compile(r"^(?:\x1b\[[0-9;]*m)?\((?P<who>[^)]*?)\s*pid=[^)]*\)(?:\x1b\[[0-9;]*m)?\s?(?P<text>.*)$", re.DOTALL)
TRAINING_ACTORS = ("RayTrainWorker",)


class ForwardedFilter(io.TextIOBase):
    """A stand-in for sys.stdout / sys.stderr in the Ray driver while the workers run: lines Ray
    forwards from a training worker reach the console without Ray's prefix; lines forwarded from
    any other Ray process go to `log` (logs/driver.log); the driver's own lines pass unchanged."""

    def __init__(self, stream: TextIO, *, log: TextIO) -> None:
        self.stream, self.log = stream, log
        self._buf = ""
        self._lock = threading.Lock()

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        with self._lock:
            self._buf += s
            *lines, self._buf = self._buf.split("\n")
            for line in lines:
                self._route(line)
        return len(s)

    def _route(self, line: str) -> None:
        m = _RAY_PREFIX.match(line)
        if m is None:
            self.stream.write(line + "\n")
        elif m.group("who").strip() in TRAINING_ACTORS:
            self.stream.write(m.group("text") + "\n")
        else:
            self.log.write(line + "\n")

    def flush(self) -> None:
        with self._lock:
            if self._buf:
                self._route(self._buf)
                self._buf = ""
            self.stream.flush()
            self.log.flush()

    def fileno(self) -> int:
        return self.stream.fileno()

    def isatty(self) -> bool:
        return False


class filter_forwarded_output:
    """`with filter_forwarded_output(run_dir, level=...)`: ForwardedFilter on sys.stdout and sys.stderr."""

    def __init__(self, run_dir: Path, *, level: str) -> None:
        self.run_dir, self.level = run_dir, level
        self._saved: tuple[Any, Any] | None = None
        self._log: TextIO | None = None

    def __enter__(self) -> "filter_forwarded_output":
        if is_verbose(self.level) or isinstance(sys.stdout, ForwardedFilter):
            return self  # verbose, or already inside a filter (re-entrant: the outer one restores)
        (self.run_dir / "logs").mkdir(parents=True, exist_ok=True)
        self._log = open(self.run_dir / "logs" / DRIVER_LOG, "a")
        self._saved = (sys.stdout, sys.stderr)
        sys.stdout = ForwardedFilter(sys.stdout, log=self._log)  # type: ignore[assignment]
        sys.stderr = ForwardedFilter(sys.stderr, log=self._log)  # type: ignore[assignment]
        return self

    def __exit__(self, *exc: object) -> None:
        if self._saved is None:
            return
        for s in (sys.stdout, sys.stderr):
            s.flush()
        sys.stdout, sys.stderr = self._saved
        assert self._log is not None
        self._log.close()


# --- our lines ----------------------------------------------------------------------------------


def console_every(*, max_steps: int, log_every: int, level: str) -> int:
    """Outside a terminal: print a step line every this many steps (about 20 per run; every
    logged step at log.level=debug). metrics.jsonl has every logged step either way."""
    log_every = max(1, log_every)
    if is_verbose(level):
        return log_every
    return max(log_every, (max_steps // 20) // log_every * log_every)


def event_line(name: str, fields: dict[str, Any]) -> str | None:
    """One console line for an event (None: the event is shown elsewhere, e.g. the summary)."""
    step = fields.get("step")
    if name in ("end", "start", "resume", "packing", "layout"):  # the summary / the start block show these
        return None
    if name == "checkpoint":
        return f"checkpoint step {step} saved ({fields.get('seconds', 0):.2f} s)"
    rest = ", ".join(f"{k}={v}" for k, v in fields.items() if k != "step")
    return f"{name} at step {step}" + (f": {rest}" if rest else "")


def start_block(*, run_dir: Path, resumed_from: str | None, step: int, model: str, params: int, trainable: int,
                peft: str, world_size: int, device: str, backend: str, global_batch: str, dtype: str,
                data: str, samples: int, mean_len: float, max_seq_len: int, dropped: int, truncated: int,
                eval_line: str, checkpoints: str, wandb: str, packing: dict[str, Any] | None = None,
                layout: str = "", layout_why: tuple[str, ...] = ()) -> list[str]:
    """The start block: what is being trained, where, on what, and where things are written.
    `packing`: the packing event's fields (rows, fill, samples_per_row), None when unpacked.
    `layout`: the resolved speed/memory layout (ftcluster/layout.py) and why each auto choice was made."""
    fill = mean_len / max(max_seq_len, 1)
    rows = (f"one sample per row, right-padded ({fill:.0%} fill)" if packing is None else
            f"packed: {packing['rows']:,} rows of up to {max_seq_len} tokens, {packing['samples_per_row']:.2f} samples/row, "
            f"{packing['fill']:.1%} fill")
    head = (f"resuming at step {step} from {resumed_from}" if resumed_from else "fresh run")
    return [
        f"ftcluster train: {head}",
        f"  run dir     {run_dir}",
        f"  model       {model}: {params:,} parameters, {trainable:,} trainable ({peft})",
        f"  layout      {backend} on {world_size} {device} rank(s); global batch {global_batch}; {dtype}",
        *([f"  memory      {layout}"] if layout else []),
        *[f"              auto: {why}" for why in layout_why],
        f"  data        {samples:,} samples from {data}; mean {mean_len:.0f} of max_seq_len {max_seq_len} tokens, "
        f"{dropped} dropped, {truncated} truncated",
        f"  rows        {rows}",
        f"  eval        {eval_line}",
        f"  checkpoints {checkpoints}",
        f"  logs        {run_dir / 'logs'} (third-party output too; --verbose shows it here)",
        f"  W&B         {wandb}",
    ]


def wandb_location(*, kind: str, mode: str, run: Any) -> str:
    """The start block's W&B line: where the run is, or why there is none."""
    if kind != "wandb" or mode == "disabled" or run is None:
        return "off (logger=wandb to log there)"
    if mode == "offline":
        return f"offline, {getattr(run.settings, 'sync_dir', None) or run.dir} (upload later: wandb sync <that dir>)"
    return f"online, {getattr(run, 'url', None) or run.project}"
