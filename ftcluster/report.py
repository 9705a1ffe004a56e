"""The run summary and report: what a run did, read back from its run dir.

`summarize` reads `<run.dir>/metrics.jsonl` (step records and events, ftcluster.metrics),
`best.json` and the committed checkpoints; `write_summary` stores it as `summary.json`; `draw` plots
loss (train and eval) and throughput to `report.png`; `print_summary` prints a short table.
`report_run` does all three and is what the trainer calls on rank 0 at the end of a run;
`ftcluster report RUN_DIR` does the same by hand, also while the run is still going.

Reads only files: no process group, no torch at import (matplotlib and the checkpoint module are
imported inside the functions that need them).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
REPORT_FILE = "report.png"
BEST_FILE = "best.json"
OPENING_EVENTS = ("start", "resume")
CLOSING_EVENTS = ("end", "preempted", "terminated", "early_stop")
# eval_* keys that count or time things rather than score the model: first/last only, no "best".
EVAL_COUNTS = ("eval_samples", "eval_tokens", "eval_tokens_per_s")
FIG_INCHES, FIG_DPI = (12, 8), 100  # 1200x800 pixels


class ReportError(ValueError):
    """A run dir whose records cannot be read: the message names the file (and line)."""


@dataclass(kw_only=True)
class Segment:
    """One process lifetime of a run: from its start/resume event to its last closing event (or
    its last timed record while it runs or after a kill -9)."""
    opening: dict
    closing: dict | None = None
    last_time: float | None = None
    first_step_line: int | None = None  # the line of the segment's first step record (its warm-up window)


@dataclass(kw_only=True)
class RunLog:
    """metrics.jsonl parsed once: step records (a step logged again by a resumed run keeps the last,
    with the line it came from), events in order, and the segments."""
    run_dir: Path
    steps: dict[int, tuple[int, dict]] = field(default_factory=dict)
    events: list[dict] = field(default_factory=list)
    segments: list[Segment] = field(default_factory=list)

    def step_records(self) -> list[dict]:
        return [rec for _, (_, rec) in sorted(self.steps.items())]

    def named(self, name: str) -> list[dict]:
        return [e for e in self.events if e.get("event") == name]


def _parse_lines(path: Path) -> list[tuple[int, dict]]:
    """(line number, object) for every non-blank line of a metrics.jsonl."""
    if not path.is_file():
        raise ReportError(f"{path}: no such file (not a run dir, or the run has not started)")
    text = path.read_text()
    lines = text.splitlines()
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            # The logger writes a record and its newline in one call: an unterminated last line that
            # does not parse is a record being written right now (the run is live), not a bad file.
            if n == len(lines) and not text.endswith("\n"):
                break
            raise ReportError(f"{path}:{n}: not a JSON object: {e.msg}") from None
        if not isinstance(obj, dict):
            raise ReportError(f"{path}:{n}: not a JSON object: {type(obj).__name__}")
        out.append((n, obj))
    if not out:
        raise ReportError(f"{path}: empty: no step or event logged yet")
    return out


def load_run(run_dir: Path) -> RunLog:
    """Parse `<run_dir>/metrics.jsonl` into step records, events and segments."""
    path = Path(run_dir) / METRICS_FILE
    run = RunLog(run_dir=Path(run_dir))
    for n, obj in _parse_lines(path):
        name = obj.get("event")
        if name in OPENING_EVENTS or (name is None and not run.segments):
            # A step before any opening event (an older log) still gets a segment to belong to.
            run.segments.append(Segment(opening=obj if name else {"event": "start"}))
        seg = run.segments[-1]
        if isinstance(obj.get("time"), (int, float)):
            seg.last_time = float(obj["time"])
        if name is None:
            if "step" not in obj or "loss" not in obj:
                raise ReportError(f"{path}:{n}: neither a step record (step, loss) nor an event")
            run.steps[int(obj["step"])] = (n, obj)
            seg.first_step_line = seg.first_step_line or n
            continue
        run.events.append(obj)
        if name in CLOSING_EVENTS:
            seg.closing = obj  # the last one counts: early_stop is followed by end
    _mark_live_end(run, path)
    return run


def _mark_live_end(run: RunLog, path: Path) -> None:
    """Step records carry no time: a last segment without a closing event (still running, or
    killed) ends at the file's modification time, the moment its last record was written."""
    last = run.segments[-1]
    if last.closing is None and last.opening.get("time") is not None:
        last.last_time = max(last.last_time or 0.0, path.stat().st_mtime)


