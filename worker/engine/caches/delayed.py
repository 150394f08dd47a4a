"""Delayed caching inside the active block: committed positions stop being recomputed (approximate).

A position committed before a step is computed once more in that step, with its token as input, and
its keys and values are then kept for the rest of the block; later steps run only the positions not
kept. The one-step delay is dKV-Cache's rule (Ma et al. 2025, arXiv:2505.15781, §3): a token's
representation still moves in the step it is decoded, and is stable after. Only inside the active
block: the finished block is still cached exactly by its own pass over the clean tokens.
"""

from __future__ import annotations

import torch

from .base import take_slots

# Every this many steps the whole block runs again and every kept position is computed afresh, as
# Fast-dLLM refreshes its approximate caches (arXiv:2505.22618, §3.2); docs/architecture.md measures it.
REFRESH_EVERY = 4


class DelayedBlockForward:
    """A ``StepForward`` ``(block, slots) -> (B, n, V)`` for one round of the block scheduler. ``key_values``:
    per layer (B, H, C + K, D), the exact cache (C = ``key_valid``'s columns) with room for the block,
    where kept positions' keys and values go; ``positions`` (B, K): the block's position ids."""

    # Logits of kept positions stay as last computed: they are committed, so the samplers never read
    # them. Rows keep different numbers of positions, so each step runs, per row, the positions not
    # kept, padded to the longest such list with kept positions whose outputs and keys are ignored: a
    # row's tokens never depend on its batch-mates.

    def __init__(self, model, key_values, key_valid: torch.Tensor, positions: torch.Tensor, mask_token_id: int,
                 refresh_every: int = REFRESH_EVERY):
        self.model, self.mask_token_id = model, mask_token_id
        self.refresh_every, self.steps = refresh_every, 0
        self.cache_valid, self.positions = key_valid, positions
        batch, block_length = positions.shape
        self.cache_length = key_valid.shape[1]
        self.key_values = key_values
        self.kept = torch.zeros((batch, block_length), dtype=torch.bool, device=positions.device)
        self.logits: torch.Tensor | None = None  # (B, K, V)
        self.computed = 0  # positions run, summed over rows and steps (the benchmark's count)

    def __call__(self, block: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        batch, block_length = block.shape
        if self.refresh_every and self.steps and self.steps % self.refresh_every == 0:
            self.kept.zero_()  # a full pass over the block: every kept position is computed afresh
        self.steps += 1
        # The positions to run first (stable, so in block order), then kept ones as padding.
        order = self.kept.to(torch.int8).argsort(dim=1, stable=True)  # (B, K)
        width = int((~self.kept).sum(dim=1).max())  # the step's one extra host sync
        chosen = order[:, :width]  # (B, n)
        real = ~self.kept.gather(1, chosen)  # (B, n): False = padding
        self.computed += int(real.sum())
        ids = block.gather(1, chosen)
        keys = torch.cat([self.cache_valid, self.kept, real], dim=1)
        mask = keys[:, None, None, :].expand(-1, 1, width, -1)  # (B, 1, n, keys)
        output = self.model(input_ids=ids, past_key_values=self.key_values, attention_mask=mask,
                            position_ids=self.positions.gather(1, chosen), use_cache=True)
        logits = self.logits
        if logits is None:
            logits = self.logits = output.logits.new_zeros((batch, block_length, output.logits.shape[-1]))
        logits.scatter_(1, chosen[:, :, None].expand_as(output.logits), output.logits)
        self._keep(output.key_values, chosen, real & (ids != self.mask_token_id), width)
        return take_slots(logits, slots)

    def _keep(self, key_values, chosen: torch.Tensor, newly_kept: torch.Tensor, width: int) -> None:
        """Store the keys and values this step computed for positions that were already committed."""
        start = self.cache_length
        write = newly_kept[:, None, :, None]  # (B, 1, n, 1)
        for layer_store, layer_new in zip(self.key_values, key_values, strict=False):
            for store, new in zip(layer_store, layer_new, strict=False):  # keys, then values: (B, H, ., D)
                block_store, step_columns = store[:, :, start:], new[:, :, -width:]
                index = chosen[:, None, :, None].expand_as(step_columns)
                block_store.scatter_(2, index, torch.where(write, step_columns, block_store.gather(2, index)))
        self.kept |= torch.zeros_like(self.kept).scatter_(1, chosen, newly_kept)
