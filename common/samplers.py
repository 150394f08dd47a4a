"""The sampler vocabulary shared by the wire format (common/lines.py) and the engine: names and options.

No torch and no pydantic, so the engine may import it (the one module of common/ it may import).
"""

from __future__ import annotations

from enum import Enum


class Sampler(str, Enum):
    """How a block's masked positions are committed; a member equals its wire name (format ``.value``)."""

    REFERENCE = "reference"  # fixed steps per block (LLaDA); DiffusionGemma: its model.generate(), token for token
    THRESHOLD = "threshold"  # Fast-dLLM: every masked position whose confidence reaches the threshold
    FACTOR = "factor"  # Fast-dLLM: the n most confident where (n + 1)(1 - c_n) < factor
    ENTROPY_BOUND = "entropy_bound"  # DiffusionGemma: acceptance under an entropy bound, renoising the rest


SAMPLERS: tuple[Sampler, ...] = tuple(Sampler)
SAMPLER_NAMES: tuple[str, ...] = tuple(s.value for s in Sampler)
BLOCK_SAMPLERS = (Sampler.REFERENCE, Sampler.THRESHOLD, Sampler.FACTOR)  # block-diffusion models'
DIFFUSION_GEMMA_SAMPLERS = (Sampler.ENTROPY_BOUND, Sampler.REFERENCE)  # its default first

# The reference sampler's tokens per step: LLaDA's even split, or Dream's default maskgit_plus count.
SCHEDULES = ("linear", "maskgit_plus")
# DiffusionGemma's options; unset, they take the checkpoint's generation_config.json values.
DIFFUSION_GEMMA_OPTIONS = ("max_steps", "entropy_bound", "t_min", "t_max")
# The options that belong to some samplers: giving one to another sampler is an error, not silently unused.
SAMPLER_OPTIONS: dict[str, tuple[Sampler, ...]] = {
    "steps": (Sampler.REFERENCE, Sampler.THRESHOLD),
    "schedule": (Sampler.REFERENCE,),
    "threshold": (Sampler.THRESHOLD,),
    "factor": (Sampler.FACTOR,),
    "editing_threshold": (Sampler.THRESHOLD,),
    "max_post_steps": (Sampler.THRESHOLD,),
    **{name: DIFFUSION_GEMMA_SAMPLERS for name in DIFFUSION_GEMMA_OPTIONS},
}


def names(samplers: tuple[Sampler, ...]) -> list[str]:
    """The wire names of ``samplers``, in their order: what error messages list."""
    return [s.value for s in samplers]


def option_samplers(option: str) -> list[str]:
    """The wire names of the samplers ``option`` belongs to, in the enum's order."""
    return [s.value for s in Sampler if s in SAMPLER_OPTIONS[option]]
