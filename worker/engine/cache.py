"""How a denoising step gets its block's logits when nothing is cached: recompute the prefix.

Every step strategy is a callable ``forward(x[:, :end], slots) -> (B, n, V)``: the logits of the
active block (the last ``block_length`` columns) at its positions ``slots`` (B, n), the ones the
sampler still has to fill (a model that can project only those saves the rest of the vocabulary
projection; others project the block and take them with ``take_slots``). So the samplers run one
loop whatever the cache (docs/architecture.md: one loop, pluggable cache): this one,
the approximate caches of full-attention models (approx_cache.py), and the exact per-block cache of
block-causal models, which lives in the continuous scheduler (scheduler.py) because there the cache
is the running batch's whole state.
"""

from __future__ import annotations

import torch

from .layout import BatchLayout


def take_slots(logits: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """(B, K, V) block logits -> (B, n, V) at the block positions ``slots`` (B, n)."""
    return logits.gather(1, slots[..., None].expand(-1, -1, logits.shape[-1]))


class Recompute:
    """Every step runs the whole prefix: no state, the baseline the caches are checked against."""

    def __init__(self, model, layout: BatchLayout):
        self.model, self.layout = model, layout
        self.extra_passes = 0

    def __call__(self, prefix: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        end, block = prefix.shape[1], self.layout.block_length
        output = self.model(input_ids=prefix, attention_mask=self.layout.attention_mask[:, :, :end, :end],
                            position_ids=self.layout.position_ids[:, :end], logits_to_keep=block)
        return take_slots(output.logits[:, -block:], slots)
