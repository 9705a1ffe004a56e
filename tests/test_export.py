"""`ftcluster export`: checkpoints of full, LoRA and QLoRA runs (fp32; FSDP2, and DeepSpeed ZeRO-3)
written as Hugging Face models and PEFT adapters, reloaded by transformers / peft, give the trained
model's logits."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import LIGHT_EVAL, REPO, cli_env, explain, run_cli

pytestmark = pytest.mark.slow  # end to end: the real CLI / multi-rank process groups

TINY = REPO / "ftcluster/assets/tiny-llama"
# Exported vs in-process fp32 logits (magnitude ~2): a merged W + s*B@A rounds differently from the
# separate matmuls, by up to 1.0e-5 seen on an AMX CPU (CI); a wrong export moves them by 1e-3 or
# more (each test first asserts training moved the logits by > 1e-3).
ATOL = 5e-5
FP32 = ["train.dtype=fp32", "train.max_steps=2", "checkpoint.every_steps=2", "optim.lr=1e-2", "optim.warmup_steps=0",
        *LIGHT_EVAL]
RANDOM_TINY = ["model.path=null", "model.init=random", "model.vocab_size=512", "model.hidden_size=64",
               "model.intermediate_size=128", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2",
               "data=synthetic", "data.max_seq_len=32"]
IDS = torch.randint(0, 500, (2, 19), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Four short fp32 runs through the real CLI, started together (they are independent)."""
    tmp = tmp_path_factory.mktemp("runs")
    jobs = {
        "full": ["peft=none", "launcher.nproc_per_node=1"],
        "lora": ["peft=lora", "launcher.nproc_per_node=2"],
        "qlora": ["peft=qlora", "launcher.nproc_per_node=1"],
        # LongLoRA (adapters + fully trained embeddings and norms) on random base weights, with a
        # checkpoint that keeps the frozen base (adapter_only=false).
        "random": ["peft=longlora", "launcher.nproc_per_node=1", "checkpoint.adapter_only=false", *RANDOM_TINY],
        "zero3": ["peft=lora", "parallel=zero3", "launcher.nproc_per_node=2"],  # DeepSpeed's own format
    }
    procs = {name: subprocess.Popen([sys.executable, "-m", "ftcluster", "train", *FP32, *args, f"run.dir={tmp / name}"],
                                    cwd=tmp, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for name, args in jobs.items()}
    for name, proc in procs.items():
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"{name}: exit {proc.returncode}\n{out[-4000:]}"
    return {name: tmp / name / "checkpoints/step_2" for name in jobs}


def trained_logits(ckpt: Path, *, trained: bool = True) -> torch.Tensor:
    """The trained model on one process: the training module rebuilt as the run built it (NF4
    layers for QLoRA), base weights materialised from the run's source, every tensor the
    checkpoint holds loaded on top; logits = output head over the decoder's last hidden state.
    trained=False: the same model as the run started (nothing loaded), to show training moved it."""
    from ftcluster.export import build_skeleton, load_source
    from ftcluster.parallel.fsdp import CheckpointReader as DCPState
    from ftcluster.model import materialize

    src = load_source(ckpt)
    module, hf = build_skeleton(src.job)
    materialize(module, cfg=src.job.model, seed=src.job.seed, device=torch.device("cpu"))
    if not trained:
        pass
    elif src.job.parallel.backend == "fsdp2":
        state = DCPState(ckpt / "engine")
    else:  # DeepSpeed's fp32 master weights, as DeepSpeed's zero_to_fp32 assembles them
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        sd = get_fp32_state_dict_from_zero_checkpoint(str(ckpt / "engine"), tag="ds", exclude_frozen_parameters=True)
        res = module.load_state_dict(sd, strict=False)
        assert not res.unexpected_keys and sd
        state = None
    if trained and state is not None:
        res = module.load_state_dict(state.read(list(state.names())), strict=False)
        assert not res.unexpected_keys
    module.eval()
    with torch.no_grad():
        return hf.get_output_embeddings()(hf.get_decoder()(input_ids=IDS).last_hidden_state)


def moved(ckpt: Path, want: torch.Tensor) -> float:
    """How far training moved the logits from the run's starting model: an export's error must be
    far below it, or an export that dropped the trained tensors would pass too."""
    return float((want - trained_logits(ckpt, trained=False)).abs().max())


def hf_logits(model) -> torch.Tensor:  # type: ignore[no-untyped-def]
    with torch.no_grad():
        return model.eval()(IDS).logits


def test_full_finetune_exports_whole_model(runs: dict[str, Path], tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from ftcluster.export import export

    out = tmp_path / "full"
    s = export(runs["full"], out, dtype="fp32")  # no --merge needed: nothing to merge
    assert s["kind"] == "full"
    want = trained_logits(runs["full"])
    got = hf_logits(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32))
    assert (got - want).abs().max() < ATOL
    base = hf_logits(AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.float32))
    assert (got - base).abs().max() > 1e-3  # training moved it


