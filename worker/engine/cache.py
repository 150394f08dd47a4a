"""How a denoising step gets its block's logits: recompute the prefix, or reuse an exact block KV cache.

Both are callables ``forward(x[:, :end]) -> logits of the last block, (B, block_length, V)``, so the
samplers run one loop whatever the cache strategy (DESIGN.md §6: one loop, pluggable cache).
"""

from __future__ import annotations

import torch

from .layout import BatchLayout


class Recompute:
    """Every step runs the whole prefix: no state, the baseline the caches are checked against."""

    def __init__(self, model, layout: BatchLayout):
        self.model, self.layout = model, layout
        self.extra_passes = 0

    def __call__(self, prefix: torch.Tensor) -> torch.Tensor:
        end, block = prefix.shape[1], self.layout.block_length
        output = self.model(input_ids=prefix, attention_mask=self.layout.attention_mask[:, :, :end, :end],
                            position_ids=self.layout.position_ids[:, :end], logits_to_keep=block)
        return output.logits[:, -block:]


class ExactBlockCache:
    """Block-causal models: a finished block never changes and never attends forward, so its keys and
    values are computed once (after its last token is committed) and every later step runs only the
    active block against them. Exact, not approximate: the cached keys are those full recomputation
    would produce (SDAR / Fast-dLLM v2 block diffusion, arXiv:2509.26328).

    Cost per block: one pass over the finished block to cache it, then each step is a pass of
    ``block_length`` queries instead of the whole prefix.
    """

    def __init__(self, model, layout: BatchLayout):
        self.model, self.layout = model, layout
        self.key_values = None  # per layer (keys, values), (B, H, cached, D)
        self.cached = 0  # columns [0, cached) are in the cache
        self.extra_passes = 0  # prefill and cache-filling passes, on top of the denoising steps

    def __call__(self, prefix: torch.Tensor) -> torch.Tensor:
        end = prefix.shape[1]
        start = end - self.layout.block_length
        if self.cached < start:
            self._extend(prefix, start)
        output = self.model(input_ids=prefix[:, start:end], past_key_values=self.key_values,
                            attention_mask=self.layout.attention_mask[:, :, start:end, :end],
                            position_ids=self.layout.position_ids[:, start:end])
        return output.logits  # (B, block_length, V)

    def _extend(self, prefix: torch.Tensor, upto: int) -> None:
        """Cache columns [cached, upto): the prompt at the first block, then each finished block."""
        lo = self.cached
        output = self.model(input_ids=prefix[:, lo:upto], past_key_values=self.key_values,
                            attention_mask=self.layout.attention_mask[:, :, lo:upto, :upto],
                            position_ids=self.layout.position_ids[:, lo:upto], use_cache=True,
                            logits_to_keep=1)
        self.key_values, self.cached = output.key_values, upto
        self.extra_passes += 1
