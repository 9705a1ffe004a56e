"""The planner's predictions against every peak recorded in bench/RESULTS.md (H200, measured by
earlier issues' commands): prints a markdown table. CPU only, a minute: python bench/plan_vs_recorded.py"""
from __future__ import annotations

import os

# Every row here was measured before expandable segments became the ranks' default (2026-12-03):
# plan them with the caching allocator those runs had.
os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:False"

from ftcluster.compose import compose_job
from ftcluster.plan import GIB, plan_memory

S = ("data=synthetic",)
# (source, overrides, world size, micro-batch, mode, liger, measured allocated GiB, measured reserved GiB or None)
RECORDED = [
    ("issue 2: 8B LoRA, FSDP2", ("model=llama3_8b", "peft=lora", "data.max_seq_len=4096"), 1, 1, "full", False, 24.41, 26.71),
    ("issue 18: 8B LoRA, Liger, mb 4", ("model=llama3_8b", "peft=lora", "data.max_seq_len=4096"), 1, 4, "none", True, 86.9, None),
    ("issue 18: 8B LoRA, Liger, mb 2", ("model=llama3_8b", "peft=lora", "data.max_seq_len=4096"), 1, 2, "none", True, 52.4, None),
    ("issue 3: 8B LoRA, FSDP2, 2 GPUs", ("model=llama3_8b", "peft=lora", "data.max_seq_len=4096"), 2, 1, "full", False, 17.11, 21.33),
    ("issue 3: 8B LoRA, ZeRO-3, 2 GPUs", ("model=llama3_8b", "peft=lora", "data.max_seq_len=4096", "parallel=zero3"), 2, 1, "full", False, 20.76, 22.98),
    ("issue 3: 1B full, FSDP2, 2 GPUs", ("model=llama32_1b", "peft=none", "data.max_seq_len=4096"), 2, 1, "full", False, 13.76, 17.61),
    ("issue 3: 1B full, ZeRO-3, 2 GPUs", ("model=llama32_1b", "peft=none", "data.max_seq_len=4096", "parallel=zero3"), 2, 1, "full", False, 20.77, 27.98),
    ("issue 7: 70B QLoRA, 1 GPU", ("model=llama3_70b", "peft=qlora", "data.max_seq_len=4096"), 1, 1, "full", False, 54.2, 56.9),
    ("issue 7: 70B LoRA, FSDP2, 2 GPUs", ("model=llama3_70b", "peft=lora", "data.max_seq_len=4096"), 2, 1, "full", False, 83.5, 89.4),
    ("issue 7: 8B LoRA, 2 GPUs, seq 2048", ("model=llama3_8b", "peft=lora", "data.max_seq_len=2048"), 2, 1, "full", False, 13.6, 16.6),
]
for n, full, s2 in ((16384, 24.9, 29.9), (32768, 31.9, 37.0), (65536, 45.9, 51.3), (262144, 129.8, 132.7)):
    ext = (f"model.max_position_embeddings={n}",) if n > 131072 else ()
    RECORDED.append((f"issue 6: 8B LoRA sdpa, Liger, {n // 1024}k", ("model=llama3_8b", "peft=lora", f"data.max_seq_len={n}", *ext), 1, 1, "full", True, full, None))
    RECORDED.append((f"issue 6: 8B LongLoRA S2, Liger, {n // 1024}k", ("model=llama3_8b", "peft=longlora", f"data.max_seq_len={n}", *ext), 1, 1, "full", True, s2, None))


def main() -> None:
    print("| run (bench/RESULTS.md) | measured alloc GiB | plan alloc GiB | err % | measured reserved GiB | plan reserved GiB | err % |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, ov, ws, mb, mode, liger, alloc, res in RECORDED:
        try:
            # Every FSDP2 row was measured while FSDP2 still sharded the frozen base at one rank.
            fsdp2 = not any(o.startswith("parallel=zero") for o in ov)
            job = compose_job(*S, *ov, *(("parallel.shard_frozen=true",) if fsdp2 else ()))
        except Exception as e:  # noqa: BLE001 - a row the schema refuses is reported, not fatal
            print(f"| {name} | {alloc} | - | - | {res or '-'} | - | {e} |")
            continue
        p = plan_memory(job, world_size=ws, micro_batch_size=mb, activation_checkpointing=mode,
                        activation_checkpointing_every=1, liger=liger)
        pa, pr = p.detail["allocated"] / GIB, p.total / GIB
        er = f"{100 * (pr - res) / res:+.1f}" if res else "-"
        print(f"| {name} | {alloc:.2f} | {pa:.2f} | {100 * (pa - alloc) / alloc:+.1f} | {res if res else '-'} | {pr:.2f} | {er} |")


if __name__ == "__main__":
    main()
