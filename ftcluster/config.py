"""The one typed config tree: the schema, and nothing else.

Dataclasses here are the schema; YAML files under `conf/` select and fill variants (Hydra groups).
`ftcluster/compose.py` registers them with Hydra, composes (unknown keys and wrong types fail
there), turns the result into these dataclasses with `OmegaConf.to_object`, and runs
`JobConfig.validate()`: each group's `validate()`, then the cross-field rules, naming the key.
(Not `__post_init__`: Hydra builds the schema's defaults itself, and a default may be legitimately
incomplete until composed.) The checks here need nothing but the config: no filesystem, no other
ftcluster module (this module imports none), no device or process group. Checks that look outside
the config (paths, the model's own config.json, the backend's checks) are compose.py's
`check_job_paths` and the backend's `check_job`. The config is never mutated after validation:
derived facts (world size, accumulation, mesh) live in their own objects.

Choice sets are tuples written once (`MODEL_INITS`, ...) and used by the validation; values stay
plain strings (not Enums) so the resolved config dumps to YAML as written and compares as `==`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Union

from omegaconf import MISSING


class ConfigError(ValueError):
    """A config value is wrong. The message starts with the dotted key."""


def _fail(key: str, msg: str) -> None:
    raise ConfigError(f"{key}: {msg}")


def _require(ok: bool, key: str, msg: str) -> None:
    if not ok:
        _fail(key, msg)


def _one_of(value: str, key: str, choices: tuple[str, ...]) -> None:
    _require(value in choices, key, f"must be one of {', '.join(choices)}; got {value!r}")


# A count that is either a positive int or `auto`. OmegaConf 2.3 supports a Union of primitive
# types (a UnionNode): `launcher.nproc_per_node=2` on the command line arrives as the int 2 and
# `=auto` as the string; floats, bools and containers fail at compose naming the key. (`Any` would
# accept anything and leave the check to validate; `str`, the old type, turned 2 into "2".)
# A digit string (a quoted '2' in YAML, or a config saved when these fields were `str`) is
# accepted by the validation too, so code reading these fields goes through `int(...)`.
IntOrAuto = Union[int, str]
BoolOrStr = Union[bool, str]
"""A mode name, or a boolean as the old on/off switch (train.activation_checkpointing)."""
AUTO = "auto"


def _int_or_auto(value: Any, key: str, *, allowed: Optional[tuple[int, ...]] = None, lowest: int = 1,
                 hint: str = "") -> None:
    v = int(value) if isinstance(value, str) and value.isdigit() else value
    if v == AUTO:
        return
    ok = isinstance(v, int) and not isinstance(v, bool) and (v in allowed if allowed else v >= lowest)
    what = f"one of {', '.join(map(str, allowed))}" if allowed else f"an int >= {lowest}"
    _require(ok, key, f"must be {what} or 'auto'{hint}; got {value!r}")


# Whole words of a key name: `api_key`, `hf_token`, `WANDB_API_KEY` match; `tokenizer` does not.
# `tokens` (plural) is a count (`max_new_tokens`), not a credential: only the singular matches.
_SECRET_RE = re.compile(r"(^|[_\-.])(keys?|token|secrets?|passwords?|passwd|credentials?|auth)($|[_\-.])", re.IGNORECASE)


def is_secret_name(name: str) -> bool:
    """True when a key or environment variable name looks like it holds a secret."""
    return bool(_SECRET_RE.search(name))


@dataclass(kw_only=True)
class RunConfig:
    name: str = "default"
    """Run name; names the default run directory and the W&B run."""
    dir: str = "runs/${run.name}"
    """Run directory (config.yaml, metrics.jsonl, logs/, checkpoints/). Relative paths are taken
    from the directory `ftcluster` was started in and made absolute once, by the driver."""

    def validate(self) -> None:
        _require(bool(self.name) and "/" not in self.name, "run.name", f"must be a non-empty name without '/'; got {self.name!r}")
        _require(bool(self.dir), "run.dir", "must not be empty")


MODEL_INITS = ("pretrained", "random")
MODEL_ARCHS = ("llama", "qwen2")
ROPE_SCALING_TYPES = ("linear", "dynamic", "yarn", "llama3")
S2_ATTN = "s2_attn"
"""`model.attn_implementation` of LongLoRA's shifted sparse attention (ftcluster/attention.py)."""
SHAPE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads")


@dataclass(kw_only=True)
class ModelConfig:
    path: Optional[str] = None
    """Local Hugging Face model directory (config.json + *.safetensors). Never a hub id: nothing is downloaded."""
    init: str = "pretrained"
    """`pretrained`: load weights from `path`. `random`: initialise from the seed (tests, benchmarks)."""
    tokenizer: Optional[str] = None
    """Local tokenizer directory; defaults to `path`."""
    trust_remote_code: bool = False
    """Allow a model directory's own Python code to run. Off unless asked."""
    attn_implementation: str = "sdpa"
    """Attention kernel registered with transformers (`sdpa`, `eager`, `flash_attention_2`, ...,
    or `s2_attn`: LongLoRA's shifted sparse attention in training, full attention in evaluation)."""
    s2_group_size_ratio: float = 0.25
    """`attn_implementation=s2_attn`: group size as a fraction of each batch's sequence length
    (LongLoRA: 1/4), rounded down, at least 2 tokens. Any length works: the last group may be
    shorter. Evaluation and generation use full attention."""
    s2_group_size: Optional[int] = None
    """`attn_implementation=s2_attn`: absolute group size in tokens (>= 2); overrides
    `s2_group_size_ratio`."""
    # Shape, used when `path` is unset (random init from a named architecture).
    arch: str = "llama"
    """Architecture for shape-only models: `llama` or `qwen2`."""
    vocab_size: int = 0
    """Shape-only model: vocabulary size (tokens)."""
    hidden_size: int = 0
    """Shape-only model: model (residual stream) width."""
    intermediate_size: int = 0
    """Shape-only model: width of the MLP's inner (gate/up) projection."""
    num_layers: int = 0
    """Shape-only model: decoder layers."""
    num_heads: int = 0
    """Shape-only model: query heads per layer (must divide hidden_size)."""
    num_kv_heads: int = 0
    """Shape-only model: key/value heads per layer (grouped-query attention; must divide num_heads)."""
    max_position_embeddings: int = 8192
    """Shape-only model: context the model was built for, in tokens (the original context for RoPE scaling)."""
    rope_theta: float = 500000.0
    """Shape-only model: RoPE base (Llama-3's 500000; Qwen2.5's 1000000)."""
    rms_norm_eps: float = 1e-5
    """Shape-only model: epsilon of every RMSNorm."""
    tie_word_embeddings: bool = False
    """Shape-only model: the output head shares the input embedding matrix."""
    # Context extension (ftcluster/rope.py). Unset: the model's own RoPE parameters are kept.
    rope_scaling_type: Optional[str] = None
    """RoPE scaling written into the model config: `linear` (position interpolation, LongLoRA's
    choice), `dynamic` (dynamic NTK), `yarn`, `llama3`. Unset with `extend_context_to`: the model's
    own scaling type if it has one of these, else `linear`."""
    rope_scaling_factor: Optional[float] = None
    """Context scaling factor (>= 1) relative to the model's original (pre-training) context."""
    extend_context_to: Optional[int] = None
    """Target context in tokens: factor = this / the model's original maximum position
    (`original_max_position_embeddings` if the config has one, else `max_position_embeddings`);
    `max_position_embeddings` becomes this (kept at the original for `dynamic`, whose scaling
    starts there). Must exceed the model's current context."""
    rope_beta_fast: float = 32.0
    """YaRN: rotations above which dimensions are extrapolated (not interpolated)."""
    rope_beta_slow: float = 1.0
    """YaRN: rotations below which dimensions are fully interpolated."""
    rope_attention_factor: Optional[float] = None
    """YaRN: attention (cos/sin) scale; unset: 0.1 * ln(factor) + 1, as in the paper."""
    rope_low_freq_factor: float = 1.0
    """llama3: wavelengths above original / low_freq_factor are divided by the factor (Meta's 1)."""
    rope_high_freq_factor: float = 4.0
    """llama3: wavelengths below original / high_freq_factor are kept (Meta's 4)."""
    liger: str = AUTO
    """Use Liger kernels (pip install liger-kernel; GPU only): RMSNorm, SwiGLU and RoPE Triton
    kernels in the model, and a fused linear cross-entropy loss instead of the chunked one.
    `auto` (default): on where liger-kernel is installed, the ranks run on CUDA and Liger has
    kernels for the model type; `true` insists (a clear error otherwise); `false`: never."""
    compile: bool = False
    """torch.compile each decoder layer in place (after PEFT and checkpointing, before sharding;
    parameter names unchanged): fuses the LoRA update, dropout and elementwise ops. GPU only: on a
    CPU rank the layers stay eager (one warning). Under train.activation_checkpointing=offload the
    layer's forward inside the checkpoint is compiled (ftcluster/model/compile.py). The first steps
    pay the compile time."""

    def validate(self) -> None:
        """Value checks only; that `path`/`tokenizer` exist and the context check against a model
        directory's config.json are compose.py's `check_job_paths`."""
        _one_of(self.init, "model.init", MODEL_INITS)
        tri_state(self.liger, "model.liger")
        self._validate_rope()
        if self.attn_implementation == S2_ATTN:
            _require(0.0 < self.s2_group_size_ratio <= 1.0, "model.s2_group_size_ratio",
                     f"must be in (0, 1]; got {self.s2_group_size_ratio}")
            _require(self.s2_group_size is None or self.s2_group_size >= 2, "model.s2_group_size",
                     f"must be >= 2 (the shifted half of the heads moves by group_size // 2); got {self.s2_group_size}")
        if self.init == "pretrained":
            _require(self.path is not None, "model.path", "required with model.init=pretrained (a local Hugging Face directory)")
        if self.path is None:
            _one_of(self.arch, "model.arch", MODEL_ARCHS)
            for name in SHAPE_FIELDS:
                _require(getattr(self, name) > 0, f"model.{name}", "must be > 0 when model.path is unset (shape-only model)")
            _require(self.hidden_size % self.num_heads == 0, "model.num_heads", "must divide model.hidden_size")
            _require(self.num_heads % self.num_kv_heads == 0, "model.num_kv_heads", "must divide model.num_heads")
            if self.extend_context_to is not None:
                check_context_extension(self.extend_context_to, current=self.max_position_embeddings)

    def _validate_rope(self) -> None:
        kind, factor, target = self.rope_scaling_type, self.rope_scaling_factor, self.extend_context_to
        if kind is not None:
            _one_of(kind, "model.rope_scaling_type", ROPE_SCALING_TYPES)
            _require(factor is not None or target is not None, "model.rope_scaling_factor",
                     f"required with model.rope_scaling_type={kind} (or set model.extend_context_to)")
        if factor is not None:
            _require(kind is not None, "model.rope_scaling_type", "required with model.rope_scaling_factor")
            _require(factor >= 1.0, "model.rope_scaling_factor", f"must be >= 1; got {factor}")
            _require(target is None, "model.extend_context_to", "set it or model.rope_scaling_factor, not both")
        _require(self.rope_beta_fast > self.rope_beta_slow > 0, "model.rope_beta_fast",
                 f"must be > model.rope_beta_slow > 0; got {self.rope_beta_fast}, {self.rope_beta_slow}")
        _require(self.rope_high_freq_factor > self.rope_low_freq_factor > 0, "model.rope_high_freq_factor",
                 f"must be > model.rope_low_freq_factor > 0; got {self.rope_high_freq_factor}, {self.rope_low_freq_factor}")


