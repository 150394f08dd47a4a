"""Which cache a model runs with, and the step forward of a laid-out canvas for it."""

from __future__ import annotations

from ..layout import BatchLayout
from .approx import DualCache, FullRecompute, PrefixCache
from .base import StepForward
from .recompute import Recompute

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


def make_forward(mode: str, model, layout: BatchLayout, *, logits_shift: int = 0) -> StepForward:
    """The step forward for ``mode`` (see resolve_cache_mode) on this batch's laid-out canvas."""
    if not layout.full_attention:
        if logits_shift:
            raise ValueError("logits_shift applies to full-attention layouts only")
        if mode != "none":  # "exact" and "delayed" keep a KV cache across rounds (schedulers/block.py)
            raise ValueError(f"cache {mode!r} does not run on a laid-out block-causal canvas")
        return Recompute(model, layout)
    classes: dict[str, type[FullRecompute]] = {"none": FullRecompute, "prefix": PrefixCache, "dual": DualCache}
    if mode not in classes:
        raise ValueError(f"cache {mode!r} does not apply to full-attention models")
    return classes[mode](model, layout, logits_shift=logits_shift)
