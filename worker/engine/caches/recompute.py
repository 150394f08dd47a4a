"""No cache on a laid-out block-causal canvas: every step recomputes the prefix."""

from __future__ import annotations

import torch

from ..layout import BatchLayout
from .base import take_slots


class Recompute:
    """A ``StepForward`` that runs the whole prefix every step: no state, the baseline the caches are
    checked against."""

    def __init__(self, model, layout: BatchLayout):
        self.model, self.layout = model, layout

    def __call__(self, prefix: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        end, block = prefix.shape[1], self.layout.block_length
        output = self.model(input_ids=prefix, attention_mask=self.layout.attention_mask[:, :, :end, :end],
                            position_ids=self.layout.position_ids[:, :end], logits_to_keep=block)
        return take_slots(output.logits[:, -block:], slots)