def check_context_extension(target: int, *, current: int) -> None:
    """`model.extend_context_to` against the model's current context (tokens): below it (e.g. 32768
    on Llama-3.1's 131072) the new factor would shrink the context."""
    _require(target > current, "model.extend_context_to",
             f"must exceed the model's current context of {current} tokens; got {target}")


DATA_FORMATS = ("messages", "prompt_completion", "alpaca", "text", "synthetic")
OVERLENGTH_POLICIES = ("truncate", "drop", "error")
PACKING_MODES = ("auto", "true", "false")


@dataclass(kw_only=True)
class DataSourceConfig:
    """One dataset of a mix (`data.sources`). Unset fields take the value of the same `data.` key."""
    path: str = MISSING
    """File(s), glob, or dataset directory, as `data.path`."""
    format: Optional[str] = None
    """As `data.format` (not `synthetic`); unset: `data.format`."""
    messages_field: Optional[str] = None
    """As `data.messages_field`; unset: that key."""
    prompt_field: Optional[str] = None
    """As `data.prompt_field`; unset: that key."""
    completion_field: Optional[str] = None
    """As `data.completion_field`; unset: that key."""
    instruction_field: Optional[str] = None
    """As `data.instruction_field`; unset: that key."""
    input_field: Optional[str] = None
    """As `data.input_field`; unset: that key."""
    output_field: Optional[str] = None
    """As `data.output_field`; unset: that key."""
    text_field: Optional[str] = None
    """As `data.text_field`; unset: that key."""
    weight: Optional[float] = None
    """Share of this source among the weighted sources, in samples per mix epoch (> 0; weights are
    normalised over the weighted sources, whose mix epoch holds as many samples as they have
    together). Exclusive with `epochs`; neither set: weight 1."""
    epochs: Optional[float] = None
    """Passes over this source per mix epoch (> 0, may be fractional: 0.5 is a seeded half,
    2 every sample twice). Exclusive with `weight`."""

    def validate(self, key: str) -> None:
        _require(bool(self.path) and self.path != MISSING, f"{key}.path", "required")
        _require(self.format is None or (self.format in DATA_FORMATS and self.format != "synthetic"), f"{key}.format",
                 f"must be one of {', '.join(f for f in DATA_FORMATS if f != 'synthetic')}; got {self.format!r}")
        _require(self.weight is None or self.epochs is None, f"{key}.weight", "set weight or epochs, not both")
        _require(self.weight is None or self.weight > 0, f"{key}.weight", f"must be > 0; got {self.weight}")
        _require(self.epochs is None or self.epochs > 0, f"{key}.epochs", f"must be > 0; got {self.epochs}")


@dataclass(kw_only=True)
class DataConfig:
    path: str = ""
    """A JSONL/JSON/Parquet file, a comma-separated list or glob of them, or a local dataset directory
    (`datasets.save_to_disk` layout or a folder of data files). Unused for `format=synthetic`."""
    format: str = "messages"
    """`messages` (chat turns, rendered with the chat template), `prompt_completion`, `alpaca`
    (instruction/input/output), `text` (every token supervised), `synthetic` (random tokens, benchmarks)."""
    split: str = "train"
    """Split to read, with `datasets` slice syntax (`train[:1000]`): data files form one split of
    this name; a saved `DatasetDict` directory is indexed by it."""
    max_seq_len: int = 512
    """Tokens per sample after rendering."""
    overlength: str = "truncate"
    """Samples longer than max_seq_len: `truncate` (keep the first max_seq_len tokens), `drop`, `error`."""
    shuffle: bool = True
    """Shuffle sample order each epoch (seeded by `seed`)."""
    chat_template: Optional[str] = None
    """Jinja chat template overriding the tokenizer's own (required if the tokenizer has none)."""
    messages_field: str = "messages"
    """`format=messages`: column holding the list of {role, content} turns."""
    prompt_field: str = "prompt"
    """`format=prompt_completion`: column of the prompt (not supervised)."""
    completion_field: str = "completion"
    """`format=prompt_completion`: column of the completion (supervised)."""
    instruction_field: str = "instruction"
    """`format=alpaca`: column of the instruction."""
    input_field: str = "input"
    """`format=alpaca`: column of the optional input."""
    output_field: str = "output"
    """`format=alpaca`: column of the response (supervised)."""
    text_field: str = "text"
    """`format=text`: column of the text (every token supervised)."""
    chosen_field: str = "chosen"
    """`objective=dpo`: column of the preferred response (a string with `format=prompt_completion`;
    a list of assistant turns, usually one, with `format=messages`, whose `messages_field` then
    holds the prompt turns)."""
    rejected_field: str = "rejected"
    """`objective=dpo`: column of the dispreferred response (same shape as `chosen_field`)."""
    synthetic_samples: int = 4096
    """Number of random samples for `format=synthetic` (each exactly max_seq_len tokens)."""
    num_proc: int = 1
    """Worker processes for tokenisation (datasets.map)."""
    eval_path: Optional[str] = None
    """Held-out data for evaluation, in the same format, fields and loaders as `path` (file, list,
    glob, folder or saved dataset). Exclusive with eval_fraction / eval_samples."""
    eval_fraction: float = 0.0
    """Hold out this fraction (0 < f < 1) of the training samples for evaluation: a deterministic
    split by `seed`, the same whatever the world size, disjoint from the samples trained on."""
    eval_samples: int = 0
    """Hold out this many training samples for evaluation (instead of a fraction)."""
    packing: str = "auto"
    """`true`: pack samples into rows of up to max_seq_len tokens (padding-free: position ids
    restart and attention never crosses samples; the loss per sample is unchanged);
    train.micro_batch_size then counts rows. `false`: one right-padded row per sample. `auto`:
    pack when the data has samples shorter than max_seq_len (never for format=synthetic, whose
    samples fill the row). Evaluation is never packed."""
    packing_window: int = 1024
    """Samples (in data order) packed together by first-fit decreasing: larger fills rows better,
    smaller keeps the order closer to the shuffle. >= 1."""
    sources: List[DataSourceConfig] = field(default_factory=list)
    """A mix of datasets instead of `path`: each with its path, format, field names and a weight
    or epochs; deterministic by seed, packed together, resumable; realised proportions are logged."""

    @property
    def has_eval(self) -> bool:
        """Whether held-out data is configured."""
        return self.eval_path is not None or self.eval_fraction > 0 or self.eval_samples > 0
    max_row_chars: Optional[int] = None
    """Characters of text per row (the sum over the fields the format reads; chat: the turns'
    contents) above which `overlength` applies before the row reaches the tokenizer, so one huge
    line cannot exhaust host memory. Unset: 64 x max_seq_len (no usual token is longer than 64
    characters, so `truncate` keeps the same first max_seq_len tokens). `truncate` cuts the text
    in rendering order (fields in the order the template places them, chat turns in order, the
    turn that crosses the cap cut, later turns left out); `drop` and `error` treat the row as
    longer than max_seq_len."""

    def row_char_cap(self) -> int:
        """`max_row_chars`, or its default 64 x max_seq_len."""
        return self.max_row_chars if self.max_row_chars is not None else 64 * self.max_seq_len

    def validate(self) -> None:
        _one_of(self.format, "data.format", DATA_FORMATS)
        _require(0.0 <= self.eval_fraction < 1.0, "data.eval_fraction", f"must be in [0, 1); got {self.eval_fraction}")
        _require(self.eval_samples >= 0, "data.eval_samples", f"must be >= 0; got {self.eval_samples}")
        _require(sum([self.eval_path is not None, self.eval_fraction > 0, self.eval_samples > 0]) <= 1,
                 "data.eval_path", "set one of data.eval_path, data.eval_fraction, data.eval_samples")
        _require(self.eval_path is None or bool(self.eval_path), "data.eval_path", "must not be empty")
        _one_of(self.overlength, "data.overlength", OVERLENGTH_POLICIES)
        _require(self.max_seq_len >= 2, "data.max_seq_len", f"must be >= 2; got {self.max_seq_len}")
        _require(self.num_proc >= 1, "data.num_proc", f"must be >= 1; got {self.num_proc}")
        _require(self.max_row_chars is None or self.max_row_chars >= 1, "data.max_row_chars",
                 f"must be >= 1 (unset: 64 x data.max_seq_len); got {self.max_row_chars}")
        _one_of(str(self.packing).lower(), "data.packing", PACKING_MODES)
        _require(self.packing_window >= 1, "data.packing_window", f"must be >= 1; got {self.packing_window}")
        if self.sources:
            _require(not self.path, "data.path", "set data.path or data.sources, not both")
            _require(self.format != "synthetic", "data.sources", "a mix of files; not with data.format=synthetic")
            _require(self.eval_fraction == 0 and self.eval_samples == 0, "data.eval_fraction",
                     "with data.sources hold out data through data.eval_path")
            for i, src in enumerate(self.sources):
                src.validate(f"data.sources[{i}]")
        elif self.format == "synthetic":
            _require(self.synthetic_samples >= 1, "data.synthetic_samples", "must be >= 1")
        else:
            _require(bool(self.path), "data.path", f"required for data.format={self.format}")

    @property
    def packing_mode(self) -> str:
        """`data.packing` as one of auto/true/false (a YAML boolean reads as true/false)."""
        return str(self.packing).lower()


