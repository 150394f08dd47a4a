"""The engine: prompts in, denoised completions out, in continuously scheduled padded batches."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Generator, Sequence
from typing import TYPE_CHECKING

import torch

from common.samplers import BLOCK_SAMPLERS, DIFFUSION_GEMMA_OPTIONS, Sampler, names

from .caches.modes import resolve_cache_mode
from .healing import TokenHealer
from .infill import encode_template
from .layout import lead_length, whole_blocks
from .loader import ALIGNED_FAMILIES, FULL_ATTENTION_FAMILIES, LOGITS_SHIFT, LoadedModel
from .params import ContextLengthError, GenerationRequest, GenerationResult, Healing, InvalidRequest
from .prompts import encode_chat, encode_completion
from .schedulers.base import ContinuousScheduler
from .schedulers.block import BlockScheduler
from .schedulers.canvas import CanvasScheduler
from .structured import Piece, StructuredCanvas, TokenClasses, encode_structured

if TYPE_CHECKING:
    from .interface import More

# Structured canvases kept, keyed by their skeleton: the requests of a batch mostly share a schema.
STRUCTURED_CACHE = 64

SUPPORTED_FAMILIES = ("block_causal", *ALIGNED_FAMILIES, *FULL_ATTENTION_FAMILIES)


def _config_integer(key: str, value, most: int) -> int:
    """``value`` of config.json's ``key``, if it is an integer in [1, ``most``]; else ValueError naming both."""
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= most:
        raise ValueError(f"config.json's {key} {value!r} is not an integer in [1, {most}]")
    return value