def _segment_seconds(seg: Segment) -> float:
    start = seg.opening.get("time")
    end = seg.closing["time"] if seg.closing and "time" in seg.closing else seg.last_time
    return max(float(end) - float(start), 0.0) if start is not None and end is not None else 0.0


def _mean(values: list[float | None]) -> float | None:
    vals = [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return sum(vals) / len(vals) if vals else None


def _max(values: list[float | None]) -> float | None:
    vals = [float(v) for v in values if isinstance(v, (int, float))]
    return max(vals) if vals else None


def _throughput(run: RunLog) -> dict[str, Any]:
    """Means over the logged windows. The first window of each segment includes model warm-up
    (allocator, torch.compile, data workers), so it is left out when at least 2 windows remain
    (with 3 windows in one run: all but the first); otherwise every window counts."""
    warmup = {seg.first_step_line for seg in run.segments}
    windows = [rec for line, rec in (run.steps[s] for s in sorted(run.steps)) if line not in warmup]
    if len(windows) < 2:
        windows = run.step_records()
    return {"tokens_per_s": _mean([w.get("tokens_per_s") for w in windows]),
            "tokens_per_s_per_gpu": _mean([w.get("tokens_per_s_per_gpu") for w in windows]),
            "mfu": _mean([w.get("mfu") for w in windows]),
            "throughput_windows": len(windows)}


def higher_is_better(metric: str) -> bool:
    """The direction of an eval metric, as eval.mode=auto decides it: lower for loss and perplexity."""
    return not any(k in metric for k in ("loss", "ppl"))


def _eval_series(run: RunLog) -> dict[int, dict]:
    """Step -> eval event; a step evaluated again (a resumed run re-doing it) keeps the last."""
    return {int(e["step"]): e for e in run.named("eval") if "step" in e}


def _eval_summary(run: RunLog) -> dict[str, dict]:
    """For every eval_* key: first and last (with steps) and, for scores, the best (with step)."""
    series = _eval_series(run)
    keys = sorted({k for e in series.values() for k in e if k.startswith("eval_")})
    out: dict[str, dict] = {}
    for key in keys:
        points = [(s, e[key]) for s, e in sorted(series.items()) if isinstance(e.get(key), (int, float))]
        if not points:
            continue
        item = {"first": points[0][1], "first_step": points[0][0], "last": points[-1][1], "last_step": points[-1][0]}
        if key not in EVAL_COUNTS:
            pick = max if higher_is_better(key) else min
            best_step, best = pick(points, key=lambda p: p[1])  # ties: the earliest step
            item.update(best=best, best_step=best_step)
        out[key] = item
    return out


def _read_best(run_dir: Path) -> dict | None:
    path = run_dir / BEST_FILE
    if not path.is_file():
        return None
    try:
        best = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ReportError(f"{path}: not JSON: {e.msg}") from None
    if not isinstance(best, dict):
        raise ReportError(f"{path}: not a JSON object")
    ckpt = best.get("checkpoint")
    # keep_best keeps it, but a checkpoint deleted by hand must not be offered for export.
    best["exists"] = bool(ckpt) and (run_dir / str(ckpt)).is_dir()  # run_dir / an absolute path is that path
    return best


def _status(run: RunLog) -> str:
    """running (no closing event yet, or killed), finished, early_stop, preempted or terminated."""
    closing = run.segments[-1].closing
    if closing is None:
        return "running"
    if closing["event"] == "early_stop" or (closing["event"] == "end" and (run.named("early_stop")
                                                                           or run.named("early_stopped"))):
        return "early_stop"
    return "finished" if closing["event"] == "end" else closing["event"]


def _newest_checkpoint(run_dir: Path) -> str | None:
    from ftcluster.checkpoint import committed_checkpoints  # lazily: it imports torch

    committed = committed_checkpoints(run_dir)
    return str(committed[-1]) if committed else None


def _summarize(run: RunLog) -> dict[str, Any]:
    recs = run.step_records()
    ends = run.named("end")
    closing_steps = [e["step"] for e in run.events if e.get("event") in CLOSING_EVENTS and "step" in e]
    tokens = ends[-1].get("tokens_seen") if ends else (recs[-1].get("tokens_seen") if recs else None)
    early = run.named("early_stop")
    return {
        "run_dir": str(run.run_dir),
        "status": _status(run),
        "steps": max([r["step"] for r in recs] + closing_steps, default=0),
        "train_loss": ({"first": recs[0]["loss"], "first_step": recs[0]["step"],
                        "last": recs[-1]["loss"], "last_step": recs[-1]["step"]} if recs else None),
        "eval": _eval_summary(run),
        **_throughput(run),
        "peak_mem_gib": _max([r.get("mem_gib") for r in recs]),
        "peak_mem_reserved_gib": _max([r.get("mem_reserved_gib") for r in recs]),
        "wall_time_s": sum(_segment_seconds(s) for s in run.segments),
        "segments": [{"event": s.opening.get("event"), "step": s.opening.get("step", 0),
                      "world_size": s.opening.get("world_size"),
                      "ended": s.closing.get("event") if s.closing else None,
                      "seconds": _segment_seconds(s)} for s in run.segments],
        "tokens_seen": tokens,
        "checkpoint": _newest_checkpoint(run.run_dir),
        "best": _read_best(run.run_dir),
        "early_stopped": bool(early or run.named("early_stopped")),
        "early_stop": {k: v for k, v in early[-1].items() if k != "event"} if early else None,
        "world_size": next((s.opening["world_size"] for s in reversed(run.segments) if "world_size" in s.opening), None),
        "wandb_offline": _wandb_offline_dir(run.run_dir),
    }


def _wandb_offline_dir(run_dir: Path) -> str | None:
    """The newest offline W&B run under the run dir (W&B writes `wandb/offline-run-<time>-<id>`)."""
    found = sorted((Path(run_dir) / "wandb").glob("offline-run-*"))
    return str(found[-1]) if found else None


def summarize(run_dir: Path) -> dict[str, Any]:
    """What a run did, from its run dir (see the module docstring); raises ReportError naming the
    file (and line) when metrics.jsonl is missing, empty or malformed."""
    return _summarize(load_run(Path(run_dir)))


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    # A reader (a user's viewer, a second `ftcluster report`) sees the old file or the new one, never half.
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _store_summary(summary: dict[str, Any], *, run_dir: Path) -> None:
    _atomic_write_bytes(run_dir / SUMMARY_FILE, (json.dumps(summary, indent=2) + "\n").encode())


def write_summary(run_dir: Path) -> dict[str, Any]:
    """Write `<run_dir>/summary.json` (atomically) and return the summary."""
    summary = summarize(Path(run_dir))
    _store_summary(summary, run_dir=Path(run_dir))
    return summary


# --- the picture ------------------------------------------------------------------------------


def _style(ax, *, title: str, ylabel: str) -> None:  # type: ignore[no-untyped-def]
    ax.set_title(title, fontsize=13)
    ax.set_xlabel("optimizer step", fontsize=11)
    ax.set_ylabel(ylabel, fontsize=11)
    ax.grid(True, alpha=0.3)


def _mark_resumes(ax, run: RunLog) -> None:  # type: ignore[no-untyped-def]
    """A dashed line where a resumed segment starts: the curve may jump there."""
    for i, seg in enumerate(s for s in run.segments if s.opening.get("event") == "resume"):
        ax.axvline(seg.opening.get("step", 0), color="grey", linestyle="--", linewidth=1,
                   label="resumed" if i == 0 else None)


def _draw_loss(ax, run: RunLog, *, summary: dict) -> None:  # type: ignore[no-untyped-def]
    recs = run.step_records()
    few = len(recs) <= 30  # markers keep a short run (one step) visible; a long curve reads better without
    if recs:
        ax.plot([r["step"] for r in recs], [r["loss"] for r in recs], color="tab:blue", linewidth=1.5,
                marker="o" if few else None, markersize=4, label="train loss")
    evals = [(s, e["eval_loss"]) for s, e in sorted(_eval_series(run).items())
             if isinstance(e.get("eval_loss"), (int, float))]
    if evals:
        ax.plot(*zip(*evals), color="tab:orange", linestyle=":", marker="s", markersize=6, label="eval loss")
        best = summary["eval"]["eval_loss"]
        ax.plot([best["best_step"]], [best["best"]], linestyle="none", marker="*", markersize=18, color="tab:red",
                markeredgecolor="black", label=f"best eval loss {best['best']:.4g} (step {best['best_step']})", zorder=5)
    if not recs and not evals:
        ax.text(0.5, 0.5, "no steps logged yet", ha="center", va="center", transform=ax.transAxes, fontsize=14)
    _mark_resumes(ax, run)
    _style(ax, title="loss", ylabel="loss (per supervised token)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best", fontsize=10, framealpha=0.8)


def _draw_throughput(ax, run: RunLog, *, summary: dict) -> None:  # type: ignore[no-untyped-def]
    recs = [r for r in run.step_records() if isinstance(r.get("tokens_per_s"), (int, float))]
    if recs:
        ax.plot([r["step"] for r in recs], [r["tokens_per_s"] for r in recs], color="tab:green", linewidth=1.5,
                marker="o" if len(recs) <= 30 else None, markersize=4, label="tokens/s (all GPUs)")
    else:
        ax.text(0.5, 0.5, "no throughput logged yet", ha="center", va="center", transform=ax.transAxes, fontsize=14)
    sizes = {s.opening.get("world_size") for s in run.segments} - {None}
    if len(sizes) == 1 and (ws := sizes.pop()) > 1:
        # One world size throughout: per GPU is the same curve on a rescaled axis.
        ax.secondary_yaxis("right", functions=(lambda x: x / ws, lambda x: x * ws)).set_ylabel("tokens/s per GPU")
    _mark_resumes(ax, run)
    mean = summary["tokens_per_s"]
    _style(ax, title="throughput (real tokens)" + (f", mean {mean:,.0f} tokens/s" if mean else ""),
           ylabel="tokens/s")
    if recs:
        ax.legend(loc="lower right", fontsize=10, framealpha=0.8)


def _figure_png(run: RunLog, *, summary: dict) -> bytes:
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # A Figure on the Agg canvas, not pyplot: no global backend switch, no window, safe in a notebook.
    fig = Figure(figsize=FIG_INCHES, dpi=FIG_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    _draw_loss(top, run, summary=summary)
    _draw_throughput(bottom, run, summary=summary)
    bottom.xaxis.get_major_locator().set_params(integer=True)
    fig.suptitle(f"{run.run_dir.name}: {summary['steps']} steps, {summary['status']}", fontsize=14)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=FIG_DPI)
    return buf.getvalue()


def _draw(run: RunLog, *, summary: dict, out: Path | None) -> Path:
    path = Path(out) if out is not None else run.run_dir / REPORT_FILE
    _atomic_write_bytes(path, _figure_png(run, summary=summary))
    return path


def draw(run_dir: Path, out: Path | None = None) -> Path:
    """Plot train and eval loss (best eval marked) and tokens/s against step; write the PNG
    (1200x800, atomically) to `out` or `<run_dir>/report.png` and return its path."""
    run = load_run(Path(run_dir))
    return _draw(run, summary=_summarize(run), out=out)


# --- the table --------------------------------------------------------------------------------


def _fmt(v: float | None, spec: str = ".4f", *, none: str = "n/a") -> str:
    return none if v is None else format(v, spec)


def hms(seconds: float) -> str:
    """Seconds as h:mm:ss."""
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _eval_row(item: dict | None) -> str:
    if not item:
        return "no evaluation"
    return (f"first {_fmt(item['first'])} / best {_fmt(item['best'])} (step {item['best_step']}) / "
            f"last {_fmt(item['last'])}")


def _export_target(summary: dict) -> str | None:
    best = summary.get("best") or {}
    if best.get("exists"):
        return str(Path(summary["run_dir"]) / str(best["checkpoint"]))  # best.json may hold it relative to the run dir
    return summary["checkpoint"]


def _rows(summary: dict) -> list[tuple[str, str]]:
    tl, ev, best = summary["train_loss"], summary["eval"], summary.get("best")
    gpu = summary["peak_mem_gib"] is not None
    rows = [("steps", f"{summary['steps']} ({summary['status'].replace('_', ' ')})"),
            ("train loss", f"{_fmt(tl['first'])} → {_fmt(tl['last'])}" if tl else "no steps logged yet"),
            ("eval loss", _eval_row(ev.get("eval_loss")))]
    scores = [k for k in ("eval_exact_match", "eval_rougeL") if k in ev]
    if scores:
        rows.append(("eval scores", ", ".join(f"{k[5:]} best {_fmt(ev[k]['best'])} (step {ev[k]['best_step']})"
                                              for k in scores)))
    rows += [("tokens/s", f"{_fmt(summary['tokens_per_s'], ',.0f')} "
                          f"({_fmt(summary['tokens_per_s_per_gpu'], ',.0f')} per GPU, world size {summary['world_size']})"),
             ("MFU", _fmt(summary["mfu"], ".1%", none="n/a (CPU)")),
             ("peak GPU memory", f"{summary['peak_mem_gib']:.2f} GiB allocated, "
                                 f"{_fmt(summary['peak_mem_reserved_gib'], '.2f')} GiB reserved" if gpu else "n/a (CPU)"),
             ("wall time", f"{hms(summary['wall_time_s'])} ({len(summary['segments'])} segment(s))"),
             ("checkpoint", summary["checkpoint"] or "none committed")]
    if best:
        rows.append(("best checkpoint", f"{best.get('checkpoint')} ({best.get('metric')} {_fmt(best.get('value'))}, "
                                        f"step {best.get('step')})" + ("" if best["exists"] else " [missing]")))
    if summary.get("wandb_offline"):
        rows.append(("W&B (offline)", f"wandb sync {shlex.quote(summary['wandb_offline'])}"))
    target = _export_target(summary)
    if target:
        out = str(Path(summary["run_dir"]) / "export")
        rows.append(("next", f"ftcluster export {shlex.quote(str(target))} {shlex.quote(out)}"))
    return rows


def print_summary(summary: dict, *, console=None) -> None:  # type: ignore[no-untyped-def]
    """Print the summary as a short two-column table (to `console`, a rich Console; default stdout)."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    if not console.is_terminal:  # a log or output file: plain lines, never a box wrapped mid-path
        print("\n".join([f"run {summary['run_dir']}", *(f"  {n:<16} {v}" for n, v in _rows(summary))]), flush=True)
        return
    table = Table(title=f"run {summary['run_dir']}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for name, value in _rows(summary):
        table.add_row(name, value)
    console.print(table)


# --- a sweep: one row per trial ----------------------------------------------------------------

SWEEP_FILE = "sweep.json"  # written by `ftcluster sweep` (ftcluster.launch.tune): metric, mode, space
TRIAL_FILE = "trial.json"  # in each trial's (or multirun point's) run dir: its params, Tune's verdict
RESULTS_CSV, RESULTS_MD, CURVES_FILE = "results.csv", "results.md", "curves.png"


def is_sweep_dir(path: Path) -> bool:
    """A sweep or multirun dir: no metrics of its own, trial run dirs below it."""
    path = Path(path)
    return not (path / METRICS_FILE).is_file() and any(path.glob(f"*/{TRIAL_FILE}"))


def _sweep_settings(sweep_dir: Path) -> tuple[str, bool]:
    """The metric trials are ranked by and whether higher is better (sweep.json; a multirun: eval_loss)."""
    path = sweep_dir / SWEEP_FILE
    spec = json.loads(path.read_text()) if path.is_file() else {}
    metric = spec.get("metric", "eval_loss")
    mode = spec.get("mode", "auto")
    return metric, (higher_is_better(metric) if mode == "auto" else mode == "max")


def _trial_status(summary: dict, trial: dict) -> str:
    status = {"early_stop": "early_stopped"}.get(summary["status"], summary["status"])
    if trial.get("tune_status") == "ERROR" and status not in ("finished", "early_stopped"):
        return "failed"
    return status


def sweep_rows(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per trial run dir that has metrics, ranked by the sweep's metric (best first;
    trials without a value last)."""
    sweep_dir = Path(sweep_dir).resolve()  # absolute paths in the table, however the dir was named
    metric, higher = _sweep_settings(sweep_dir)
    rows = []
    for trial_file in sorted(sweep_dir.glob(f"*/{TRIAL_FILE}")):
        run_dir = trial_file.parent
        trial = json.loads(trial_file.read_text())
        if not (run_dir / METRICS_FILE).is_file():
            rows.append({"trial": run_dir.name, "params": trial.get("params", {}), "status":
                         "failed" if trial.get("tune_status") == "ERROR" else "pending", "steps": 0, "best": None,
                         "best_step": None, "final": None, "tokens_per_s": None, "wall_time_s": 0.0,
                         "checkpoint": None, "run_dir": str(run_dir), "curve": []})
            continue
        run = load_run(run_dir)
        summary = _summarize(run)
        item = summary["eval"].get(metric) or {}
        curve = [(st, e[metric]) for st, e in sorted(_eval_series(run).items()) if isinstance(e.get(metric), (int, float))]
        rows.append({"trial": run_dir.name, "params": trial.get("params", {}), "status": _trial_status(summary, trial),
                     "steps": summary["steps"], "best": item.get("best"), "best_step": item.get("best_step"),
                     "final": item.get("last"), "tokens_per_s": summary["tokens_per_s"],
                     "wall_time_s": summary["wall_time_s"], "checkpoint": _export_target(summary),
                     "run_dir": str(run_dir), "curve": curve})
    sign = -1 if higher else 1
    rows.sort(key=lambda r: (r["best"] is None, sign * r["best"] if r["best"] is not None else 0, r["trial"]))
    return rows


def _param_keys(rows: list[dict]) -> list[str]:
    """The keys whose values differ between trials (a multirun point's overrides include the constant ones)."""
    keys = sorted({k for r in rows for k in r["params"]})
    if len(rows) < 2:
        return keys
    return [k for k in keys if len({str(r["params"].get(k)) for r in rows}) > 1]


def _table(rows: list[dict], metric: str) -> tuple[list[str], list[list[str]]]:
    keys = _param_keys(rows)
    header = ["trial", *keys, "status", "steps", f"best {metric}", "best step", f"final {metric}", "tokens/s",
              "wall time", "best checkpoint"]
    body = [[r["trial"], *(f"{r['params'][k]:.4g}" if isinstance(r["params"].get(k), float) else str(r["params"].get(k, ""))
                           for k in keys),
             r["status"], str(r["steps"]), _fmt(r["best"]), str(r["best_step"] if r["best_step"] is not None else "n/a"),
             _fmt(r["final"]), _fmt(r["tokens_per_s"], ",.0f"), hms(r["wall_time_s"]), r["checkpoint"] or "none"]
            for r in rows]
    return header, body


def _write_csv(path: Path, rows: list[dict], metric: str) -> None:
    import csv
    import io

    keys = _param_keys(rows)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["trial", *keys, "status", "steps", f"best_{metric}", "best_step", f"final_{metric}", "tokens_per_s",
                "wall_time_s", "best_checkpoint", "run_dir"])
    for r in rows:
        w.writerow([r["trial"], *(r["params"].get(k, "") for k in keys), r["status"], r["steps"],
                    "" if r["best"] is None else r["best"], "" if r["best_step"] is None else r["best_step"],
                    "" if r["final"] is None else r["final"], "" if r["tokens_per_s"] is None else r["tokens_per_s"],
                    round(r["wall_time_s"], 1), r["checkpoint"] or "", r["run_dir"]])
    _atomic_write_bytes(path, buf.getvalue().encode())


