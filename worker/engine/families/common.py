"""Pieces shared by the full-attention families: the engine's forward convention and rotary tables.

Every family model answers ``forward(input_ids, attention_mask, position_ids, logits_to_keep,
past_key_values, use_cache)`` like the built-in model (worker/engine/builtin/modeling.py), so one
engine drives them all:

- ``attention_mask``: bool (B, 1, Lq, Lk), True = may attend, or (B, Lk) key padding (1 = real);
  None = every query sees every key.
- ``past_key_values``: per layer (keys, values) of earlier columns, (B, H_kv, Lpast, D), keys
  already rotated; the mask then covers Lpast + Lq keys in that order (cache first, then inputs).
  With ``write_offset`` they are instead the whole canvas's, (B, H_kv, Lk, D): the inputs are its
  columns [write_offset, write_offset + Lq), whose keys and values are written there in place, and
  they attend to all Lk columns (the approximate caches refresh a window of the canvas this way,
  without copying the cache every step).
- ``logits_to_keep``: 0 = all positions, an int N = the last N, or a 1-D LongTensor of positions
  (transformers' convention), so a full-attention step projects only the active block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.utils import ModelOutput


@dataclass
class FamilyOutput(ModelOutput):
    """Logits, and with ``use_cache`` the per-layer (keys, values) of past + input positions.

    (Not named ``past_key_values``: transformers 5's ModelOutput renames that field to ``cache``.)
    """

    logits: torch.Tensor | None = None
    key_values: list[tuple[torch.Tensor, torch.Tensor]] | None = None


def as_attention_mask(attention_mask, batch: int, length: int, key_length: int):
    """Normalise the mask to bool (B, 1, Lq, Lk), True = may attend; None stays None (full attention)."""
    if attention_mask is None:
        return None
    if attention_mask.dim() == 2:
        if tuple(attention_mask.shape) != (batch, key_length):
            raise ValueError(f"a 2-D attention_mask must be (B, Lk) = {(batch, key_length)}")
        return attention_mask.bool()[:, None, None, :]
    if attention_mask.dim() != 4 or tuple(attention_mask.shape[-2:]) != (length, key_length):
        raise ValueError(
            f"attention_mask must be (B, Lk) or (B, 1, Lq, Lk) with Lq = {length}, Lk = {key_length}, "
            f"got {tuple(attention_mask.shape)}"
        )
    if attention_mask.dtype != torch.bool:
        raise ValueError("a 4-D attention_mask must be a bool tensor (True = may attend)")
    return attention_mask


def default_position_ids(input_ids: torch.Tensor, past_length: int) -> torch.Tensor:
    batch, length = input_ids.shape
    return torch.arange(past_length, past_length + length, device=input_ids.device).expand(batch, length)


def past_length_of(past_key_values) -> int:
    return 0 if past_key_values is None else past_key_values[0][0].shape[2]


def key_length_of(past_key_values, length: int, write_offset: int | None) -> int:
    """The keys a forward of ``length`` inputs attends to (see the module docstring)."""
    if write_offset is not None:
        if past_key_values is None or not 0 <= write_offset <= past_key_values[0][0].shape[2] - length:
            raise ValueError("write_offset needs past_key_values with room for the inputs at that offset")
        return past_key_values[0][0].shape[2]
    return past_length_of(past_key_values) + length


def rotary_angles(position_ids: torch.Tensor, head_dim: int, theta: float):
    """float32 cos/sin (B, L, head_dim) for ``position_ids`` (B, L): the "rotate half" RoPE layout
    (frequencies repeated over both halves) that LLaDA and Dream (Qwen2) both use."""
    inv_freq = 1.0 / theta ** (
        torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim)
    freqs = position_ids[..., None].float() * inv_freq  # (B, L, head_dim / 2)
    angles = torch.cat((freqs, freqs), dim=-1)  # (B, L, head_dim)
    return angles.cos(), angles.sin()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (B, H, L, D) by the tables (B, L, D), in the tables' dtype."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


def attend(q, k, v, attention_mask, past, write_offset=None):
    """Scaled dot-product attention of q (B, Hq, L, D) over past + (k, v) (B, Hkv, ., D), no causal
    mask (masked diffusion sees both ways), or with ``write_offset`` over the canvas buffers ``past``
    with (k, v) written into them there. Returns the output and the (keys, values) to cache."""
    if write_offset is not None:
        end = write_offset + k.shape[2]
        past[0][:, :, write_offset:end], past[1][:, :, write_offset:end] = k, v
        k, v = past
    elif past is not None:
        k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
    gqa = q.shape[1] != k.shape[1]  # grouped-query heads: query head h reads kv head h // group
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, enable_gqa=gqa)
    return out, (k, v)


def keep_positions(hidden: torch.Tensor, logits_to_keep) -> torch.Tensor:
    """The hidden states whose logits are wanted: see the module docstring."""
    if isinstance(logits_to_keep, torch.Tensor):
        if logits_to_keep.dim() != 1:
            raise ValueError("logits_to_keep as a tensor must be 1-D positions")
        return hidden.index_select(1, logits_to_keep.to(hidden.device))
    if not isinstance(logits_to_keep, int) or logits_to_keep < 0:
        raise ValueError("logits_to_keep must be an int >= 0 or a 1-D tensor of positions")
    return hidden[:, -logits_to_keep:] if logits_to_keep else hidden
