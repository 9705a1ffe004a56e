"""`train.mlp_tile_tokens`: each decoder layer's MLP run over its tokens in tiles.

The MLP is position-wise, so it can run on any split of the tokens. Its intermediates (gate and up
outputs and their product: 3 x intermediate_size values per token, 3.5x the hidden size for Llama)
are the largest tensors of a layer at long context: 8B at 393,216 tokens holds 34 GB of them for
one layer's backward, the working set that full checkpointing still needs. Tiled, the forward
keeps only the MLP's input and output, and the backward recomputes one tile at a time and
back-propagates it at once, so the intermediates exist for one tile. Cost: one more MLP forward per
step (the tile recompute), as with checkpointing. The design is Arctic Long Sequence Training's
`TiledMLP` (Snowflake, 2025) and Unsloth's tiled MLP; ours is written for our LoRA and fused LoRA
projections and FSDP2 and is about fifty lines, hence not a dependency.

Parameter gradients are accumulated by the inner backward straight into the (unsharded) parameters'
`.grad`, inside the layer's own backward, where FSDP2 expects them before its post-backward
reduce-scatter. DeepSpeed (whose ZeRO-3 gathers parameters per module call and whose gradient hooks
were not tested with an inner backward) and torch.compile (the inner backward is a graph break)
are refused at compose.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn as nn


class TiledMLPFn(torch.autograd.Function):
    """y = mlp(x), computed tile by tile; only x is saved. `mlp` is the module's own forward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, mlp: Callable[[torch.Tensor], torch.Tensor], tile: int) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        out = torch.empty_like(flat)  # the MLP maps hidden -> hidden; filled tile by tile (no concat copy)
        with torch.no_grad():
            for start in range(0, flat.shape[0], tile):
                out[start:start + tile] = mlp(flat[start:start + tile])
        ctx.save_for_backward(x)
        ctx.mlp, ctx.tile = mlp, tile
        return out.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        (x,) = ctx.saved_tensors
        flat = x.reshape(-1, x.shape[-1])
        g = grad.reshape(-1, grad.shape[-1])
        dx = torch.empty_like(flat) if ctx.needs_input_grad[0] else None
        for start in range(0, flat.shape[0], ctx.tile):
            part = flat[start:start + ctx.tile].detach().requires_grad_(ctx.needs_input_grad[0])
            with torch.enable_grad():
                y = ctx.mlp(part)
            if not y.requires_grad:  # nothing in the MLP trains and its input needs no gradient
                continue
            # Every leaf of the tile's graph gets its gradient: the trainable parameters accumulate
            # into .grad (as an untiled backward would), the tile's input into part.grad.
            torch.autograd.backward(y, g[start:start + ctx.tile])
            if dx is not None:
                dx[start:start + ctx.tile] = part.grad
        return (None if dx is None else dx.view_as(x)), None, None


def apply_tiled_mlp(layers: list[nn.Module], *, tile_tokens: int) -> int:
    """Make every decoder layer's `mlp` run in tiles of `tile_tokens` tokens (in place: the module
    and its parameter names are unchanged, only its forward is wrapped). Returns how many."""
    count = 0
    for layer in layers:
        mlp = layer.mlp
        inner = mlp.forward  # the bound forward of this module (Liger's SwiGLU or HF's MLP)

        def tiled(x: torch.Tensor, _inner: Callable[[torch.Tensor], torch.Tensor] = inner) -> torch.Tensor:
            if not torch.is_grad_enabled() or x.shape[:-1].numel() <= tile_tokens:
                return _inner(x)  # evaluation, or nothing to tile
            return TiledMLPFn.apply(x, _inner, tile_tokens)

        mlp.forward = tiled
        count += 1
    return count