class Engine:
    """The block-diffusion engine (a GenerationEngine): block-causal, aligned and full-attention families."""

    default_sampler: str = Sampler.REFERENCE.value  # unless the checkpoint's config.json names its own (below)
    default_block_length = 32  # likewise (diffbatch_default_block_length)
    default_steps: int | None = None  # likewise (diffbatch_default_steps): one token a pass at least

    def __init__(self, loaded: LoadedModel, *, max_batch_size: int = 32, kv_cache: bool = True,
                 cache: str | None = None, max_batch_tokens: int | None = None, graphs: bool | None = None):
        """``cache``: a mode of caches/modes.py (None: the fastest, or "none" if not ``kv_cache``).
        ``max_batch_tokens``: rows x the columns the running batch can reach (default: max_batch_size x
        positions). ``graphs``: CUDA graphs for the exact cache's steps (None: on CUDA; True on a CPU: uncaptured)."""
        if not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ValueError("max_batch_size must be a positive integer")
        if loaded.family not in SUPPORTED_FAMILIES:
            raise ValueError(
                f"model family {loaded.family!r} is not supported yet; supported: {list(SUPPORTED_FAMILIES)}"
            )
        self.loaded = loaded
        # A checkpoint trained for parallel acceptance (distill-builtin) says so in config.json, so a
        # request that names no sampler gets the one the model was made for.
        default = getattr(loaded.config, "diffbatch_default_sampler", None) or self.default_sampler
        if default not in BLOCK_SAMPLERS:
            raise ValueError(f"config.json's diffbatch_default_sampler {default!r} is not one of "
                             f"{names(BLOCK_SAMPLERS)}")
        self.default_sampler = default
        # The block a request that names none gets may be shorter than the one the model was trained
        # with (the built-in model's config.json names 16: fewer FLOPs a token at the same quality).
        # An aligned model (SDAR) gets the block it was trained with.
        self.aligned = loaded.family in ALIGNED_FAMILIES
        block = getattr(loaded.config, "diffbatch_default_block_length", None)
        if block is None:
            block = loaded.config.block_length if self.aligned else self.default_block_length
        self.default_block_length = _config_integer("diffbatch_default_block_length", block, 1024)
        # A checkpoint made to commit several tokens a pass (distill-builtin) may also name the passes a
        # default block takes at most: the threshold rule then commits at least block / steps tokens a
        # pass, and a request that names neither sampler nor steps gets that floor.
        steps = getattr(loaded.config, "diffbatch_default_steps", None)
        self.default_steps = None if steps is None else _config_integer("diffbatch_default_steps", steps, block)
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.name = loaded.name
        self.max_positions = loaded.max_positions
        self.max_batch_size = max_batch_size
        self.kv_cache = kv_cache
        # Full-attention families (LLaDA, Dream): padding-only mask, whole canvas in every forward.
        self.full_attention = loaded.family in FULL_ATTENTION_FAMILIES
        self.cache_mode = resolve_cache_mode(cache, full_attention=self.full_attention, kv_cache=kv_cache)
        self.logits_shift = LOGITS_SHIFT.get(loaded.family, 0)
        # A shifted block-causal model (Fast-dLLM v2) takes each block's first token from the last
        # position of the clean block before it, which only the exact cache's commit pass computes.
        shifted_blocks = self.logits_shift and not self.full_attention
        if shifted_blocks and self.cache_mode != "exact":
            raise ValueError(f"{loaded.name}: this model family runs with the exact cache only, "
                             f"not {self.cache_mode!r}")
        self.vocab_size = int(loaded.config.vocab_size)
        self.mask_token_id = loaded.mask_token_id
        self.device = next(self.model.parameters()).device
        common = dict(tokenizer=self.tokenizer, mask_token_id=loaded.mask_token_id,
                      pad_token_id=loaded.pad_token_id, eos_token_ids=loaded.eos_token_ids,
                      max_batch_size=max_batch_size, device=self.device, vocab_size=self.vocab_size,
                      max_batch_tokens=max_batch_tokens or max_batch_size * self.max_positions,
                      aligned=self.aligned)
        self.scheduler: ContinuousScheduler
        if self.cache_mode in ("exact", "delayed"):  # the block-causal KV cache carries the batch
            self.scheduler = BlockScheduler(self.model, delayed=self.cache_mode == "delayed",
                                            graphs=self.device.type == "cuda" if graphs is None else graphs,
                                            logits_shift=self.logits_shift,
                                            sub_block=getattr(loaded.config, "diffbatch_sub_block", None), **common)
        else:  # recomputation and the approximate caches: each round lays the canvases out again
            self.scheduler = CanvasScheduler(self.model, cache_mode=self.cache_mode,
                                             full_attention=self.full_attention, logits_shift=self.logits_shift,
                                             **common)
        self.healer = TokenHealer(self.tokenizer, self.vocab_size)
        self.eos_token_ids = tuple(loaded.eos_token_ids)
        self._token_classes: TokenClasses | None = None  # built on the first structured request
        self._structured: OrderedDict[tuple[Piece, ...], StructuredCanvas] = OrderedDict()
        self._structured_lock = threading.Lock()

    @property
    def tokens_in_flight(self) -> int:
        """Completion tokens committed for the rows running now (the heartbeat reports them as progress)."""
        return self.scheduler.tokens_in_flight

    @property
    def tokens_committed(self) -> int:
        """Completion tokens committed since the model loaded."""
        return self.scheduler.tokens_committed

    # ---- prompts -------------------------------------------------------------------------

    def encode_completion(self, prompt: str) -> list[int]:
        return encode_completion(self.tokenizer, prompt)

    def encode_chat(self, messages: list[dict]) -> list[int]:
        return encode_chat(self.tokenizer, messages)

    def heal(self, prompt_ids: list[int]) -> tuple[list[int], Healing | None]:
        """Token healing of a completion prompt (healing.py): the prompt to run and the healing."""
        return self.healer.heal(prompt_ids)

    # ---- generation ----------------------------------------------------------------------

    def check(self, request: GenerationRequest) -> None:
        """Raise InvalidRequest if ``request`` cannot run; lets a caller reject one request alone."""
        params = request.params
        params.validate()
        if params.sampler not in BLOCK_SAMPLERS:
            raise InvalidRequest(f"diffusion.sampler {params.sampler!r} applies to DiffusionGemma models only; "
                                 f"this model takes one of {names(BLOCK_SAMPLERS)}", param="diffusion.sampler")
        for name in DIFFUSION_GEMMA_OPTIONS:
            if getattr(params, name) is not None:
                raise InvalidRequest(f"diffusion.{name} applies to DiffusionGemma models only",
                                     param=f"diffusion.{name}")
        if params.edits and self.cache_mode == "delayed":  # it keeps committed positions' keys and values
            raise InvalidRequest("diffusion.editing_threshold does not run with the delayed cache, whose keys of "
                                 "a committed token an edit would leave stale; serve this model with the exact "
                                 "cache", param="diffusion.editing_threshold")
        prompt = request.prompt_ids
        if not isinstance(prompt, list) or not prompt:
            raise InvalidRequest("prompt must contain at least one token", param="prompt")
        if not all(isinstance(t, int) and 0 <= t < self.vocab_size for t in prompt):
            raise InvalidRequest(f"prompt token ids must be integers in [0, {self.vocab_size})", param="prompt")
        self._check_template(request)
        self._check_structured(request)
        healing = request.healing
        if healing is not None and (request.template_ids is not None or not healing.allowed or not all(
                isinstance(t, int) and 0 <= t < self.vocab_size for t in healing.allowed)):
            raise InvalidRequest(f"token healing needs allowed token ids in [0, {self.vocab_size}) and no template")
        lead = lead_length(len(prompt), params.block_length, aligned=self.aligned)
        if self.mask_token_id in prompt[len(prompt) - lead:]:
            # The lead opens the first denoised block, where [MASK] means "fill me": the text would change.
            raise InvalidRequest(f"prompt: it holds the mask token {self._mask_spelling()} in its last "
                                 f"{lead} tokens, which open the first block this model denoises; it would "
                                 "be overwritten. Remove it from the prompt", param="prompt")
        needed = len(prompt) - lead + whole_blocks(lead + params.max_tokens, params.block_length)
        if needed > self.max_positions:
            completion = (f"max_tokens={params.max_tokens}" if request.structured is None else
                          f"the response_format's {params.max_tokens} tokens")
            raise ContextLengthError(
                f"prompt of {len(prompt)} tokens + {completion} (rounded up to "
                f"{needed - len(prompt)}, to end on a block of diffusion.block_length={params.block_length}) "
                f"needs {needed} positions; the model supports {self.max_positions}"
            )

    def encode_template(self, template: str) -> list[int | None]:
        return encode_template(self.tokenizer, template)

    def encode_structured(self, pieces: Sequence[Piece]) -> StructuredCanvas:
        """Structured output's canvas of a skeleton (structured.py), cached per skeleton. Locked: the
        control process validates lines in threads, and the cache's reordering is not thread-safe."""
        key = tuple(pieces)
        with self._structured_lock:
            canvas = self._structured.get(key)
            if canvas is not None:
                self._structured.move_to_end(key)
                return canvas
            if self.logits_shift and not self.full_attention:
                raise InvalidRequest(self._no_templates("response_format"), param="response_format")
            if not self.eos_token_ids:
                raise InvalidRequest("response_format: this model has no EOS token to pad a value with",
                                     param="response_format")
            if self._token_classes is None:
                mask = self.scheduler.mask_token_id
                special = {int(i) for i in getattr(self.tokenizer, "all_special_ids", [])} | {mask}
                self._token_classes = TokenClasses(self.tokenizer, self.vocab_size, special, self.eos_token_ids[0])
            canvas = encode_structured(self.tokenizer, self._token_classes, key, self.scheduler.mask_token_id)
            self._structured[key] = canvas
            if len(self._structured) > STRUCTURED_CACHE:
                self._structured.popitem(last=False)
            return canvas

    @staticmethod
    def _no_templates(param: str) -> str:
        return (f"{param} is not supported for this model: each block's first token is its previous token's "
                "prediction, not a hole's")

    def _check_structured(self, request: GenerationRequest) -> None:
        structured = request.structured
        if structured is None:
            return
        canvas = structured.canvas
        if request.template_ids is not canvas.template and request.template_ids != canvas.template:
            raise InvalidRequest("response_format: the request's template must be its structured canvas's",
                                 param="response_format")
        if canvas.masks.dim() != 2 or canvas.masks.shape[1] != self.vocab_size or canvas.masks.dtype != torch.bool \
                or len(canvas.classes) != len(canvas.template) or int(canvas.classes.max()) >= len(canvas.masks):
            raise InvalidRequest("response_format: the structured canvas was not made for this model's vocabulary",
                                 param="response_format")
        if request.healing is not None:
            raise InvalidRequest("diffusion.token_healing does not apply with response_format",
                                 param="diffusion.token_healing")

    def _check_template(self, request: GenerationRequest) -> None:
        template = request.template_ids
        if template is None:
            return
        param = "diffusion.template" if request.structured is None else "response_format"
        if self.logits_shift and not self.full_attention:
            raise InvalidRequest(self._no_templates(param), param=param)
        if not isinstance(template, list) or None not in template:
            raise InvalidRequest(f"{param} must hold at least one hole", param=param)
        if not all(t is None or (isinstance(t, int) and 0 <= t < self.vocab_size) for t in template):
            raise InvalidRequest(f"template token ids must be integers in [0, {self.vocab_size}) or holes")
        if self.mask_token_id in template:  # it would read as a hole and be overwritten
            raise InvalidRequest(f"{param} holds the mask token {self._mask_spelling()} in its text; only "
                                 "{{fill:N}} marks holes. Remove it from the template", param=param)
        if request.params.max_tokens != len(template) or request.params.stop:
            raise InvalidRequest(f"with {param}, the template sets the length: max_tokens must equal "
                                 "its length in tokens and stop must be empty")

    def _mask_spelling(self) -> str:
        return f"{self.tokenizer.convert_ids_to_tokens(self.mask_token_id)!r} (id {self.mask_token_id})"

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        """Results in the order of ``requests``; raises InvalidRequest if any request is invalid."""
        results = dict(self.stream(requests))
        return [results[i] for i in range(len(requests))]

    def stream(self, requests: list[GenerationRequest], more: More | None = None,
               ) -> Generator[tuple[int, GenerationResult], None, None]:
        """Yield (index, result) as each request finishes; raises InvalidRequest first if any request is
        invalid. Rows are batched continuously, one scheduler run per block length. ``more`` (free rows ->
        requests) feeds the running batch when nothing waits: fed requests are numbered after those given
        so far; those of the run's block length join it, the others wait for a later run."""
        for request in requests:
            self.check(request)
        held = list(enumerate(requests))  # numbered requests not yet handed to a scheduler run
        numbered = len(requests)

        def take(length: int) -> list[tuple[int, GenerationRequest]]:
            taken = [item for item in held if item[1].params.block_length == length]
            held[:] = [item for item in held if item[1].params.block_length != length]
            return taken

        def feeder(length: int) -> Callable[[int], list[tuple[int, GenerationRequest]]]:
            def feed(free: int) -> list[tuple[int, GenerationRequest]]:
                nonlocal numbered
                assert more is not None
                fresh = more(free)
                for request in fresh:
                    self.check(request)
                held.extend(enumerate(fresh, start=numbered))
                numbered += len(fresh)
                return take(length)
            return feed

        while held:
            length = held[0][1].params.block_length
            yield from self.scheduler.run(take(length), more=None if more is None else feeder(length))
