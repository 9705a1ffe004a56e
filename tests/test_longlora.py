"""LongLoRA end to end on CPU: config, the trainable set (LoRA + embeddings + norms, fp32 under
FSDP2), S2-Attn in training only, RoPE scaling / context extension, export config, and a real
`ftcluster train peft=longlora` run through the CLI."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import cli_env, committed_steps, compose_job, events, explain, lm_batch, losses, one_gloo_rank_engine, run_cli
from ftcluster.compose import check_model_paths, register_configs
from ftcluster.config import ConfigError, JobConfig, ModelConfig
from ftcluster.longlora import S2_ATTN, hf_config_for_export
from ftcluster.model import TrainModule, build_hf_config, build_module, materialize

register_configs()
torch.set_num_threads(1)


job = compose_job


def build(j: JobConfig, *, device: torch.device | None = None) -> TrainModule:
    """The trained module exactly as train.py builds it (`build_module`), materialised on `device`
    when given (no process group needed on one CPU process)."""
    module = build_module(j).module
    if device is not None:
        materialize(module, cfg=j.model, seed=j.seed, device=device)
    return module


def trainable(module: torch.nn.Module) -> set[str]:
    return {n for n, p in module.named_parameters() if p.requires_grad}


# --- config ---------------------------------------------------------------------------------------

def test_peft_longlora_composes_lora_plus_s2() -> None:
    j = job("peft=longlora")
    assert j.peft.method == "longlora" and j.model.attn_implementation == S2_ATTN
    assert j.peft.trainable_modules == ["embed_tokens", "input_layernorm", "post_attention_layernorm", "norm"]
    assert j.model.s2_group_size_ratio == 0.25 and j.model.s2_group_size is None
    # a command-line override wins over the group (full-attention ablation)
    assert job("peft=longlora", "model.attn_implementation=sdpa").model.attn_implementation == "sdpa"
    assert job("peft=lora").model.attn_implementation == "sdpa"


@pytest.mark.parametrize("overrides, key", [
    (["peft=longlora", "model.s2_group_size=1"], "model.s2_group_size"),
    (["peft=longlora", "model.s2_group_size_ratio=0"], "model.s2_group_size_ratio"),
    (["peft=longlora", "model.s2_group_size_ratio=1.5"], "model.s2_group_size_ratio"),
    (["peft=none", "peft.trainable_modules=[embed_tokens]"], "peft.trainable_modules"),
    (["model.rope_scaling_type=ntk", "model.rope_scaling_factor=2"], "model.rope_scaling_type"),
    (["model.rope_scaling_type=linear"], "model.rope_scaling_factor"),
    (["model.rope_scaling_factor=2"], "model.rope_scaling_type"),
    (["model.rope_scaling_type=linear", "model.rope_scaling_factor=0.5"], "model.rope_scaling_factor"),
    (["model.rope_scaling_type=yarn", "model.rope_scaling_factor=2", "model.extend_context_to=8192"],
     "model.extend_context_to"),
    (["model.extend_context_to=2048"], "model.extend_context_to"),  # tiny model's own context is 2048
    (["model.rope_scaling_type=yarn", "model.rope_scaling_factor=2", "model.rope_beta_fast=0.5"], "model.rope_beta_fast"),
])
def test_bad_values_name_their_key(overrides: list[str], key: str) -> None:
    with pytest.raises(ConfigError) as e:
        job(*overrides)
    assert str(e.value).startswith(f"{key}:"), str(e.value)


# --- the trainable set ----------------------------------------------------------------------------

def test_trainable_set_is_exactly_lora_plus_embeddings_and_norms() -> None:
    module = build(job("peft=longlora"))
    names = trainable(module)
    lora = {n for n in names if ".lora_A." in n or ".lora_B." in n}
    rest = names - lora
    layers = module.hf_model.config.num_hidden_layers
    prefix = "model.base_model.model.model."
    expected = ({prefix + "embed_tokens.weight", prefix + "norm.weight"}
                | {f"{prefix}layers.{i}.{k}.weight" for i in range(layers) for k in ("input_layernorm", "post_attention_layernorm")})
    assert rest == expected
    # every linear projection of every decoder layer has both adapters; nothing else is trainable
    assert len(lora) == layers * 7 * 2
    all_names = {n for n, _ in module.named_parameters()}
    assert all_names - names == {n for n in all_names if n.endswith(".base_layer.weight")} | {"model.base_model.model.lm_head.weight"}
    # plain LoRA keeps embeddings and norms frozen; the list is config
    assert trainable(build(job("peft=lora"))) == lora
    only_embed = trainable(build(job("peft=longlora", "peft.trainable_modules=[embed_tokens]")))
    assert only_embed - lora == {prefix + "embed_tokens.weight"}


def test_trainable_module_typo_fails_clearly() -> None:
    with pytest.raises(ValueError, match=r"peft.trainable_modules: 'embed' matches no module"):
        build(job("peft=longlora", "peft.trainable_modules=[embed]"))


def test_fsdp2_keeps_trainable_non_lora_params_fp32_and_trains_them() -> None:
    """FSDP2 on one gloo process: frozen base weights are stored in bf16, adapters, embeddings
    and norms as fp32 master weights; one step updates embeddings and norms."""
    from torch.distributed.tensor import DTensor

    j = job("peft=longlora", "train.dtype=bf16")
    built = build_module(j)
    module = built.module
    with one_gloo_rank_engine(j, built) as engine:
        params = dict(module.named_parameters())
        # FSDP2 shards what trains; at world size 1 parallel.shard_frozen=auto leaves the frozen
        # base outside FSDP (plain tensors, used in place).
        assert all(isinstance(p, DTensor) == p.requires_grad for p in params.values()), \
            {n: type(p).__name__ for n, p in params.items()}
        for n, p in params.items():
            assert p.dtype == (torch.float32 if p.requires_grad else torch.bfloat16), (n, p.dtype)
        in_optimizer = {id(p) for g in engine.optimizer.param_groups for p in g["params"]}
        assert in_optimizer == {id(p) for p in params.values() if p.requires_grad}
        emb = next(p for n, p in params.items() if n.endswith("embed_tokens.weight"))
        norm = next(p for n, p in params.items() if n.endswith("model.norm.weight"))
        before = emb.full_tensor().clone(), norm.full_tensor().clone()
        module.train()
        ids = torch.randint(6, 1000, (2, 48), generator=torch.Generator().manual_seed(0))
        loss = engine.forward(lm_batch(ids))
        engine.backward(loss / ids.numel(), last_micro=True)
        assert torch.isfinite(engine.clip_grad_norm(1.0))
        engine.step(lr=1e-2, skip=torch.tensor(False))
        assert not torch.equal(emb.full_tensor(), before[0]) and not torch.equal(norm.full_tensor(), before[1])


# --- S2-Attn in training, full attention in evaluation --------------------------------------------

def test_eval_uses_full_attention_train_uses_s2() -> None:
    cpu = torch.device("cpu")
    s2 = build(job("peft=longlora"), device=cpu)
    full = build(job("peft=longlora", "model.attn_implementation=sdpa"), device=cpu)  # same weights
    assert s2.hf_model.config._attn_implementation == S2_ATTN and s2.hf_model.config.s2_group_size_ratio == 0.25
    ids = torch.randint(6, 1000, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        s2.eval(), full.eval()
        torch.testing.assert_close(s2.hf_model(ids).logits, full.hf_model(ids).logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(s2(lm_batch(ids)), full(lm_batch(ids)), rtol=1e-5, atol=1e-4)
        s2.train(), full.train()  # N = 64 > G = 16: sparse attention changes the result
        a, b = s2.hf_model(ids).logits, full.hf_model(ids).logits
        assert (a - b).abs().max() > 1e-3
        torch.testing.assert_close(a[:, :8], b[:, :8], rtol=1e-5, atol=1e-5)  # first G/2 tokens: same context
        assert not torch.allclose(s2(lm_batch(ids)), full(lm_batch(ids)))
    # an absolute group size covering the whole sequence: training equals full attention up to G/2
    whole = build(job("peft=longlora", "model.s2_group_size=128"), device=cpu)
    assert whole.hf_model.config.s2_group_size == 128 and whole.hf_model.config.s2_group_size_ratio is None
    with torch.no_grad():
        whole.train()
        torch.testing.assert_close(whole.hf_model(ids).logits, b, rtol=1e-5, atol=1e-5)


def test_mfu_counts_the_group_as_attended_span() -> None:
    from ftcluster.longlora import attended_span

    s2 = build(job("peft=longlora")).hf_model.config
    assert attended_span(s2, 4096) == 1024 and attended_span(s2, 7) == 2
    assert attended_span(build(job("peft=longlora", "model.s2_group_size=512")).hf_model.config, 4096) == 512
    assert attended_span(build(job("peft=longlora", "model.s2_group_size=512")).hf_model.config, 100) == 100
    assert attended_span(build(job("peft=lora")).hf_model.config, 4096) == 4096


def test_export_config_has_full_attention_and_no_s2_keys(tmp_path: Path) -> None:
    from transformers import AutoConfig

    module = build(job("peft=longlora", "model.extend_context_to=4096"))
    out = hf_config_for_export(module.hf_model.config)
    assert out._attn_implementation == "sdpa" and module.hf_model.config._attn_implementation == S2_ATTN
    out.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert not {"s2_group_size", "s2_group_size_ratio", "attn_implementation", "_attn_implementation"} & set(saved)
    assert saved["rope_parameters"]["factor"] == 2.0 and saved["max_position_embeddings"] == 4096  # kept
    assert AutoConfig.from_pretrained(tmp_path)._attn_implementation in (None, "sdpa")


# --- RoPE scaling / context extension -------------------------------------------------------------

def _inv_freq(hf_config) -> tuple[torch.Tensor, float]:  # type: ignore[no-untyped-def]
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    rope = LlamaRotaryEmbedding(hf_config)
    return rope.inv_freq, rope.attention_scaling


TINY_DEFAULT = build_hf_config(job().model)  # rope_theta 10000, head_dim 32, max positions 2048


def test_linear_factor_divides_inv_freq() -> None:
    base, _ = _inv_freq(TINY_DEFAULT)
    hf = build_hf_config(job("model.rope_scaling_type=linear", "model.rope_scaling_factor=4").model)
    assert hf.rope_parameters == {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}
    assert hf.max_position_embeddings == 8192
    inv, scale = _inv_freq(hf)
    torch.testing.assert_close(inv, base / 4)
    assert scale == 1.0


def test_extend_context_to_computes_factor_from_original() -> None:
    hf = build_hf_config(job("model.extend_context_to=8192").model)  # no scaling yet: linear
    assert hf.rope_parameters["rope_type"] == "linear" and hf.rope_parameters["factor"] == 4.0
    assert hf.max_position_embeddings == 8192
    hf = build_hf_config(job("model.extend_context_to=5000", "model.rope_scaling_type=yarn").model)
    p = hf.rope_parameters
    assert p["factor"] == pytest.approx(5000 / 2048) and p["original_max_position_embeddings"] == 2048
    assert (p["beta_fast"], p["beta_slow"]) == (32.0, 1.0) and hf.max_position_embeddings == 5000


def test_yarn_and_llama3_keep_high_and_scale_low_frequencies() -> None:
    base, _ = _inv_freq(TINY_DEFAULT)
    yarn = build_hf_config(job("model.rope_scaling_type=yarn", "model.rope_scaling_factor=4").model)
    inv, scale = _inv_freq(yarn)
    torch.testing.assert_close(inv[0], base[0])  # fastest rotation: extrapolated (kept)
    torch.testing.assert_close(inv[-1], base[-1] / 4)  # slowest: interpolated
    assert scale == pytest.approx(0.1 * math.log(4) + 1)
    l3 = build_hf_config(job("model.rope_scaling_type=llama3", "model.rope_scaling_factor=4").model)
    assert {k: l3.rope_parameters[k] for k in ("original_max_position_embeddings", "low_freq_factor", "high_freq_factor")} \
        == {"original_max_position_embeddings": 2048, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    inv, _ = _inv_freq(l3)
    wavelen = 2 * math.pi / base
    torch.testing.assert_close(inv[wavelen < 2048 / 4], base[wavelen < 2048 / 4])
    torch.testing.assert_close(inv[wavelen > 2048], base[wavelen > 2048] / 4)


def test_dynamic_ntk_keeps_max_positions_and_scales_beyond_it() -> None:
    hf = build_hf_config(job("model.extend_context_to=8192", "model.rope_scaling_type=dynamic").model)
    assert hf.rope_parameters["factor"] == 4.0 and hf.max_position_embeddings == 2048
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    rope = LlamaRotaryEmbedding(hf)
    base = rope.inv_freq.clone()
    torch.testing.assert_close(base, _inv_freq(TINY_DEFAULT)[0])  # unscaled within the original context
    x = torch.zeros(1, 1, 4)
    rope(x, torch.arange(4096)[None])
    assert (rope.inv_freq[1:] < base[1:]).all()  # NTK: a larger base beyond 2048 positions


def test_model_with_llama3_scaling_extends_from_its_pretraining_context(tmp_path: Path) -> None:
    """Llama-3.1 style: max positions 131072 from llama3 scaling of an 8192 pre-training context."""
    cfg = json.loads((Path(job().model.path) / "config.json").read_text())
    cfg.update(max_position_embeddings=131072, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 16.0, "original_max_position_embeddings": 8192,
        "low_freq_factor": 1.0, "high_freq_factor": 4.0})
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    m = ModelConfig(path=str(tmp_path), init="pretrained", extend_context_to=262144)
    m.validate()
    check_model_paths(m)
    hf = build_hf_config(m)
    assert hf.rope_parameters["rope_type"] == "llama3"  # the model's own scaling type is kept
    assert hf.rope_parameters["factor"] == 32.0 and hf.rope_parameters["original_max_position_embeddings"] == 8192
    assert hf.max_position_embeddings == 262144
    # Between the pre-training context (8192) and the current one (131072) a factor from 8192 would
    # shrink the model's context: refused.
    with pytest.raises(ConfigError, match="^model.extend_context_to: must exceed .* current context of 131072"):
        check_model_paths(ModelConfig(path=str(tmp_path), init="pretrained", extend_context_to=32768))


def test_materialised_model_uses_scaled_rope() -> None:
    """The rotary buffers are rebuilt after the meta-device build: they must carry the scaling."""
    module = build(job("peft=longlora", "model.rope_scaling_type=linear", "model.rope_scaling_factor=4"),
                   device=torch.device("cpu"))
    torch.testing.assert_close(module.hf_model.model.rotary_emb.inv_freq, _inv_freq(TINY_DEFAULT)[0] / 4)


# --- Liger (GPU-only kernels): only the CPU-checkable parts ---------------------------------------

def _liger_importable(env: dict[str, str]) -> bool:
    code = "import liger_kernel.transformers"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True).returncode == 0


def test_liger_option_fails_clearly_or_keeps_parameter_names() -> None:
    """Without liger-kernel: a clear error. With it (importable on a CPU host too): the Liger
    classes replace RMSNorm/MLP in a subprocess (its patch is process-wide) and every parameter
    name and shape is unchanged, so materialisation and checkpoints are unaffected. The kernels
    themselves need a GPU and are exercised only by the bench."""
    env = cli_env()
    code = r"""
