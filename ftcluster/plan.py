"""The memory planner: per-rank GPU and host bytes of a job, and the fastest layout that fits.

Pure arithmetic over the meta model (no GPU, no process group). Parameters are counted exactly:
`build_module` on the meta device gives every parameter's shape and storage dtype with PEFT
applied (LoRA adapters, QLoRA's packed NF4 states); each backend's shard arithmetic then gives
the bytes on the fullest rank. Activations are derived from the architecture op by op
(`layer_activation_bytes`, the derivation in its comments) and calibrated against H200 runs
(`CALIBRATION`, one place, each figure with its source).

What the plan predicts: `MemoryPlan.total` is the peak of `torch.cuda.max_memory_reserved`
(torch's allocator, CUDA context excluded: it is outside torch's counters); `detail["allocated"]`
is the predicted `max_memory_allocated`.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

from ftcluster.config import ConfigError, JobConfig, ac_mode
from ftcluster.distributed import expandable_segments

GIB = 1024 ** 3

# --- calibration: every constant the plan did not derive, with where it came from --------------
CALIBRATION: dict[str, float] = {
    # Reserved minus allocated: the caching allocator's rounding and fragmentation. bench/RESULTS.md
    # (issues 2, 3, 7): reserved/allocated 26.71/24.41 (8B LoRA, 1 GPU), 21.33/17.11 (8B LoRA, 2 GPUs),
    # 56.9/54.2 (70B QLoRA), 89.4/83.5 (70B LoRA, 2 GPUs), 17.61/13.76 (1B full): about 8% + 1 GiB.
    "slack_fraction": 0.08,
    "slack_fixed_gib": 1.0,
    # The same under expandable segments (the ranks' default since 2026-12-03, ftcluster/distributed.py),
    # which map one growing region per stream instead of caching fixed blocks. Fitted on the five
    # 8B runs of bench/RESULTS.md issue 18 (2026-12-03, one H200), reserved - allocated: 0.04 (LoRA
    # mb 4), 0.09 (the same, peft's forward), 0.36 (QLoRA mb 4), 0.56 (offload mb 1), 1.42 GiB (LoRA
    # mb 4 without Liger, 112 GiB allocated): about 1% + 0.3 GiB.
    "slack_fraction_expandable": 0.01,
    "slack_fixed_gib_expandable": 0.3,
    # More ranks: collectives run on their own streams and the caching allocator keeps per-stream
    # pools, so reserved grows further: at 2 ranks reserved - allocated was 4.2 (8B LoRA), 3.0 (8B,
    # seq 2048), 5.9 (70B LoRA), 3.9 GiB (1B full) against 2.3-2.7 GiB at one rank.
    "slack_multi_rank_gib": 1.5,
    # Safety margin choose_layout keeps below the budget (the ±10% the plan aims for, halved).
    "safety_margin": 0.05,
    # Micro-batch efficiency vs tokens per micro-batch, from the H200 8B LoRA runs of issue 18
    # (no checkpointing, Liger, seq 4096): mb1 11,614, mb2 13,866, mb4 14,426 tokens/s.
    "eff_4096": 11614 / 14426,   # 0.805
    "eff_8192": 13866 / 14426,   # 0.961
    # ZeRO-3 holds more than its partitions and gathers: bench/RESULTS.md issue 3 measured 3.7 GiB
    # (8B LoRA) and 7.0 GiB (1B full) above FSDP2 at 2 ranks; its gradient bucket (reduce_bucket_size
    # elements in the compute dtype, allocated whole at start) explains ~0.9 GiB; the rest (fitted:
    # ~3 GiB) is DeepSpeed's flat buffers and its fp32 master copy during set-up.
    "zero3_extra_gib": 3.0,
    # Offload: full recompute plus the host copies (overlapped on a side stream; a guess, not measured).
    "offload_copy_cost": 0.05,
}

DEFAULT_GPU_GIB = 80.0
"""Planned-for GPU memory when neither --gpu-gib, train.memory_budget_gib nor a local GPU says (an 80 GB card)."""

SELECTIVE_EVERY = (2, 3, 4, 8)
"""The k of `selective` that choose_layout tries (every k-th decoder layer recomputed)."""

_LAYER_RE = re.compile(r"\.layers\.(\d+)\.")


class PlanError(ConfigError):
    """Nothing fits: the message starts with the dotted key and says what would fit, with figures."""


@dataclass(frozen=True, kw_only=True)
class MemoryPlan:
    """Bytes per rank (the fullest rank). `total` is the predicted max_memory_reserved."""
    frozen_weights: int
    trainable_weights: int
    grads: int
    optimizer: int
    activations: int
    logits: int
    comm_buffers: int
    slack: int
    host_bytes: int
    """Host memory per node: loading plus whatever is offloaded (activations, optimizer, params)."""
    detail: dict = field(default_factory=dict)

    GPU_FIELDS = ("frozen_weights", "trainable_weights", "grads", "optimizer", "activations", "logits",
                  "comm_buffers", "slack")

    @property
    def total(self) -> int:
        return sum(getattr(self, f) for f in self.GPU_FIELDS)

    def as_dict(self) -> dict:
        return {**{f: getattr(self, f) for f in self.GPU_FIELDS}, "host_bytes": self.host_bytes,
                "total": self.total, "detail": dict(self.detail)}


@dataclass(frozen=True, kw_only=True)
class Choice:
    micro_batch_size: int
    activation_checkpointing: str
    activation_checkpointing_every: int
    predicted_peak_gib: float
    why: tuple[str, ...]


# --- parameters, counted on the meta device --------------------------------------------------
@dataclass(frozen=True)
class Param:
    shape: tuple[int, ...]
    bytes_per_elt: int
    """Storage bytes per element on the GPU as the backend keeps it (before sharding)."""
    trainable: bool
    logical: int
    """Parameters it stands for (NF4: out x in)."""


@dataclass(frozen=True)
class ParamTable:
    layer: tuple[Param, ...]
    """One decoder layer's parameters (all layers have the same)."""
    root: tuple[Param, ...]
    """Embeddings, final norm, output head: the FSDP root's group."""
    num_layers: int


