"""The DiffusionGemma engine: the worker's engine interface over the two DiffusionGemma samplers.

- ``entropy_bound`` (the default): continuous batching (``continuous.py``), per-request seeds;
- ``reference``: ``model.generate()`` token for token (``reference.py``), batch-synchronous.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Generator, Sequence
from functools import partial

from common.samplers import DIFFUSION_GEMMA_SAMPLERS, Sampler, names

from ..interface import More
from ..loader import LoadedModel
from ..params import ContextLengthError, GenerationRequest, GenerationResult, InvalidRequest, SamplingParams
from ..postprocess import apply_stop, completion_text, cut_at_eos, finish_row
from ..prompts import encode_chat, encode_completion
from ..structured import Piece, StructuredCanvas
from .adapter import DiffusionGemmaAdapter
from .continuous import ContinuousDenoiser, Job
from .reference import generate_reference
from .settings import checkpoint_defaults, resolve


class DiffusionGemmaEngine:
    default_sampler: str = Sampler.ENTROPY_BOUND.value
    default_steps: int | None = None  # its max_steps bounds a canvas's passes instead

    def __init__(self, loaded: LoadedModel, *, max_batch_size: int = 32):
        if not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ValueError("max_batch_size must be a positive integer")
        if loaded.family != "diffusion_gemma":
            raise ValueError(f"model family {loaded.family!r} is not DiffusionGemma")
        self.loaded, self.model, self.tokenizer = loaded, loaded.model, loaded.tokenizer
        self.name, self.max_positions, self.max_batch_size = loaded.name, loaded.max_positions, max_batch_size
        self.adapter = DiffusionGemmaAdapter(loaded.model, loaded.pad_token_id)
        self.canvas_length = self.adapter.canvas_length
        self.default_block_length = self.canvas_length  # the canvas is DiffusionGemma's block
        self._denoiser: ContinuousDenoiser | None = None  # the continuous run in progress, for progress reports
        self.vocab_size = self.adapter.vocab_size
        self.defaults = checkpoint_defaults(loaded.model.generation_config)
        self.eos_token_ids = tuple(loaded.eos_token_ids)
        # Multimodal input is out of scope: a prompt may not smuggle in the image placeholders.
        config = loaded.config
        self.image_token_ids = {t for t in (getattr(config, name, None) for name in
                                            ("image_token_id", "boi_token_id", "eoi_token_id")) if t is not None}

    def encode_completion(self, prompt: str) -> list[int]:
        return encode_completion(self.tokenizer, prompt)

    def heal(self, prompt_ids: list[int]) -> tuple[list[int], None]:
        """No token healing here yet (the canvas sampler has no first-token constraint): unchanged."""
        return prompt_ids, None

    def encode_chat(self, messages: list[dict]) -> list[int]:
        return encode_chat(self.tokenizer, messages)

    # ---- checks --------------------------------------------------------------------------

    def check(self, request: GenerationRequest) -> None:
        """Raise InvalidRequest (ContextLengthError for length) if ``request`` cannot run on this model."""
        params = request.params
        params.validate()
        if request.structured is not None:
            self.encode_structured(())  # raises: structured output is infilling
        if request.template_ids is not None:
            self.encode_template("")  # raises: infilling is not supported here
        if params.sampler not in DIFFUSION_GEMMA_SAMPLERS:
            raise InvalidRequest(f"diffusion.sampler {params.sampler!r} does not apply to DiffusionGemma models; "
                                 f"use one of {names(DIFFUSION_GEMMA_SAMPLERS)}", param="diffusion.sampler")
        if params.steps is not None:
            raise InvalidRequest("diffusion.steps does not apply to DiffusionGemma models; use diffusion.max_steps",
                                 param="diffusion.steps")
        if params.schedule is not None:  # its reference is model.generate(), which has no such choice
            raise InvalidRequest("diffusion.schedule does not apply to DiffusionGemma models",
                                 param="diffusion.schedule")
        if params.block_length != self.canvas_length:
            raise InvalidRequest(f"diffusion.block_length is fixed by the checkpoint: canvas_length="
                                 f"{self.canvas_length}", param="diffusion.block_length")
        if params.temperature != 0:
            raise InvalidRequest("temperature does not apply to DiffusionGemma models: their sampler follows a "
                                 "temperature schedule, set diffusion.t_min and diffusion.t_max instead",
                                 param="temperature")
        if params.top_p != 1:
            raise InvalidRequest("top_p does not apply to DiffusionGemma models", param="top_p")
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(params, name) != 0:
                raise InvalidRequest(f"{name} is not supported with DiffusionGemma models yet", param=name)
        resolve(self.defaults, params)
        prompt = request.prompt_ids
        if not isinstance(prompt, list) or not prompt:
            raise InvalidRequest("prompt must contain at least one token", param="prompt")
        if not all(isinstance(t, int) and 0 <= t < self.vocab_size for t in prompt):
            raise InvalidRequest(f"prompt token ids must be integers in [0, {self.vocab_size})", param="prompt")
        if self.image_token_ids.intersection(prompt):
            raise InvalidRequest("prompt holds image placeholder tokens: multimodal input is not supported",
                                 param="prompt")
        generated = math.ceil(params.max_tokens / self.canvas_length) * self.canvas_length
        if len(prompt) + generated > self.max_positions:
            raise ContextLengthError(
                f"prompt of {len(prompt)} tokens + max_tokens={params.max_tokens} (rounded up to {generated}, "
                f"whole canvases of {self.canvas_length}) needs {len(prompt) + generated} positions; "
                f"the model supports {self.max_positions}")

    # ---- generation ----------------------------------------------------------------------

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        """Results in the order of ``requests``; raises InvalidRequest if any request is invalid."""
        for request in requests:
            self.check(request)
        results: dict[int, GenerationResult] = {}
        continuous = [i for i, r in enumerate(requests) if r.params.sampler == Sampler.ENTROPY_BOUND]
        if continuous:
            self._run_continuous(requests, continuous, results)
        reference = [i for i, r in enumerate(requests) if r.params.sampler == Sampler.REFERENCE]
        if reference:
            self._run_reference(requests, reference, results)
        return [results[i] for i in range(len(requests))]

    @property
    def tokens_in_flight(self) -> int:
        """Completion tokens the running continuous batch has committed (reference runs report none)."""
        denoiser = self._denoiser
        return denoiser.tokens_in_flight if denoiser is not None else 0

    def encode_template(self, template: str) -> list[int | None]:
        raise InvalidRequest("diffusion.template (infilling) is not supported for DiffusionGemma models: their "
                             "canvas starts from random tokens, not from [MASK] around fixed text",
                             param="diffusion.template")

    def encode_structured(self, pieces: Sequence[Piece]) -> StructuredCanvas:
        raise InvalidRequest("response_format json_schema is not supported for DiffusionGemma models: it is "
                             "written by infilling a skeleton, and their canvas starts from random tokens, not "
                             "from [MASK] around fixed text", param="response_format")

    def stream(self, requests: list[GenerationRequest], more: More | None = None,
               ) -> Generator[tuple[int, GenerationResult], None, None]:
        """(index, result) pairs, the worker's interface; all come once the whole call is done. ``more`` is
        ignored: a run takes no requests once it started, so a worker runs one chunk at a time here."""
        yield from enumerate(self.generate(requests))

    def _run_continuous(self, requests: list[GenerationRequest], indices: list[int],
                        results: dict[int, GenerationResult]) -> None:
        jobs = [Job(prompt_ids=requests[i].prompt_ids, settings=resolve(self.defaults, requests[i].params),
                    seed=requests[i].params.effective_seed, done=partial(self._is_done, params=requests[i].params))
                for i in indices]
        self._denoiser = ContinuousDenoiser(self.adapter, max_rows=self.max_batch_size, stop=self.defaults)
        try:
            self._denoiser.run(jobs)
        finally:
            self._denoiser = None
        for i, job in zip(indices, jobs, strict=False):
            results[i] = self._result(requests[i], job.generated, job.forward_passes, job.elapsed_s)

    def _run_reference(self, requests: list[GenerationRequest], indices: list[int],
                       results: dict[int, GenerationResult]) -> None:
        """One generate() batch per (seed, settings), in chunks of max_batch_size, in request order."""
        groups = defaultdict(list)
        for i in indices:
            params = requests[i].params
            groups[(params.effective_seed, resolve(self.defaults, params))].append(i)
        for (seed, settings), members in groups.items():
            for first in range(0, len(members), self.max_batch_size):
                batch = members[first : first + self.max_batch_size]
                started = time.perf_counter()
                generated, passes = generate_reference(
                    self.model, [requests[i].prompt_ids for i in batch], settings=settings,
                    max_new_tokens=max(requests[i].params.max_tokens for i in batch), seed=seed,
                    pad_token_id=self.loaded.pad_token_id, eos_token_ids=self.eos_token_ids,
                    all_done=lambda rows, batch=batch: all(
                        self._is_done(row, requests[i].params) for row, i in zip(rows, batch, strict=False)))
                elapsed = time.perf_counter() - started
                for i, row, count in zip(batch, generated, passes, strict=False):
                    results[i] = self._result(requests[i], row, count, elapsed)

    # ---- rows ----------------------------------------------------------------------------

    def _is_done(self, generated: list[int], params: SamplingParams) -> bool:
        """After a canvas: EOS or max_tokens reached, or a stop string in the text (later canvases
        cannot change committed tokens, so stopping only saves compute)."""
        kept, hit_eos = cut_at_eos(generated[: params.max_tokens], self.eos_token_ids)
        if hit_eos or len(generated) >= params.max_tokens:
            return True
        return bool(params.stop) and apply_stop(completion_text(self.tokenizer, kept), params.stop)[1]

    def _result(self, request: GenerationRequest, generated: list[int], forward_passes: int,
                elapsed: float) -> GenerationResult:
        params = request.params
        row = finish_row(generated, max_tokens=params.max_tokens, eos_token_ids=self.eos_token_ids, stop=params.stop,
                         tokenizer=self.tokenizer)
        return GenerationResult(token_ids=row.token_ids, text=row.text, finish_reason=row.finish_reason,
                                prompt_tokens=len(request.prompt_ids), completion_tokens=len(row.token_ids),
                                forward_passes=forward_passes, elapsed_s=elapsed, stop_sequence=row.stop_sequence)
