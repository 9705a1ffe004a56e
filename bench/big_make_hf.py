"""Write a Llama-3.1-8B-shaped model with random bf16 weights to DIR in Hugging Face format, shard by
shard (~5 GB safetensors files + model.safetensors.index.json + config.json), generating each tensor
on the GPU when there is one: never more than one shard in host memory. Copies the embedded tiny
tokenizer in, so an export of a run on it carries a tokenizer too.

usage: python bench/big_make_hf.py DIR [--layers N] [--shard-bytes B] [--tiny]
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("dir", type=Path)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--shard-bytes", type=float, default=5e9)
    ap.add_argument("--tiny", action="store_true", help="a tiny model of the same architecture (CPU smoke test)")
    a = ap.parse_args()
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=a.layers,
                      num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                      rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001,
                      rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 8192})
    if a.tiny:
        cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers = 2048, 128, 256, 2
        cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim = 4, 2, 32
        cfg.bos_token_id, cfg.eos_token_id = 0, 4
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LlamaForCausalLM(cfg).state_dict().items()}
    tmp = a.dir.with_name(a.dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    g = torch.Generator(device=dev).manual_seed(1234)
    groups: list[list[str]] = [[]]
    size = 0
    for k, s in shapes.items():
        n = s.numel() * 2
        if groups[-1] and size + n > a.shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(k)
        size += n
    weight_map, total, t0 = {}, 0, time.time()
    for i, keys in enumerate(groups, start=1):
        fname = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for k in keys:
            if k.endswith("norm.weight"):
                t = torch.ones(shapes[k], device=dev, dtype=torch.bfloat16)
            else:
                t = torch.empty(shapes[k], device=dev, dtype=torch.float32).normal_(0.0, 0.02, generator=g)
                t = t.to(torch.bfloat16)
            tensors[k] = t.cpu()
            weight_map[k] = fname
            total += t.numel() * 2
        save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
        del tensors
        print(f"{fname}: {len(keys)} tensors, {time.time() - t0:.0f} s", flush=True)
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}, indent=1))
    cfg.architectures = ["LlamaForCausalLM"]
    cfg.dtype = torch.bfloat16
    cfg.save_pretrained(tmp)
    tiny = Path(__file__).resolve().parent.parent / "ftcluster/assets/tiny-llama"
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(tiny / f, tmp / f)
    shutil.rmtree(a.dir, ignore_errors=True)
    tmp.rename(a.dir)
    print(f"wrote {total / 1e9:.1f} GB in {len(groups)} shards to {a.dir} in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
