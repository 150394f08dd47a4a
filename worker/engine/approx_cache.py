"""Full-attention models (LLaDA, Dream): recompute, or Fast-dLLM's approximate prefix / dual KV cache.

Same shape as cache.py's callables, ``forward(x[:, :end], slots) -> logits at the active block's
positions ``slots``, (B, n, V)``,
so ``samplers.denoise_block`` runs one loop whatever the model family and cache (docs/architecture.md). For
full attention the whole canvas (prompt and every generation block, the future ones still masked)
is in every forward, as these models were trained; ``x[:, :end]`` only says which block is active,
and the tokens are read from ``layout.x``, the canvas it is a view of.

Wu et al. 2025, "Fast-dLLM" (arXiv:2505.22618, §3.2): within a block, the keys and values of the
other columns barely change between steps, so they are computed once per block (the "refresh", a
full forward whose logits also serve the block's first step) and reused for its remaining steps:
- PrefixCache reuses the columns before the block; each step runs the block and everything after it.
- DualCache also reuses the columns after the block (the masked future); each step runs the block only.
Approximate, unlike the block-causal exact cache (scheduler.py): the cached prompt keys were computed while the
block was still masked. The first step of every block is exact (the refresh is a full recompute).

Dream-style models read the logit of column i at column i - 1 (``logits_shift`` = 1), so the query
window starts ``logits_shift`` columns before the block, and that column leaves the cache to be
recomputed with the block. (Fast-dLLM's Dream code instead reuses the block's first column's own
logit for it; reading the previous column keeps recompute and cache on the same definition.)
"""

from __future__ import annotations

import torch

from .cache import Recompute, take_slots
from .layout import BatchLayout

CACHE_MODES = ("exact", "delayed", "prefix", "dual", "none")
BLOCK_CAUSAL_MODES = ("exact", "delayed", "none")  # delayed: exact across blocks, approximate within
FULL_ATTENTION_MODES = ("prefix", "dual", "none")


def resolve_cache_mode(cache: str | None, *, full_attention: bool, kv_cache: bool = True) -> str:
    """The cache for a model family: None picks the fastest ("exact" for block-causal models, Fast-dLLM's
    "dual" for full attention), or "none" when ``kv_cache`` is False."""
    allowed = FULL_ATTENTION_MODES if full_attention else BLOCK_CAUSAL_MODES
    if cache is None:
        return ("dual" if full_attention else "exact") if kv_cache else "none"
    if cache not in CACHE_MODES:
        raise ValueError(f"cache must be one of {list(CACHE_MODES)}, got {cache!r}")
    if cache not in allowed:
        kind = "full-attention" if full_attention else "block-causal"
        raise ValueError(f"cache {cache!r} does not apply to {kind} models; use one of {list(allowed)}")
    return cache


def make_forward(mode: str, model, layout: BatchLayout, *, logits_shift: int = 0):
    """The step callable for ``mode`` (see resolve_cache_mode) on this batch's layout."""
    if not layout.full_attention:
        if logits_shift:
            raise ValueError("logits_shift applies to full-attention layouts only")
        if mode != "none":  # "exact" and "delayed" keep a KV cache across rounds (scheduler.py)
            raise ValueError(f"cache {mode!r} does not run on a laid-out block-causal canvas")
        return Recompute(model, layout)
    classes = {"none": FullRecompute, "prefix": PrefixCache, "dual": DualCache}
    if mode not in classes:
        raise ValueError(f"cache {mode!r} does not apply to full-attention models")
    return classes[mode](model, layout, logits_shift=logits_shift)


class FullRecompute:
    """Every step runs the whole canvas: the reference the approximate caches are measured against."""

    def __init__(self, model, layout: BatchLayout, *, logits_shift: int = 0):
        if not layout.full_attention:
            raise ValueError("full-attention forwards need a layout built with full_attention=True")
        if not 0 <= logits_shift <= layout.prompt_length:
            raise ValueError(f"logits_shift must be in [0, prompt length {layout.prompt_length}]")
        self.model, self.layout, self.shift = model, layout, logits_shift
        self.extra_passes = 0  # the refresh doubles as a block's first step: no pass is extra

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
    """Reuse the keys and values of columns [0, block start - shift) for the block's steps.

    The cache is the refresh pass's keys and values of the whole canvas; a step runs its window of
    columns (here the block and everything after it), writes their keys and values over the
    window's in place and attends to every column. So no step copies the cache (a concatenation
    of cache and window did, every step)."""

    def __init__(self, model, layout: BatchLayout, *, logits_shift: int = 0):
        super().__init__(model, layout, logits_shift=logits_shift)
        self.block_start = None  # the block the cache was refreshed for
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