PEFT_METHODS = ("none", "lora", "qlora", "longlora")


@dataclass(kw_only=True)
class PeftConfig:
    method: str = "none"
    """`none` (full fine-tuning), `lora`, `qlora` (LoRA over a frozen base quantised to
    bitsandbytes NF4 with double quantisation, stored sharded by FSDP2, de-quantised to the
    compute dtype `train.dtype` on the fly; see ftcluster/quant.py), or `longlora` (LoRA +
    `trainable_modules`, normally the embeddings and norms (LongLoRA+); `peft=longlora` also
    selects S2-Attn, `model.attn_implementation=s2_attn`, used in training only)."""
    rank: int = 16
    """LoRA rank r: inner dimension of each adapter (A: r x in, B: out x r)."""
    alpha: float = 32.0
    """LoRA scaling numerator: the adapter's output is multiplied by alpha / rank."""
    dropout: float = 0.0
    """Dropout probability on the adapter's input, in [0, 1) (training only)."""
    target_modules: List[str] = field(default_factory=lambda: ["all-linear"])
    """Module name suffixes that get adapters; `all-linear` means every linear projection of the
    decoder layers (not the output head)."""
    trainable_modules: List[str] = field(default_factory=list)
    """Modules trained in full next to the adapters, as fp32 master weights: each entry matches a
    module whose dotted name ends with it as whole components (`norm` is the final norm only,
    `input_layernorm` every layer's). An entry matching nothing is an error."""
    fused: str = AUTO
    """Run each LoRA linear as one fused autograd node (ftcluster/model/fused_lora.py): the base
    projection and the low-rank update in one pass, the update accumulated by the same GEMM, no
    separate adapter output tensor. Same losses within float rounding; on one H200 (8B LoRA, seq
    4096) 1.06x the tokens/s of peft's forward (bench/RESULTS.md, issue 18). `auto` (default): on
    where the ranks run on CUDA with an adapter method, peft.dropout=0 and a backend other than
    zero3, else off (the layout says why); `true` insists (a clear error where it cannot apply);
    `false`: peft's own forward."""
    fp8_base: bool = False
    """Store the frozen base linears of the decoder layers in float8 e4m3 (per-row scales) and run
    their forward and input-gradient GEMMs in FP8 (ftcluster/fp8.py): faster GEMMs on GPUs with FP8
    tensor cores (compute capability 8.9+), the same memory as bf16. An approximation of the base
    (each weight to e4m3's 3-bit mantissa; tests/test_fp8.py is the accuracy check; one H200, 8B LoRA 4k:
    1.26x the bf16 default's tokens/s, losses within 1.1e-3 relative over 20 steps, bench/RESULTS.md);
    adapters, their gradients and the loss stay in `train.dtype`. LoRA or LongLoRA with
    parallel=fsdp2 only; export merges into the original weights."""

    def validate(self) -> None:
        _one_of(self.method, "peft.method", PEFT_METHODS)
        if self.method != "none":
            _require(self.rank >= 1, "peft.rank", f"must be >= 1; got {self.rank}")
            _require(self.alpha > 0, "peft.alpha", f"must be > 0; got {self.alpha}")
            _require(0.0 <= self.dropout < 1.0, "peft.dropout", f"must be in [0, 1); got {self.dropout}")
            _require(len(self.target_modules) > 0, "peft.target_modules", "must name at least one module")
        _require(self.method != "none" or not self.trainable_modules, "peft.trainable_modules",
                 "only with an adapter method (peft=none trains every parameter already)")
        fused = tri_state(self.fused, "peft.fused")
        _require(self.method != "none" or not fused, "peft.fused", "only with an adapter method (lora, qlora, longlora)")
        _require(not fused or self.dropout == 0.0, "peft.fused",
                 f"the fused LoRA linear has no dropout; set peft.dropout=0 (got {self.dropout}) or peft.fused=false")
        _require(all(bool(m) and not m.startswith(".") and not m.endswith(".") for m in self.trainable_modules),
                 "peft.trainable_modules", f"entries must be module names like embed_tokens; got {self.trainable_modules}")
        _require(not self.fp8_base or self.method in ("lora", "longlora"), "peft.fp8_base",
                 f"only with peft=lora or longlora (a frozen bf16 base to store in FP8); got peft.method={self.method}")


# --- objective: one schema per training objective (`objective=sft|dpo`) -------------------------
OBJECTIVE_KINDS = ("sft", "dpo")
PREFERENCE_LOSSES = ("sigmoid", "ipo", "simpo")
REFERENCE_FREE_LOSSES = ("simpo",)
REFERENCE_SOURCES = ("auto", "adapters", "precompute", "model")


@dataclass(kw_only=True)
class SFTObjectiveConfig:
    """`objective=sft`: token-level cross-entropy on the supervised tokens (ftcluster/objectives/sft.py)."""
    kind: str = "sft"
    """Objective name (`sft`)."""

    def validate(self) -> None:
        _require(self.kind == "sft", "objective.kind", f"must be sft for this schema; got {self.kind!r}")


@dataclass(kw_only=True)
class DPOObjectiveConfig:
    """`objective=dpo`: preference optimisation on (prompt, chosen, rejected) pairs
    (ftcluster/objectives/dpo.py). Log-probs are sums over a response's tokens (SimPO: means)."""
    kind: str = "dpo"
    """Objective name (`dpo`)."""
    loss: str = "sigmoid"
    """`sigmoid`: DPO, -log sigmoid(beta * (policy log-ratio - reference log-ratio)) (Rafailov et al.
    2023, arXiv:2305.18290). `ipo`: (log-ratio difference - 1 / (2 beta))^2 (Azar et al. 2023,
    arXiv:2310.12036). `simpo`: reference-free, -log sigmoid(beta * (mean log-prob of chosen - of
    rejected) - simpo_gamma) (Meng et al. 2024, arXiv:2405.14734)."""
    beta: float = 0.1
    """DPO/IPO: the KL penalty's strength (IPO: the target margin is 1 / (2 beta)); SimPO: the
    reward scale (the paper uses 2.0-2.5)."""
    label_smoothing: float = 0.0
    """sigmoid/simpo: probability that a pair's preference label is flipped (conservative DPO,
    Mitchell 2023), in [0, 0.5)."""
    simpo_gamma: float = 0.5
    """simpo: target reward margin gamma, in reward units (the paper's gamma; 0.5-1.6 there)."""
    reference: str = "auto"
    """Where reference log-probs come from (DPO/IPO; SimPO needs none): `adapters` (LoRA/QLoRA: the
    same sharded model with its adapters disabled, one extra no-grad forward per micro-batch),
    `precompute` (one sharded no-grad pass over every training and held-out pair before step 1,
    stored in `<run.dir>/reference_logps.safetensors` keyed by row, reused on resume at any world
    size), `model` (full fine-tuning: a frozen copy of the model, sharded by the same backend and
    loaded from the same weights, run without autograd before each forward; costs a second copy of
    the weights, sharded, and one extra forward per micro-batch; nothing stored, never checkpointed),
    `auto`: adapters with an adapter method, precompute for full fine-tuning."""

    @property
    def reference_free(self) -> bool:
        return self.loss in REFERENCE_FREE_LOSSES

    def reference_source(self, peft_method: str) -> str:
        """`none`, `adapters`, `precompute` or `model`: `reference` with `auto` resolved for `peft_method`."""
        if self.reference_free:
            return "none"
        if self.reference != "auto":
            return self.reference
        return "precompute" if peft_method == "none" else "adapters"

    def validate(self) -> None:
        _require(self.kind == "dpo", "objective.kind", f"must be dpo for this schema; got {self.kind!r}")
        _one_of(self.loss, "objective.loss", PREFERENCE_LOSSES)
        _require(self.beta > 0, "objective.beta", f"must be > 0; got {self.beta}")
        _require(0.0 <= self.label_smoothing < 0.5, "objective.label_smoothing",
                 f"must be in [0, 0.5); got {self.label_smoothing}")
        _require(self.simpo_gamma >= 0, "objective.simpo_gamma", f"must be >= 0; got {self.simpo_gamma}")
        _one_of(self.reference, "objective.reference", REFERENCE_SOURCES)


