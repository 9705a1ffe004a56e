"""`ftcluster plan [overrides] [--world-size N | --nodes N[,M..] --gpus-per-node G] [--gpu-gib X[,Y]] [--json]`.

Composes the job with the same Hydra overrides as `ftcluster train` (config errors exit 2 naming
the key), plans it (ftcluster/plan.py) and prints the per-rank breakdown and the layout it would
choose. Explicit layout values (train.micro_batch_size=2 train.activation_checkpointing=full
model.liger=true) are planned exactly as given. `model.liger=auto` is planned as a CUDA GPU with
Liger installed. Lists of --nodes / --gpu-gib print one summary row per combination (the meta
model is built once; each row is shard arithmetic).
"""
from __future__ import annotations

import json
import sys
from typing import Optional

from ftcluster.config import AUTO, ConfigError, JobConfig, ac_mode, tri_state

USAGE = ("usage: ftcluster plan [overrides] [--world-size N | --nodes N[,M,...] --gpus-per-node G] "
         "[--gpu-gib X[,Y,...]] [--json]")


def _ints(value: str, flag: str) -> list[int]:
    try:
        out = [int(v) for v in value.split(",") if v]
    except ValueError:
        raise ConfigError(f"{flag}: expected an integer or a comma-separated list; got {value!r}") from None
    if not out or min(out) < 1:
        raise ConfigError(f"{flag}: must be >= 1; got {value!r}")
    return out


def _floats(value: str, flag: str) -> list[float]:
    try:
        out = [float(v) for v in value.split(",") if v]
    except ValueError:
        raise ConfigError(f"{flag}: expected a number or a comma-separated list; got {value!r}") from None
    if not out or min(out) <= 0:
        raise ConfigError(f"{flag}: must be > 0; got {value!r}")
    return out


def _parse(argv: list[str]) -> tuple[list[str], dict]:
    opts: dict = {"json": False, "world_size": None, "nodes": None, "gpus_per_node": None, "gpu_gib": None}
    overrides: list[str] = []
    it = iter(argv)
    for a in it:
        name, eq, val = a.partition("=")
        if name in ("--world-size", "--nodes", "--gpus-per-node", "--gpu-gib"):
            if not eq:
                val = next(it, None)
                if val is None:
                    raise ConfigError(f"{name}: needs a value")
            if name == "--gpu-gib":
                opts["gpu_gib"] = _floats(val, name)
            else:
                opts[name[2:].replace("-", "_")] = _ints(val, name)
        elif a == "--json":
            opts["json"] = True
        elif a.startswith("--"):
            raise ConfigError(f"{a}: unknown option ({USAGE})")
        else:
            overrides.append(a)
    if opts["world_size"] and (opts["nodes"] or opts["gpus_per_node"]):
        raise ConfigError("--world-size: give either --world-size or --nodes/--gpus-per-node")
    return overrides, opts


def _local_gpu_gib() -> Optional[float]:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_properties(0).total_memory / 1024 ** 3
    except Exception:  # noqa: BLE001 - no usable GPU: the stated default is used
        return None
    return None


