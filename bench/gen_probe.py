"""Where generation time goes on one GPU (issue 12): 8 prompts x 64 new tokens from the 8B LoRA
model, timed three times in a row through the FSDP2 engine, then with the same weights outside any
engine (plain transformers generate). Run on the device machine: python3 bench/gen_probe.py"""
from __future__ import annotations

import sys
import time

import torch

sys.path.insert(0, "tests")
from conftest import compose_job  # noqa: E402

from ftcluster.distributed import init_distributed  # noqa: E402
from ftcluster.evaluation.generate import generate_samples  # noqa: E402
from ftcluster.evaluation.prompts import Prompt  # noqa: E402
from ftcluster.model import build_module, materialize  # noqa: E402
from ftcluster.parallel import parallelize  # noqa: E402
from ftcluster.train import _load_tokenizer  # noqa: E402

TOK = "ftcluster/assets/tiny-llama"
PROMPTS = [Prompt(text=t) for t in ["What is 2+2?", "Name the capital of France.", "Reverse the word apple.",
                                     "How many letters are in banana?", "Say hello politely.", "Convert 3 km to meters.",
                                     "Count to five.", "Tell me a short fact about the moon."]]


def timed(fn) -> float:  # type: ignore[no-untyped-def]
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


d = init_distributed()
job = compose_job("model=llama3_8b", f"model.tokenizer={TOK}", "peft=lora", "launcher.nproc_per_node=1",
                  *sys.argv[1:])
tok = _load_tokenizer(job)
built = build_module(job)
engine = parallelize(built.module, layers=built.layers, job=job, dist=d,
                     materialize=lambda m, dev, view: materialize(m, cfg=job.model, seed=0, device=dev, shard_view=view))
run = lambda: generate_samples(engine, tokenizer=tok, prompts=PROMPTS, data_cfg=job.data, max_new_tokens=64,  # noqa: E731
                               device=d.device)
print("engine generate, 3 calls (s):", [round(timed(run), 2) for _ in range(3)], flush=True)
del engine, built
torch.cuda.empty_cache()
plain = build_module(job)
materialize(plain.module, cfg=job.model, seed=0, device=d.device)
plain.module.to(torch.bfloat16).eval()
ids = torch.randint(10, 1000, (8, 24), device=d.device)
with torch.no_grad():
    gen = lambda: plain.hf_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=64,  # noqa: E731
                                          min_new_tokens=64, do_sample=False, use_cache=True, pad_token_id=0)
    print("plain transformers generate (no engine), 3 calls (s):", [round(timed(gen), 2) for _ in range(3)], flush=True)
print("peak GiB", round(torch.cuda.max_memory_allocated() / 2**30, 1))
