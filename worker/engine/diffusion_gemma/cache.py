"""The encoder KV cache of a continuously batched DiffusionGemma: one slot per row, rows of any length.

transformers' DynamicCache holds one length for the whole batch; here slot r holds its row's keys and
values at positions [0, lengths[r]) of per-layer tensors (slots, kv_heads, capacity, head_dim), so
rows with different prompts and different numbers of finished canvases share one decoder pass.
Active rows occupy slots 0..n-1 (``move`` compacts on eviction), so the decoder reads plain views.

Two faces for the HF modules (``modeling_diffusion_gemma.py``): the encoder attention calls
``update(keys, values, layer_idx)`` and attends over what it returns; the decoder attention reads
``layers[i].keys`` / ``.values`` and appends the canvas itself (it never writes the cache).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class _LayerView:
    keys: torch.Tensor
    values: torch.Tensor


class _DecoderView:
    """What the decoder reads: slots [0, n), positions [0, span)."""

    is_compileable = False

    def __init__(self, layers: list[_LayerView]):
        self.layers = layers


class _EncoderWriter:
    """What the encoder writes through: new tokens of ``rows`` at ``positions`` (R, N)."""

    is_compileable = False

    def __init__(self, cache: RowKVCache, rows: torch.Tensor, positions: torch.Tensor, span: int):
        self.cache, self.rows, self.positions, self.span = cache, rows, positions, span

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Write (R, H, N, D) at each row's positions; return the rows' (R, H, span, D) keys/values."""
        keys, values = self.cache.layer(layer_idx, key_states, value_states)
        slot_index = self.rows[:, None]  # (R, 1) with positions (R, N): advanced indices -> (R, N, H, D)
        keys[slot_index, :, self.positions] = key_states.transpose(1, 2)
        values[slot_index, :, self.positions] = value_states.transpose(1, 2)
        return keys[self.rows, :, : self.span], values[self.rows, :, : self.span]


class RowKVCache:
    def __init__(self, num_layers: int, num_slots: int, device: torch.device, capacity_step: int):
        self.num_layers, self.num_slots, self.device = num_layers, num_slots, device
        self.capacity_step = capacity_step  # grow in multiples of this (a canvas, typically)
        self.capacity = 0
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.lengths = [0] * num_slots  # host copy: capacity and span decisions need no device sync

    def layer(self, idx: int, like_keys: torch.Tensor,
              like_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Storage of layer ``idx``, allocated on first use (layers differ in heads and head_dim)."""
        keys, values = self.keys[idx], self.values[idx]
        if keys is None or values is None:
            heads, dim = like_keys.shape[1], like_keys.shape[3]
            shape = (self.num_slots, heads, self.capacity, dim)
            keys = self.keys[idx] = like_keys.new_zeros(shape)
            values = self.values[idx] = like_values.new_zeros((*shape[:3], like_values.shape[3]))
        return keys, values

    def reserve(self, needed: int) -> None:
        """Make room for ``needed`` positions in every slot (existing contents kept)."""
        if needed <= self.capacity:
            return
        new_capacity = max(-(-needed // self.capacity_step) * self.capacity_step, 2 * self.capacity)
        for store in (self.keys, self.values):
            for i, tensor in enumerate(store):
                if tensor is not None:
                    grown = tensor.new_zeros((*tensor.shape[:2], new_capacity, tensor.shape[3]))
                    grown[:, :, : self.capacity] = tensor
                    store[i] = grown
        self.capacity = new_capacity

    def writer(self, slots: list[int], num_new: int) -> tuple[_EncoderWriter, torch.Tensor]:
        """A writer for ``num_new`` (padded) tokens after each slot's prefix, and their positions (R, N)."""
        starts = torch.tensor([self.lengths[s] for s in slots], device=self.device)
        positions = starts[:, None] + torch.arange(num_new, device=self.device)[None]  # (R, N)
        span = max(self.lengths[s] for s in slots) + num_new
        self.reserve(span)
        rows = torch.tensor(slots, device=self.device)
        return _EncoderWriter(self, rows, positions, span), positions

    def decoder_view(self, num_rows: int) -> _DecoderView:
        span = max(self.lengths[:num_rows])
        layers = []
        for k, v in zip(self.keys, self.values, strict=True):
            if k is None or v is None:
                raise RuntimeError("the decoder reads a layer the encoder has not written")
            layers.append(_LayerView(k[:num_rows, :, :span], v[:num_rows, :, :span]))
        return _DecoderView(layers)

    def move(self, src: int, dst: int) -> None:
        """Copy slot ``src`` into slot ``dst`` (compaction after an eviction)."""
        for store in (self.keys, self.values):
            for tensor in store:
                if tensor is not None:
                    tensor[dst] = tensor[src]
        self.lengths[dst] = self.lengths[src]
