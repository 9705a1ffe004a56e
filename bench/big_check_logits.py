"""Compare the logits of a merged export (reloaded by transformers) with the trained model's.

The trained model is rebuilt in fp32 as training built it (base from the run's model.path, adapters
from the checkpoint) on one GPU; the merged export is loaded with `AutoModelForCausalLM
.from_pretrained`. Both run the same short random input in fp32 (TF32 off). Also reports how far
the adapters moved the logits (adapters disabled), so "equal" is not trivially true.

usage: python bench/big_check_logits.py RUN_DIR_OR_CHECKPOINT MERGED_DIR OUT_JSON
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch


def main() -> None:
    ckpt, merged_dir, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    from transformers import AutoModelForCausalLM

    from ftcluster.export import build_skeleton, load_source
    from ftcluster.parallel.fsdp import CheckpointReader as DCPState
    from ftcluster.model import materialize

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ids = torch.randint(0, 1000, (2, 48), generator=torch.Generator().manual_seed(0)).to(dev)
    t0 = time.time()
    src = load_source(ckpt)
    module, hf = build_skeleton(src.job)
    materialize(module, cfg=src.job.model, seed=src.job.seed, device=dev)
    state = DCPState(src.checkpoint / "engine")
    trained = [n for n, p in module.named_parameters() if p.requires_grad]
    res = module.load_state_dict({k: v.to(dev) for k, v in state.read(trained).items()}, strict=False)
    assert not res.unexpected_keys, res.unexpected_keys
    module.eval()
    with torch.no_grad():
        ref = hf.get_output_embeddings()(hf.get_decoder()(input_ids=ids).last_hidden_state).float()
        with module.model.disable_adapter():
            base = hf.get_output_embeddings()(hf.get_decoder()(input_ids=ids).last_hidden_state).float()
    t_ref = time.time() - t0
    del module, hf
    torch.cuda.empty_cache() if dev.type == "cuda" else None
    t0 = time.time()
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32, device_map=str(dev)).eval()
    with torch.no_grad():
        got = merged(ids).logits.float()
    t_merged = time.time() - t0
    diff = (got - ref).abs().max().item()
    result = {"checkpoint": str(src.checkpoint), "merged": str(merged_dir), "max_abs_diff": diff,
              "max_abs_logit": ref.abs().max().item(), "rel_diff": diff / max(ref.abs().max().item(), 1e-12),
              "argmax_agree": float((got.argmax(-1) == ref.argmax(-1)).float().mean().item()),
              "adapter_effect_max_abs": (ref - base).abs().max().item(),
              "seconds_trained_model": round(t_ref, 1), "seconds_merged_load": round(t_merged, 1)}
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result))
    ok = result["rel_diff"] < 1e-4 and result["adapter_effect_max_abs"] > 10 * diff
    print("logits match" if ok else "LOGITS DIFFER")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