OBJECTIVE_SCHEMAS: dict[str, type] = {"sft": SFTObjectiveConfig, "dpo": DPOObjectiveConfig}
"""`objective.kind` (ConfigStore `objective_<kind>_schema`) -> dataclass."""


def objective_schema(kind: str) -> type:
    """The schema of an `objective.kind` value. Raises ConfigError for an unknown kind."""
    _one_of(kind, "objective.kind", OBJECTIVE_KINDS)
    return OBJECTIVE_SCHEMAS[kind]


# --- parallel: one schema per backend family (`parallel=fsdp2|zero1|zero2|zero3`) ---------------
FSDP2_BACKEND = "fsdp2"
ZERO_BACKENDS = ("zero1", "zero2", "zero3")
PARALLEL_BACKENDS = (FSDP2_BACKEND, *ZERO_BACKENDS)
REDUCE_DTYPES = ("fp32", "bf16")
ZERO_OPTIMIZERS = ("torch", "deepspeed")


@dataclass(kw_only=True)
class FSDP2Config:
    """`parallel=fsdp2`: torch FSDP2 (`fully_shard` per decoder layer and on the root)."""
    backend: str = FSDP2_BACKEND
    """`fsdp2` (this schema)."""
    reduce_dtype: str = "fp32"
    """Precision of gradient reduction across ranks (`fp32` or `bf16`)."""
    cpu_offload: bool = False
    """Keep sharded parameters, gradients and optimizer state in host memory (CPUOffloadPolicy;
    needs GPUs)."""
    reshard_after_forward: bool = True
    """Free unsharded layer weights after forward (ZeRO-3 style). False keeps them until
    backward (less communication, more memory)."""
    defer_grad_sync: Union[bool, str] = "auto"
    """With train.grad_accum > 1: reduce-scatter gradients once per step, after the last
    micro-batch, instead of after every one (`true`), or never defer (`false`). Deferring keeps
    unsharded fp32 gradients of the trainable parameters for the whole step. `auto`: defer on GPU
    ranks when the trainable parameters are at most 5% of the model (adapter runs), where that
    memory is small; on CPU ranks the per-micro-batch reduction is kept (same sums, same order as
    without accumulation)."""
    shard_frozen: str = AUTO
    """Shard the frozen parameters (an adapter run's base weights, QLoRA's NF4 state) across the
    ranks like the trained ones (`true`), or leave them whole on every rank and outside FSDP2
    (`false`: no per-layer all-gather of them at all, at the cost of a whole frozen model per
    rank). `auto` (default): shard them when there are several ranks; at world size 1 leave them
    out, since a one-way "shard" still copies every layer into FSDP2's all-gather buffers each
    forward and backward (2.8 GiB and two copies of the weights per step for an 8B model)."""

    def shards_frozen(self, *, world_size: int) -> bool:
        """`shard_frozen` resolved for this world size (the engine and the plan both read it here)."""
        choice = tri_state(self.shard_frozen, "parallel.shard_frozen")
        return world_size > 1 if choice is None else choice

    def validate(self) -> None:
        tri_state(self.shard_frozen, "parallel.shard_frozen")
        _require(self.backend == FSDP2_BACKEND, "parallel.backend", f"must be {FSDP2_BACKEND!r} for this schema; got {self.backend!r}")
        _one_of(self.reduce_dtype, "parallel.reduce_dtype", REDUCE_DTYPES)
        _require(self.defer_grad_sync in (True, False, "auto"), "parallel.defer_grad_sync",
                 f"must be true, false or auto; got {self.defer_grad_sync!r}")


@dataclass(kw_only=True)
class ZeroConfig:
    """`parallel=zero1|zero2|zero3`: DeepSpeed ZeRO. The DeepSpeed config is generated from these
    fields (ftcluster/parallel/deepspeed.py)."""
    backend: str = MISSING
    """DeepSpeed ZeRO stage: `zero1` (optimizer state sharded), `zero2` (+ gradients), `zero3`
    (+ parameters, partitioned as they are created)."""
    reduce_dtype: str = "fp32"
    """Precision of gradient reduction across ranks (`fp32` or `bf16`)."""
    cpu_offload: bool = False
    """Keep state in host memory and run the optimizer step on the CPU. zero1/zero2: optimizer
    state, fp32 master weights and gradients (ZeRO-Offload). zero3: those and the parameters."""
    zero_optimizer: str = "torch"
    """Optimizer implementation: `torch` (torch.optim.AdamW, fused kernel; nothing to compile, the
    same update as fsdp2) or `deepspeed` (DeepSpeed's FusedAdam, or DeepSpeedCPUAdam with
    cpu_offload; JIT-compiled C++/CUDA ops that need a compiler and, on GPU, a valid
    TORCH_CUDA_ARCH_LIST)."""
    overlap_comm: bool = True
    """Overlap gradient reduction (and zero3 parameter gathering) with compute."""
    reduce_bucket_size: int = 500_000_000
    """Elements per gradient-reduction bucket."""
    allgather_bucket_size: int = 500_000_000
    """zero1/zero2: elements per all-gather of updated parameters after the optimizer step."""
    stage3_prefetch_bucket_size: int = 50_000_000
    """zero3: elements of parameters gathered ahead of the layer that needs them."""
    stage3_param_persistence_threshold: int = 100_000
    """zero3: parameters with fewer elements stay gathered for the whole step (norms, biases)."""
    stage3_max_live_parameters: int = 1_000_000_000
    """zero3: most gathered parameter elements alive at once per rank."""
    stage3_max_reuse_distance: int = 1_000_000_000
    """zero3: keep a gathered parameter if it is used again within this many elements."""
    stage3_gather_per_layer: bool = True
    """zero3: gather each decoder layer's parameters as one unit when the layer starts (DeepSpeed
    "leaf modules"), as FSDP2 does, instead of one gather per linear. False restores DeepSpeed's
    per-submodule hooks: each one costs Python time and, when more than two gathers are in flight,
    a host sync (bench/RESULTS.md measures the difference)."""
    deepspeed_overrides: dict[str, Any] = field(default_factory=dict)
    """Further DeepSpeed config keys, merged recursively over the config ftcluster generates and
    checked by DeepSpeed's own config model when the job is validated (before any process starts).
    Keys ftcluster owns (batch sizes, accumulation, clipping, precision, ZeRO stage and offload,
    optimizer, scheduler) are refused there: set them through their typed fields. On the command
    line new keys take Hydra's `+`: `+parallel.deepspeed_overrides.zero_optimization.sub_group_size=100000000`."""

    def validate(self) -> None:
        _one_of(self.backend, "parallel.backend", ZERO_BACKENDS)
        _one_of(self.reduce_dtype, "parallel.reduce_dtype", REDUCE_DTYPES)
        _one_of(self.zero_optimizer, "parallel.zero_optimizer", ZERO_OPTIMIZERS)
        for name in ("reduce_bucket_size", "allgather_bucket_size", "stage3_prefetch_bucket_size",
                     "stage3_max_live_parameters", "stage3_max_reuse_distance"):
            _require(getattr(self, name) > 0, f"parallel.{name}", f"must be > 0; got {getattr(self, name)}")
        _require(self.stage3_param_persistence_threshold >= 0, "parallel.stage3_param_persistence_threshold", "must be >= 0")


PARALLEL_SCHEMAS: dict[str, type] = {"fsdp2": FSDP2Config, "zero": ZeroConfig}
"""Schema name (ConfigStore `parallel_<name>_schema`) -> dataclass."""


def parallel_schema(backend: str) -> type:
    """The schema of a `parallel.backend` value. Raises ConfigError for an unknown backend."""
    _one_of(backend, "parallel.backend", PARALLEL_BACKENDS)
    return FSDP2Config if backend == FSDP2_BACKEND else ZeroConfig


@dataclass(kw_only=True)
class LocalLauncherConfig:
    kind: str = "local"
    """`local` (this schema)."""
    nproc_per_node: IntOrAuto = AUTO
    """Ranks on this host: an int, or `auto` (one per visible GPU; 1 on a CPU-only host)."""
    master_port: int = 0
    """Rendezvous port on localhost; 0 picks a free one."""

    def validate(self) -> None:
        _require(self.kind == "local", "launcher.kind", "must be 'local' for this launcher")
        _int_or_auto(self.nproc_per_node, "launcher.nproc_per_node")
        _require(0 <= self.master_port < 65536, "launcher.master_port", "must be in [0, 65535]")


RAY_PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