def test_lora_adapter_and_merged_exports(runs: dict[str, Path], tmp_path: Path) -> None:
    from peft import PeftModel
    from torch.distributed.checkpoint import FileSystemReader
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Adapter-only checkpoint: adapters and their optimizer state, no base tensor.
    engine = runs["lora"] / "engine"
    md = FileSystemReader(str(engine)).read_metadata().state_dict_metadata
    keys = [k for k in md if k.startswith("model.")]
    assert keys and all(".lora_" in k for k in keys)
    base_bytes = (TINY / "model.safetensors").stat().st_size
    assert sum(md[k].size.numel() * 4 for k in keys) < 0.2 * base_bytes  # rank 16 on a 128-wide model
    assert sum(f.stat().st_size for f in engine.iterdir()) < base_bytes  # adapters + Adam moments

    want = trained_logits(runs["lora"])
    assert moved(runs["lora"], want) > 1e-3
    adapter = tmp_path / "adapter"
    p = run_cli("export", str(runs["lora"].parent.parent), str(adapter), "--dtype", "fp32", cwd=tmp_path)  # the run dir
    assert p.returncode == 0, explain(p)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(TINY.resolve()) and cfg["r"] == 16
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.float32), adapter)
    assert (hf_logits(peft_model) - want).abs().max() < ATOL

    merged = tmp_path / "merged"
    from ftcluster.export import export

    s = export(runs["lora"], merged, merge=True, dtype="fp32", max_shard_size="1MB")
    index = json.loads((merged / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert s["shards"] == len(shards) >= 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert not any("lora" in k or "base_layer" in k for k in index["weight_map"])
    umask = os.umask(0o022)
    os.umask(umask)
    modes = {f.name: f.stat().st_mode & 0o777 for f in merged.iterdir()}
    assert set(modes.values()) == {0o666 & ~umask}, modes  # the weight shards as readable as the json beside them
    assert (hf_logits(AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)) - want).abs().max() < ATOL
    assert AutoTokenizer.from_pretrained(merged)("hello").input_ids  # the tokenizer travels with it
    # The same stream without files: (HF name, merged tensor), one at a time.
    from safetensors.torch import load_file

    from ftcluster.export import iter_hf_tensors

    streamed = dict(iter_hf_tensors(runs["lora"]))
    assert sorted(streamed) == sorted(index["weight_map"])
    first = load_file(str(merged / shards[0]))
    assert all(torch.equal(streamed[k], v) for k, v in first.items())

    bf16 = tmp_path / "bf16"
    export(runs["lora"], bf16, merge=True)  # default dtype bf16
    m = AutoModelForCausalLM.from_pretrained(bf16)
    assert m.dtype == torch.bfloat16
    # bf16 rounding of the merged weights, far below what training changed (CPU: 0.004 vs 0.52).
    assert (hf_logits(m.float()) - want).abs().max() < 0.05 * moved(runs["lora"], want)


def test_qlora_merges_into_dequantised_base(runs: dict[str, Path], tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from ftcluster.export import export

    want = trained_logits(runs["qlora"])
    assert moved(runs["qlora"], want) > 1e-3  # from the de-quantised base the run started from
    out = tmp_path / "merged"
    s = export(runs["qlora"], out, merge=True, dtype="fp32")
    assert any("de-quantised NF4 base" in n for n in s["notes"])
    assert (hf_logits(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)) - want).abs().max() < ATOL
    # Merging into the original (not quantised) weights would not give the trained model.
    plain = hf_logits(AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.float32))
    assert (plain - want).abs().max() > 1e-3


