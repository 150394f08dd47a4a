"""Delayed caching inside the active block: committed positions stop being recomputed.

The exact cache (scheduler.py) makes finished blocks free, but every step of a block still runs all
``block_length`` of its positions, though only the still-masked ones need logits and a committed
token's keys and values barely change once it is committed. Here a position committed before a step
is computed once more in that step, with its token as input, and its keys and values are then kept
for the rest of the block; later steps run only the positions not yet kept. At the reference
sampler's one token a pass a step runs ~half the block on average instead of all of it.

Approximate, unlike the exact cache: a kept position's keys were computed when more of the block
was masked. Only inside the active block: the finished block is still cached exactly by its own
pass over the clean tokens (scheduler._denoise_round), so the error does not carry to later blocks.
The one-step delay is dKV-Cache's rule (Ma et al. 2025, "dKV-Cache: The Cache for Diffusion
Language Models", arXiv:2505.15781, §3): a token's representation still moves in the step it is
decoded, and is stable after. Written for this engine; none of their code is used.

Every ``REFRESH_EVERY`` steps the whole block runs again and every kept position is computed afresh
(Fast-dLLM refreshes its approximate caches the same way, per block; arXiv:2505.22618, §3.2). Measured
on the built-in model along exact reference trajectories (16 held-out prompts, 64 tokens): the
position and token a step commits agree with the exact cache's on 88.4% of steps without refresh and
96.9% with a refresh every 4 steps, which still skips about a third of the positions a block runs.

Rows of a batch keep different numbers of positions, so each step runs, per row, the positions not
kept, padded to the longest such list with kept positions whose outputs and keys are ignored: a
row's tokens never depend on its batch-mates.
"""

from __future__ import annotations

import torch

from .cache import take_slots

REFRESH_EVERY = 4


class DelayedBlockForward:
    """``forward(block, slots) -> logits (B, n, V)`` for one round of the continuous scheduler.

    ``key_values``: per layer (B, H, C + K, D), the running batch's exact cache with room for the
    block after it (C = ``key_valid``'s (B, C) columns); kept positions' keys and values go there.
    ``positions`` (B, K): position ids of the block. Logits of kept positions are left as they were
    at their last computation: they are committed, so the samplers never read them.
    """

    def __init__(self, model, key_values, key_valid: torch.Tensor, positions: torch.Tensor, mask_token_id: int,
                 refresh_every: int = REFRESH_EVERY):
        self.model, self.mask_token_id = model, mask_token_id
        self.refresh_every, self.steps = refresh_every, 0
        self.cache_valid, self.positions = key_valid, positions
        batch, block_length = positions.shape
        self.cache_length = key_valid.shape[1]
        self.key_values = key_values
        self.kept = torch.zeros((batch, block_length), dtype=torch.bool, device=positions.device)
        self.logits = None  # (B, K, V)
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
        if self.logits is None:
            self.logits = output.logits.new_zeros((batch, block_length, output.logits.shape[-1]))
        self.logits.scatter_(1, chosen[:, :, None].expand_as(output.logits), output.logits)
        self._keep(output.key_values, chosen, real & (ids != self.mask_token_id), width)
        return take_slots(self.logits, slots)

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
