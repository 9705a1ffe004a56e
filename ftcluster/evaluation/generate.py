"""Generation samples: greedy decoding from the model as it is now, through the engine (every rank
runs the same prompts in lockstep), decoded and written to `<run.dir>/samples.jsonl`."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ftcluster.config import DataConfig
from ftcluster.evaluation.prompts import Prompt, display, render_prompt


def generate_samples(engine: Any, *, tokenizer: Any, prompts: list[Prompt], data_cfg: DataConfig,
                     max_new_tokens: int, device: torch.device) -> list[dict]:
    """Collective. Left-pads the rendered prompts into one batch (a decoder-only model continues at
    the right edge), decodes only the new tokens up to the first end of sequence. The same list on
    every rank."""
    ids = [render_prompt(p, tokenizer=tokenizer, data_cfg=data_cfg) for p in prompts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), int(pad), dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, width - len(x):] = torch.tensor(x, dtype=torch.long)
        mask[i, width - len(x):] = 1
    eos = tokenizer.eos_token_id
    out = engine.generate(input_ids.to(device), mask.to(device), max_new_tokens=max_new_tokens, eos_token_id=eos,
                          pad_token_id=int(pad)).cpu()
    samples = []
    for p, row in zip(prompts, out[:, width:].tolist()):
        if eos is not None and eos in row:
            row = row[:row.index(eos)]
        samples.append({"prompt": display(p), "completion": tokenizer.decode(row, skip_special_tokens=True).strip(),
                        "reference": p.reference})
    return samples


def write_samples(run_dir: Path, *, step: int, samples: list[dict]) -> None:
    """Append the samples with their step to <run_dir>/samples.jsonl (rank 0 only)."""
    with open(Path(run_dir) / "samples.jsonl", "a") as f:
        for s in samples:
            f.write(json.dumps({"step": step, **s}) + "\n")
