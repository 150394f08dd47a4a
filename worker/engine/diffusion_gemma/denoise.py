"""The per-step math of DiffusionGemma's sampler, batched over rows that each have their own settings.

Learned from transformers ``models/diffusion_gemma/generation_diffusion_gemma.py``:
``LinearTemperatureScheduleLogitsProcessor``, ``EntropyBoundSampler.accept_canvas`` (after
arXiv:2505.24857) and ``StableAndConfidentStoppingCriteria``. There every row shares one setting;
here each argument that is a setting is a (B,) tensor, so one batch mixes requests.
"""

from __future__ import annotations

import torch


def linear_temperature(t_min: torch.Tensor, t_max: torch.Tensor, steps_left: torch.Tensor,
                       max_steps: torch.Tensor) -> torch.Tensor:
    """(B,) temperature: t_max at the first step, falling linearly towards t_min.

    ``steps_left`` counts down from max_steps to 1, as ``cur_step`` does in ``generate``.
    """
    return t_min + (t_max - t_min) * (steps_left.to(t_min.dtype) / max_steps.to(t_min.dtype))


def token_entropy(probs: torch.Tensor) -> torch.Tensor:
    """(B, L) entropy of the distributions probs (B, L, V), as Categorical(logits).entropy()."""
    return torch.special.entr(probs).sum(dim=-1)


def entropy_bound_accept(entropy: torch.Tensor, bound: torch.Tensor) -> torch.Tensor:
    """(B, L) bool: accept the k lowest-entropy positions with sum(H_1..k) - max(H_1..k) <= bound, from
    ``entropy`` (B, L) and ``bound`` (B,); the lowest-entropy position always passes."""
    # The left side bounds the joint mutual information of the accepted tokens, so they are nearly
    # independent and may be committed together.
    sorted_entropy, order = torch.sort(entropy, dim=-1)
    # Sorted ascending, so the running maximum is the current element.
    passes = torch.cumsum(sorted_entropy, dim=-1) - sorted_entropy <= bound[:, None]
    return torch.zeros_like(passes).scatter(-1, order, passes)


def sample_inverse_cdf_(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """(B, L) draws from probs (B, L, V), one ``uniform`` (B, L) in [0, 1) per position; overwrites
    ``probs`` with its cumulative sums (one (B, L, V) buffer fewer: at full size each is gigabytes)."""
    # Inverse-CDF sampling lets every row bring its own pre-drawn noise (per-request seeds) to one
    # batched operation; torch.multinomial takes a single generator for the whole batch.
    cdf = probs.cumsum_(dim=-1)  # (B, L, V)
    # Scale by the total so float rounding in the cumsum never leaves a draw past the end.
    target = (uniform.to(cdf.dtype) * cdf[..., -1])[..., None]  # (B, L, 1)
    drawn = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    return drawn.clamp_(max=probs.shape[-1] - 1)


def stable_and_confident(history: torch.Tensor | None, argmax: torch.Tensor, entropy: torch.Tensor,
                         confidence_threshold: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B,) stop flags and the updated history: stable (the argmax canvas equals each of the last S,
    ``history`` (S, B, L), -1 where a canvas has fewer steps; None: S == 0, always stable) and confident
    (the mean token entropy of the temperature-scaled logits below ``confidence_threshold``)."""
    if history is None:
        stable = torch.ones(argmax.shape[0], dtype=torch.bool, device=argmax.device)
    else:
        stable = (history == argmax[None]).all(dim=-1).all(dim=0)
        history = torch.cat([history[1:], argmax[None]], dim=0)
    confident = entropy.mean(dim=-1) < confidence_threshold
    return stable & confident, history
