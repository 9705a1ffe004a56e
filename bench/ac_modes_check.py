"""Activation checkpointing modes on one GPU: memory and speed per mode, and no host sync under offload.

Llama-3.1-8B shape (random weights), LoRA r16, bf16, synthetic 4096-token rows, micro-batch 1, FSDP2
at world size 1, no Liger (the modes are what is compared). One real CLI run per mode
(`none`, `selective` every 2, `full`, `offload`), each `train.max_steps` steps; from its
metrics.jsonl: peak allocated / reserved GPU memory (torch.cuda.max_memory_*, over the run) and the
median tokens/s per GPU after the warm-up steps. Then, in this process, the offload build runs
steps under `torch.cuda.set_sync_debug_mode("error")` (after warm-up steps, which allocate the
pinned host blocks): forward + backward, and separately clip + optimizer step, each reported as
passed or with the first synchronising call. Prints a markdown table (also written to
$OUT/ac_modes.md, with the runs under $OUT).

GPU machine, from the repo root:  python bench/ac_modes_check.py         (about 5 minutes on an H200)
CPU check of the command lines:    TINY=1 python bench/ac_modes_check.py (model=tiny, seq 256; the
                                   sync check runs its steps without the CUDA sync mode)
MODES="offload full" limits the CLI runs; SYNC=0 skips the sync check.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

TINY = os.environ.get("TINY") == "1"
OUT = Path(os.environ.get("OUT", "/tmp/out"))
MODEL = ["model=tiny"] if TINY else ["model=llama3_8b"]  # llama3_8b: the shape, random weights
SEQ = 256 if TINY else 4096
STEPS = 4 if TINY else 6
SKIP = 2  # warm-up steps left out of the speed median
COMMON = [*MODEL, "peft=lora", "peft.rank=16", "peft.alpha=32", "data=synthetic", f"data.max_seq_len={SEQ}",
          "data.synthetic_samples=64", "train.micro_batch_size=1", "train.grad_accum=1", "model.liger=false",
          "logger=none", "checkpoint.enabled=false", "eval.every_steps=0", "eval.at_start=false",
          "data.eval_path=null", f"train.max_steps={STEPS}"]
MODES = {"none": ["train.activation_checkpointing=none"],
         "selective": ["train.activation_checkpointing=selective", "train.activation_checkpointing_every=2"],
         "full": ["train.activation_checkpointing=full"],
         "offload": ["train.activation_checkpointing=offload"]}


def run_mode(name: str) -> dict:
    run = OUT / f"ac_{name}"
    cmd = [sys.executable, "-m", "ftcluster", "train", *COMMON, *MODES[name], f"run.dir={run}"]
    print("+", " ".join(cmd[1:]), flush=True)
    t0 = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True)
    (OUT / f"ac_{name}.log").write_text(p.stdout + p.stderr)
    if p.returncode != 0:
        return {"mode": name, "error": f"exit {p.returncode}: {(p.stdout + p.stderr)[-600:]}"}
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in recs if "loss" in r]
    timed = steps[SKIP:] or steps
    peak = [r.get("mem_gib") for r in steps if r.get("mem_gib") is not None]
    reserved = [r.get("mem_reserved_gib") for r in steps if r.get("mem_reserved_gib") is not None]
    tok = statistics.median(r["tokens_per_s_per_gpu"] for r in timed)
    return {"mode": name, "peak_gib": max(peak) if peak else None, "reserved_gib": max(reserved) if reserved else None,
            "tok_s_per_gpu": tok, "step_s": SEQ / tok, "losses": [round(r["loss"], 4) for r in steps],
            "wall_s": round(time.time() - t0, 1)}


def sync_check(steps: int = 3) -> dict:
    """Build the offload job here (world size 1), warm up, then run `steps` steps with CUDA's
    sync debug mode set to error. Returns what passed (or the first error per phase)."""
    import torch

    from ftcluster.compose import compose_job
    from ftcluster.data import Batch
    from ftcluster.distributed import init_distributed, shutdown
    from ftcluster.layout import concrete
    from ftcluster.model import build_module, materialize
    from ftcluster.parallel import parallelize

    dist = init_distributed()
    job = concrete(compose_job(*COMMON, *MODES["offload"]))
    built = build_module(job)
    engine = parallelize(built.module, layers=built.layers, job=job, dist=dist,
                         materialize=lambda m, dev, view: materialize(m, cfg=job.model, seed=0, device=dev, shard_view=view))
    built.module.train()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(6, built.hf_model.config.vocab_size, (1, SEQ), generator=g).to(dist.device)
    batch = Batch(input_ids=ids, labels=ids, num_tokens=ids.numel(), num_supervised=ids.numel())
    scale = 1.0 / ids.numel()
    no_skip = torch.zeros((), device=dist.device)
    cuda = dist.device_type == "cuda"
    result: dict = {"device": str(dist.device)}

    def one(phase_mode: dict[str, str]) -> None:
        for phase, mode in phase_mode.items():
            try:
                if cuda:
                    torch.cuda.set_sync_debug_mode(mode)
                if phase == "forward+backward":
                    engine.backward(engine.forward(batch) * scale, last_micro=True)
                else:
                    engine.clip_grad_norm(1.0)
                    engine.step(lr=1e-5, skip=no_skip)
            except RuntimeError as e:
                result.setdefault(phase, f"FAILED: {str(e).splitlines()[0][:200]}")
                if phase == "forward+backward":
                    engine.optimizer.zero_grad(set_to_none=True)
            finally:
                if cuda:
                    torch.cuda.set_sync_debug_mode("default")

    for _ in range(2):  # warm-up: pinned host blocks, allocator pools, NCCL communicators
        one({"forward+backward": "default", "clip+step": "default"})
    for _ in range(steps):
        one({"forward+backward": "error", "clip+step": "error"})
    if cuda:
        torch.cuda.synchronize()
    stats = built.layers[0]._gradient_checkpointing_func.offloader.stats
    for phase in ("forward+backward", "clip+step"):
        result.setdefault(phase, "passed" if cuda else "ran (no CUDA: sync mode not checked)")
    result["offloaded_per_step"] = stats.offloaded / (2 + steps)
    result["offloaded_gib_per_step"] = stats.offloaded_bytes / (2 + steps) / 2**30
    result["prefetched_per_step"] = stats.prefetched / (2 + steps)
    shutdown()
    return result


def table(rows: list[dict], sync: dict | None) -> str:
    lines = ["| mode | peak allocated GiB | peak reserved GiB | tokens/s per GPU | step s | losses |",
             "| --- | --- | --- | --- | --- | --- |"]
    f = lambda v, spec: "n/a" if v is None else format(v, spec)  # noqa: E731
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['mode']} | error: {r['error'][:120]} | | | | |")
            continue
        lines.append(f"| {r['mode']} | {f(r['peak_gib'], '.2f')} | {f(r['reserved_gib'], '.2f')} | "
                     f"{r['tok_s_per_gpu']:,.0f} | {r['step_s']:.3f} | {r['losses']} |")
    shape = "tiny, seq 256 (CPU check)" if TINY else "Llama-3.1-8B shape, LoRA r16, bf16, seq 4096, mb 1, FSDP2 ws 1"
    lines.append(f"\n{shape}; speed: median after {SKIP} warm-up steps; memory: max over the run.")
    if sync is not None:
        lines.append(f"\noffload under torch.cuda.set_sync_debug_mode('error') on {sync['device']}: "
                     f"forward+backward {sync['forward+backward']}; clip+step {sync['clip+step']}; "
                     f"{sync['offloaded_per_step']:.0f} tensors ({sync['offloaded_gib_per_step']:.2f} GiB) offloaded "
                     f"and {sync['prefetched_per_step']:.0f} prefetched per step")
    return "\n".join(lines)


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    if "--sync-worker" in sys.argv:  # a fresh process: no CUDA state left by anything else
        print(json.dumps(sync_check()))
        return
    rows = [run_mode(m) for m in os.environ.get("MODES", " ".join(MODES)).split()]
    sync = None
    if os.environ.get("SYNC", "1") == "1":
        p = subprocess.run([sys.executable, __file__, "--sync-worker"], capture_output=True, text=True)
        (OUT / "ac_sync.log").write_text(p.stdout + p.stderr)
        last = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
        sync = json.loads(last[-1]) if p.returncode == 0 and last else {
            "device": "?", "forward+backward": f"worker exit {p.returncode}: {p.stderr[-300:]}", "clip+step": "",
            "offloaded_per_step": 0, "offloaded_gib_per_step": 0, "prefetched_per_step": 0}
    md = table(rows, sync)
    (OUT / "ac_modes.md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
