"""Explicit attention masks for rows of different lengths, per layer type.

The rules reproduce, row by row, what DiffusionGemma sees with transformers' DynamicCache
(``modeling_diffusion_gemma.py``, ``cache_utils.DynamicSlidingWindowLayer``, ``masking_utils``):
- encoder, full layers: causal over the row's own tokens;
- encoder, sliding layers: causal, and the key is less than ``window`` positions back;
- decoder, full layers: every cached token of the row, and the whole canvas (bidirectional);
- decoder, sliding layers: the last ``window - 1`` cached tokens of the row (all a sliding cache
  layer keeps), and the whole canvas.
Masks are boolean, True = attend (what sdpa takes); ``for_attention`` converts for eager attention.
"""

from __future__ import annotations

import torch


def encoder_masks(positions: torch.Tensor, span: int, window: int) -> dict[str, torch.Tensor]:
    """positions (R, N) of the new tokens; keys are positions [0, span). Returns (R, 1, N, span)."""
    keys = torch.arange(span, device=positions.device)[None, None, :]  # (1, 1, T)
    query = positions[:, :, None]  # (R, N, 1)
    causal = keys <= query
    return {"full_attention": causal[:, None], "sliding_attention": (causal & (keys > query - window))[:, None]}


def decoder_masks(lengths: torch.Tensor, span: int, canvas_length: int, window: int) -> dict[str, torch.Tensor]:
    """lengths (n,) of each row's prefix; keys are [cache 0..span) + canvas. Returns (n, 1, L, span + L)."""
    keys = torch.arange(span, device=lengths.device)[None, :]  # (1, T)
    cached = keys < lengths[:, None]  # (n, T)
    recent = cached & (keys >= lengths[:, None] - (window - 1))
    canvas = torch.ones((lengths.shape[0], canvas_length), dtype=torch.bool, device=lengths.device)

    def expand(prefix: torch.Tensor) -> torch.Tensor:
        row = torch.cat([prefix, canvas], dim=-1)  # (n, T + L)
        return row[:, None, None, :].expand(-1, 1, canvas_length, -1)

    return {"full_attention": expand(cached), "sliding_attention": expand(recent)}


def for_attention(masks: dict[str, torch.Tensor], implementation: str, dtype: torch.dtype) -> dict:
    """sdpa and flex take boolean masks; eager adds a float mask (0 or the dtype's minimum)."""
    if implementation != "eager":
        return masks
    floor = torch.finfo(dtype).min
    return {name: torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill_(~m, floor)
            for name, m in masks.items()}
