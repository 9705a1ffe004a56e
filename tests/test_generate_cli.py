"""`ftcluster generate`: a run dir's checkpoint, an exported model and an exported PEFT adapter answer
prompts through the real CLI, with the same answers as plain transformers greedy decoding of the
exported weights; bad paths exit 2 naming the path."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, cli_env, explain, run_cli
from ftcluster.generate_cli import generate_command

TINY = REPO / "ftcluster/assets/tiny-llama"
PROMPTS = ["What is the capital of France?", 'How many letters are in the word "river"?']
SHORT = ["train.dtype=fp32", "train.max_steps=4", "checkpoint.every_steps=4", "optim.lr=1e-2", "optim.warmup_steps=0",
         "eval.every_steps=0", "data.eval_path=null", "train.micro_batch_size=4", "data.max_seq_len=128"]


def generate(path: Path, *extra: str, cwd: Path) -> tuple[subprocess.CompletedProcess, list[str]]:
    args = [a for p in PROMPTS for a in ("--prompt", p)]
    p = run_cli("generate", str(path), *args, "--max-new-tokens", "24", *extra, cwd=cwd, timeout=300)
    # Output: a header line, then "> prompt" and the answer for each prompt.
    blocks = p.stdout.split("\n> ")[1:]
    assert [b.partition("\n")[0] for b in blocks] == (PROMPTS if p.returncode == 0 else []), explain(p)
    return p, [b.partition("\n")[2].rstrip("\n") for b in blocks]


def reference(model_dir: Path, prompt: str) -> str:
    """transformers' own greedy decoding of one prompt (no batch, no padding) rendered with the
    model's chat template: what the CLI must print."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, dtype=torch.float32).eval()
    enc = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=24, do_sample=False, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id)
    row = out[0, enc["input_ids"].shape[1]:].tolist()
    row = row[:row.index(tok.eos_token_id)] if tok.eos_token_id in row else row
    return tok.decode(row, skip_special_tokens=True).strip()


@pytest.mark.slow
def test_generate_from_run_dirs_exports_and_adapters(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # The default run (a full fine-tune) and a LoRA run, short, started together.
    procs = {name: subprocess.Popen([sys.executable, "-m", "ftcluster", "train", *SHORT, *args,
                                     f"run.dir={tmp_path / name}"], cwd=tmp_path, env=cli_env(),
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for name, args in {"full": [], "lora": ["peft=lora"]}.items()}
    for name, proc in procs.items():
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"{name}: exit {proc.returncode}\n{out[-4000:]}"
    from ftcluster.export import export

    for name in procs:  # in-process (the export command has its own tests): one process start less each
        export(tmp_path / name, tmp_path / f"{name}-export", dtype="fp32")
    assert (tmp_path / "lora-export/adapter_config.json").is_file()  # the LoRA run exports an adapter

    p, from_run = generate(tmp_path / "full", cwd=tmp_path)
    assert p.returncode == 0 and "checkpoint" in p.stdout and "step 4" in p.stdout, explain(p)
    assert all(from_run), from_run
    # The exported model answers the same, and so does plain transformers on it, prompt by prompt
    # (the CLI batches them left-padded).
    _, from_export = generate(tmp_path / "full-export", cwd=tmp_path)
    want = [reference(tmp_path / "full-export", q) for q in PROMPTS]
    assert from_run == from_export == want
    # The run's weights, not the base's: the shipped model answers otherwise.
    assert want != [reference(TINY, q) for q in PROMPTS]

    # LoRA: the run dir (adapters merged in memory) and the exported adapter (peft on its base) agree.
    _, lora_run = generate(tmp_path / "lora", cwd=tmp_path)
    p, lora_adapter = generate(tmp_path / "lora-export", cwd=tmp_path)
    assert "PEFT adapter" in p.stdout and lora_run == lora_adapter and all(lora_run), (lora_run, lora_adapter)

    # Bad paths: exit 2, the path named, no traceback (through the CLI once, then in-process).
    p, _ = generate(tmp_path / "nowhere", cwd=tmp_path)
    assert p.returncode == 2 and str(tmp_path / "nowhere") in p.stderr and "Traceback" not in p.stderr, explain(p)
    for bad, extra in ((tmp_path, []), (tmp_path / "full", ["--best"])):  # no checkpoints/; no best.json
        assert generate_command([str(bad), "--prompt", "x", *extra]) == 2
        assert str(bad) in capsys.readouterr().err
