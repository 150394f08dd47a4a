"""The block positions each row keeps, so that its passes stop once those are committed."""

from __future__ import annotations

import torch


class Kept:
    """``upto`` (B, K) bool, or None (all): the positions before each row's max_tokens. ``eos_ids`` (E,),
    or None: an EOS committed at a column >= ``eos_from`` (B, 1) ends its row, so nothing after the
    first such EOS is kept (K for a row no EOS ends, e.g. a template's; past an aligned row's lead)."""

    # A committed token never changes and what a row does not keep is cut off, so stopping early
    # changes no token; an EOS committed early saves the rest of the block (dInfer's early stop).

    def __init__(self, upto: torch.Tensor | None = None, eos_ids: torch.Tensor | None = None,
                 eos_from: torch.Tensor | None = None):
        self.upto, self.eos_ids, self.eos_from = upto, eos_ids, eos_from

    def masks_left(self, block: torch.Tensor, mask_index: torch.Tensor) -> torch.Tensor:
        """(B, K) bool: the still-masked positions each row keeps. No host sync."""
        left = mask_index if self.upto is None else mask_index & self.upto
        if self.eos_ids is None or self.eos_from is None:
            return left
        columns = torch.arange(block.shape[1], device=block.device)
        # A compare against each of the few EOS ids: static shapes, nothing a CUDA graph could not hold.
        is_eos = (block[..., None] == self.eos_ids).any(dim=-1)
        ends = is_eos & ~mask_index & (columns >= self.eos_from)  # (B, K)
        first_end = torch.where(ends, columns, block.shape[1]).min(dim=-1, keepdim=True).values  # (B, 1)
        return left & (columns < first_end)