@dataclass(kw_only=True)
class RayLauncherConfig:
    kind: str = "ray"
    """`ray` (this schema)."""
    address: str = "auto"
    """Ray cluster to run on: `auto` (the running cluster this host belongs to, or $RAY_ADDRESS),
    `local` (start a private one-node cluster inside the driver), `host:port` (a cluster's GCS
    address) or `ray://host:port` (Ray Client)."""
    num_workers: IntOrAuto = AUTO
    """Training workers (ranks): an int, or `auto` (every GPU the cluster has now, divided by
    gpus_per_worker; 1 on a cluster without GPUs)."""
    gpus_per_worker: IntOrAuto = AUTO
    """GPUs per worker: 1, 0 (CPU workers, gloo), or `auto` (1 when the cluster has GPUs, 0 when
    it has none). Each rank drives one device, so more than 1 is refused."""
    cpus_per_worker: int = 1
    """Logical CPUs reserved per worker. Ray sets the workers' OMP_NUM_THREADS to it, unless the
    driver's environment sets OMP_NUM_THREADS (forwarded to the workers)."""
    placement_strategy: str = "PACK"
    """How the workers' resource bundles are placed: PACK (as few nodes as possible), SPREAD,
    STRICT_PACK (one node or fail), STRICT_SPREAD (one worker per node)."""
    max_failures: int = 0
    """Worker-group failures (crash, OOM, lost node) to recover from by restarting every worker
    from the newest committed checkpoint; -1 = unlimited, 0 = fail on the first."""
    storage_path: Optional[str] = None
    """Where Ray Train keeps its own run state (a filesystem or URI every node sees). Defaults to
    the run dir. ftcluster checkpoints always live in <run.dir>/checkpoints."""

    def validate(self) -> None:
        _require(self.kind == "ray", "launcher.kind", "must be 'ray' for this launcher")
        a = self.address
        ok = a in ("auto", "local") or a.startswith("ray://") or re.fullmatch(r"[\w.\-\[\]:]+:\d+", a) is not None
        _require(ok, "launcher.address", f"must be auto, local, host:port or ray://host:port; got {a!r}")
        _int_or_auto(self.num_workers, "launcher.num_workers")
        _int_or_auto(self.gpus_per_worker, "launcher.gpus_per_worker", allowed=(0, 1),
                     hint=" (each rank drives one device; use more workers for more GPUs)")
        _require(self.cpus_per_worker >= 0, "launcher.cpus_per_worker", f"must be >= 0; got {self.cpus_per_worker}")
        _one_of(self.placement_strategy, "launcher.placement_strategy", RAY_PLACEMENT_STRATEGIES)
        _require(self.max_failures >= -1, "launcher.max_failures", f"must be >= -1 (-1 = unlimited); got {self.max_failures}")
        if self.storage_path is not None:
            _require(self.storage_path.startswith("/") or "://" in self.storage_path, "launcher.storage_path",
                     f"must be an absolute path or a URI (s3://, gs://, ...) every node sees; got {self.storage_path!r}")


SLURM_MODES = ("ray", "torchrun")
# Slurm's --time formats: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS (or no limit).
_SLURM_TIME_RE = re.compile(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?")


def slurm_time_seconds(value: str) -> Optional[int]:
    """Seconds in a Slurm --time value; None for UNLIMITED/INFINITE. ValueError if malformed."""
    if value.upper() in ("UNLIMITED", "INFINITE"):
        return None
    m = _SLURM_TIME_RE.fullmatch(value)
    if not m:
        raise ValueError(value)
    days, a, b, c = (int(x) if x is not None else None for x in m.groups())
    if days is not None:  # D-HH[:MM[:SS]]
        return days * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
    if b is None:  # minutes
        return a * 60
    if c is None:  # MM:SS
        return a * 60 + b
    return a * 3600 + b * 60 + c  # HH:MM:SS


@dataclass(kw_only=True)
class SlurmLauncherConfig:
    """`launcher=slurm`: render an sbatch script (slurm/<mode>.sbatch), submit it, return. Inside the
    allocation the job runs the saved resolved config with Ray (`mode=ray`) or torch elastic
    (`mode=torchrun`); see ftcluster/launch/slurm.py."""
    kind: str = "slurm"
    """`slurm` (this schema)."""
    mode: str = "ray"
    """`ray`: a Ray head on the first node, Ray workers on the others (srun), training through the
    Ray launcher. `torchrun`: srun one torch elastic agent per node, c10d rendezvous on the first."""
    nodes: int = 1
    """Nodes to allocate (#SBATCH --nodes)."""
    gpus_per_node: int = 8
    """GPUs per node (#SBATCH --gpus-per-node) and ranks per node; 0: CPU nodes, one rank per node."""
    cpus_per_task: Optional[int] = None
    """CPUs per node for the one task per node (#SBATCH --cpus-per-task); unset: the partition's default."""
    mem: Optional[str] = None
    """Memory per node (#SBATCH --mem), e.g. `480G`; `0` asks for all of it; unset: the partition's default."""
    partition: Optional[str] = None
    """#SBATCH --partition; unset: the cluster's default partition."""
    account: Optional[str] = None
    """#SBATCH --account to charge; unset: your default account."""
    qos: Optional[str] = None
    """#SBATCH --qos; unset: the association's default."""
    time: Optional[str] = None
    """Time limit (#SBATCH --time): minutes, HH:MM:SS or D-HH:MM:SS; unset: the partition's default."""
    constraint: Optional[str] = None
    """Node features (#SBATCH --constraint), e.g. `h100&ib`."""
    exclusive: bool = False
    """#SBATCH --exclusive: no other job shares the nodes."""
    job_name: Optional[str] = None
    """#SBATCH --job-name; unset: `ftc-<run.name>`."""
    sbatch_extra: list[str] = field(default_factory=list)
    """More sbatch options, one per entry: `--reservation=big` or `#SBATCH --reservation=big`."""
    env: dict[str, str] = field(default_factory=dict)
    """Environment exported in the job before anything starts (NCCL and network settings), e.g.
    `+launcher.env.NCCL_SOCKET_IFNAME=ib0`. Secrets do not belong here (they would be written into
    the script): export them before submitting, sbatch passes the submitting environment on."""
    setup: str = ""
    """Shell lines run at the start of the job, e.g. `module load cuda/12.4; source ~/venv/bin/activate`."""
    python: Optional[str] = None
    """Python on the compute nodes; unset: the interpreter running `ftcluster` now (or `python3`
    after a `setup` that activates an environment, if that is what you set here)."""
    signal_grace_s: int = 300
    """Slurm sends the job USR1 this many seconds before its time limit (#SBATCH --signal=B:USR1@N):
    every rank finishes its step, a checkpoint commits and the job requeues itself. 0: no signal."""
    max_requeues: int = 3
    """Self-requeues after a preemption signal before the job gives up (counted by SLURM_RESTART_COUNT)."""
    dry_run: bool = False
    """Render the script into <run.dir>/slurm/dry-run/ and print it; submit nothing."""
    rdzv_port: int = 0
    """mode=torchrun: c10d rendezvous port on the first node; 0: 20000 + job id % 20000, so jobs
    sharing a node do not collide."""
    ray_port: int = 0
    """mode=ray: the Ray head's GCS port on the first node (its dashboard takes the next one);
    0: 40000 + job id % 20000."""
    ray_wait_s: int = 300
    """mode=ray: seconds to wait for every node to join the Ray cluster before failing."""
    ray_max_failures: int = 0
    """mode=ray: worker-group failures Ray Train recovers from inside one allocation (-1 = unlimited)."""

    def validate(self) -> None:
        _require(self.kind == "slurm", "launcher.kind", "must be 'slurm' for this launcher")
        _one_of(self.mode, "launcher.mode", SLURM_MODES)
        _require(self.nodes >= 1, "launcher.nodes", f"must be >= 1; got {self.nodes}")
        _require(self.gpus_per_node >= 0, "launcher.gpus_per_node", f"must be >= 0; got {self.gpus_per_node}")
        _require(self.cpus_per_task is None or self.cpus_per_task >= 1, "launcher.cpus_per_task",
                 f"must be >= 1; got {self.cpus_per_task}")
        if self.mem is not None:
            _require(re.fullmatch(r"\d+[KMGT]?", str(self.mem)) is not None, "launcher.mem",
                     f"must be a size like 480G, 64000M or 0 (all of a node's memory); got {self.mem!r}")
        for key in ("partition", "account", "qos", "constraint", "job_name"):
            v = getattr(self, key)
            _require(v is None or (v != "" and re.search(r"\s", v) is None), f"launcher.{key}",
                     f"must be a non-empty value without whitespace; got {v!r}")
        limit = None
        if self.time is not None:
            try:
                limit = slurm_time_seconds(str(self.time))
            except ValueError:
                _fail("launcher.time", f"must be minutes, HH:MM:SS or D-HH:MM:SS; got {self.time!r}")
        _require(self.signal_grace_s >= 0, "launcher.signal_grace_s", f"must be >= 0; got {self.signal_grace_s}")
        if limit is not None and self.signal_grace_s:
            _require(self.signal_grace_s < limit, "launcher.signal_grace_s",
                     f"{self.signal_grace_s} s is not less than launcher.time ({self.time} = {limit} s): the "
                     "preemption signal would come as the job starts")
        _require(self.max_requeues >= 0, "launcher.max_requeues", f"must be >= 0; got {self.max_requeues}")
        for i, line in enumerate(self.sbatch_extra):
            opt = line[len("#SBATCH"):].strip() if line.startswith("#SBATCH") else line
            _require("\n" not in line and opt.startswith("-"), f"launcher.sbatch_extra[{i}]",
                     f"must be one sbatch option like --reservation=big (or '#SBATCH --reservation=big'); got {line!r}")
        for name in self.env:
            _require(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) is not None, f"launcher.env.{name}",
                     "must be an environment variable name")
            _require(not is_secret_name(name), f"launcher.env.{name}",
                     "looks like a secret and would be written into the job script; export it in the shell "
                     "you submit from instead (sbatch passes your environment to the job)")
        _require(self.python is None or self.python.startswith("/") or "/" not in self.python, "launcher.python",
                 f"must be an absolute path or a command name on PATH; got {self.python!r}")
        for key in ("rdzv_port", "ray_port"):
            _require(0 <= getattr(self, key) < 65535, f"launcher.{key}", "must be in [0, 65534] (0: from the job id)")
        _require(self.ray_wait_s >= 1, "launcher.ray_wait_s", f"must be >= 1; got {self.ray_wait_s}")
        _require(self.ray_max_failures >= -1, "launcher.ray_max_failures", f"must be >= -1; got {self.ray_max_failures}")


