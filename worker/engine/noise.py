"""Per-request random streams, so a request's tokens never depend on its batch-mates.

Noise convention (the contract the tests' oracle follows): each request owns a
``torch.Generator`` on the model's device seeded with its seed (0 when unset). At every denoising
step in which the request commits tokens and has temperature > 0, exactly one tensor
``u = torch.rand((block_length, vocab_size), dtype=float64, generator=g)`` is drawn for the
positions of the active block; nothing else draws from ``g``. The Gumbel-max denominator is
``(-log u) ** temperature`` as in LLaDA's ``add_gumbel_noise``.
"""

from __future__ import annotations

import torch


class RowNoise:
    def __init__(self, seeds: list[int], device: torch.device | str):
        self.device = torch.device(device)
        self.generators = [torch.Generator(device=self.device).manual_seed(seed) for seed in seeds]

    def gumbel_denominator(
        self, rows: list[int], temperature: list[float], shape: torch.Size, batch_size: int
    ) -> torch.Tensor:
        """(B, K, V) float64: (-log u) ** T for ``rows``, ones elsewhere (those rows use argmax)."""
        denominator = torch.ones((batch_size, *shape), dtype=torch.float64, device=self.device)
        # One draw per row from its own generator: the only per-row loop of a step.
        for r in rows:
            u = torch.rand(shape, dtype=torch.float64, device=self.device, generator=self.generators[r])
            denominator[r] = (-torch.log(u)) ** temperature[r]
        return denominator
