"""The static-shape block loop for greedy rounds, whose whole step a CUDA graph can hold."""

from __future__ import annotations

from collections.abc import Callable
from itertools import accumulate

import torch

from .editing import BlockEditing
from .step import BlockContext, commit_step


class GreedyBlockSteps:
    """A greedy round's steps over ``block`` (B, K), denoised in place, with no host sync inside a step
    (cuda_graph.py captures one): every position is scored and the step count and passes live on the
    device. Gives denoise_block's tokens and passes for rows at temperature 0 (they draw no noise)."""

    def __init__(self, block: torch.Tensor, context: BlockContext, *, logits_shift: int = 0):
        size, length = block.shape
        self.block, self.context, self.rules = block, context, context.rules
        if not self.rules.greedy:
            raise ValueError("GreedyBlockSteps serves rows at temperature 0 only")
        mask_token_id = context.mask_token_id
        # Rows that edit (LLaDA2.1): their state lives on the device, decided inside the step.
        self.editing = BlockEditing(self.rules, block == mask_token_id) if self.rules.any_editing else None
        # A shifted model (Fast-dLLM v2) reads a position's logits one position back; the last
        # position's own logits (B, V) are kept for the next block's first token (schedulers/block.py).
        self.logits_shift = logits_shift
        self.last_logits: torch.Tensor | None = None
        self.slots = torch.arange(length, device=block.device).expand(size, length)  # every position
        self.step = torch.zeros((size, 1), dtype=torch.long, device=block.device)
        self.passes = torch.zeros(size, dtype=torch.long, device=block.device)

    def __call__(self, forward_block: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """One step: ``forward_block(block)`` gives the whole block's logits (B, K, V). Once no mask is
        left a step changes no token (and leaves the clean block's keys and values in an exact cache)."""
        mask_index = self.block == self.context.mask_token_id  # (B, K)
        working = self._left(self.block, mask_index).any(dim=-1)  # (B,)
        editable = None
        if self.editing is not None:
            working = self.editing.start(mask_index, working)
            editable = self.editing.editable_now(working)
        logits = forward_block(self.block)
        if self.logits_shift:  # a block's first position is never masked: its row is a filler
            self.last_logits = logits[:, -1]
            logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        last = self.rules.schedule_t.shape[1] - 1  # past a row's steps its schedule is 0 anyway
        num_transfer = self.rules.schedule_t.gather(1, self.step.clamp(max=last)).squeeze(1)  # (B,)
        edited = commit_step(self.context, self.block, logits, self.slots, mask_index, num_transfer,
                             editable=editable)
        if self.editing is not None:
            self.editing.stepped(edited)
        self.passes += working
        self.step += 1

    def _left(self, block: torch.Tensor, mask_index: torch.Tensor) -> torch.Tensor:
        kept = self.context.kept
        return mask_index if kept is None else kept.masks_left(block, mask_index)

    def _anyone_works(self) -> bool:
        """Whether the next step has a row that works: the host's look after a step (a sync)."""
        mask_index = self.block == self.context.mask_token_id
        working = self._left(self.block, mask_index).any(dim=-1)
        if self.editing is not None:
            working = self.editing.start(mask_index, working, look_only=True)
        return bool(working.any())

    def run(self, step: Callable[[], object]) -> list[int]:
        """Denoise the block with ``step`` (this object's step, maybe replayed from a graph); returns
        each row's passes. The host looks at the block after a step only for parallel rows or a row
        whose max_tokens ends inside the block; a reference-only round's step count is known ahead."""
        kept = self.context.kept
        # A reference-only round does not look for an EOS: a sync a step would cost every such round
        # what an EOS saves only some (the passes a row reports still stop there: counted on the device).
        look = self.rules.any_parallel or (kept is not None and kept.upto is not None)
        if self.rules.any_editing:  # its passes after the last mask, while tokens change
            steps = self.block.shape[1] + max(self.rules.max_post_steps) + 1
        elif self.rules.any_parallel:
            steps = self.block.shape[1]
        else:  # a template's fixed text leaves fewer masks than the schedule plans for
            masked = (self.block == self.context.mask_token_id).sum(dim=-1).tolist()  # once a round
            steps = max(sum(done < m for done in accumulate(schedule)) + (m > 0)
                        for schedule, m in zip(self.rules.schedule, masked, strict=False))
        for _ in range(steps):
            step()
            if look and not self._anyone_works():
                break
        return self.passes.tolist()
