"""Context extension: RoPE scaling written into the Hugging Face config from `model.*` keys.

transformers (5.x) reads RoPE from `config.rope_parameters` (`rope_type`, `rope_theta`, `factor`,
and per type: `original_max_position_embeddings`, YaRN's `beta_fast`/`beta_slow`/
`attention_factor`, llama3's `low_freq_factor`/`high_freq_factor`) and turns it into the rotary
inverse frequencies in `transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS`. We only write
that dict (and `max_position_embeddings`) before the model is built; the rotary module computes
`inv_freq` from it, also when `materialize` rebuilds the buffers after the meta-device build.

`model.extend_context_to=T` sets factor = T / original, where the original context is the
pre-training one: `original_max_position_embeddings` when the model already uses a scaled RoPE
(Llama-3.1: 8192 with llama3 factor 8), else `max_position_embeddings`. Types:

* `linear` (position interpolation, what LongLoRA used): every inverse frequency / factor.
* `dynamic` (dynamic NTK): the base grows with the current sequence length once it exceeds
  `max_position_embeddings`, so that stays at the original context.
* `yarn`: interpolates low frequencies, keeps high ones, scales attention by 0.1 ln(factor) + 1.
* `llama3`: Meta's Llama-3.1 piecewise rule (wavelengths above original / low_freq_factor are
  divided by factor, below original / high_freq_factor kept, smooth in between).
"""
from __future__ import annotations

from typing import Any

from ftcluster.config import ModelConfig

SCALED_TYPES = ("linear", "dynamic", "yarn", "llama3")


def _rope_dict(config: dict[str, Any]) -> dict[str, Any]:
    """The RoPE parameters of a config dict: transformers 5 `rope_parameters` or 4.x `rope_scaling`."""
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    return rope if isinstance(rope, dict) else {}


def original_max_positions(config: dict[str, Any]) -> int:
    """Pre-training context of a model, from its config as a dict (config.json or `to_dict()`)."""
    rope = _rope_dict(config)
    for value in (config.get("original_max_position_embeddings"), rope.get("original_max_position_embeddings")):
        if value:
            return int(value)
    return int(config["max_position_embeddings"])


def current_max_positions(config: dict[str, Any]) -> int:
    """The context a model supports as it is (after any RoPE scaling it already carries): extending
    to less would shrink it (Llama-3.1: 131072 from a pre-training context of 8192)."""
    return max(original_max_positions(config), int(config.get("max_position_embeddings") or 0))


def rope_parameters_for(cfg: ModelConfig, hf_config) -> tuple[dict[str, Any], int] | None:  # type: ignore[no-untyped-def]
    """(new `rope_parameters`, new `max_position_embeddings`) for `cfg`, or None to keep the model's."""
    if cfg.rope_scaling_type is None and cfg.extend_context_to is None:
        return None
    current = dict(getattr(hf_config, "rope_parameters", None) or {})
    if "rope_theta" not in current:
        raise ValueError("model.rope_scaling_type: the model config has no single rope_parameters dict with "
                         "rope_theta (per-layer-type RoPE is not supported for context extension)")
    original = original_max_positions(hf_config.to_dict())
    kind = cfg.rope_scaling_type
    if kind is None:  # extend_context_to alone: keep the model's own scaling type, else linear
        kind = current.get("rope_type") if current.get("rope_type") in SCALED_TYPES else "linear"
    if cfg.extend_context_to is not None:
        supported = current_max_positions(hf_config.to_dict())
        if cfg.extend_context_to <= supported:
            raise ValueError(f"model.extend_context_to: must exceed the model's current context of {supported} "
                             f"tokens; got {cfg.extend_context_to}")
        factor = cfg.extend_context_to / original
        max_positions = cfg.extend_context_to
    else:
        assert cfg.rope_scaling_factor is not None  # ModelConfig.validate
        factor = float(cfg.rope_scaling_factor)
        max_positions = int(round(original * factor))
    params: dict[str, Any] = {"rope_type": kind, "rope_theta": current["rope_theta"], "factor": float(factor)}
    if "partial_rotary_factor" in current:
        params["partial_rotary_factor"] = current["partial_rotary_factor"]
    if kind in ("yarn", "llama3"):
        params["original_max_position_embeddings"] = original
    if kind == "yarn":
        params["beta_fast"] = float(cfg.rope_beta_fast)
        params["beta_slow"] = float(cfg.rope_beta_slow)
        if cfg.rope_attention_factor is not None:
            params["attention_factor"] = float(cfg.rope_attention_factor)
    if kind == "llama3":
        params["low_freq_factor"] = float(cfg.rope_low_freq_factor)
        params["high_freq_factor"] = float(cfg.rope_high_freq_factor)
    if kind == "dynamic":
        max_positions = original  # dynamic NTK starts scaling beyond max_position_embeddings
    return params, max_positions


def apply_rope_scaling(hf_config, cfg: ModelConfig) -> None:  # type: ignore[no-untyped-def]
    """Write the RoPE scaling of `cfg` into a freshly built transformers config (before the model
    is built from it). No-op when neither `model.rope_scaling_type` nor `model.extend_context_to` is set."""
    new = rope_parameters_for(cfg, hf_config)
    if new is None:
        return
    params, max_positions = new
    if getattr(hf_config, "original_max_position_embeddings", None):
        # Phi-3 style top-level field: transformers prefers it over the dict; keep them equal.
        hf_config.original_max_position_embeddings = params.get("original_max_position_embeddings",
                                                                hf_config.original_max_position_embeddings)
    hf_config.rope_parameters = params
    hf_config.max_position_embeddings = max_positions
    validate = getattr(hf_config, "validate_rope", None)  # transformers' own key checks (5.x)
    if validate is not None:
        validate()
