"""Attention for packed rows: never across samples, through an existing kernel.

A packed `Batch` (ftcluster/data/packing.py) holds several samples per row, with position ids
restarting at each and segment ids naming the sample of every position. The decoder gets them as:

* CUDA, `model.attn_implementation=sdpa`: a flex-attention `BlockMask` (document mask: same
  segment and causal), built once per micro-batch here, outside the layers; the layers run
  `packed_attention_forward`, registered with transformers' AttentionInterface, which hands a
  BlockMask to transformers' compiled flex attention and anything else (evaluation's and
  generation's padding masks) to transformers' SDPA unchanged.
* FlashAttention installed (`flash_attn` importable, CUDA): its variable-length path, through
  transformers' own `cu_seq_lens_*` arguments on rows flattened into one.
* `s2_attn` (LongLoRA): segment bounds on the host; S2-Attn groups and shifts within each sample
  (ftcluster/attention.py).
* Otherwise (CPU, the tests): a dense block-diagonal causal mask [rows, 1, width, width], which
  transformers passes to the attention function as is.
"""
from __future__ import annotations

import importlib.util
import logging
from typing import Any

import torch
import torch.nn as nn

from ftcluster.config import S2_ATTN

PACKED_SDPA = "ftcluster_packed"
"""Attention implementation the model is built with for packed training when sdpa was asked."""
FLASH = ("flash_attention_2", "flash_attention_3")
log = logging.getLogger(__name__)


def packed_attn_implementation(asked: str) -> str:
    """The attention implementation to build the model with when training on packed rows."""
    if asked == "sdpa":
        if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
            log.info("packed rows: FlashAttention variable-length attention (flash_attn is installed)")
            return "flash_attention_2"
        register_packed_attention()
        log.info("packed rows: %s", "flex attention with a document BlockMask" if torch.cuda.is_available()
                 else "SDPA with a dense block-diagonal causal mask (no CUDA)")
        return PACKED_SDPA
    log.info("packed rows: model.attn_implementation=%s with %s", asked,
             "per-sample S2-Attn groups" if asked == S2_ATTN else "a block-diagonal causal mask")
    return asked


def packed_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: Any, dropout: float = 0.0, scaling: float | None = None,
                             is_causal: bool | None = None, **kwargs: Any) -> tuple[torch.Tensor, Any]:
    """transformers attention-interface function: flex attention for a BlockMask (packed rows on
    CUDA), transformers' SDPA for anything else. `kwargs` are the interface's own (it forwards the
    decoder's keyword arguments to every attention function)."""
    from torch.nn.attention.flex_attention import BlockMask

    if isinstance(attention_mask, BlockMask):
        from transformers.integrations.flex_attention import flex_attention_forward

        return flex_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout)
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **kwargs)


def register_packed_attention() -> str:
    """Register `packed_attention_forward` under PACKED_SDPA with transformers' attention and mask
    interfaces (the SDPA mask builder, so evaluation and generation get SDPA's masks). Idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(PACKED_SDPA, packed_attention_forward)
    AttentionMaskInterface.register(PACKED_SDPA, sdpa_mask)
    return PACKED_SDPA


def row_segments(batch: Any) -> tuple[tuple[tuple[int, int], ...], ...]:
    """Host-side (start, stop) of every segment of every row (samples, then the padded tail)."""
    out = []
    for lens in batch.seq_lens:
        bounds, t = [], 0
        for n in lens:
            bounds.append((t, t + n))
            t += n
        if t < batch.width:
            bounds.append((t, batch.width))
        out.append(tuple(bounds))
    return tuple(out)


def document_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """Dense bool [rows, 1, width, width]: query i sees key j iff same segment and j <= i."""
    width = segment_ids.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=segment_ids.device).tril()
    return ((segment_ids[:, :, None] == segment_ids[:, None, :]) & causal)[:, None]


def document_block_mask(segment_ids: torch.Tensor):  # type: ignore[no-untyped-def]
    """The same mask as a flex-attention BlockMask (block-sparse: blocks across samples are skipped)."""
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q, kv):  # type: ignore[no-untyped-def]
        return (segment_ids[b, q] == segment_ids[b, kv]) & (kv <= q)

    rows, width = segment_ids.shape
    return create_block_mask(mask_mod, B=rows, H=None, Q_LEN=width, KV_LEN=width, device=segment_ids.device)


def packed_hidden(decoder: nn.Module, batch: Any, *, attn_implementation: str) -> torch.Tensor:
    """The decoder's last hidden states [rows, width, d] for a packed batch."""
    if attn_implementation in FLASH:
        rows, width = batch.input_ids.shape
        # transformers' FlashAttention path takes one flattened row with cu_seq_lens (varlen).
        out = decoder(input_ids=batch.input_ids.reshape(1, -1), position_ids=batch.position_ids.reshape(1, -1),
                      cu_seq_lens_q=batch.cu_seqlens, cu_seq_lens_k=batch.cu_seqlens, max_length_q=width,
                      max_length_k=width, use_cache=False).last_hidden_state
        return out.reshape(rows, width, -1)
    if attn_implementation == S2_ATTN:
        # S2-Attn reads the segments, not a mask. A 4D mask goes through transformers as is: this
        # all-true stand-in keeps it from building a dense width x width packed mask from the
        # restarting positions (and from reading the device to detect them).
        keep = torch.ones(batch.input_ids.shape[0], 1, 1, 1, dtype=torch.bool, device=batch.input_ids.device)
        return decoder(input_ids=batch.input_ids, position_ids=batch.position_ids, attention_mask=keep,
                       use_cache=False, packed_segments=row_segments(batch)).last_hidden_state
    seg = batch.segment_ids
    if attn_implementation == PACKED_SDPA and seg.device.type == "cuda":
        mask: Any = document_block_mask(seg)
    else:
        mask = document_mask(seg)
        if attn_implementation not in ("sdpa", PACKED_SDPA):  # eager and others add the mask to the scores
            mask = torch.zeros(mask.shape, dtype=torch.float32, device=seg.device).masked_fill(~mask, float("-inf"))
    return decoder(input_ids=batch.input_ids, position_ids=batch.position_ids, attention_mask=mask,
                   use_cache=False).last_hidden_state
