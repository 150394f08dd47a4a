"""Full-attention models (LLaDA, Dream): recompute, or Fast-dLLM's approximate prefix and dual caches.

Each forward sees the whole canvas (prompt and every block, the future ones still masked), as these
models were trained; ``x[:, :end]`` only says which block is active, the tokens are read from
``layout.x``. Within a block the other columns' keys and values barely change between steps, so they
are computed once per block, by a full forward whose logits also serve the block's first step
(Wu et al. 2025, "Fast-dLLM", arXiv:2505.22618, §3.2). Approximate: the cached keys were computed
while the block was still masked; the first step of every block is exact.
"""

from __future__ import annotations

import torch

from ..layout import BatchLayout
from .base import take_slots


class FullRecompute:
    """A ``StepForward`` that runs the whole canvas every step: the reference the approximate caches
    are measured against. ``logits_shift`` 1 (Dream): column i's logit is read at column i - 1."""

    # A shifted model's query window starts logits_shift columns before the block, and that column
    # leaves the cache to be recomputed with the block. (Fast-dLLM's Dream code reuses the block's first
    # column's own logit instead; reading the previous column keeps recompute and cache on one definition.)

    def __init__(self, model, layout: BatchLayout, *, logits_shift: int = 0):
        if not layout.full_attention:
            raise ValueError("full-attention forwards need a layout built with full_attention=True")
        if not 0 <= logits_shift <= layout.prompt_length:
            raise ValueError(f"logits_shift must be in [0, prompt length {layout.prompt_length}]")
        self.model, self.layout, self.shift = model, layout, logits_shift

    def _span(self, prefix: torch.Tensor) -> tuple[int, int, int]:
        """(start, end, lo): the active block's columns and the first column whose logits it reads."""
        if prefix.data_ptr() != self.layout.x.data_ptr():
            raise ValueError("full-attention forwards take a column slice x[:, :end] of layout.x")
        end = prefix.shape[1]
        start = end - self.layout.block_length
        return start, end, start - self.shift

    def _logits_columns(self, first: int) -> torch.Tensor:
        return torch.arange(first, first + self.layout.block_length, device=self.layout.x.device)

    def _full_pass(self, lo: int, use_cache: bool = False):
        layout = self.layout
        return self.model(input_ids=layout.x, attention_mask=layout.attention_mask,
                          position_ids=layout.position_ids, logits_to_keep=self._logits_columns(lo),
                          use_cache=use_cache)

    def __call__(self, prefix: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        _, _, lo = self._span(prefix)
        return take_slots(self._full_pass(lo).logits, slots)  # (B, n, V)


class PrefixCache(FullRecompute):
    """Reuse the keys and values of columns [0, block start - shift) for the block's steps; a step
    runs the block and everything after it."""

    # The cache is the refresh pass's keys and values of the whole canvas; a step writes its window's
    # over the cache's in place and attends to every column, so no step copies the cache.

    def __init__(self, model, layout: BatchLayout, *, logits_shift: int = 0):
        super().__init__(model, layout, logits_shift=logits_shift)
        self.block_start: int | None = None  # the block the cache was refreshed for
        self.key_values = None  # per layer (keys, values) of every column of the canvas, (B, H_kv, L, D)

    def __call__(self, prefix: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        start, end, lo = self._span(prefix)
        if start != self.block_start:
            return take_slots(self._refresh(start, lo), slots)
        hi = self._window_end(end)
        layout = self.layout
        output = self.model(input_ids=layout.x[:, lo:hi], past_key_values=self.key_values, write_offset=lo,
                            attention_mask=layout.attention_mask[:, :, lo:hi],
                            position_ids=layout.position_ids[:, lo:hi], logits_to_keep=self._logits_columns(0))
        return take_slots(output.logits, slots)  # (B, n, V)

    def _window_end(self, end: int) -> int:
        return self.layout.x.shape[1]  # the block and everything after it

    def _refresh(self, start: int, lo: int) -> torch.Tensor:
        output = self._full_pass(lo, use_cache=True)
        self.key_values = output.key_values
        self.block_start = start
        return output.logits


class DualCache(PrefixCache):
    """Reuse the keys and values of every column outside [block start - shift, block end): the prefix
    and the still-masked future blocks. Cheapest step: only the block's own columns run."""

    def _window_end(self, end: int) -> int:
        return end