LAUNCHER_SCHEMAS: dict[str, type] = {"local": LocalLauncherConfig, "ray": RayLauncherConfig,
                                     "slurm": SlurmLauncherConfig}
"""`launcher.kind` -> schema (ConfigStore `launcher_<kind>_schema`)."""

TRAIN_DTYPES = ("bf16", "fp32")
AC_MODES = ("none", "selective", "full", "offload")
"""Activation checkpointing modes (train.activation_checkpointing), cheapest in memory last."""
DEFAULT_SELECTIVE_EVERY = 2
"""`selective` without train.activation_checkpointing_every: every 2nd layer recomputed."""


def ac_mode(value: Any, key: str = "train.activation_checkpointing") -> str:
    """`auto` or one of AC_MODES; booleans (and their spellings) are the old on/off switch."""
    spelled = {True: "full", False: "none", "true": "full", "false": "none"}
    mode = spelled.get(value.lower() if isinstance(value, str) else value, value)
    _require(mode == "auto" or mode in AC_MODES, key, f"must be auto, {', '.join(AC_MODES)} (or true/false); got {value!r}")
    return mode


def tri_state(value: Any, key: str) -> Optional[bool]:
    """`auto` -> None, `true`/`false` -> the bool. A `str` field, not a Union: OmegaConf 2.3 fails
    to expand a Union node inside a group-selected (MISSING) config such as `model`, so
    `model.liger=true` arrives as the string 'True' and is read through this function."""
    spelled = {"auto": None, "true": True, "false": False}
    key_ = str(value).lower()
    _require(key_ in spelled, key, f"must be auto, true or false; got {value!r}")
    return spelled[key_]


@dataclass(kw_only=True)
class TrainConfig:
    max_steps: int = 100
    """Optimizer steps to train for (the run ends at this step)."""
    micro_batch_size: IntOrAuto = AUTO
    """Samples (rows when packed) per rank per forward/backward, or `auto`: the largest that fits
    the memory plan (ftcluster/plan.py) and divides the per-rank batch; on a CPU the whole per-rank
    batch. An explicit value always wins."""
    grad_accum: IntOrAuto = AUTO
    """Micro-batches per optimizer step, or `auto`: global batch / (micro_batch_size x world size).
    Global batch = micro_batch_size x grad_accum x world size."""
    global_batch_size: Optional[int] = None
    """Sequences (rows when packed) per optimizer step over all ranks. Unset: micro_batch_size x
    grad_accum x world size when both are set, else 8 per rank."""
    global_batch_tokens: Optional[int] = None
    """The global batch in tokens instead: global_batch_size = this / data.max_seq_len (rounded
    up). Set this or global_batch_size, not both."""
    grad_clip: float = 1.0
    """Max global gradient L2 norm; 0 disables clipping (the norm is still computed and logged)."""
    activation_checkpointing: BoolOrStr = AUTO
    """What decoder layers keep for backward: `none` (everything: fastest, most memory),
    `selective` (every `activation_checkpointing_every`-th layer recomputed), `full` (every layer
    recomputed from its input), `offload` (full, and each layer's input moved to pinned host memory
    on a side stream), or `auto` (default): the fastest that fits the plan and the GPU's free memory
    (or train.memory_budget_gib); `none` on a CPU. `true`/`false` mean `full`/`none`."""
    activation_checkpointing_every: Optional[int] = None
    """`selective`: recompute every k-th decoder layer, counting from the first: layers 0, k, 2k, ...
    (index % k == 0; k=1 is `full`); the others keep their activations. Unset: 2, or the plan's
    choice under `auto`."""
    mlp_tile_tokens: int = 0
    """Run each decoder layer's MLP over its tokens in tiles of this many (0 = whole micro-batch;
    ftcluster/model/tiled_mlp.py): only the MLP's input is kept, the backward recomputes one tile at
    a time, so the MLP's intermediates (3 x intermediate_size per token) exist for one tile. For
    very long sequences, where they are the largest tensors; costs one more MLP forward per step.
    FSDP2 only, not with model.compile."""
    memory_budget_gib: Optional[float] = None
    """GPU memory (GiB per rank) the auto layout must fit; unset: the GPU's free memory at start.
    Lets a 24 or 48 GB card be planned for (and tested on a bigger one)."""
    dtype: str = "bf16"
    """Compute dtype (`bf16` or `fp32`). Master weights and optimizer state stay fp32."""
    log_every: int = 1
    """Log (and fetch loss from the device) every N steps. Stop requests (preemption, SIGTERM) are
    also agreed on at these points only, so a stop waits at most N steps."""
    loss_chunk_size: int = 4096
    """Tokens per chunk of the output projection + cross-entropy, so fp32 logits never exist for
    the whole batch at once."""

    def validate(self) -> None:
        _require(self.max_steps >= 1, "train.max_steps", f"must be >= 1; got {self.max_steps}")
        _int_or_auto(self.micro_batch_size, "train.micro_batch_size")
        _int_or_auto(self.grad_accum, "train.grad_accum")
        for key in ("global_batch_size", "global_batch_tokens"):
            value = getattr(self, key)
            _require(value is None or value >= 1, f"train.{key}", f"must be >= 1; got {value}")
        _require(self.global_batch_size is None or self.global_batch_tokens is None, "train.global_batch_tokens",
                 "set it or train.global_batch_size, not both")
        ac_mode(self.activation_checkpointing)
        _require(self.activation_checkpointing_every is None or self.activation_checkpointing_every >= 1,
                 "train.activation_checkpointing_every", f"must be >= 1; got {self.activation_checkpointing_every}")
        _require(self.mlp_tile_tokens >= 0, "train.mlp_tile_tokens", f"must be >= 0 (0 = off); got {self.mlp_tile_tokens}")
        _require(self.memory_budget_gib is None or self.memory_budget_gib > 0, "train.memory_budget_gib",
                 f"must be > 0; got {self.memory_budget_gib}")
        _require(self.grad_clip >= 0, "train.grad_clip", f"must be >= 0; got {self.grad_clip}")
        _one_of(self.dtype, "train.dtype", TRAIN_DTYPES)
        _require(self.log_every >= 1, "train.log_every", f"must be >= 1; got {self.log_every}")
        _require(self.loss_chunk_size >= 1, "train.loss_chunk_size", "must be >= 1")


@dataclass(kw_only=True)
class OptimConfig:
    lr: float = 2e-4
    """Peak learning rate (AdamW)."""
    weight_decay: float = 0.0
    """Decoupled weight decay, applied to matrices only (not norms, biases)."""
    beta1: float = 0.9
    """AdamW decay rate of the first-moment (gradient mean) estimate, in [0, 1)."""
    beta2: float = 0.95
    """AdamW decay rate of the second-moment (squared gradient) estimate, in [0, 1)."""
    eps: float = 1e-8
    """AdamW term added to the root of the second moment (numerical stability), > 0."""
    warmup_steps: int = 0
    """Linear warm-up from 0 to lr over this many steps, then cosine decay to lr x min_lr_ratio at max_steps."""
    min_lr_ratio: float = 0.1
    """Final learning rate at max_steps as a fraction of lr, in [0, 1]."""

    def validate(self) -> None:
        _require(self.lr > 0, "optim.lr", f"must be > 0; got {self.lr}")
        _require(self.weight_decay >= 0, "optim.weight_decay", f"must be >= 0; got {self.weight_decay}")
        _require(0 <= self.beta1 < 1, "optim.beta1", "must be in [0, 1)")
        _require(0 <= self.beta2 < 1, "optim.beta2", "must be in [0, 1)")
        _require(self.eps > 0, "optim.eps", "must be > 0")
        _require(self.warmup_steps >= 0, "optim.warmup_steps", f"must be >= 0; got {self.warmup_steps}")
        _require(0 <= self.min_lr_ratio <= 1, "optim.min_lr_ratio", "must be in [0, 1]")


@dataclass(kw_only=True)
class CheckpointConfig:
    every_steps: int = 50
    """Save every N steps (and always at the last step); 0 saves only at the end."""
    keep_last: int = 2
    """Committed checkpoints to keep (older ones are deleted after a new one commits)."""
    enabled: bool = True
    """False: never save (benchmarks). The run cannot be resumed."""
    adapter_only: bool = True
    """Save only trainable parameters (adapters, `peft.trainable_modules`) with the optimizer and
    loop state, not the frozen base: resume rebuilds the base from model.path or the seed, as at
    the start. A full fine-tune (peft=none) has no frozen parameters, so this changes nothing there.
    False also saves the frozen base (in its training dtype; NF4 bytes for QLoRA)."""
    keep_best: bool = False
    """Also keep the checkpoint with the best `eval.metric`, whatever `keep_last` deletes: every
    evaluation that improves on the best so far saves a checkpoint at that step (if one is not due
    anyway), recorded in `<run.dir>/best.json`; `ftcluster export RUN_DIR --best` exports it."""

    def validate(self) -> None:
        _require(self.every_steps >= 0, "checkpoint.every_steps", f"must be >= 0; got {self.every_steps}")
        _require(self.keep_last >= 1, "checkpoint.keep_last", f"must be >= 1; got {self.keep_last}")


