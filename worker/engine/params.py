"""Sampling parameters, requests and results: the engine's public data types (no torch here).

Error messages name fields the way the wire format does: OpenAI fields by their plain name
(``max_tokens``), diffusion-only fields under ``diffusion.`` (``diffusion.block_length``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from common.samplers import DIFFUSION_GEMMA_OPTIONS, SAMPLER_OPTIONS, SAMPLERS, SCHEDULES, Sampler, names

if TYPE_CHECKING:  # structured.py holds torch tensors; this module stays torch-free
    from .structured import StructuredOutput

MAX_STOP_SEQUENCES = 4  # as OpenAI's chat/completions API


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class InvalidRequest(ValueError):
    """A request the engine refuses. ``param``: the request field at fault, spelled as its message
    starts (``max_tokens``, ``diffusion.sampler``, ``prompt``), or None for the request as a whole."""

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class ContextLengthError(InvalidRequest):
    """The prompt plus the tokens to generate do not fit the model's positions."""

    def __init__(self, message: str) -> None:
        super().__init__(message, param="prompt")


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 128
    temperature: float = 0.0
    # Nucleus filtering before the Gumbel draw; only matters when temperature > 0.
    top_p: float = 1.0
    # OpenAI's penalties on tokens already generated (not the prompt), per occurrence and once per
    # distinct token; here "generated" means committed: earlier blocks and this block's filled positions.
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    stop: tuple[str, ...] = ()
    # None means seed 0: a request without a seed is still reproducible.
    seed: int | None = None
    sampler: str = Sampler.REFERENCE.value  # a Sampler's wire name
    block_length: int = 32
    # Denoising steps per block; None = block_length, one token per step (the exact reference).
    steps: int | None = None
    # reference sampler: how many tokens each step commits, one of SCHEDULES; None = "linear".
    schedule: str | None = None
    # threshold sampler: commit every masked position whose confidence is at least this.
    threshold: float = 0.9
    # factor sampler: commit the n most confident where (n + 1) * (1 - c_n) < factor.
    factor: float = 1.0
    # threshold sampler, LLaDA2.1's token editing: a generated token of the active block is replaced
    # by the model's prediction there when that differs and has at least this confidence; None = off.
    editing_threshold: float | None = None
    # With editing: passes a block may run after its last mask is filled, while tokens still change
    # (None: LLaDA2.1's 16); without editing it is an error, not silently unused.
    max_post_steps: int | None = None
    # DiffusionGemma: most denoising steps per canvas, the entropy bound of the acceptance rule, and
    # the linear temperature schedule's last (t_min) and first (t_max) temperatures.
    max_steps: int | None = None
    entropy_bound: float | None = None
    t_min: float | None = None
    t_max: float | None = None

    def __post_init__(self):
        # Callers (JSON bodies) pass lists; keep the frozen dataclass hashable.
        if isinstance(self.stop, list):
            object.__setattr__(self, "stop", tuple(self.stop))
        if isinstance(self.sampler, Sampler):  # its wire name, which messages print
            object.__setattr__(self, "sampler", self.sampler.value)

    @property
    def penalised(self) -> bool:
        """Whether generated tokens are penalised, so the sampler needs their counts."""
        return bool(self.frequency_penalty or self.presence_penalty)

    @property
    def edits(self) -> bool:
        return self.editing_threshold is not None

    @property
    def post_steps_limit(self) -> int:
        """An editing row's passes after its block's last mask, at most (0 for a row that does not edit)."""
        return 0 if not self.edits else 16 if self.max_post_steps is None else self.max_post_steps

    @property
    def steps_per_block(self) -> int:
        return self.block_length if self.steps is None else self.steps

    @property
    def schedule_kind(self) -> str:
        return "linear" if self.schedule is None else self.schedule

    @property
    def effective_seed(self) -> int:
        return 0 if self.seed is None else self.seed

    def validate(self) -> None:
        """Raise InvalidRequest naming the first invalid field."""
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise InvalidRequest("max_tokens must be a positive integer", param="max_tokens")
        if not _is_number(self.temperature) or self.temperature < 0:
            raise InvalidRequest("temperature must be a finite number >= 0", param="temperature")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise InvalidRequest("top_p must be a number in (0, 1]", param="top_p")
        for name in ("frequency_penalty", "presence_penalty"):
            if not _is_number(getattr(self, name)) or not -2 <= getattr(self, name) <= 2:
                raise InvalidRequest(f"{name} must be a number in [-2, 2]", param=name)
        if not isinstance(self.stop, tuple) or not all(isinstance(s, str) and s for s in self.stop):
            raise InvalidRequest("stop must be a tuple of non-empty strings", param="stop")
        if len(self.stop) > MAX_STOP_SEQUENCES:
            raise InvalidRequest(f"stop may hold at most {MAX_STOP_SEQUENCES} strings", param="stop")
        # The range torch.Generator.manual_seed accepts.
        if self.seed is not None and (not _is_int(self.seed) or not -(2**63) <= self.seed < 2**64):
            raise InvalidRequest("seed must be an integer in [-2**63, 2**64)", param="seed")
        if self.sampler not in SAMPLERS:
            raise InvalidRequest(f"diffusion.sampler must be one of {names(SAMPLERS)}, got {self.sampler!r}",
                                 param="diffusion.sampler")
        if not _is_int(self.block_length) or self.block_length < 1:
            raise InvalidRequest("diffusion.block_length must be a positive integer", param="diffusion.block_length")
        if self.steps is not None and (not _is_int(self.steps) or not 1 <= self.steps <= self.block_length):
            raise InvalidRequest(f"diffusion.steps must be an integer in [1, block_length={self.block_length}]",
                                 param="diffusion.steps")
        if self.steps is not None and self.sampler not in SAMPLER_OPTIONS["steps"]:
            raise InvalidRequest("diffusion.steps applies to the reference and threshold samplers only",
                                 param="diffusion.steps")
        if self.schedule is not None:
            self._validate_schedule(self.schedule)
        if not _is_number(self.threshold) or not 0 < self.threshold <= 1:
            raise InvalidRequest("diffusion.threshold must be a number in (0, 1]", param="diffusion.threshold")
        if not _is_number(self.factor) or self.factor <= 0:
            raise InvalidRequest("diffusion.factor must be a number > 0", param="diffusion.factor")
        if self.editing_threshold is not None:
            self._validate_editing(self.editing_threshold)
        if self.max_post_steps is not None:
            if not _is_int(self.max_post_steps) or not 0 <= self.max_post_steps <= 1024:
                raise InvalidRequest("diffusion.max_post_steps must be an integer in [0, 1024]",
                                     param="diffusion.max_post_steps")
            if not self.edits:
                raise InvalidRequest("diffusion.max_post_steps applies with diffusion.editing_threshold only",
                                     param="diffusion.max_post_steps")
        self._validate_diffusion_gemma_options()

    def _validate_schedule(self, schedule: str) -> None:
        param = "diffusion.schedule"
        if schedule not in SCHEDULES:
            raise InvalidRequest(f"{param} must be one of {list(SCHEDULES)}, got {schedule!r}", param=param)
        if self.sampler not in SAMPLER_OPTIONS["schedule"]:
            raise InvalidRequest(f"{param} applies to the reference sampler only", param=param)

    def _validate_editing(self, threshold: float) -> None:
        param = "diffusion.editing_threshold"
        if not _is_number(threshold) or not 0 < threshold <= 1:
            raise InvalidRequest(f"{param} must be a number in (0, 1]", param=param)
        if self.sampler not in SAMPLER_OPTIONS["editing_threshold"]:
            raise InvalidRequest(f"{param} applies to the threshold sampler only", param=param)
        if self.penalised:  # a committed token would count against itself where it stands
            raise InvalidRequest(f"{param} does not combine with frequency_penalty or presence_penalty: a token "
                                 "would count against itself where it stands", param=param)

    def _validate_diffusion_gemma_options(self) -> None:
        if self.max_steps is not None and (not _is_int(self.max_steps) or self.max_steps < 1):
            raise InvalidRequest("diffusion.max_steps must be a positive integer", param="diffusion.max_steps")
        if self.entropy_bound is not None and (not _is_number(self.entropy_bound) or self.entropy_bound <= 0):
            raise InvalidRequest("diffusion.entropy_bound must be a number > 0", param="diffusion.entropy_bound")
        for name in ("t_min", "t_max"):
            value = getattr(self, name)
            if value is not None and (not _is_number(value) or value < 0):
                raise InvalidRequest(f"diffusion.{name} must be a finite number >= 0", param=f"diffusion.{name}")
        if self.t_min is not None and self.t_max is not None and self.t_max <= self.t_min:
            raise InvalidRequest("diffusion.t_max must be greater than diffusion.t_min", param="diffusion.t_max")
        given = [name for name in DIFFUSION_GEMMA_OPTIONS
                 if getattr(self, name) is not None and self.sampler not in SAMPLER_OPTIONS[name]]
        if given:
            raise InvalidRequest(f"diffusion.{given[0]} does not apply to the {self.sampler} sampler",
                                 param=f"diffusion.{given[0]}")


@dataclass(frozen=True)
class Healing:
    """Token healing (healing.py) of one request."""

    text: str  # what the given-back prompt token spelled; the completion's text starts with it
    allowed: tuple[int, ...]  # the token ids the first generated position may take


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    params: SamplingParams
    # Infilling (infill.py): the canvas after the prompt, token ids where the text is fixed and None
    # in the holes; its length is the completion's length (params.max_tokens must equal it).
    template_ids: list[int | None] | None = None
    # Token healing (healing.py): the prompt's last token was given back; the first generated token
    # must be one of ``healing.allowed`` and the reported text leaves out ``healing.text``.
    healing: Healing | None = None
    # Structured output (structured.py): every hole position of ``template_ids`` (which must be
    # ``structured.canvas.template``) bound to its class's tokens, and the text the result reports
    # rendered from the holes (a JSON document) instead of decoded.
    structured: StructuredOutput | None = None

    @property
    def healed_text(self) -> str:
        """The text the prompt gave back, which the generated tokens spell first ("" without healing)."""
        return self.healing.text if self.healing else ""


@dataclass
class GenerationResult:
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int
    forward_passes: int
    elapsed_s: float
    stop_sequence: str | None = None  # the stop string the text was cut at, if one was
