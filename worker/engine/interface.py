"""The engine interface: what the worker calls on an engine (no torch here).

Both engines (``engine.Engine``, ``diffusion_gemma.engine.DiffusionGemmaEngine``) implement it;
``factory.make_engine`` returns one, and the worker is typed against this and nothing else.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from typing import TYPE_CHECKING, Protocol

from .params import GenerationRequest, GenerationResult, Healing

if TYPE_CHECKING:  # structured.py holds torch tensors
    from .structured import Piece, StructuredCanvas


# The worker's feed of further requests while a run goes on (GenerationEngine.stream): free rows -> requests.
More = Callable[[int], list[GenerationRequest]]


class GenerationEngine(Protocol):
    """A loaded model that turns requests into results, in batches of its choosing."""

    @property
    def name(self) -> str:
        """The checkpoint's name."""
        ...

    @property
    def max_positions(self) -> int:
        """Positions the model supports: a prompt plus its completion (rounded up to blocks) fit in them."""
        ...

    @property
    def default_sampler(self) -> str:
        """The sampler's wire name (common.samplers) for a request that names none."""
        ...

    @property
    def default_block_length(self) -> int:
        """The block (DiffusionGemma: the canvas) length for a request that names none."""
        ...

    @property
    def default_steps(self) -> int | None:
        """Passes a default block takes at most when a request names neither sampler nor steps (None: no
        bound beyond the sampler's own)."""
        ...

    @property
    def tokens_in_flight(self) -> int:
        """Completion tokens committed for the rows running now; the heartbeat reports them as progress."""
        ...

    def encode_completion(self, prompt: str) -> list[int]:
        """A /v1/completions prompt's token ids."""
        ...

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """Chat messages ({"role", "content"}) as the checkpoint's chat template lays them out."""
        ...

    def encode_template(self, template: str) -> list[int | None]:
        """An infilling template: token ids for its text, None for each hole position."""
        ...

    def encode_structured(self, pieces: Sequence[Piece]) -> StructuredCanvas:
        """Structured output's canvas of a skeleton (structured.py); InvalidRequest naming response_format
        where the model cannot fill one."""
        ...

    def heal(self, prompt_ids: list[int]) -> tuple[list[int], Healing | None]:
        """Token healing of a completion prompt: the prompt to run and the healing (None: none)."""
        ...

    def check(self, request: GenerationRequest) -> None:
        """Raise InvalidRequest (ContextLengthError for length) if ``request`` cannot run here."""
        ...

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        """Results in the order of ``requests``; raises InvalidRequest if any request is invalid."""
        ...

    def stream(self, requests: list[GenerationRequest], more: More | None = None,
               ) -> Generator[tuple[int, GenerationResult], None, None]:
        """(index, result) pairs as requests finish; checks every request first. ``more``: called with the
        free rows when the running batch has room and nothing waits; the requests it returns (which the
        caller has checked) join the run with indices after the ones given so far. An engine that cannot
        take requests mid-run may ignore it (DiffusionGemmaEngine does)."""
        ...