def test_qlora_adapter_loads_on_a_bitsandbytes_nf4_base(runs: dict[str, Path], tmp_path: Path) -> None:
    import bitsandbytes.functional as BF
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from ftcluster.export import export
    from ftcluster.quant import NF4Layout, dequantize_nf4, quantize_nf4

    out = tmp_path / "adapter"
    export(runs["qlora"], out, dtype="fp32")
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.float32, quantization_config=q, device_map="cpu")
    # transformers + bitsandbytes quantise the base to exactly the weights training used.
    plain = AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.float32)
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.3.mlp.down_proj"):
        w4 = base.get_submodule(name).weight
        w = plain.get_submodule(name).weight
        ours = dequantize_nf4(quantize_nf4(w, storage_dtype=torch.float32),
                              NF4Layout(out_features=w.shape[0], in_features=w.shape[1]), dtype=torch.float32)
        assert torch.equal(BF.dequantize_4bit(w4.data, w4.quant_state), ours)
    got = hf_logits(PeftModel.from_pretrained(base, out))
    # bitsandbytes' CPU 4-bit matmul kernel rounds differently from de-quantise + fp32 matmul.
    want = trained_logits(runs["qlora"])
    # ... far below what training changed (CPU: 0.006 vs 0.56), so the adapters did load.
    assert (got - want).abs().max() < 0.05 * moved(runs["qlora"], want)


def test_random_init_adapter_export_writes_its_base(runs: dict[str, Path], tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from ftcluster.export import export

    engine_keys = json.loads((runs["random"] / "meta.json").read_text())
    assert engine_keys["model"]["adapter_only"] is False
    want = trained_logits(runs["random"])
    assert moved(runs["random"], want) > 1e-3
    out = tmp_path / "adapter"
    s = export(runs["random"], out, dtype="fp32")
    base_dir = out / "base"
    assert s["base_model_name_or_path"] == str(base_dir.resolve())
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base_dir.resolve())
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    assert (hf_logits(PeftModel.from_pretrained(base, out)) - want).abs().max() < ATOL
    merged = tmp_path / "merged"
    export(runs["random"], merged, merge=True, dtype="fp32")
    assert (hf_logits(AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)) - want).abs().max() < ATOL


def test_deepspeed_zero3_checkpoint_exports(runs: dict[str, Path], tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from ftcluster.export import export

    assert (runs["zero3"] / "engine/ds").is_dir()
    want = trained_logits(runs["zero3"])
    assert moved(runs["zero3"], want) > 1e-3
    export(runs["zero3"], tmp_path / "adapter", dtype="fp32")
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.float32),
                                           tmp_path / "adapter")
    assert (hf_logits(peft_model) - want).abs().max() < ATOL
    export(runs["zero3"], tmp_path / "merged", merge=True, dtype="fp32")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    assert (hf_logits(merged) - want).abs().max() < ATOL


def test_longlora_trained_modules_travel_as_modules_to_save(runs: dict[str, Path], tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from ftcluster.export import export

    want = trained_logits(runs["random"])  # eval mode: full attention, as the export serves it
    export(runs["random"], tmp_path / "adapter", dtype="fp32")
    cfg = json.loads((tmp_path / "adapter/adapter_config.json").read_text())
    assert cfg["modules_to_save"] == ["embed_tokens", "input_layernorm", "post_attention_layernorm", "norm"]
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "adapter/base", dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, tmp_path / "adapter")
    assert (hf_logits(peft_model) - want).abs().max() < ATOL
    export(runs["random"], tmp_path / "merged", merge=True, dtype="fp32")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    assert merged.config._attn_implementation != "s2_attn" and not hasattr(merged.config, "s2_group_size")
    assert (hf_logits(merged) - want).abs().max() < ATOL


def test_export_refuses_bad_input(runs: dict[str, Path], tmp_path: Path) -> None:
    from ftcluster.export import ExportError, export

    with pytest.raises(ExportError, match="not a committed checkpoint"):
        export(tmp_path, tmp_path / "o")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    with pytest.raises(ExportError, match="not empty"):
        export(runs["lora"], tmp_path / "busy")
    with pytest.raises(ExportError, match="--max-shard-size"):
        export(runs["lora"], tmp_path / "o2", max_shard_size="lots")
