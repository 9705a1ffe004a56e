"""LongLoRA shifted sparse attention (S2-Attn) on fused SDPA kernels.

S2-Attn (Chen et al., "LongLoRA", 2023) makes long-context fine-tuning affordable: during
training, every attention head only attends *causally within a group* of ``G`` consecutive
tokens, and half of the heads use groups shifted by ``G // 2`` so that information flows
between neighbouring groups. Evaluation and generation use ordinary full causal attention.

Semantics implemented here (the spec; tests compare against a dense masked reference):

* heads ``[0, Hq/2)`` attend causally within groups ``[iG, (i+1)G)``;
* heads ``[Hq/2, Hq)`` attend causally within groups shifted by ``s = G // 2``:
  ``[0, s), [s, s+G), [s+G, s+2G), ...``;
* the last group of either half may be shorter; nothing wraps around the end of the
  sequence (unlike the rolled, non-flash path of the LongLoRA reference code, whose last
  shifted group also sees the first tokens of the sequence);
* "causal within a group": query ``i`` attends key ``j`` iff ``group(j) == group(i)`` and
  ``j <= i``.

For odd ``G`` the shift is ``G // 2`` (rounded down), so the first shifted group has
``(G - 1) // 2`` tokens and all later shifted groups still have ``G`` tokens.

Construction (no N x N mask is ever built; memory is linear in N): a span of tokens
``[a, b)`` split into groups of ``G`` is computed as

* the ``(b - a) // G`` full groups, reshaped so that each group is an independent batch
  element -> one ``scaled_dot_product_attention(..., is_causal=True)`` call on
  ``[B * n_groups, H, G, D]``;
* the short tail group (if any) -> one ``is_causal=True`` SDPA call on that slice as is.

The unshifted half is the span ``[0, N)``. The shifted half is the short head group
``[0, min(s, N))`` (its own ``is_causal=True`` call -- a group that starts at position 0 is
just a causal prefix) plus the span ``[s, N)``. Because short groups are run on their own,
no padding tokens exist at all: no wasted FLOPs on pad queries, no risk of a real query
seeing a pad key, and no extra group for the shifted half. Outputs are written straight
into one ``[B, N, Hq, Dv]`` buffer (the layout transformers wants) and returned as a
``[B, Hq, N, Dv]`` view.

Grouped-query attention is passed to SDPA with ``enable_gqa=True`` (no K/V repeat). Query
head ``h`` reads K/V head ``h // (Hq // Hkv)``. When ``Hkv`` is even each half of the query
heads maps onto its own half of the K/V heads; when ``Hkv`` is odd the two halves share the
middle K/V head, so each half reads the K/V heads it needs at half the GQA ratio (a plain
slice when ``Hkv == 1``, a small gather otherwise).
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F

__all__ = [
    "s2_attention",
    "s2_attention_packed",
    "s2_group_size_for",
    "s2_attention_forward",
    "register_s2_attention",
    "DEFAULT_S2_GROUP_SIZE_RATIO",
]

DEFAULT_S2_GROUP_SIZE_RATIO = 0.25


# --------------------------------------------------------------------------------------
# Core op
# --------------------------------------------------------------------------------------


def _kv_heads_for_half(x: torch.Tensor, half: int, n_rep: int) -> tuple[torch.Tensor, int]:
    """K/V heads read by query-head half ``half`` (0 or 1), and the GQA ratio within it."""
    hkv = x.shape[1]
    if n_rep == 1 or hkv % 2 == 0:
        # Hq/2 query heads map exactly onto Hkv/2 K/V heads (ratio unchanged).
        return x[:, half * (hkv // 2) : (half + 1) * (hkv // 2)], n_rep
    # Odd Hkv (so n_rep is even because Hq is even): conceptually repeat every K/V head
    # twice, giving 2*Hkv heads at ratio n_rep/2, and take that tensor's half ``half``.
    idx = [(half * hkv + j) // 2 for j in range(hkv)]
    if hkv == 1:
        return x, n_rep // 2
    index = torch.tensor(idx, device=x.device)
    return x.index_select(1, index), n_rep // 2


def _sdpa(q, k, v, gqa: bool, dropout_p: float, scale: float | None) -> torch.Tensor:
    if gqa:
        return F.scaled_dot_product_attention(
            q, k, v, dropout_p=dropout_p, is_causal=True, scale=scale, enable_gqa=True
        )
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, scale=scale)


def _grouped_causal_span(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    start: int,
    stop: int,
    group_size: int,
    gqa: bool,
    dropout_p: float,
    scale: float | None,
) -> None:
    """Causal attention within consecutive groups of ``group_size`` tokens covering
    ``[start, stop)`` (the last group may be shorter). q/k/v: ``[B, H, N, D]`` (the head
    slice of this half); writes ``out[:, start:stop]`` where out is ``[B, N, H, Dv]``."""
    G = group_size
    n_full = (stop - start) // G
    full_stop = start + n_full * G
    B = q.shape[0]

    if n_full == 1:
        o = _sdpa(q[:, :, start:full_stop], k[:, :, start:full_stop], v[:, :, start:full_stop], gqa, dropout_p, scale)
        out[:, start:full_stop].copy_(o.transpose(1, 2))
    elif n_full > 1:

        def to_groups(x: torch.Tensor) -> torch.Tensor:
            # [B, H, n*G, D] -> [B, n*G, H, D] -> [B*n, G, H, D] -> [B*n, H, G, D].
            # The reshape is a view when x is seq-major in memory (what HF models produce
            # for the transposed projections) and a single copy otherwise.
            x = x[:, :, start:full_stop].transpose(1, 2)
            return x.reshape(B * n_full, G, x.shape[2], x.shape[3]).transpose(1, 2)

        o = _sdpa(to_groups(q), to_groups(k), to_groups(v), gqa, dropout_p, scale)
        # o: [B*n, H, G, Dv] -> [B, n, G, H, Dv] (always a view) into out[:, start:full_stop].
        out[:, start:full_stop].unflatten(1, (n_full, G)).copy_(o.transpose(1, 2).unflatten(0, (B, n_full)))

    if full_stop < stop:  # short last group: its own causal call, no padding needed
        o = _sdpa(q[:, :, full_stop:stop], k[:, :, full_stop:stop], v[:, :, full_stop:stop], gqa, dropout_p, scale)
        out[:, full_stop:stop].copy_(o.transpose(1, 2))


def s2_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    group_size: int,
    dropout_p: float = 0.0,
    scale: float | None = None,
) -> torch.Tensor:
    """LongLoRA shifted sparse attention.

    Args:
        q: ``[B, Hq, N, D]`` queries.
        k: ``[B, Hkv, N, D]`` keys (``Hq`` must be even and a multiple of ``Hkv``).
        v: ``[B, Hkv, N, Dv]`` values.
        group_size: ``G >= 2`` tokens per group. Heads ``[0, Hq/2)`` use groups
            ``[iG, (i+1)G)``; heads ``[Hq/2, Hq)`` use groups shifted by ``G // 2`` (for odd
            ``G`` the shift rounds down). Any ``N >= 1`` is accepted, including ``N < G``
            and ``N`` not a multiple of ``G``; nothing wraps around the sequence end.
        dropout_p: attention dropout probability (pass 0.0 in eval).
        scale: softmax scale, default ``1 / sqrt(D)``.

    Returns:
        ``[B, Hq, N, Dv]`` (a transposed view of a contiguous ``[B, N, Hq, Dv]`` buffer).
        Differentiable with respect to q, k and v.
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"s2_attention expects 4-D q, k, v of shape [B, H, N, D]; got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    B, Hq, N, D = q.shape
    if k.shape[0] != B or v.shape[0] != B:
        raise ValueError(f"batch size mismatch: q {B}, k {k.shape[0]}, v {v.shape[0]}")
    if k.shape[2] != N or v.shape[2] != N:
        raise ValueError(
            f"s2_attention is self-attention: q, k, v must have the same sequence length; got "
            f"{N}, {k.shape[2]}, {v.shape[2]} (no KV cache in S2-Attn)"
        )
    if k.shape[1] != v.shape[1]:
        raise ValueError(f"k and v must have the same number of heads; got {k.shape[1]} and {v.shape[1]}")
    if k.shape[3] != D:
        raise ValueError(f"q and k head dims differ: {D} vs {k.shape[3]}")
    Hkv = k.shape[1]
    if Hkv < 1 or Hq % Hkv != 0:
        raise ValueError(f"number of query heads ({Hq}) must be a multiple of number of key/value heads ({Hkv})")
    if Hq % 2 != 0:
        raise ValueError(f"S2-Attn splits the query heads into two halves; number of query heads must be even, got {Hq}")
    if isinstance(group_size, bool):
        raise ValueError(f"group_size must be an integer >= 2, got {group_size!r}")
    try:
        G = operator.index(group_size)
    except TypeError:
        raise ValueError(f"group_size must be an integer >= 2, got {group_size!r}") from None
    if G < 2:
        raise ValueError(f"group_size must be >= 2 (the shifted half uses a shift of group_size // 2), got {G}")
    if N < 1:
        raise ValueError("s2_attention needs a sequence length N >= 1")

    n_rep = Hq // Hkv
    h = Hq // 2
    shift = G // 2
    out = q.new_empty(B, N, Hq, v.shape[3])  # seq-major, the layout HF wants

    # Half 0: plain groups [iG, (i+1)G).
    k0, r0 = _kv_heads_for_half(k, 0, n_rep)
    v0, _ = _kv_heads_for_half(v, 0, n_rep)
    _grouped_causal_span(q[:, :h], k0, v0, out[:, :, :h], 0, N, G, r0 > 1, dropout_p, scale)

    # Half 1: groups [0, s), [s, s+G), ... -- first a causal prefix group, then the span.
    k1, r1 = _kv_heads_for_half(k, 1, n_rep)
    v1, _ = _kv_heads_for_half(v, 1, n_rep)
    q1, out1 = q[:, h:], out[:, :, h:]
    head = min(shift, N)
    # [0, head) is a single group shorter than G (n_full == 0 -> one causal call).
    _grouped_causal_span(q1, k1, v1, out1, 0, head, G, r1 > 1, dropout_p, scale)
    if N > shift:
        _grouped_causal_span(q1, k1, v1, out1, shift, N, G, r1 > 1, dropout_p, scale)

    return out.transpose(1, 2)


