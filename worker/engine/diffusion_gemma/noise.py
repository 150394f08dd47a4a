"""Per-request random streams: a request's tokens never depend on its batch-mates.

Noise convention: each request owns a ``torch.Generator`` on the model's device seeded with its seed.
At the start of each canvas it draws, in this order, the initial canvas ``randint(V, (L,))``, the
sampling uniforms ``rand((S, L))`` and the renoising tokens ``randint(V, (S, L))``, S = the request's
max denoising steps; nothing else draws from it. Drawing a whole canvas's noise at its boundary keeps
the per-row Python loop out of the denoising step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class CanvasNoise:
    initial: torch.Tensor  # (L,) long
    uniform: torch.Tensor  # (S, L) float32
    renoise: torch.Tensor  # (S, L) long


def draw_canvas_noise(generator: torch.Generator, *, canvas_length: int, max_steps: int,
                      vocab_size: int, device: torch.device) -> CanvasNoise:
    def randint(shape):
        return torch.randint(0, vocab_size, shape, generator=generator, device=device)

    initial = randint((canvas_length,))
    uniform = torch.rand((max_steps, canvas_length), generator=generator, device=device)
    return CanvasNoise(initial=initial, uniform=uniform, renoise=randint((max_steps, canvas_length)))