def _topologies(job: JobConfig, opts: dict) -> list[tuple[int, int]]:
    """(world size, nodes) pairs to plan. --world-size N: N ranks, 8 per node (or --gpus-per-node);
    --nodes: that many nodes of --gpus-per-node (default 8) ranks; neither: one rank."""
    gpn = (opts["gpus_per_node"] or [8])[0]
    if opts["world_size"]:
        return [(ws, -(-ws // gpn)) for ws in opts["world_size"]]
    if opts["nodes"]:
        return [(n * gpn, n) for n in opts["nodes"]]
    return [(1, 1)]


def plan_command(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE + "\n\n" + (__doc__ or ""))
        return 0
    try:
        overrides, opts = _parse(argv)
        from ftcluster.compose import compose_job

        job = compose_job(*overrides)
        return _run(job, opts)
    except ConfigError as e:
        print(f"ftcluster: config error: {e}", file=sys.stderr)
        return 2


def _run(job: JobConfig, opts: dict) -> int:
    from ftcluster.layout import per_rank_batch
    from ftcluster.plan import GIB, DEFAULT_GPU_GIB, PlanError, choose_layout, format_plan, plan_json, plan_memory

    t = job.train
    notes = []
    liger = tri_state(job.model.liger, "model.liger")
    if liger is None:
        liger = True
        notes.append("model.liger=auto planned as a CUDA GPU with liger-kernel installed (liger on)")
    if opts["gpu_gib"]:
        budgets = opts["gpu_gib"]
    elif t.memory_budget_gib is not None:
        budgets = [t.memory_budget_gib]
    else:
        local = _local_gpu_gib()
        budgets = [local if local is not None else DEFAULT_GPU_GIB]
        if local is None:
            notes.append(f"no GPU here and no --gpu-gib / train.memory_budget_gib: planned for {DEFAULT_GPU_GIB:g} GiB")
    topologies = _topologies(job, opts)
    mb_fixed = None if t.micro_batch_size == AUTO else int(t.micro_batch_size)
    ac = ac_mode(t.activation_checkpointing)
    ac_fixed = None if ac == AUTO else ac
    results = []
    for ws, nodes in topologies:
        per_rank = per_rank_batch(job, world_size=ws)
        for gib in budgets:
            try:
                choice = choose_layout(job, world_size=ws, nodes=nodes, budget_gib=gib, liger=liger, per_rank_batch=per_rank,
                                       micro_batch_size=mb_fixed, activation_checkpointing=ac_fixed,
                                       activation_checkpointing_every=t.activation_checkpointing_every)
                mb, mode, every, error = (choice.micro_batch_size, choice.activation_checkpointing,
                                          choice.activation_checkpointing_every, None)
            except PlanError as e:
                choice, error = None, str(e)
                mb = mb_fixed or 1
                mode = ac_fixed or "offload"
                every = t.activation_checkpointing_every or 2
            plan = plan_memory(job, world_size=ws, nodes=nodes, micro_batch_size=mb, activation_checkpointing=mode,
                               activation_checkpointing_every=every, liger=liger)
            results.append((plan, plan_json(job, plan, micro_batch_size=mb, activation_checkpointing=mode,
                                            activation_checkpointing_every=every, liger=liger, choice=choice,
                                            budget_gib=gib, error=error)))
    if opts["json"]:
        out = [r[1] for r in results]
        print(json.dumps(out[0] if len(out) == 1 else out, indent=1))
        return 0
    for n in notes:
        print(f"note: {n}")
    if len(results) == 1:
        plan, d = results[0]
        det = plan.detail
        print(f"plan: {job.model.arch} {det['params_total'] / 1e9:.2f}B parameters ({det['params_trainable'] / 1e6:.1f}M trainable), "
              f"peft={job.peft.method}, parallel={det['backend']}{' +cpu_offload' if det['cpu_offload'] else ''}, "
              f"{det['world_size']} ranks on {det['nodes']} node(s), seq {job.data.max_seq_len}")
        print(f"layout: micro-batch {d['micro_batch_size']}, activation checkpointing {d['activation_checkpointing']}"
              f"{' every ' + str(d['activation_checkpointing_every']) if d['activation_checkpointing'] == 'selective' else ''}, "
              f"liger {'on' if liger else 'off'} (GPU {d['budget_gib']:.1f} GiB)")
        print(format_plan(plan))
        for w in d["why"]:
            print(f"why: {w}")
        if d["error"]:
            print(f"does not fit: {d['error']}")
        return 0
    print(f"{'nodes':>5} {'ranks':>6} {'GPU GiB':>8} {'mb':>3} {'checkpointing':<14} {'peak GiB':>9} {'weights+opt':>11} "
          f"{'activ.':>7} {'host/node':>9}  fits")
    for plan, d in results:
        c = d["components"]
        w = c["frozen_weights"] + c["trainable_weights"] + c["grads"] + c["optimizer"]
        ac_s = d["activation_checkpointing"] + (f"/{d['activation_checkpointing_every']}" if d["activation_checkpointing"] == "selective" else "")
        print(f"{d['nodes']:>5} {d['world_size']:>6} {d['budget_gib']:>8.0f} {d['micro_batch_size']:>3} {ac_s:<14} "
              f"{d['total_gib']:>9.1f} {w:>11.1f} {c['activations']:>7.1f} {plan.host_bytes / GIB:>9.1f}  "
              f"{'yes' if d['error'] is None else 'no'}")
    return 0