# --------------------------------------------------------------------------------------
# transformers integration
# --------------------------------------------------------------------------------------


def s2_group_size_for(config, seq_len: int) -> int:
    """Group size for a sequence of ``seq_len`` tokens from a model config.

    ``config.s2_group_size`` (absolute tokens) wins if set; otherwise
    ``config.s2_group_size_ratio`` (default 0.25, as in LongLoRA) times ``seq_len``,
    rounded down. Never below 2.
    """
    size = getattr(config, "s2_group_size", None) if config is not None else None
    if size is not None:
        if isinstance(size, bool) or int(size) != size or size < 2:
            raise ValueError(f"config.s2_group_size must be an integer >= 2, got {size!r}")
        return int(size)
    ratio = getattr(config, "s2_group_size_ratio", None) if config is not None else None
    if ratio is None:
        ratio = DEFAULT_S2_GROUP_SIZE_RATIO
    if not 0 < ratio <= 1:
        raise ValueError(f"config.s2_group_size_ratio must be in (0, 1], got {ratio!r}")
    return max(2, int(seq_len * ratio))


def _mask_is_plain_causal(mask: torch.Tensor, q_len: int, kv_len: int) -> bool:
    """True iff ``mask`` (2D padding mask, or 4D bool / additive-float mask) allows exactly
    the causal pattern for every batch row, i.e. it carries no padding/packing information."""
    if mask.dim() == 2:  # [B, kv] padding mask: 1 = keep
        return bool(mask.bool().all())
    if mask.dim() != 4 or mask.shape[-2:] != (q_len, kv_len):
        return False
    allowed = mask if mask.dtype == torch.bool else mask == 0
    i = torch.arange(q_len, device=mask.device)[:, None]
    j = torch.arange(kv_len, device=mask.device)[None, :]
    causal = j <= i + (kv_len - q_len)
    return bool((allowed == causal).all())