def _table_key(job: JobConfig) -> tuple:
    # Only what changes parameter shapes or dtypes (one meta build per key, e.g. across world sizes).
    m, p = job.model, job.peft
    return (m.path, m.arch, m.vocab_size, m.hidden_size, m.intermediate_size, m.num_layers, m.num_heads,
            m.num_kv_heads, m.tie_word_embeddings, p.method, p.rank, tuple(p.target_modules),
            tuple(p.trainable_modules), job.train.dtype)


_TABLES: dict[tuple, ParamTable] = {}


def param_table(job: JobConfig) -> ParamTable:
    """Every parameter of one decoder layer and of the root, from `build_module` on the meta device.
    A model made from a shape is built with one decoder layer (the layers are identical; this keeps
    405B at a fraction of a second); a model from a directory is built whole and layer 0 read."""
    key = _table_key(job)
    if key in _TABLES:
        return _TABLES[key]
    from ftcluster.model import build_module
    from ftcluster.quant import logical_numel

    # The `auto` knobs do not change parameters: pin them (layout.concrete would import us back).
    small = dataclasses.replace(job, train=dataclasses.replace(job.train, activation_checkpointing="none",
                                                               micro_batch_size=1, grad_accum=1),
                                model=dataclasses.replace(job.model, liger="false"))
    if job.model.path is None:
        small = dataclasses.replace(small, model=dataclasses.replace(small.model, num_layers=1))
    built = build_module(small)
    compute_bytes = 2 if job.train.dtype == "bf16" else 4
    layer, root, n_layers = [], [], 0
    for name, p in built.module.named_parameters():
        # Backends store trainable parameters as fp32 masters, frozen ones in the compute dtype
        # (NF4 states are already typed as the compute dtype: their numel is the packed length).
        bpe = 4 if p.requires_grad else compute_bytes
        entry = Param(tuple(p.shape), bpe, p.requires_grad, logical_numel(built.module, name, p))
        match = _LAYER_RE.search(name)
        if match is None:
            root.append(entry)
        else:
            n_layers = max(n_layers, int(match.group(1)) + 1)
            if match.group(1) == "0":
                layer.append(entry)
    full_layers = job.model.num_layers if job.model.path is None else n_layers
    table = ParamTable(layer=tuple(layer), root=tuple(root), num_layers=full_layers)
    _TABLES[key] = table
    return table


def _numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape) if shape else 1


def fsdp_local_numel(shape: tuple[int, ...], world_size: int) -> int:
    """FSDP2 shards dim 0 with padding: every rank holds ceil(dim0 / world) rows (rank 0 always does;
    the last ranks may hold fewer real rows, but the padded shard is what is allocated)."""
    if not shape:
        return 1
    return math.ceil(shape[0] / world_size) * _numel(shape[1:])


def _sum(params, fn) -> int:  # type: ignore[no-untyped-def]
    return sum(fn(p) for p in params)


# --- activations, derived op by op ----------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class Shape:
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    layers: int
    vocab: int


def model_shape(job: JobConfig) -> Shape:
    from ftcluster.model.build import build_hf_config

    hf = build_hf_config(job.model)
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    return Shape(hidden=hf.hidden_size, intermediate=hf.intermediate_size, heads=hf.num_attention_heads,
                 kv_heads=hf.num_key_value_heads, head_dim=head_dim, layers=hf.num_hidden_layers,
                 vocab=hf.vocab_size)