def _markdown(rows: list[dict], metric: str, *, sweep_dir: Path) -> str:
    header, body = _table(rows, metric)
    lines = [f"# {sweep_dir.name}: {len(rows)} trial(s), ranked by {metric}", "",
             "| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in body]
    stopped = sum(1 for r in rows if r["status"] == "early_stopped")
    lines += ["", f"{stopped} trial(s) stopped early."]
    if rows and rows[0]["checkpoint"]:
        lines += ["", f"Best: {rows[0]['trial']}; export it with `{_export_command(rows[0])}`"]
    return "\n".join(lines) + "\n"


def _export_command(row: dict) -> str:
    return f"ftcluster export {shlex.quote(str(row['checkpoint']))} {shlex.quote(str(Path(row['run_dir']) / 'export'))}"


def _curves_png(rows: list[dict], metric: str, *, title: str) -> bytes:
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=FIG_INCHES, dpi=FIG_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for r in sorted(rows, key=lambda r: r["trial"]):
        if not r["curve"]:
            continue
        params = ", ".join(f"{k.rsplit('.', 1)[-1]}={v:.3g}" if isinstance(v, float) else f"{k.rsplit('.', 1)[-1]}={v}"
                           for k, v in r["params"].items())
        line, = ax.plot(*zip(*r["curve"]), marker="o", markersize=4, linewidth=1.5,
                        label=f"{r['trial']} ({params}): {r['status'].replace('_', ' ')}")
        if r["status"] == "early_stopped":  # where ASHA (or early stopping) ended it
            ax.plot([r["curve"][-1][0]], [r["curve"][-1][1]], marker="X", markersize=12, color=line.get_color(),
                    markeredgecolor="black", linestyle="none")
    if not any(r["curve"] for r in rows):
        ax.text(0.5, 0.5, "no evaluations logged yet", ha="center", va="center", transform=ax.transAxes, fontsize=14)
    _style(ax, title=title, ylabel=metric)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best", fontsize=9, framealpha=0.8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=FIG_DPI)
    return buf.getvalue()


def write_sweep_report(sweep_dir: Path) -> list[dict[str, Any]]:
    """results.csv, results.md and curves.png (the metric against step, every trial) in the sweep
    (or multirun) dir; returns the rows, best first. Also while the sweep runs."""
    sweep_dir = Path(sweep_dir)
    metric, _ = _sweep_settings(sweep_dir)
    rows = sweep_rows(sweep_dir)
    _write_csv(sweep_dir / RESULTS_CSV, rows, metric)
    _atomic_write_bytes(sweep_dir / RESULTS_MD, _markdown(rows, metric, sweep_dir=sweep_dir).encode())
    stopped = sum(1 for r in rows if r["status"] == "early_stopped")
    title = f"{sweep_dir.name}: {metric} of {len(rows)} trial(s), {stopped} stopped early"
    _atomic_write_bytes(sweep_dir / CURVES_FILE, _curves_png(rows, metric, title=title))
    return rows


def print_sweep(sweep_dir: Path, rows: list[dict], *, out=None) -> None:  # type: ignore[no-untyped-def]
    """The table (as results.md has it: wide rows read better unwrapped in a log), where the files
    are, and the best trial with its export command."""
    out = out or sys.stdout
    metric, _ = _sweep_settings(Path(sweep_dir))
    print(_markdown(rows, metric, sweep_dir=Path(sweep_dir)), file=out)
    print(f"table: {Path(sweep_dir) / RESULTS_MD} (and {RESULTS_CSV}); curves: {Path(sweep_dir) / CURVES_FILE}", file=out)
    if rows and rows[0]["best"] is not None:
        best = rows[0]
        print(f"best trial: {best['trial']} ({metric} {_fmt(best['best'])} at step {best['best_step']}; "
              f"{', '.join(f'{k}={v}' for k, v in best['params'].items())})", file=out)
        if best["checkpoint"]:
            print(f"export it: {_export_command(best)}", file=out)
    out.flush()


# --- the entry points -------------------------------------------------------------------------


def report_run(run_dir: Path, *, out: Path | None = None, console=None) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    """summary.json, the PNG (`out`, default report.png) and, when `console` is given, the table for a
    run dir; returns the summary. Rank 0 calls this at the end of a run; a run with one step or none
    still gets a picture."""
    run = load_run(Path(run_dir))
    summary = _summarize(run)
    _store_summary(summary, run_dir=run.run_dir)
    _draw(run, summary=summary, out=out)
    if console is not None:
        print_summary(summary, console=console)
    return summary


def report_command(argv: list[str]) -> int:
    """`ftcluster report RUN_DIR [--out PNG]`: exit 0, or 2 for a dir whose metrics cannot be read."""
    from rich.console import Console

    p = argparse.ArgumentParser(prog="ftcluster report", description=(
        "Summarise a run dir (finished or still running): write summary.json and a PNG of loss and "
        "throughput, print a table."))
    p.add_argument("run_dir", type=Path)
    p.add_argument("--out", type=Path, default=None, help="where to write the PNG (default RUN_DIR/report.png)")
    args = p.parse_args(argv)
    if is_sweep_dir(args.run_dir):
        try:
            print_sweep(args.run_dir, write_sweep_report(args.run_dir))
        except ReportError as e:
            print(f"ftcluster report: {e}", file=sys.stderr)
            return 2
        return 0
    try:
        report_run(args.run_dir, out=args.out, console=Console())
    except ReportError as e:
        print(f"ftcluster report: {e}", file=sys.stderr)
        return 2
    print(f"summary: {args.run_dir / SUMMARY_FILE}")
    print(f"plot: {args.out or args.run_dir / REPORT_FILE}")
    return 0