def s2_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention-interface function (same contract as
    ``transformers.integrations.sdpa_attention.sdpa_attention_forward``): q ``[B, Hq, N, D]``,
    k/v ``[B, Hkv, N, D]``; returns ``(attn_output [B, N, Hq, D], None)``.

    In ``module.training`` mode runs S2-Attn; otherwise (evaluation, generation) it is
    exactly transformers' SDPA path with full causal attention.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if not module.training:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )

    if kwargs.get("softcap") is not None:
        raise ValueError("S2-Attn does not support attention logit softcapping")
    if kwargs.get("position_bias") is not None:
        raise ValueError("S2-Attn does not support an additive position_bias")
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if not causal:
        raise ValueError("S2-Attn is for causal decoder self-attention; got a non-causal attention call")
    q_len, kv_len = query.shape[2], key.shape[2]
    if kv_len != q_len:
        raise ValueError(
            f"S2-Attn training needs self-attention over the whole sequence (query length {q_len} != key "
            f"length {kv_len}); disable the KV cache (use_cache=False) in training"
        )
    segments = kwargs.get("packed_segments")
    if segments is None and attention_mask is not None and not _mask_is_plain_causal(attention_mask, q_len, kv_len):
        raise ValueError(
            "S2-Attn training expects right-padded batches without an attention mask (right padding is "
            "harmless under causal attention; set the labels of pad tokens to -100). Got an attention mask "
            "with padding or packed-sequence information: pass attention_mask=None and do not pack several "
            "sequences into one row with restarting position_ids."
        )

    group_size = s2_group_size_for(getattr(module, "config", None), q_len)
    if segments is not None:  # packed rows (ftcluster/model/packed.py): groups within each sample
        return s2_attention_packed(query, key, value, segments=segments, group_size=group_size,
                                   dropout_p=dropout, scale=scaling), None
    out = s2_attention(query, key, value, group_size=group_size, dropout_p=dropout, scale=scaling)
    return out.transpose(1, 2), None  # [B, N, Hq, D], contiguous