EVAL_MODES = ("auto", "min", "max")


@dataclass(kw_only=True)
class EarlyStoppingConfig:
    patience: int = 0
    """Stop after this many evaluations in a row without an improvement of `eval.metric` by at
    least `min_delta` (0 = never stop early). The run ends with a committed checkpoint, an
    `early_stop` event and exit code 0; a resumed run keeps the best value and the count."""
    min_delta: float = 0.0
    """The smallest change of `eval.metric` that counts as an improvement (in the metric's units)."""

    def validate(self) -> None:
        _require(self.patience >= 0, "eval.early_stopping.patience", f"must be >= 0; got {self.patience}")
        _require(self.min_delta >= 0, "eval.early_stopping.min_delta", f"must be >= 0; got {self.min_delta}")


@dataclass(kw_only=True)
class EvalConfig:
    """Held-out evaluation (needs data.eval_path, data.eval_fraction or data.eval_samples)."""
    every_steps: int = 0
    """Evaluate every N optimizer steps, and always at the end of training (0 = only at the end)."""
    at_start: bool = True
    """Also evaluate before the first step (the base model's metrics); skipped on resume."""
    max_batches: Optional[int] = None
    """Evaluation micro-batches per rank at most; unset: the whole eval set."""
    micro_batch_size: Optional[int] = None
    """Samples per rank per evaluation forward; unset: train.micro_batch_size."""
    metric: str = "eval_loss"
    """The metric that decides the best checkpoint and early stopping (a key of the eval record:
    eval_loss, eval_ppl, eval_exact_match, eval_rougeL)."""
    mode: str = "auto"
    """Whether lower (`min`) or higher (`max`) `metric` is better; `auto`: min for loss and
    perplexity, max otherwise."""
    prompts: List[str] = field(default_factory=list)
    """Prompts to generate from at each evaluation (user turns, rendered with the chat template
    when the data is chat). Empty: the first `num_prompts` eval samples' prompts, with their
    answers as references."""
    prompts_path: Optional[str] = None
    """A JSONL file of prompts instead: one object per line, `{"messages": [...]}` (chat turns up to
    the answer) or `{"prompt": "..."}`, optionally with `"reference": "..."`."""
    num_prompts: int = 2
    """With no prompts given: how many eval samples to take prompts from (0 = no generation)."""
    max_new_tokens: int = 64
    """Greedy decoding length of each sample, in tokens."""
    task_metrics: bool = False
    """Score the generated samples against their references: `eval_exact_match` and `eval_rougeL`
    (ROUGE-L F1 from the rouge-score package: pip install 'ftcluster[eval]')."""
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    """Stop when `metric` stops improving."""

    @property
    def higher_is_better(self) -> bool:
        if self.mode != "auto":
            return self.mode == "max"
        return not any(k in self.metric for k in ("loss", "ppl"))

    def validate(self) -> None:
        _require(self.every_steps >= 0, "eval.every_steps", f"must be >= 0; got {self.every_steps}")
        _require(self.max_batches is None or self.max_batches >= 1, "eval.max_batches", f"must be >= 1; got {self.max_batches}")
        _require(self.micro_batch_size is None or self.micro_batch_size >= 1, "eval.micro_batch_size",
                 f"must be >= 1; got {self.micro_batch_size}")
        _require(self.metric.startswith("eval_"), "eval.metric", f"must name an eval record key (eval_loss, ...); got {self.metric!r}")
        _one_of(self.mode, "eval.mode", EVAL_MODES)
        _require(self.num_prompts >= 0, "eval.num_prompts", f"must be >= 0; got {self.num_prompts}")
        _require(self.max_new_tokens >= 1, "eval.max_new_tokens", f"must be >= 1; got {self.max_new_tokens}")
        _require(not (self.prompts and self.prompts_path), "eval.prompts_path", "set eval.prompts or eval.prompts_path, not both")
        self.early_stopping.validate()


LOGGER_KINDS = ("none", "wandb")
WANDB_MODES = ("online", "offline", "disabled")


@dataclass(kw_only=True)
class LoggerConfig:
    kind: str = "none"
    """`none`: metrics.jsonl and the console only. `wandb`: also Weights & Biases."""
    mode: str = "offline"
    """W&B mode: `online`, `offline` (local files only, no account needed) or `disabled`."""
    project: str = "ftcluster"
    """W&B project the run is logged to."""
    entity: Optional[str] = None
    """W&B entity (user or team) owning the project; unset: the account's default."""
    group: Optional[str] = None
    """W&B run group (e.g. a sweep's name), to view related runs together."""
    tags: List[str] = field(default_factory=list)
    """W&B run tags."""
    name: Optional[str] = None
    """W&B run name; defaults to run.name."""

    def validate(self) -> None:
        _one_of(self.kind, "logger.kind", LOGGER_KINDS)
        _one_of(self.mode, "logger.mode", WANDB_MODES)


LOG_LEVELS = ("info", "debug")


@dataclass(kw_only=True)
class LogConfig:
    level: str = "info"
    """Console verbosity. `info`: ftcluster's own lines only (start block, progress, events, summary);
    third-party warnings, progress bars and Ray/DeepSpeed chatter go to the run dir's logs/ only.
    `debug`: everything on the console as the libraries print it, and ftcluster's detail lines
    (`ftcluster train --verbose` sets it). See ftcluster/console.py."""

    def validate(self) -> None:
        _one_of(self.level, "log.level", LOG_LEVELS)


@dataclass(kw_only=True)
class DebugConfig:
    fail_at_step: int = 0
    """Test hook: rank `fail_rank` raises once at this step (0 = off). Recorded in the run dir so a
    restarted run does not raise again."""
    fail_rank: int = 1
    """Test hook: the rank that raises at `fail_at_step`."""
    nan_at_step: int = 0
    """Test hook: rank `nan_rank` makes its loss NaN at this step (0 = off)."""
    nan_rank: int = 0
    """Test hook: the rank whose loss becomes NaN at `nan_at_step`."""
    kill_at_step: int = 0
    """Test hook: right after the checkpoint of this step commits, SIGKILL the job's whole process
    group (every rank and the launcher), exactly like `kill -9` of the job (0 = off)."""
    kill_in_save_at_step: int = 0
    """Test hook: SIGKILL the job while saving this step's checkpoint, after every rank wrote its
    shards and before the commit (0 = off)."""
    sync_check: bool = False
    """Check (GPU): run every training step after the first two under
    `torch.cuda.set_sync_debug_mode("error")`, so any host sync inside a step raises and names the
    operation. Log, eval and save points sync by design and run outside the check."""
    sync_at_step: int = 0
    """Test hook: read the loss on the host inside this step (a deliberate sync that
    debug.sync_check must catch; 0 = off)."""
    profile_steps: int = 0
    """Profile this many training steps with torch.profiler (0 = off): each rank writes its
    operator table, a summary (device busy fraction) and a Chrome trace to <run.dir>/profile/
    (ftcluster/profiling.py)."""
    profile_from_step: int = 4
    """The first profiled step (after the warm-up steps that build optimizer state and caches)."""

    def validate(self) -> None:
        _require(self.fail_at_step >= 0, "debug.fail_at_step", "must be >= 0")
        _require(self.profile_steps >= 0, "debug.profile_steps", "must be >= 0")
        _require(self.profile_from_step >= 1, "debug.profile_from_step", "must be >= 1")
        _require(self.nan_at_step >= 0, "debug.nan_at_step", "must be >= 0")


SWEEP_SEARCHES = ("random", "grid", "optuna")
SWEEP_SCHEDULERS = ("fifo", "asha")


