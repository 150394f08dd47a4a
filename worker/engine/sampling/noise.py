"""Per-request random streams, so a request's tokens never depend on its batch-mates."""

from __future__ import annotations

import torch


class RowNoise:
    """One ``torch.Generator`` per row, seeded with its seed. The tests' oracle's contract: a row's only draw
    is one ``torch.rand((masked, V), dtype=float64)`` at each step in which it commits tokens at T > 0, a
    row per still-masked position of the active block in block order."""

    def __init__(self, seeds: list[int], device: torch.device | str):
        self.device = torch.device(device)
        self.generators = [torch.Generator(device=self.device).manual_seed(seed) for seed in seeds]

    @classmethod
    def from_generators(cls, generators: list[torch.Generator], device: torch.device | str) -> RowNoise:
        """Rows that carry their generator from block to block (continuous batching)."""
        noise = cls([], device)
        noise.generators = generators
        return noise

    def gumbel_denominator(
        self, rows: list[int], temperature: list[float], masked_counts: list[int], shape: torch.Size
    ) -> torch.Tensor | None:
        """(B, n, V) float64 for ``shape`` = (B, n, V): (-log u) ** T in row r's first
        masked_counts[r] slots for ``rows``, ones elsewhere; None if no row samples."""
        if not rows:
            return None
        denominator = torch.ones(shape, dtype=torch.float64, device=self.device)
        # The Gumbel-max denominator of LLaDA's add_gumbel_noise, drawn for the masked positions only:
        # only they are ever committed, and on a CPU the draw costs as much as the forward at batch 32.
        for r in rows:  # one draw per row from its own generator: the only per-row loop of a step
            u = torch.rand((masked_counts[r], shape[-1]), dtype=torch.float64, device=self.device,
                           generator=self.generators[r])
            denominator[r, : masked_counts[r]] = (-torch.log(u)) ** temperature[r]
        return denominator
