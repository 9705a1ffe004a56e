"""Building the trained module: `build_module(job)` is the one place it is assembled.

Order (each step's constraint in its docstring): transformers config -> model on the meta device
(attention implementation and Liger kernels chosen here) -> decoder layers found once -> PEFT
transform -> fused LoRA linears (ftcluster/model/fused_lora.py, `peft.fused`) -> tiled MLPs
(ftcluster/model/tiled_mlp.py, `train.mlp_tile_tokens`) -> activation
checkpointing (ftcluster/model/checkpointing.py) -> per-layer torch.compile (ftcluster/model/compile.py)
-> `TrainModule` (the model plus the objective's loss head).
Then `parallelize` shards it and materialises the local shards (ftcluster/model/weights.py); no
rank ever holds a full copy of the model. Used alike by training, export, tests and benchmarks.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ftcluster.attention import register_s2_attention
from ftcluster.config import DEFAULT_SELECTIVE_EVERY, JobConfig, ModelConfig, ac_mode, tri_state
from ftcluster.data.batch import Batch
from ftcluster.longlora import S2_ATTN, apply_s2_group_size, apply_trainable_modules
from ftcluster.model.checkpointing import apply_activation_checkpointing
from ftcluster.model.compile import apply_compile, compile_device_type
from ftcluster.model.packed import packed_attn_implementation, packed_hidden
from ftcluster.objectives import Objective, build_objective
from ftcluster.quant import logical_numel
from ftcluster.rope import apply_rope_scaling


def build_hf_config(cfg: ModelConfig):  # type: ignore[no-untyped-def]
    """The transformers config: read from the local directory, or made from a shape."""
    from transformers import AutoConfig, LlamaConfig, Qwen2Config

    if cfg.path is not None:
        hf = AutoConfig.from_pretrained(cfg.path, trust_remote_code=cfg.trust_remote_code, local_files_only=True)
    else:
        cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[cfg.arch]
        extra = {"attention_bias": False} if cfg.arch == "llama" else {}
        hf = cls(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                 num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                 num_key_value_heads=cfg.num_kv_heads, max_position_embeddings=cfg.max_position_embeddings,
                 rope_theta=cfg.rope_theta, rms_norm_eps=cfg.rms_norm_eps,
                 tie_word_embeddings=cfg.tie_word_embeddings, **extra)
    hf.use_cache = False  # training never needs the KV cache
    apply_rope_scaling(hf, cfg)  # context extension (model.rope_scaling_*, model.extend_context_to)
    return hf


def build_meta_model(cfg: ModelConfig, hf_config, *, packed: bool = False) -> nn.Module:  # type: ignore[no-untyped-def]
    """The Hugging Face causal LM with every parameter on the meta device (no memory).
    Registers S2-Attn first when selected (transformers checks the name at construction), and
    applies Liger's kernels (module-level class swaps in transformers) when `cfg.liger`. With
    `packed` (training on packed rows) sdpa becomes the packed-attention dispatcher or
    FlashAttention (ftcluster/model/packed.py)."""
    from transformers import AutoModelForCausalLM

    attn = packed_attn_implementation(cfg.attn_implementation) if packed else cfg.attn_implementation
    if cfg.attn_implementation == S2_ATTN:
        register_s2_attention(S2_ATTN)
    if tri_state(cfg.liger, "model.liger"):  # `auto` is resolved before training (ftcluster/layout.py): off here
        from ftcluster.liger import apply_liger_kernels

        apply_liger_kernels(hf_config)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(hf_config, attn_implementation=attn,
                                                trust_remote_code=cfg.trust_remote_code, dtype=torch.float32)


def find_decoder_layers(hf_model: nn.Module) -> list[nn.Module]:
    """The decoder layers, in order. Which classes they are is data transformers records per model
    family (`_no_split_modules`), so no family list lives here."""
    names = set(getattr(hf_model, "_no_split_modules", None) or [])
    if not names:
        raise ValueError(f"{type(hf_model).__name__} does not declare _no_split_modules; cannot find its decoder layers")
    layers = [m for m in hf_model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"no decoder layers of classes {sorted(names)} found in {type(hf_model).__name__}")
    return layers


def apply_peft(hf_model: nn.Module, job: JobConfig, *, layers: list[nn.Module]) -> nn.Module:
    """PEFT is a model transform plus a trainable-parameter filter. Returns the module to train
    (a peft.PeftModel for adapters, the model itself for full fine-tuning). Base weights of an
    adapter run are frozen (and later stored in the compute dtype); `peft.trainable_modules`
    (LongLoRA+: embeddings, norms) train in full as fp32 master weights. With S2-Attn the group
    size goes into the HF config here (ftcluster/longlora.py). QLoRA also quantises the frozen
    decoder linears to NF4 here (still on the meta device; they are filled as weights load), and
    `peft.fp8_base` to FP8 (ftcluster/fp8.py) the same way."""
    p = job.peft
    if hf_model.config._attn_implementation == S2_ATTN:
        apply_s2_group_size(hf_model.config, job.model)
    if p.method == "none":
        for prm in hf_model.parameters():
            prm.requires_grad_(True)
        return hf_model
    from peft import LoraConfig, get_peft_model

    targets: str | list[str] = "all-linear" if p.target_modules == ["all-linear"] else list(p.target_modules)
    lcfg = LoraConfig(r=p.rank, lora_alpha=p.alpha, lora_dropout=p.dropout, target_modules=targets,
                      bias="none", task_type="CAUSAL_LM")
    with torch.device("meta"):
        peft_model = get_peft_model(hf_model, lcfg)
    apply_trainable_modules(peft_model, list(p.trainable_modules))  # after get_peft_model froze the base
    if p.method == "qlora":
        # After the adapters exist (their linears are trainable and skipped) and before sharding:
        # the frozen decoder linears become NF4 (ftcluster/quant.py), stored in the compute dtype.
        from ftcluster.quant import apply_nf4

        storage = {"bf16": torch.bfloat16, "fp32": torch.float32}[job.train.dtype]
        apply_nf4(peft_model, layer_classes={type(m).__name__ for m in layers}, storage_dtype=storage)
    if p.fp8_base:
        # The same place and reason as NF4: the frozen decoder linears become FP8 (ftcluster/fp8.py).
        from ftcluster.fp8 import apply_fp8

        storage = {"bf16": torch.bfloat16, "fp32": torch.float32}[job.train.dtype]
        apply_fp8(peft_model, layer_classes={type(m).__name__ for m in layers}, storage_dtype=storage)
    return peft_model


class TrainModule(nn.Module):
    """The trained module: the (PEFT-wrapped) model and the objective's loss head.

    forward(batch) runs the decoder and hands its last hidden states and the output projection's
    weight to `objective.head`, which returns the summed loss (fp32). Being one module, it is
    sharded as the FSDP root (embeddings, final norm and output head live in the root's parameter
    group), and the head runs inside the root's forward, where every backend has gathered them."""

    def __init__(self, *, model: nn.Module, hf_model: nn.Module, objective: Objective) -> None:
        super().__init__()
        self.model = model  # registered once: peft model or the HF model itself
        self._hf = [hf_model]  # a list so the HF model is not registered twice under another name
        self.objective = objective  # no parameters: not a submodule

    @property
    def hf_model(self) -> nn.Module:
        return self._hf[0]

    def forward(self, batch: Batch) -> torch.Tensor:
        hf = self.hf_model
        weight = hf.get_output_embeddings().weight
        if self.objective.needs_reference_forward and getattr(batch, "ref_logps", None) is None:
            # DPO's reference under LoRA/QLoRA: the same (sharded) model with the adapters off,
            # first and without autograd (nothing of it is kept for backward). Inside the root's
            # forward, so every backend has the root's parameters gathered for both passes.
            with torch.no_grad(), self.model.disable_adapter():
                ref_hidden = self._hidden(batch)
                batch = batch.with_reference(self.objective.reference_logps(ref_hidden, weight, batch))
        return self.objective.head(self._hidden(batch), weight, batch)

    def _hidden(self, batch: Batch) -> torch.Tensor:
        hf = self.hf_model
        if batch.packed:  # several samples per row: positions restart, attention stays within each
            return packed_hidden(hf.get_decoder(), batch, attn_implementation=hf.config._attn_implementation)
        return hf.get_decoder()(input_ids=batch.input_ids, use_cache=False).last_hidden_state