def s2_attention_packed(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                        segments: tuple[tuple[tuple[int, int], ...], ...], group_size: int,
                        dropout_p: float = 0.0, scale: float | None = None) -> torch.Tensor:
    """S2-Attn on packed rows: `segments[b]` are the (start, stop) spans of row b's samples (and
    its padded tail), host integers. Each span is its own sequence: the groups and the half-group
    shift start at its first token, and a span of at most `group_size` tokens attends fully
    (causally), as that sample trained alone would. Returns ``[B, N, Hq, Dv]``."""
    B, Hq, N, _ = q.shape
    out = q.new_empty(B, N, Hq, v.shape[3])
    gqa = k.shape[1] != Hq
    for b, spans in enumerate(segments):
        for start, stop in spans:
            qs, ks, vs = (x[b:b + 1, :, start:stop] for x in (q, k, v))
            if stop - start <= group_size:
                o = _sdpa(qs, ks, vs, gqa, dropout_p, scale)
            else:
                o = s2_attention(qs, ks, vs, group_size=group_size, dropout_p=dropout_p, scale=scale)
            out[b:b + 1, start:stop].copy_(o.transpose(1, 2))
    return out


def register_s2_attention(name: str = "s2_attn") -> str:
    """Make S2-Attn selectable as ``attn_implementation=name`` in transformers models.

    This is the transformers attention-interface registration
    (``AttentionInterface.register``), never a monkey-patch of model classes: any model whose
    attention layers dispatch through ``ALL_ATTENTION_FUNCTIONS`` (Llama, Mistral, Qwen2, ...)
    picks it up via ``config._attn_implementation``. We also register transformers' SDPA mask
    builder under the same name (``AttentionMaskInterface.register``): for names without a
    mask builder transformers silently drops the attention mask altogether, which would make
    eval/generation with padding wrong and hide padded batches from the training check.
    Idempotent.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    existing = AttentionInterface._global_mapping.get(name)
    if existing is not None and existing is not s2_attention_forward:
        raise ValueError(f"attention implementation {name!r} is already registered to {existing!r}")
    if name == "eager":
        raise ValueError("'eager' is reserved by transformers")
    AttentionInterface.register(name, s2_attention_forward)
    AttentionMaskInterface.register(name, sdpa_mask)
    return name
