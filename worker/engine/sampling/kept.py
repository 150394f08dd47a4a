"""The block positions each row keeps, so that its passes stop once those are committed."""

from __future__ import annotations

import torch


class Kept:
    """``upto`` (B, K) bool, or None (all): the positions before each row's max_tokens. ``eos_ids`` (E,),
    or None: an EOS committed at a column >= ``eos_from`` (B, 1) ends its row, so nothing after the
    first such EOS is kept (K for a row no EOS ends, e.g. a template's; past an aligned row's lead).
    ``eos_in_order``: such an EOS may be committed only at its row's first mask (``held_back``)."""

    # A committed token never changes and what a row does not keep is cut off, so stopping early
    # changes no token; an EOS committed early saves the rest of the block (dInfer's early stop).

    def __init__(self, upto: torch.Tensor | None = None, eos_ids: torch.Tensor | None = None,
                 eos_from: torch.Tensor | None = None, *, eos_in_order: bool = False):
        self.upto, self.eos_ids, self.eos_from = upto, eos_ids, eos_from
        self.eos_in_order = eos_in_order and eos_ids is not None and eos_from is not None

    def masks_left(self, block: torch.Tensor, mask_index: torch.Tensor) -> torch.Tensor:
        """(B, K) bool: the still-masked positions each row keeps. No host sync."""
        left = mask_index if self.upto is None else mask_index & self.upto
        if self.eos_ids is None or self.eos_from is None:
            return left
        columns = torch.arange(block.shape[1], device=block.device)
        ends = self._ending_eos(block, columns) & ~mask_index  # (B, K)
        first_end = torch.where(ends, columns, block.shape[1]).min(dim=-1, keepdim=True).values  # (B, 1)
        return left & (columns < first_end)

    def held_back(self, x0: torch.Tensor, mask_index: torch.Tensor) -> torch.Tensor | None:
        """(B, K) bool: masked positions whose prediction ``x0`` (B, K) is an EOS that would end the row
        while a mask is left before it, which an ``eos_in_order`` step leaves masked; None: none are.
        No host sync."""
        # A model trained on completions padded with EOS to a fixed length is most sure of EOS far from
        # its text, and under a confidence rule such an EOS is committed first and ends the answer where
        # the padding began, not where the text would (cf. Rainbow Padding, arXiv:2510.03680, on early
        # termination from EOS padding). Kept for the row's first mask, the EOS is decided in order.
        if not self.eos_in_order:
            return None
        columns = torch.arange(x0.shape[1], device=x0.device)
        masks_before = mask_index.long().cumsum(dim=-1) - mask_index.long()  # (B, K), exclusive
        return mask_index & self._ending_eos(x0, columns) & (masks_before > 0)

    def _ending_eos(self, tokens: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
        """(B, K) bool: where ``tokens`` hold an EOS at or past the row's ``eos_from``."""
        assert self.eos_ids is not None and self.eos_from is not None
        # A compare against each of the few EOS ids: static shapes, nothing a CUDA graph could not hold.
        return (tokens[..., None] == self.eos_ids).any(dim=-1) & (columns >= self.eos_from)