def greedy_generate(hf_model: nn.Module, *, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    max_new_tokens: int, eos_token_id: int | None, pad_token_id: int,
                    synced_gpus: bool) -> torch.Tensor:
    """transformers' greedy decoding with the KV cache on (training builds the config with
    use_cache=False) and every sampling setting pinned, whatever the model's generation config."""
    return hf_model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=eos_token_id, pad_token_id=pad_token_id, use_cache=True,
                             synced_gpus=synced_gpus)


@dataclass(kw_only=True)
class BuiltModule:
    module: TrainModule
    """What `parallelize` shards and trains."""
    hf_model: nn.Module
    """The transformers model inside it (its config, decoder, output embeddings)."""
    layers: list[nn.Module]
    """The decoder layers, found once: the sharding, checkpointing and quantisation unit."""
    counts: "ParamCounts"
    """Global parameter counts (for the log and the MFU formula)."""


def build_module(job: JobConfig, *, objective: Objective | None = None, packed: bool = False,
                 frozen: bool = False) -> BuiltModule:
    """The trained module on the meta device (no memory): the same parameter names, shapes and
    PEFT wrapping (QLoRA's NF4 layers included) for training, export and tests. `packed`: it will
    train on packed rows (the attention implementation that keeps samples apart). `frozen`: DPO's
    reference copy (objective.reference=model): no PEFT, no activation checkpointing (it runs
    without autograd), nothing trainable; the same parameter names as the full fine-tune's, so
    `materialize` fills it with the same weights."""
    hf_config = build_hf_config(job.model)
    hf_model = build_meta_model(job.model, hf_config, packed=packed)
    layers = find_decoder_layers(hf_model)
    if frozen:
        hf_model.requires_grad_(False)
        module = TrainModule(model=hf_model, hf_model=hf_model, objective=objective or build_objective(job))
        return BuiltModule(module=module, hf_model=hf_model, layers=layers, counts=count_params(module))
    trained = apply_peft(hf_model, job, layers=layers)
    if tri_state(job.peft.fused, "peft.fused"):  # auto: resolved by layout.py (a module built outside it: off)
        # After PEFT and QLoRA's NF4 swap (the base layers are final), before checkpointing,
        # compile and sharding: each LoRA linear becomes one fused node (same parameters).
        from ftcluster.model.fused_lora import apply_fused_lora

        apply_fused_lora(trained)
    if job.train.mlp_tile_tokens:
        # After PEFT and fused LoRA (the tile recomputes the MLP's final projections), before
        # checkpointing: a checkpointed layer's recompute then runs the tiled MLP too.
        from ftcluster.model.tiled_mlp import apply_tiled_mlp

        apply_tiled_mlp(layers, tile_tokens=job.train.mlp_tile_tokens)
    mode = ac_mode(job.train.activation_checkpointing)
    if mode != "auto":  # auto: resolved by layout.py before training (a module built outside it: none)
        # After PEFT (the layers hold their adapters), before compile and sharding.
        apply_activation_checkpointing(hf_model, layers=layers, mode=mode,
                                       every=job.train.activation_checkpointing_every or DEFAULT_SELECTIVE_EVERY)
    if job.model.compile:
        # After checkpointing (the compiled call includes the checkpointed forward), before sharding
        # (torchtitan's order: FSDP2 hooks are added to the compiled layers).
        apply_compile(layers, device_type=compile_device_type())
    module = TrainModule(model=trained, hf_model=hf_model, objective=objective or build_objective(job))
    return BuiltModule(module=module, hf_model=hf_model, layers=layers, counts=count_params(module))


@dataclass(kw_only=True)
class ParamCounts:
    total: int
    trainable: int
    embedding: int

    @property
    def frozen(self) -> int:
        return self.total - self.trainable


def count_params(module: nn.Module) -> ParamCounts:
    """Global (unsharded) parameter counts; the input embedding is counted separately (MFU excludes it)."""
    total = trainable = emb = 0
    for name, p in module.named_parameters():
        n = logical_numel(module, name, p)  # NF4 / FP8: out x in, not the flat quantised length
        total += n
        trainable += n if p.requires_grad else 0
        if "embed_tokens" in name:
            emb += n
    return ParamCounts(total=total, trainable=trainable, embedding=emb)
