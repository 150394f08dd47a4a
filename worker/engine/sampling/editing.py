"""When rows that edit (LLaDA2.1's token editing) are done with a block, with the state on the device."""

from __future__ import annotations

import torch

from .rules import BlockRules


class BlockEditing:
    """An editing row works until a pass that began with no mask changed no token, or until more than
    its ``max_post_steps`` passes would begin with no mask (as LLaDA2.1's ``generate`` decides). Until
    then it keeps its whole block: the max_tokens and EOS early stop (Kept) does not apply to it."""

    # On the device, so that a captured step (GreedyBlockSteps) can hold it; a later pass may still
    # change a token before a row's cut, which is why an editing row keeps its whole block.

    def __init__(self, rules: BlockRules, masked_at_start: torch.Tensor):
        device = masked_at_start.device
        self.rows = torch.tensor(rules.edits, device=device)  # (B,)
        self.editable = masked_at_start & self.rows[:, None]  # (B, K): the positions the row generates here
        self.max_post_steps = torch.tensor(rules.max_post_steps, device=device)  # (B,)
        # A row whose block holds nothing it generates (a template's fixed text) has nothing to edit.
        self.settled = ~self.rows | ~self.editable.any(dim=-1)  # (B,)
        self.post_steps = torch.zeros_like(self.max_post_steps)
        self.began_clean = torch.zeros_like(self.rows)  # the last pass began with no mask
        self.edited = torch.zeros_like(self.rows)  # the last pass changed a token

    def start(self, mask_index: torch.Tensor, working: torch.Tensor, *, look_only: bool = False) -> torch.Tensor:
        """(B,) bool: who works in the pass that begins with ``mask_index`` (B, K): ``working`` (B,) for
        rows that do not edit. Advances the state unless ``look_only`` (the host's look after a step)."""
        settled = self.settled | (self.began_clean & ~self.edited)
        clean = ~mask_index.any(dim=-1)
        post_steps = self.post_steps + (clean & ~settled).long()
        settled = settled | (post_steps > self.max_post_steps)
        if not look_only:
            self.settled.copy_(settled)
            self.post_steps.copy_(post_steps)
            self.began_clean.copy_(clean)
        return torch.where(self.rows, ~settled, working)

    def editable_now(self, working: torch.Tensor) -> torch.Tensor:
        """(B, K): what this pass may edit; a settled row's tokens are final while batch-mates work on."""
        return self.editable & working[:, None]

    def stepped(self, edited: torch.Tensor | None) -> None:
        """Record which rows (B,) bool the pass edited (None: none)."""
        self.edited.copy_(edited if edited is not None else torch.zeros_like(self.edited))
