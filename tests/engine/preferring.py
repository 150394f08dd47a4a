"""A stand-in model whose logits prefer two tokens everywhere, whatever the context."""

import torch
from torch import nn


class Preferring(nn.Module):
    """Wraps a model: its logits are replaced by 10 for ``first``, 9 for ``second`` and 0 elsewhere,
    so which of the two a position takes depends on the repetition penalties alone. Keys and values
    still come from the wrapped model, so every cache path runs as usual."""

    def __init__(self, model, first: int, second: int):
        super().__init__()
        self.inner, self.first, self.second = model, first, second

    def forward(self, *args, **kwargs):
        output = self.inner(*args, **kwargs)
        logits = torch.zeros_like(output.logits)
        logits[..., self.first], logits[..., self.second] = 10.0, 9.0
        output.logits = logits
        return output