import json, sys
import torch
from ftcluster.compose import compose_job
from ftcluster.model import build_module
def shapes(liger):
    hf = build_module(compose_job(f"model.liger={str(liger).lower()}")).hf_model
    return {n: list(p.shape) for n, p in hf.named_parameters()}, sorted({type(x).__name__ for x in hf.modules()})
plain, _ = shapes(False)
try:
    patched, classes = shapes(True)
except RuntimeError as e:
    print(json.dumps({"error": str(e)})); sys.exit(0)
print(json.dumps({"same": plain == patched, "classes": classes}))
"""
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    if _liger_importable(env):
        assert out.get("same") is True and {"LigerRMSNorm", "LigerSwiGLUMLP"} <= set(out["classes"]), out
    else:
        assert "model.liger=true needs the liger-kernel package" in out["error"], out


# --- the real CLI ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_cli_longlora_trains_and_commits(tmp_path: Path) -> None:
    run = tmp_path / "ll"
    # One conversation per row (data.packing=false): packed, the embedded samples (~41 tokens) are shorter
    # than an S2 group and attend fully, so S2-Attn would not show in the loss (test_packing covers that).
    p = run_cli("train", "peft=longlora", "data.packing=false", "data.max_seq_len=256", "train.max_steps=4",
                f"run.dir={run}", cwd=tmp_path)
    assert p.returncode == 0, explain(p)
    got = losses(run)
    assert sorted(got) == [1, 2, 3, 4] and all(math.isfinite(v) for v in got.values())
    assert committed_steps(run) == [4]
    log = (run / "logs/rank0.log").read_text()
    assert "S2-Attn in training, group size 0.25 x sequence length" in log
    expected = sum(p.numel() for p in build(job("peft=longlora")).parameters() if p.requires_grad)
    assert events(run, "start")[0]["trainable"] == expected
    # The same first step with full attention gives another loss: the CLI run really used S2-Attn.
    ref = tmp_path / "full"
    p = run_cli("train", "peft=longlora", "data.packing=false", "model.attn_implementation=sdpa", "data.max_seq_len=256",
                "train.max_steps=1",
                "checkpoint.enabled=false", f"run.dir={ref}", cwd=tmp_path)
    assert p.returncode == 0, explain(p)
    full = losses(ref)[1]
    assert math.isfinite(full) and abs(full - got[1]) > 1e-4 * abs(got[1])  # beyond float noise
