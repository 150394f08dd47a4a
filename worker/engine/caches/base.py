"""What the block loop calls on a cache: the step forward protocol."""

from __future__ import annotations

from typing import Protocol

import torch


class StepForward(Protocol):
    """``forward(x[:, :end], slots)``: the logits (B, n, V) of the active block (the last K columns of
    ``prefix`` (B, end)) at its positions ``slots`` (B, n), the ones the sampler still has to fill."""

    def __call__(self, prefix: torch.Tensor, slots: torch.Tensor, /) -> torch.Tensor: ...


def take_slots(logits: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """(B, K, V) block logits -> (B, n, V) at the block positions ``slots`` (B, n)."""
    return logits.gather(1, slots[..., None].expand(-1, -1, logits.shape[-1]))
