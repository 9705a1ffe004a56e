"""GPU check of packed attention: flex attention with a document BlockMask (what CUDA training uses)
against the dense block-diagonal mask and against each sample alone, fp32, on a small random model.

    python3 bench/packing_check.py      (prints one JSON line; on CPU only the dense path runs)
"""
from __future__ import annotations

import json
import math

import numpy as np
import torch

from ftcluster.compose import compose_job
from ftcluster.data.batches import collate
from ftcluster.data.packing import collate_packed, first_fit_decreasing
from ftcluster.model import build_module, materialize
from ftcluster.model.packed import document_block_mask, document_mask, packed_hidden


def main() -> None:
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    job = compose_job("peft=none", "data.max_seq_len=512", "model.hidden_size=128", "model.num_heads=4",
                      "model.num_kv_heads=2", "model.intermediate_size=256", "model.num_layers=2")
    rng = np.random.default_rng(0)
    lengths = [512, 1, 37, 200, 130, 90, 61, 300, 9, 150]
    samples = [(rng.integers(0, 1000, size=n).astype(np.int64), np.ones(n, dtype=bool)) for n in lengths]
    rows = [[samples[int(i)] for i in r] for r in first_fit_decreasing(np.array(lengths), capacity=512, window=64)]
    batch = collate_packed(rows, max_seq_len=512, pad_id=0).to(dev)
    out = {"device": str(dev), "rows": len(rows), "samples": len(samples), "torch": torch.__version__}
    packed = build_module(job, packed=True).module
    materialize(packed, cfg=job.model, seed=0, device=dev)
    plain = build_module(job).module
    materialize(plain, cfg=job.model, seed=0, device=dev)
    hf = packed.hf_model
    with torch.no_grad():
        total = float(packed(batch))  # CUDA: flex attention with a BlockMask; CPU: the dense mask
        alone = sum(float(plain(collate([s], indices=[i], pad_id=0, max_seq_len=512).to(dev)))
                    for i, s in enumerate(samples))
        out.update(packed_loss_sum=total, alone_loss_sum=alone, rel_diff=abs(total - alone) / abs(alone))
        if dev.type == "cuda":
            dec = hf.get_decoder()
            dense = dec(input_ids=batch.input_ids, position_ids=batch.position_ids,
                        attention_mask=document_mask(batch.segment_ids), use_cache=False).last_hidden_state
            flex = packed_hidden(dec, batch, attn_implementation=hf.config._attn_implementation)
            out["flex_vs_dense_max_abs"] = float((flex - dense).abs().max())
            bm = document_block_mask(batch.segment_ids)
            out["block_mask_sparsity"] = round(float(bm.sparsity()), 2)
    out["ok"] = out["rel_diff"] < 1e-4 and out.get("flex_vs_dense_max_abs", 0.0) < 1e-3 and math.isfinite(total)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
