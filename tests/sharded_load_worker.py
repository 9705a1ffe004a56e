"""Run by tests/test_sharded_load.py under torchrun (2 ranks, gloo): load a local HF directory
through the real sharded path (meta build -> FSDP2 fully_shard -> materialize reading only this
rank's slices) and report what it measured. Not a test module itself.

usage: torchrun --standalone --nproc_per_node=N sharded_load_worker.py OUT_JSON MODE:MODEL_DIR ...
(tasks run in order in one process group; put `rss` first, before anything else was allocated)
  rss:     host RSS of this rank before and at peak during the load (VmRSS / VmHWM)
  compare: gather the full state dict from the FSDP2 module on rank 0 and compare it with
           transformers' own single-process `from_pretrained`, tensor by tensor, bit for bit
  qlora:   peft=qlora (bf16 storage): each rank's share of every NF4 state, the gathered NF4
           states against quantising the file's weights in one process, and the loss and LoRA
           gradients of one batch through the sharded module against the same module unsharded
           in one process (qlora32: the same in fp32, with activation checkpointing)
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch


def main() -> None:
    out, tasks = Path(sys.argv[1]), [t.split(":", 1) for t in sys.argv[2:]]
    from ftcluster.distributed import init_distributed, shutdown

    d = init_distributed()
    results = [{"task": f"{mode}:{model_dir}", **(_qlora if mode.startswith("qlora") else _load)(d, mode, model_dir)}
               for mode, model_dir in tasks]
    (out.parent / f"{out.stem}.rank{d.rank}.json").write_text(json.dumps(results))
    shutdown()


def _load(d, mode: str, model_dir: str) -> dict:  # type: ignore[no-untyped-def]
    from ftcluster.config import FSDP2Config, SFTObjectiveConfig, JobConfig, LocalLauncherConfig, ModelConfig, TrainConfig
    from ftcluster.metrics import host_rss_gib
    from ftcluster.model import build_module, hf_key, materialize
    from ftcluster.parallel import parallelize

    job = JobConfig(model=ModelConfig(path=model_dir), launcher=LocalLauncherConfig(), parallel=FSDP2Config(), objective=SFTObjectiveConfig(),
                    train=TrainConfig(dtype="fp32"))
    built = build_module(job)
    rss_before = host_rss_gib()[0]
    engine = parallelize(built.module, layers=built.layers, job=job, dist=d,
                         materialize=lambda m, dev, view: materialize(m, cfg=job.model, seed=0, device=dev, shard_view=view))
    rss_after, rss_peak = host_rss_gib()
    local_bytes = sum(p.to_local().numel() * p.element_size() for p in engine.module.parameters())
    result: dict = {"model_dir": model_dir, "rank": d.rank, "world_size": d.world_size, "rss_before_gib": rss_before,
                    "rss_peak_gib": rss_peak, "rss_after_gib": rss_after, "local_param_bytes": local_bytes}
    if mode == "compare":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(engine.module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if d.rank == 0:
            from transformers import AutoModelForCausalLM

            ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).state_dict()
            ours = {hf_key(k): v for k, v in full.items()}
            result["keys_only_ours"] = sorted(set(ours) - set(ref))
            result["keys_only_ref"] = sorted(set(ref) - set(ours))
            result["mismatched"] = sorted(k for k in set(ours) & set(ref) if not torch.equal(ours[k], ref[k].float()))
            result["compared"] = len(set(ours) & set(ref))
    return result


def _qlora(d, mode: str, model_dir: str) -> dict:  # type: ignore[no-untyped-def]
    """qlora: bf16 storage and compute; qlora32: fp32, with activation checkpointing (recompute)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from ftcluster.config import FSDP2Config, SFTObjectiveConfig, JobConfig, LocalLauncherConfig, ModelConfig, PeftConfig, TrainConfig
    from ftcluster.data import IGNORE_INDEX, Batch
    from ftcluster.model import BuiltModule, SafetensorsSlices, build_module, hf_key, materialize
    from ftcluster.parallel import parallelize
    from ftcluster.parallel.fsdp import shard_view
    from ftcluster.quant import is_nf4_param, nf4_weight_name, quantize_nf4

    fp32 = mode == "qlora32"
    dtype = torch.float32 if fp32 else torch.bfloat16
    job = JobConfig(model=ModelConfig(path=model_dir), launcher=LocalLauncherConfig(), parallel=FSDP2Config(), objective=SFTObjectiveConfig(),
                    peft=PeftConfig(method="qlora", rank=4, alpha=8.0),
                    train=TrainConfig(dtype="fp32" if fp32 else "bf16", activation_checkpointing=fp32))

    def build() -> BuiltModule:
        return build_module(job)

    def fill_lora_b(m: torch.nn.Module) -> None:
        # peft starts B at zero, which makes every A gradient zero: give B values (same on all ranks).
        with torch.no_grad():
            for n, p in m.named_parameters():
                if ".lora_B." in n:
                    view = shard_view(p)
                    full = torch.empty(p.shape).normal_(0, 0.05, generator=torch.Generator().manual_seed(len(n)))
                    view.local.copy_(full[view.index])

    built = build()
    engine = parallelize(built.module, layers=built.layers, job=job, dist=d,
                         materialize=lambda m, dev, view: materialize(m, cfg=job.model, seed=0, device=dev, shard_view=view))
    fill_lora_b(engine.module)
    nf4 = {n: p for n, p in engine.module.named_parameters() if is_nf4_param(n)}
    shares = [p.to_local().numel() / p.numel() for p in nf4.values()]
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 1000, (2, 24), generator=g)
    labels = torch.randint(0, 1000, (2, 24), generator=g)
    batch = Batch(input_ids=ids, labels=labels, num_tokens=ids.numel(), num_supervised=int((labels != IGNORE_INDEX).sum()))
    loss = engine.forward(batch)
    loss.backward()  # each rank fed the same batch: the rank-averaged gradient is the batch's
    loss = loss.detach().float()
    torch.distributed.all_reduce(loss)
    grads = {n: p.grad.full_tensor() for n, p in engine.module.named_parameters() if p.requires_grad}
    full = get_model_state_dict(engine.module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    result: dict = {"rank": d.rank, "nf4_params": len(nf4), "nf4_dtypes": sorted({str(p.dtype) for p in nf4.values()}),
                    "share_min": min(shares), "share_max": max(shares)}
    if d.rank == 0:
        reader = SafetensorsSlices(Path(model_dir))
        # Bit for bit (as ints: the packed bytes seen as bf16/fp32 include NaN patterns, and NaN != NaN).
        ints = torch.int32 if fp32 else torch.int16
        result["nf4_mismatched"] = [n for n in nf4 if not torch.equal(full[n].view(ints), quantize_nf4(
            reader.read(hf_key(nf4_weight_name(n)), ()), storage_dtype=dtype).view(ints))]
        # The same module in one process, unsharded (frozen weights in the compute dtype, as FSDP2 stores them).
        single = build().module
        materialize(single, cfg=job.model, seed=0, device=torch.device("cpu"))
        fill_lora_b(single)
        with torch.no_grad():
            for p in single.parameters():
                if not p.requires_grad and p.dtype != dtype:
                    p.data = p.data.to(dtype)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=not fp32):
            ref = single(batch).float()
        ref.backward()
        worst = 0.0
        for n, p in single.named_parameters():
            if p.requires_grad:
                worst = max(worst, ((grads[n] - p.grad).norm() / p.grad.norm().clamp(min=1e-30)).item())
        result["loss_sharded"] = loss.item() / d.world_size
        result["loss_single"] = ref.item()
        result["grad_rel_err_max"] = worst
        result["grads_compared"] = len(grads)
        result["grad_a_norm"] = sum(p.grad.norm().item() for n, p in single.named_parameters() if ".lora_A." in n)
    return result


if __name__ == "__main__":
    main()
