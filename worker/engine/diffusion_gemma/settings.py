"""A request's DiffusionGemma settings: its own options over the checkpoint's generation config."""

from __future__ import annotations

from dataclasses import dataclass

from ..params import InvalidRequest, SamplingParams

# transformers' own fallbacks (DiffusionGemmaGenerationConfig._get_default_generation_params), used
# when the checkpoint's generation_config.json leaves a value unset, as ``generate`` does.
GENERATE_DEFAULTS = dict(max_steps=48, entropy_bound=0.1, t_min=0.4, t_max=0.8, stability_threshold=1,
                         confidence_threshold=0.005)


@dataclass(frozen=True)
class DenoiseSettings:
    max_steps: int
    entropy_bound: float
    t_min: float
    t_max: float
    # Adaptive stop; both None disables it (as in generate). Shared by all rows: from the checkpoint.
    stability_threshold: int | None
    confidence_threshold: float | None

    @property
    def adaptive_stop(self) -> bool:
        return self.stability_threshold is not None and self.confidence_threshold is not None


def checkpoint_defaults(generation_config) -> DenoiseSettings:
    """The settings ``model.generate()`` would use with no arguments."""
    sampler_config = getattr(generation_config, "sampler_config", None)

    def pick(value, name):
        return GENERATE_DEFAULTS[name] if value is None else value

    return DenoiseSettings(
        max_steps=int(pick(getattr(generation_config, "max_denoising_steps", None), "max_steps")),
        entropy_bound=float(pick(getattr(sampler_config, "entropy_bound", None), "entropy_bound")),
        t_min=float(pick(getattr(generation_config, "t_min", None), "t_min")),
        t_max=float(pick(getattr(generation_config, "t_max", None), "t_max")),
        stability_threshold=pick(getattr(generation_config, "stability_threshold", None), "stability_threshold"),
        confidence_threshold=pick(getattr(generation_config, "confidence_threshold", None),
                                  "confidence_threshold"),
    )


def resolve(defaults: DenoiseSettings, params: SamplingParams) -> DenoiseSettings:
    """``params`` (SamplingParams) override the checkpoint's values where they are set."""
    chosen = {name: getattr(params, name) for name in ("max_steps", "entropy_bound", "t_min", "t_max")
              if getattr(params, name) is not None}
    settings = DenoiseSettings(**{**defaults.__dict__, **chosen})
    if not 0 <= settings.t_min < settings.t_max:
        raise InvalidRequest(f"diffusion.t_min ({settings.t_min}) must be >= 0 and below diffusion.t_max "
                             f"({settings.t_max}); unset values come from the checkpoint", param="diffusion.t_min")
    return settings