def _targets(job: JobConfig) -> set[str]:
    if job.peft.method == "none":
        return set()
    t = set(job.peft.target_modules)
    if "all-linear" in t:
        return {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    return t


def layer_activation_bytes(job: JobConfig, *, shape: Shape, tokens: int, seq_len: int, liger: bool) -> dict[str, int]:
    """Bytes one decoder layer saves for backward (no checkpointing), per op, for `tokens` tokens
    (micro-batch x sequence) in the compute dtype `c` (2 bytes for bf16). Unique storages only:
    a tensor two ops save (the normed input of q/k/v) counts once.

      input norm   HF RMSNorm: x.to(fp32) is saved by pow and mul (4h bytes/token; the rsqrt, T x 4);
                   weight * y.to(c) saves y only if the weight trains (full fine-tune: +c h).
                   Liger RMSNorm saves its input x (c h) and rstd (4 bytes).
      q/k/v        the normed input (c h), saved once by the three base linears; LoRA on a target:
                   the dropout copy (c x in) and its mask (1 byte x in) if peft.dropout > 0, and A's
                   output (c r), saved by B.
      RoPE         saves cos/sin only (they need no grad; T x head_dim each, in c), not q/k.
      attention    flash/SDPA (memory-efficient kernels): q, k, v after RoPE (c (h + 2 kv)), the
                   output (c h) and the logsumexp (4 x heads). `eager` adds the T x T probabilities
                   per head (c, plus the dropout-free softmax output saved again by matmul) -- on CPU
                   SDPA's math path saves like eager; the GPU's flash kernel saves only the above.
      o_proj       its input is the attention output (same storage after the no-op contiguous of
                   flash's layout) + LoRA as for q/k/v.
      post norm    as the input norm; its input is the residual sum (c h) under Liger.
      MLP          gate/up input (the normed x: c h); gate output g and up output u (c i each);
                   HF: silu(g) saved by the product (c i); Liger's SwiGLU recomputes silu(g).
                   down_proj saves the product (c i); LoRA on gate/up (in = h), down (in = i).
    """
    c = 2 if job.train.dtype == "bf16" else 4
    h, i, kv = shape.hidden, shape.intermediate, shape.kv_heads * shape.head_dim
    q = shape.heads * shape.head_dim
    T = tokens
    r = job.peft.rank
    targets = _targets(job)
    dropout = job.peft.dropout > 0
    full_ft = job.peft.method == "none"
    norms_train = full_ft or any(n in ("input_layernorm", "post_attention_layernorm") for n in job.peft.trainable_modules)

    def norm() -> int:
        if liger:
            return T * (c * h + 4)  # its input x (the residual stream) and rstd
        return T * (4 * h + 4) + (T * c * h if norms_train else 0)

    def lora(name: str, fan_in: int) -> int:
        if name not in targets:
            return 0
        return T * ((c + 1) * fan_in if dropout else 0) + T * c * r

    out: dict[str, int] = {}
    out["input_norm"] = norm()
    out["qkv_input"] = T * c * h
    out["qkv_lora"] = lora("q_proj", h) + lora("k_proj", h) + lora("v_proj", h)
    out["attention"] = T * c * (q + 2 * kv) + T * c * q + T * 4 * shape.heads
    if job.model.attn_implementation == "eager":
        rows = tokens // seq_len
        out["attention"] += rows * shape.heads * seq_len * seq_len * (2 * c)
    if job.model.attn_implementation == "s2_attn":
        # S2-Attn shifts half the heads and regroups q/k/v: one more copy of q, k, v is saved.
        out["attention"] += T * c * (q + 2 * kv)
    out["rope"] = 0 if liger else 2 * T * c * shape.head_dim  # Liger's RoPE kernel saves cos/sin once per model
    out["o_lora"] = lora("o_proj", q)
    out["post_norm"] = norm()
    out["mlp_input"] = T * c * h
    if mlp_tile(job, tokens=T) is not None:
        # train.mlp_tile_tokens: the tiled MLP saves its input alone (the tiles' intermediates live
        # only inside its backward: _activations' working set).
        out["mlp_lora"] = out["mlp"] = 0
        return out
    out["mlp_lora"] = lora("gate_proj", h) + lora("up_proj", h) + lora("down_proj", i)
    out["mlp"] = T * c * i * (3 if liger else 4)
    return out


def mlp_tile(job: JobConfig, *, tokens: int) -> Optional[int]:
    """Tokens per MLP tile when train.mlp_tile_tokens tiles a micro-batch of `tokens`, else None."""
    tile = job.train.mlp_tile_tokens
    return tile if 0 < tile < tokens else None


def _loss_bytes(job: JobConfig, *, shape: Shape, tokens: int, liger: bool) -> int:
    """Peak of the output projection + loss. Ours (ftcluster/objectives/sft.py): chunks of
    train.loss_chunk_size tokens, each recomputed in backward; at the peak one chunk's fp32
    log-softmax output and its gradient exist (8 bytes x chunk x vocab; the bf16 logits are freed
    once cast, calibrated on the issue-2 8B run: 24.41 GiB allocated).
    Liger's fused linear CE computes the hidden-state gradient in forward (c x T x h kept) and holds
    logits for chunks of T / ceil(V / h) tokens (in c, the gradient written in place; 4 bytes per
    element at the peak with the matmul's output)."""
    c = 2 if job.train.dtype == "bf16" else 4
    lm_head_trains = job.peft.method == "none" or "lm_head" in job.peft.trainable_modules
    if liger:
        chunk = max(1, tokens // math.ceil(shape.vocab / shape.hidden))
        grad_w = shape.vocab * shape.hidden * 4 if lm_head_trains else 0
        return tokens * c * shape.hidden + chunk * shape.vocab * 4 + grad_w
    chunk = min(job.train.loss_chunk_size, tokens)
    return chunk * shape.vocab * 8


# --- the plan -------------------------------------------------------------------------------
@dataclass
class _State:
    """Weights, gradients, optimizer state and their buffers on the GPU of one rank; `host`: what
    the backend moved to host memory (per rank)."""
    frozen: int = 0
    trainable: int = 0
    grads: int = 0
    optimizer: int = 0
    comm: int = 0
    host: int = 0


def _fsdp2_state(job: JobConfig, table: ParamTable, *, ws: int, c: int) -> _State:
    L = table.num_layers
    all_params = [*table.root, *(table.layer * L)]
    local = lambda p: fsdp_local_numel(p.shape, ws)  # noqa: E731
    # parallel.shard_frozen (parallel/fsdp.py): frozen parameters outside FSDP2 stay whole on the
    # rank and are used in place (no all-gather buffer); sharded ones take their padded shard.
    frozen_sharded = job.parallel.shards_frozen(world_size=ws) or job.parallel.cpu_offload
    sharded = lambda p: p.trainable or frozen_sharded  # noqa: E731
    s = _State()
    s.frozen = _sum([p for p in all_params if not p.trainable],
                    lambda p: (local(p) if sharded(p) else _numel(p.shape)) * p.bytes_per_elt)
    s.trainable = _sum([p for p in all_params if p.trainable], lambda p: local(p) * 4)
    s.grads = s.trainable  # fp32 sharded gradients
    s.optimizer = 2 * s.trainable  # AdamW: two fp32 moments per local trainable element
    # All-gathered layers in the compute dtype: the current and the prefetched one; the root's
    # group (embeddings, head) stays gathered from its forward through its backward. Even at world
    # size 1 FSDP2 copies what it shards into its all-gather buffers (bench/RESULTS.md issue 2: +2 GiB).
    s.comm = 2 * _gathered([p for p in table.layer if sharded(p)], c) + _gathered([p for p in table.root if sharded(p)], c)
    # The reduce-scatter input of one layer's gradients (reduce dtype) while the next computes.
    reduce_bytes = 4 if job.parallel.reduce_dtype == "fp32" else 2
    s.comm += 2 * _sum([p for p in table.layer if p.trainable], lambda p: _numel(p.shape)) * reduce_bytes
    # Deferred reduce-scatter with accumulation (parallel/fsdp.py _defer_grad_sync, auto on GPU for
    # adapters over several ranks): unsharded fp32 gradients of every trainable parameter all step.
    accum = job.train.grad_accum if isinstance(job.train.grad_accum, int) else 1
    defer = job.parallel.defer_grad_sync
    if defer == "auto":
        defer = ws > 1 and _sum([p for p in all_params if p.trainable], lambda p: p.logical) <= \
            0.05 * _sum(all_params, lambda p: p.logical)
    if defer and accum > 1:
        s.grads += 4 * _sum([p for p in all_params if p.trainable], lambda p: _numel(p.shape))
    if job.parallel.cpu_offload:  # CPUOffloadPolicy: sharded params, grads and optimizer on the host
        s.host = s.frozen + s.trainable + s.grads + s.optimizer
        s.frozen = s.trainable = s.grads = s.optimizer = 0
    return s


def _zero_state(job: JobConfig, table: ParamTable, *, ws: int, c: int) -> _State:
    stage = int(job.parallel.backend[-1])
    all_params = [*table.root, *(table.layer * table.num_layers)]
    trainable = [p for p in all_params if p.trainable]
    frozen = [p for p in all_params if not p.trainable]
    n_train = _sum(trainable, lambda p: _numel(p.shape))
    s = _State()
    if stage == 3:
        # ZeRO-3 partitions every parameter on its own: ceil(numel / world) elements per rank (its
        # local partition tensor), the fp32 master / moments / gradient partitions the same elements.
        part = _sum(trainable, lambda p: math.ceil(_numel(p.shape) / ws))
        s.frozen = _sum(frozen, lambda p: math.ceil(_numel(p.shape) / ws) * p.bytes_per_elt)
        train16 = c * part
        s.grads = 4 * part  # fp32 accumulation of the partition (data_types.grad_accum_dtype)
        # Per-layer gathers (stage3_gather_per_layer) of the current and the prefetched layer;
        # parameters under stage3_param_persistence_threshold stay gathered all step.
        small = [p for p in all_params if _numel(p.shape) < job.parallel.stage3_param_persistence_threshold]
        s.comm = 2 * _gathered(table.layer, c) + _gathered(table.root, c) + _sum(small, lambda p: _numel(p.shape) * c)
        s.comm += job.parallel.reduce_bucket_size * c
        if ws > 1:
            # The extra was fitted on 2-rank runs; at one rank ZeRO-3 holds none of it (one H200,
            # 2026-12-03, bench/RESULTS.md: 1B LoRA measured exactly 3.0 GiB under a plan with it,
            # 1B full fine-tune 1.7% over with it and 7.4% under without it).
            s.comm += int(CALIBRATION["zero3_extra_gib"] * GIB)
    else:
        # ZeRO-1/2: the flat fp32 group is split evenly; the bf16 module stays whole on every rank.
        part = math.ceil(n_train / ws)
        s.frozen = _sum(frozen, lambda p: _numel(p.shape) * p.bytes_per_elt)
        train16 = c * n_train
        s.grads = 4 * (n_train if stage == 1 else part)
    s.optimizer = 8 * part
    master = 4 * part
    # Gradient buckets in flight (overlap_comm: two), bf16 gradients of a bucket.
    s.comm += 2 * min(job.parallel.reduce_bucket_size, n_train) * c
    s.trainable = train16 + master
    if job.parallel.cpu_offload:  # ZeRO-Offload: optimizer, fp32 masters and gradients (+ params at stage 3)
        s.host = s.optimizer + master + s.grads
        s.optimizer, s.grads, s.trainable = 0, 0, train16
        if stage == 3:
            s.host += s.frozen + s.trainable
            s.frozen = s.trainable = 0
    return s


def _gathered(params: Iterable[Param], c: int) -> int:
    """Bytes of these parameters all-gathered for compute (trainable ones cast to the compute dtype)."""
    return _sum(params, lambda p: _numel(p.shape) * (c if p.trainable else p.bytes_per_elt))


def _activations(job: JobConfig, *, shape: Shape, layers: int, tokens: int, mode: str, every: int,
                 liger: bool) -> tuple[int, int, dict[str, int]]:
    """(GPU bytes, host bytes, per-layer bytes by op) of the saved activations in this mode."""
    c = 2 if job.train.dtype == "bf16" else 4
    per_layer = layer_activation_bytes(job, shape=shape, tokens=tokens, seq_len=job.data.max_seq_len, liger=liger)
    layer_b = sum(per_layer.values())
    ckpt_in = tokens * c * shape.hidden  # a checkpointed layer keeps only its input
    host = 0
    if mode == "none":
        acts = layers * layer_b
    elif mode == "full":  # every input kept, one layer's full set alive while it is recomputed
        acts = layers * ckpt_in + layer_b
    elif mode == "selective":
        n_ck = len(range(0, layers, every))  # layer index % k == 0 recomputed, the others store all
        acts = n_ck * ckpt_in + (layers - n_ck) * layer_b + (layer_b if n_ck else 0)
    else:  # offload: inputs in pinned host memory; two in flight on the GPU (copy out / copy back)
        acts = 2 * ckpt_in + layer_b
        host = layers * ckpt_in
    # One layer's backward working set: the gradient of one MLP branch and of the residual stream
    # (the recomputed layer's saved tensors are freed as its backward consumes them). Fitted on the
    # issue-6 slope (8B, full checkpointing, 16k-64k tokens: 0.427 MiB per token). Tiled MLP: the
    # branch gradient is one tile's, plus the tile's recomputed intermediates (as untiled saves).
    tile = mlp_tile(job, tokens=tokens)
    acts += tokens * c * shape.hidden + (tokens if tile is None else tile) * c * shape.intermediate
    if tile is not None:
        acts += tile * c * shape.intermediate * (3 if liger else 4)
    acts += tokens * c * shape.hidden  # the final norm's output: the head's input
    return acts, host, per_layer


def _reference_copy_bytes(job: JobConfig, table: ParamTable, *, ws: int, c: int) -> int:
    """DPO with objective.reference=model: a frozen copy of the whole model in the compute dtype,
    sharded like the trained one (FSDP2: dim-0 shards; ZeRO-3: per-parameter partitions; ZeRO-1/2:
    whole on every rank). It runs without autograd, so it adds no activations. The other
    references (adapters disabled, precomputed log-probs) cost no GPU memory of their own."""
    if job.objective.kind != "dpo" or job.objective.reference_source(job.peft.method) != "model":
        return 0
    params = [*table.root, *(table.layer * table.num_layers)]
    # The base model's parameters: all of a full fine-tune's; the frozen ones of an adapter run
    # (LoRA's A/B are not in the copy). `logical` counts an NF4 weight as out x in (the copy is
    # not quantised). Per-rank share: about 1/ws of each (dim-0 padding ignored here).
    base = params if job.peft.method == "none" else [p for p in params if not p.trainable]
    share = ws if job.parallel.backend in ("fsdp2", "zero3") else 1
    return _sum(base, lambda p: -(-p.logical // share) * c)


def plan_memory(job: JobConfig, *, world_size: int, nodes: int = 1, micro_batch_size: int,
                activation_checkpointing: str, activation_checkpointing_every: int, liger: bool) -> MemoryPlan:
    """Per-rank bytes of `job` at this layout (values given are taken as they are: no `auto`)."""
    mode = ac_mode(activation_checkpointing)
    table = param_table(job)
    shape = model_shape(job)
    c = 2 if job.train.dtype == "bf16" else 4
    # DPO: a micro-batch of `micro_batch_size` pairs is one forward over chosen and rejected rows.
    rows = 2 * micro_batch_size if job.objective.kind == "dpo" else micro_batch_size
    T = rows * job.data.max_seq_len
    ws = world_size
    state = (_fsdp2_state if job.parallel.backend == "fsdp2" else _zero_state)(job, table, ws=ws, c=c)
    reference = _reference_copy_bytes(job, table, ws=ws, c=c)
    acts, act_host, per_layer = _activations(job, shape=shape, layers=table.num_layers, tokens=T, mode=mode,
                                             every=activation_checkpointing_every, liger=liger)
    logits = _loss_bytes(job, shape=shape, tokens=T, liger=liger)
    gpu = state.frozen + state.trainable + state.grads + state.optimizer + acts + logits + state.comm + reference
    tail = "_expandable" if expandable_segments() else ""
    slack = int(CALIBRATION["slack_fraction" + tail] * gpu + CALIBRATION["slack_fixed_gib" + tail] * GIB
                + (CALIBRATION["slack_multi_rank_gib"] * GIB if ws > 1 else 0))
    all_params = [*table.root, *(table.layer * table.num_layers)]
    # Host: the sharded load reads safetensors slices one tensor at a time (model/weights.py): at most
    # one whole tensor per rank in flight (the embedding is the largest), in the compute dtype. Pinned
    # host memory per node: every rank of the node offloads its own share.
    biggest = max(_numel(p.shape) * c for p in all_params)
    host = (biggest + state.host + act_host) * nodes_ranks(ws, nodes)
    detail = {
        "world_size": ws, "nodes": nodes, "backend": job.parallel.backend, "cpu_offload": job.parallel.cpu_offload,
        "params_total": _sum(all_params, lambda p: p.logical),
        "params_trainable": _sum([p for p in all_params if p.trainable], lambda p: p.logical),
        "layers": table.num_layers, "tokens_per_micro_batch": T,
        "activation_bytes_per_layer": sum(per_layer.values()), "activation_bytes_per_layer_by_op": per_layer,
        "checkpoint_bytes_per_layer": T * c * shape.hidden, "allocated": gpu, "reference_copy": reference,
    }
    return MemoryPlan(frozen_weights=state.frozen + reference, trainable_weights=state.trainable, grads=state.grads,
                      optimizer=state.optimizer, activations=acts, logits=logits, comm_buffers=state.comm,
                      slack=slack, host_bytes=host, detail=detail)


def nodes_ranks(world_size: int, nodes: int) -> int:
    """Ranks per node (host memory is per node)."""
    return max(1, math.ceil(world_size / max(1, nodes)))


# --- choosing -------------------------------------------------------------------------------
def micro_batch_efficiency(tokens: int) -> float:
    """Relative tokens/s of a micro-batch of `tokens` tokens (H200 8B LoRA, CALIBRATION):
    4096 -> 0.80, 8192 -> 0.96, >= 16384 -> 1.0, linear in log2(tokens) between, and below 4096
    falling on as from 4096 to 8192."""
    e4, e8 = CALIBRATION["eff_4096"], CALIBRATION["eff_8192"]
    x = math.log2(max(tokens, 1))
    if x >= 14:
        return 1.0
    if x >= 13:
        return e8 + (1.0 - e8) * (x - 13)
    if x >= 12:
        return e4 + (e8 - e4) * (x - 12)
    return max(0.05, e4 - (e8 - e4) * (12 - x))


def recompute_cost(job: JobConfig, mode: str, every: int) -> float:
    """Extra step time from recomputing forwards. Without checkpointing a LoRA step is forward 2N +
    backward 2N (activation gradients only: frozen weights get no weight gradient, DESIGN.md's
    4 N_frozen + 6 N_lora), so one more forward is +50%; a full fine-tune's 6N step gets +33%.
    Selective k recomputes 1/k of the layers; offload is full plus the host copies."""
    full = 1 / 3 if job.peft.method == "none" else 1 / 2
    if mode == "none":
        return 0.0
    if mode == "selective":
        return full / every
    if mode == "full":
        return full
    return full + CALIBRATION["offload_copy_cost"]


def relative_step_time(job: JobConfig, *, micro_batch_size: int, mode: str, every: int) -> float:
    """Step time per token, relative: (1 + recompute) / micro-batch efficiency. Lower is faster."""
    return (1 + recompute_cost(job, mode, every)) / micro_batch_efficiency(micro_batch_size * job.data.max_seq_len)


def _describe(mb: int, mode: str, every: int) -> str:
    ac = f"selective every {every}" if mode == "selective" else mode
    return f"micro-batch {mb}, checkpointing {ac}"


def choose_layout(job: JobConfig, *, world_size: int, nodes: int, budget_gib: float, liger: bool, per_rank_batch: int,
                  micro_batch_size: Optional[int], activation_checkpointing: Optional[str],
                  activation_checkpointing_every: Optional[int]) -> Choice:
    """The fastest predicted layout (relative_step_time) whose planned reserved peak fits in
    `budget_gib` less a safety margin (CALIBRATION["safety_margin"]). Given values are fixed (they
    are still checked). Candidates: micro-batches dividing `per_rank_batch`; none, selective
    (SELECTIVE_EVERY), full, offload. Raises PlanError naming the key when nothing fits."""
    usable = budget_gib * (1 - CALIBRATION["safety_margin"])
    mbs = [micro_batch_size] if micro_batch_size else [m for m in range(1, per_rank_batch + 1) if per_rank_batch % m == 0]
    if activation_checkpointing is not None:
        modes = [(activation_checkpointing, activation_checkpointing_every or (2 if activation_checkpointing == "selective" else 1))]
        if activation_checkpointing == "selective" and activation_checkpointing_every is None:
            modes = [("selective", k) for k in SELECTIVE_EVERY]
    else:
        ks = [activation_checkpointing_every] if activation_checkpointing_every else list(SELECTIVE_EVERY)
        modes = [("none", 1), *[("selective", k) for k in ks], ("full", 1), ("offload", 1)]
    rows = []
    for mb in mbs:
        for mode, k in modes:
            plan = plan_memory(job, world_size=world_size, nodes=nodes, micro_batch_size=mb,
                               activation_checkpointing=mode, activation_checkpointing_every=k, liger=liger)
            rows.append((relative_step_time(job, micro_batch_size=mb, mode=mode, every=k), mb, mode, k, plan.total / GIB))
    rows.sort(key=lambda r: (r[0], r[4]))
    fits = [r for r in rows if r[4] <= usable]
    margin = f"{budget_gib:.1f} GiB less a {CALIBRATION['safety_margin']:.0%} margin = {usable:.1f} GiB"
    if not fits:
        raise PlanError(_no_fit_message(job, rows=rows, usable=usable, margin=margin, world_size=world_size, liger=liger,
                                        fixed_mb=micro_batch_size, fixed_ac=activation_checkpointing))
    best = fits[0]
    why = [f"{_describe(best[1], best[2], best[3])}: planned peak {best[4]:.1f} GiB of {margin}, "
           f"relative step time {best[0]:.2f}"]
    faster = [r for r in rows if r[0] < best[0]]
    if faster:
        r = min(faster, key=lambda r: r[4])
        why.append(f"not {_describe(r[1], r[2], r[3])} (faster, {r[0]:.2f}): needs {r[4]:.1f} GiB")
    elif len(fits) > 1:
        r = fits[1]
        why.append(f"runner-up {_describe(r[1], r[2], r[3])}: relative step time {r[0]:.2f}, {r[4]:.1f} GiB")
    return Choice(micro_batch_size=best[1], activation_checkpointing=best[2], activation_checkpointing_every=best[3],
                  predicted_peak_gib=round(best[4], 2), why=tuple(why))


def _no_fit_message(job: JobConfig, *, rows, usable: float, margin: str, world_size: int, liger: bool,  # type: ignore[no-untyped-def]
                    fixed_mb: Optional[int], fixed_ac: Optional[str]) -> str:
    smallest = min(rows, key=lambda r: r[4])
    key = ("train.micro_batch_size" if fixed_mb and fixed_mb > 1 else
           "train.activation_checkpointing" if fixed_ac and fixed_ac != "offload" else "train.memory_budget_gib")
    hints = []
    # Fewer tokens per micro-batch at the least memory-hungry mode.
    plan1 = plan_memory(job, world_size=world_size, micro_batch_size=1, activation_checkpointing="offload",
                        activation_checkpointing_every=1, liger=liger)
    fixed = plan1.total - plan1.activations - plan1.logits
    per_token = (plan1.activations + plan1.logits) / max(1, job.data.max_seq_len)
    if usable > fixed / GIB:
        fit_tokens = int((usable * GIB - fixed) / per_token)
        hints.append(f"about {fit_tokens:,} tokens per micro-batch (data.max_seq_len x micro-batch) with "
                     f"activation_checkpointing=offload ({plan1.total / GIB:.1f} GiB at micro-batch 1 of {job.data.max_seq_len})")
    if smallest[2] != "offload" and fixed_ac is not None:
        hints.append(f"train.activation_checkpointing=offload ({plan1.total / GIB:.1f} GiB at micro-batch 1)")
    weights = plan1.frozen_weights + plan1.trainable_weights + plan1.grads + plan1.optimizer
    ranks = world_size * 2
    while ranks <= 65536:  # shard arithmetic only: cheap to try each doubling
        more = plan_memory(job, world_size=ranks, micro_batch_size=1, activation_checkpointing="offload",
                           activation_checkpointing_every=1, liger=liger)
        if more.total / GIB <= usable:
            more_w = more.frozen_weights + more.trainable_weights + more.grads + more.optimizer
            hints.append(f"more GPUs: {ranks} ranks (weights, gradients and optimizer {weights / GIB:.1f} GiB per rank "
                         f"at {world_size}, {more_w / GIB:.1f} GiB at {ranks}; {more.total / GIB:.1f} GiB in all at "
                         f"micro-batch 1 with offload)")
            break
        ranks *= 2
    if job.peft.method != "qlora":
        hints.append("peft=qlora (4-bit frozen base weights)")
    return (f"{key}: nothing fits in {margin}: the smallest layout, {_describe(smallest[1], smallest[2], smallest[3])}, "
            f"needs {smallest[4]:.1f} GiB. What would fit: {'; '.join(hints) or 'a bigger GPU'}")


# --- printing -------------------------------------------------------------------------------
def plan_json(job: JobConfig, plan: MemoryPlan, *, micro_batch_size: int, activation_checkpointing: str,
              activation_checkpointing_every: int, liger: bool, choice: Optional[Choice] = None,
              budget_gib: Optional[float] = None, error: Optional[str] = None) -> dict[str, Any]:
    d = plan.as_dict()
    return {"world_size": plan.detail["world_size"], "nodes": plan.detail["nodes"], "budget_gib": budget_gib,
            "micro_batch_size": micro_batch_size, "activation_checkpointing": activation_checkpointing,
            "activation_checkpointing_every": activation_checkpointing_every, "liger": liger,
            "total_gib": round(plan.total / GIB, 3), "allocated_gib": round(plan.detail["allocated"] / GIB, 3),
            "host_gib": round(plan.host_bytes / GIB, 3),
            "components": {k: round(d[k] / GIB, 3) for k in MemoryPlan.GPU_FIELDS},
            "detail": {k: v for k, v in plan.detail.items() if k != "activation_bytes_per_layer_by_op"},
            "why": list(choice.why) if choice else [], "error": error}


def format_plan(plan: MemoryPlan) -> str:
    lines = [f"{'component (per rank)':<24}{'GiB':>10}"]
    for f in MemoryPlan.GPU_FIELDS:
        lines.append(f"{f:<24}{getattr(plan, f) / GIB:>10.2f}")
    lines.append(f"{'GPU total (reserved)':<24}{plan.total / GIB:>10.2f}")
    lines.append(f"{'  of which allocated':<24}{plan.detail['allocated'] / GIB:>10.2f}")
    lines.append(f"{'host per node':<24}{plan.host_bytes / GIB:>10.2f}")
    return "\n".join(lines)