@dataclass(kw_only=True)
class SweepConfig:
    """`ftcluster sweep`: Ray Tune over trials that are each this job (ftcluster/launch/tune.py).
    `ftcluster train` ignores this group. Per-trial resources are the Ray launcher's
    (`launcher.num_workers` x `launcher.gpus_per_worker`, `launcher.cpus_per_worker`)."""
    name: Optional[str] = None
    """The sweep's name: the W&B group of every trial; unset: run.name."""
    params: Dict[str, str] = field(default_factory=dict)
    """Search space: config key -> Hydra sweep expression, as on the command line, e.g.
    `optim.lr: tag(log,interval(1e-5,1e-3))` (log-uniform), `interval(a,b)` (uniform),
    `choice(8,16,32)`, `range(0,100,step=50)` (discrete). Sweep overrides on the command line are
    added to these."""
    search: str = "random"
    """`random` (Tune's random sampling), `grid` (every combination of choice/range values; no
    interval) or `optuna` (TPE through Ray Tune's Optuna integration: pip install optuna)."""
    num_samples: int = 4
    """Trials to run (random, optuna); with `grid`, how many times the whole grid is repeated."""
    scheduler: str = "fifo"
    """`fifo` (every trial runs to train.max_steps) or `asha` (Tune's ASHA stops trials whose metric
    falls behind at its rungs; a stopped trial ends at a step boundary with a committed checkpoint)."""
    grace_evals: int = 1
    """ASHA: evaluations (of eval.every_steps steps each) a trial runs before it can be stopped."""
    reduction_factor: float = 2.0
    """ASHA: rungs are grace x factor^k steps apart, and 1/factor of the trials pass each rung."""
    metric: str = "eval_loss"
    """The eval record key trials are ranked and scheduled by."""
    mode: str = "auto"
    """`min`, `max`, or `auto`: min for loss and perplexity, max otherwise."""
    max_concurrent_trials: int = 1
    """Trials running at once (each takes launcher.num_workers workers' resources)."""
    max_failures: int = 0
    """Times a crashed trial is retried (it resumes from its newest committed checkpoint)."""
    same_seed: bool = False
    """True: every trial uses `seed`; false: trial n uses seed + n (its own weights noise, data order)."""
    trial_workers: Optional[int] = None
    """launcher=slurm: Ray workers (ranks) per trial inside the allocation; unset: one node's
    (launcher.gpus_per_node, 1 on CPU nodes). With launcher=ray the trial size is launcher.num_workers."""

    @property
    def higher_is_better(self) -> bool:
        if self.mode != "auto":
            return self.mode == "max"
        return not any(k in self.metric for k in ("loss", "ppl"))

    def validate(self) -> None:
        _require(self.name is None or (bool(self.name) and "/" not in self.name), "sweep.name",
                 f"must be a non-empty name without '/'; got {self.name!r}")
        _one_of(self.search, "sweep.search", SWEEP_SEARCHES)
        _one_of(self.scheduler, "sweep.scheduler", SWEEP_SCHEDULERS)
        _require(self.num_samples >= 1, "sweep.num_samples", f"must be >= 1; got {self.num_samples}")
        _require(self.grace_evals >= 1, "sweep.grace_evals", f"must be >= 1; got {self.grace_evals}")
        _require(self.reduction_factor > 1, "sweep.reduction_factor", f"must be > 1; got {self.reduction_factor}")
        _require(self.metric.startswith("eval_"), "sweep.metric",
                 f"must name an eval record key (eval_loss, ...); got {self.metric!r}")
        _one_of(self.mode, "sweep.mode", EVAL_MODES)
        _require(self.max_concurrent_trials >= 1, "sweep.max_concurrent_trials",
                 f"must be >= 1; got {self.max_concurrent_trials}")
        _require(self.max_failures >= 0, "sweep.max_failures", f"must be >= 0; got {self.max_failures}")
        _require(self.trial_workers is None or self.trial_workers >= 1, "sweep.trial_workers",
                 f"must be >= 1; got {self.trial_workers}")


RESUME_KEYWORDS = ("auto", "never")


@dataclass(kw_only=True)
class JobConfig:
    run: RunConfig = field(default_factory=RunConfig)
    """Run name and directory."""
    seed: int = 0
    """Seeds initial weights, data order and dropout. Same seed, same run, whatever the world size."""
    resume: str = "auto"
    """`auto`: continue from the newest committed checkpoint in run.dir if any; `never`: start fresh
    (fails if run.dir already holds checkpoints); or the path of one committed checkpoint directory."""
    model: ModelConfig = MISSING
    """The model: a local directory or a shape (`model=tiny|local|llama3_8b|...`)."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training data and its rendering (`data=sample_chat|jsonl|synthetic`)."""
    peft: PeftConfig = field(default_factory=PeftConfig)
    """Parameter-efficient fine-tuning (`peft=none|lora|qlora|longlora`)."""
    objective: Any = MISSING
    """SFTObjectiveConfig or DPOObjectiveConfig (`objective=sft|dpo`): what loss the loop minimises."""
    parallel: Any = MISSING
    """FSDP2Config or ZeroConfig (`parallel=fsdp2|zero1|zero2|zero3|...`): variants with their own keys."""
    launcher: Any = MISSING
    """One of the launcher configs (`launcher=local|ray|slurm`)."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The loop: steps, batch, precision, clipping."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """AdamW and the learning-rate schedule."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpoint cadence and retention."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Held-out evaluation, generation samples, early stopping."""
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    """Metrics logging (`logger=none|wandb`)."""
    log: LogConfig = field(default_factory=LogConfig)
    """Console verbosity (`log.level=info|debug`)."""
    debug: DebugConfig = field(default_factory=DebugConfig)
    """Test hooks (failure injection)."""
    sweep: SweepConfig = field(default_factory=SweepConfig)
    """`ftcluster sweep` only: the search space, search, scheduler and metric."""

    def validate(self) -> "JobConfig":
        """Check every group, then the cross-field rules. Raises ConfigError naming the key."""
        for group in (self.run, self.model, self.data, self.peft, self.objective, self.parallel, self.launcher,
                      self.train, self.optim, self.checkpoint, self.eval, self.logger, self.log, self.debug,
                      self.sweep):
            group.validate()
        self._validate_eval()
        _require(self.seed >= 0, "seed", f"must be >= 0; got {self.seed}")
        _require(bool(self.resume), "resume", "must be auto, never, or a committed checkpoint directory")
        if self.data.format != "synthetic":
            _require(self.model.tokenizer is not None or self.model.path is not None, "model.tokenizer",
                     "a tokenizer directory is required to tokenise data (or use data.format=synthetic)")
        _require(self.debug.fail_at_step <= self.train.max_steps, "debug.fail_at_step", "must be <= train.max_steps")
        _require(not self.debug.profile_steps or self.debug.profile_from_step + self.debug.profile_steps - 1 <= self.train.max_steps,
                 "debug.profile_from_step", f"the profiled steps {self.debug.profile_from_step}.."
                 f"{self.debug.profile_from_step + self.debug.profile_steps - 1} must end by train.max_steps={self.train.max_steps}")
        self._validate_restarts()
        self._validate_objective()
        if self.train.mlp_tile_tokens:
            # The tile's inner backward accumulates into the parameters' .grad inside the layer's
            # backward: tested under FSDP2; DeepSpeed gathers (ZeRO-3) and hooks gradients its own way.
            _require(self.parallel.backend == FSDP2_BACKEND, "train.mlp_tile_tokens",
                     f"only with parallel=fsdp2 (got {self.parallel.backend}); or set train.mlp_tile_tokens=0")
            _require(not self.model.compile, "train.mlp_tile_tokens",
                     "not with model.compile=true (the tiles' inner backward is a graph break); set one of them off")
        if self.peft.fp8_base:
            # Like QLoRA's NF4 state, the flat FP8 state is sharded by FSDP2 byte-exactly; ZeRO
            # would cast, flatten or partition it.
            _require(self.parallel.backend == FSDP2_BACKEND, "peft.fp8_base",
                     f"only with parallel=fsdp2 (got {self.parallel.backend})")
            _require(self.checkpoint.adapter_only, "peft.fp8_base",
                     "not with checkpoint.adapter_only=false: the FP8 base is rebuilt from model.path or the seed, never saved")
        if tri_state(self.peft.fused, "peft.fused"):
            # DeepSpeed ZeRO-3 gathers a parameter when its own module runs; the fused node reads
            # lora_A/lora_B's weights without calling those modules.
            _require(self.parallel.backend != "zero3", "peft.fused",
                     "not with parallel=zero3 (its parameters are gathered per module); use fsdp2 or peft.fused=false")
        if not self.checkpoint.adapter_only and self.peft.method != "none":
            _require(self.parallel.backend == FSDP2_BACKEND, "checkpoint.adapter_only",
                     "false (save the frozen base too) is supported by parallel=fsdp2 only; DeepSpeed checkpoints "
                     "never hold frozen weights (they are rebuilt from model.path or the seed)")
        return self

    def _validate_eval(self) -> None:
        if self.data.has_eval:
            return
        # (eval.every_steps alone is allowed: data options may set a cadence for their own eval data;
        # the run logs that there is nothing to evaluate.)
        uses = [("checkpoint.keep_best", self.checkpoint.keep_best),
                ("eval.early_stopping.patience", self.eval.early_stopping.patience > 0)]
        for key, used in uses:
            _require(not used, key, "needs held-out data: set data.eval_path, data.eval_fraction or data.eval_samples")

    def _validate_objective(self) -> None:
        o = self.objective
        if not isinstance(o, DPOObjectiveConfig):
            return
        _require(self.data.format in ("messages", "prompt_completion"), "data.format",
                 f"objective=dpo reads preference pairs with data.format=messages or prompt_completion; got {self.data.format!r}")
        # Pairs are padded whole (chosen and rejected rows of one pair in one micro-batch), not packed
        # with other samples, and a mix of preference sets is not built.
        _require(self.data.packing_mode != "true", "data.packing",
                 "objective=dpo trains on whole preference pairs, which are not packed; use auto or false")
        _require(not self.data.sources, "data.sources", "objective=dpo reads one preference file (data.path)")
        if o.reference_source(self.peft.method) == "adapters":
            _require(self.peft.method != "none", "objective.reference",
                     "adapters (the model with its adapters disabled) needs peft=lora|qlora|longlora; "
                     "use precompute for full fine-tuning")
        if o.reference_source(self.peft.method) == "model":
            # With adapters the reference is the same model with them disabled: no second copy needed.
            _require(self.peft.method == "none", "objective.reference",
                     f"model (a frozen copy of the whole model) is for full fine-tuning (peft=none); with "
                     f"peft={self.peft.method} use adapters (the same model with its adapters disabled)")

    def _validate_restarts(self) -> None:
        # Ray Train restarts a failed worker group inside the same launch (launcher=ray, or Slurm's
        # mode=ray); the new group must continue from the newest committed checkpoint.
        launcher, retries = self.launcher, 0
        if isinstance(launcher, RayLauncherConfig):
            retries, knob = launcher.max_failures, "launcher.max_failures"
        elif isinstance(launcher, SlurmLauncherConfig) and launcher.mode == "ray":
            retries, knob = launcher.ray_max_failures, "launcher.ray_max_failures"
        if retries != 0:
            _require(self.resume == "auto", "resume",
                     f"{self.resume!r} with {knob}={retries}: a restarted worker group continues from the newest "
                     "committed checkpoint in the run dir, which needs resume=auto")
