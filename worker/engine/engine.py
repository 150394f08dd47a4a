"""The engine: prompts in, denoised completions out, in padded block-causal batches."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator

import torch

from .approx_cache import make_forward, resolve_cache_mode
from .healing import TokenHealer, first_token_mask
from .infill import encode_template
from .layout import build_layout
from .loader import FULL_ATTENTION_FAMILIES, LOGITS_SHIFT, LoadedModel
from .params import DIFFUSION_GEMMA_OPTIONS, ContextLengthError, GenerationRequest, GenerationResult, Healing
from .postprocess import apply_stop, completion_text, cut_at_eos, finish_row
from .prompts import encode_chat, encode_completion
from .samplers import RowNoise, denoise_block, token_counts
from .scheduler import BlockScheduler

SUPPORTED_FAMILIES = ("block_causal", *FULL_ATTENTION_FAMILIES)
SAMPLERS = ("reference", "threshold", "factor")  # entropy_bound is DiffusionGemma's


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class Engine:
    default_sampler = "reference"  # unless the checkpoint's config.json names its own (below)
    default_block_length = 32  # likewise (diffbatch_default_block_length)

    def __init__(self, loaded: LoadedModel, *, max_batch_size: int = 32, kv_cache: bool = True,
                 cache: str | None = None, max_batch_tokens: int | None = None, graphs: bool | None = None):
        """``kv_cache``: reuse finished blocks' keys and values (exact for block-causal models);
        False recomputes the whole prefix at every step, the baseline the cache is tested against.
        ``cache``: "exact" | "delayed" (exact across blocks, committed positions kept within the active
        block: delayed_cache.py) | "none" for block-causal models, "prefix" | "dual" | "none" (Fast-dLLM's
        approximate caches, approx_cache.py) for full-attention ones; None picks from ``kv_cache``.
        With the exact cache, rows are batched continuously (scheduler.py); ``max_batch_tokens`` caps
        rows x cached positions of the running batch (default: max_batch_size x the model's positions).
        ``graphs``: with the exact cache, each round's step (greedy rounds) or forward (rounds with
        sampling rows) is captured as a CUDA graph and replayed (cuda_graph.py); None = on a CUDA
        device. True elsewhere runs the same static-shape protocol without capture, which is how the
        CPU tests check it."""
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
        if default not in SAMPLERS:
            raise ValueError(f"config.json's diffbatch_default_sampler {default!r} is not one of {list(SAMPLERS)}")
        self.default_sampler = default
        # The block a request that names none gets may be shorter than the one the model was trained
        # with: the built-in model's config.json names 16 (README: same quality, fewer FLOPs a token).
        block = getattr(loaded.config, "diffbatch_default_block_length", None)
        block = self.default_block_length if block is None else block
        if not isinstance(block, int) or isinstance(block, bool) or not 1 <= block <= 1024:
            raise ValueError(f"config.json's diffbatch_default_block_length {block!r} is not an integer in [1, 1024]")
        self.default_block_length = block
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
        self.vocab_size = int(loaded.config.vocab_size)
        self.device = next(self.model.parameters()).device
        self.scheduler = BlockScheduler(
            self.model, tokenizer=self.tokenizer, mask_token_id=loaded.mask_token_id,
            pad_token_id=loaded.pad_token_id, eos_token_ids=loaded.eos_token_ids, max_batch_size=max_batch_size,
            max_batch_tokens=max_batch_tokens or max_batch_size * self.max_positions, device=self.device,
            vocab_size=self.vocab_size, delayed=self.cache_mode == "delayed",
            graphs=self.device.type == "cuda" if graphs is None else graphs)
        self.healer = TokenHealer(self.tokenizer, self.vocab_size)

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
        """Raise ValueError if ``request`` cannot run; lets a caller reject one request alone."""
        params = request.params
        params.validate()
        if params.sampler not in SAMPLERS:
            raise ValueError(f"diffusion.sampler {params.sampler!r} applies to DiffusionGemma models only; "
                             f"this model takes one of {list(SAMPLERS)}")
        for name in DIFFUSION_GEMMA_OPTIONS:
            if getattr(params, name) is not None:
                raise ValueError(f"diffusion.{name} applies to DiffusionGemma models only")
        prompt = request.prompt_ids
        if not isinstance(prompt, list) or not prompt:
            raise ValueError("prompt must contain at least one token")
        if not all(isinstance(t, int) and 0 <= t < self.vocab_size for t in prompt):
            raise ValueError(f"prompt token ids must be integers in [0, {self.vocab_size})")
        self._check_template(request)
        healing = request.healing
        if healing is not None and (request.template_ids is not None or not healing.allowed or not all(
                isinstance(t, int) and 0 <= t < self.vocab_size for t in healing.allowed)):
            raise ValueError(f"token healing needs allowed token ids in [0, {self.vocab_size}) and no template")
        gen_length = _round_up(params.max_tokens, params.block_length)
        if len(prompt) + gen_length > self.max_positions:
            raise ContextLengthError(
                f"prompt of {len(prompt)} tokens + max_tokens={params.max_tokens} (rounded up to "
                f"{gen_length}, a multiple of diffusion.block_length={params.block_length}) needs "
                f"{len(prompt) + gen_length} positions; the model supports {self.max_positions}"
            )

    def encode_template(self, template: str) -> list[int | None]:
        return encode_template(self.tokenizer, template)

    def _check_template(self, request: GenerationRequest) -> None:
        template = request.template_ids
        if template is None:
            return
        if self.cache_mode not in ("exact", "delayed"):
            raise ValueError("diffusion.template needs the continuous block-causal engine (exact KV cache)")
        if not isinstance(template, list) or None not in template:
            raise ValueError("diffusion.template must hold at least one hole")
        if not all(t is None or (isinstance(t, int) and 0 <= t < self.vocab_size) for t in template):
            raise ValueError(f"template token ids must be integers in [0, {self.vocab_size}) or holes")
        if request.params.max_tokens != len(template) or request.params.stop:
            raise ValueError("with diffusion.template, the template sets the length: max_tokens must equal "
                             "its length in tokens and stop must be empty")

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        """Results in the order of ``requests``; raises ValueError if any request is invalid."""
        results: list[GenerationResult | None] = [None] * len(requests)
        for i, result in self.stream(requests):
            results[i] = result
        return results

    def stream(self, requests: list[GenerationRequest]) -> Iterator[tuple[int, GenerationResult]]:
        """Yield (index in ``requests``, result) as each request finishes.

        With the exact KV cache, rows are scheduled continuously (scheduler.BlockScheduler): a
        finished row leaves at the next block boundary and a waiting one takes its place. Without
        it (the recompute baseline), fixed batches run to the end.
        """
        for request in requests:
            self.check(request)
        if self.cache_mode in ("exact", "delayed"):  # continuous batching rides on the exact block cache
            groups: dict[int, list[tuple[int, GenerationRequest]]] = defaultdict(list)
            for i, request in enumerate(requests):
                groups[request.params.block_length].append((i, request))
            for group in groups.values():
                yield from self.scheduler.run(group)
            return
        for indices in self._plan_batches(requests):
            yield from zip(indices, self._generate_batch([requests[i] for i in indices]))

    def _plan_batches(self, requests: list[GenerationRequest]) -> list[list[int]]:
        """Rows of one batch share block_length; sorting by prompt length limits padding."""
        groups: dict[int, list[int]] = defaultdict(list)
        for i, request in enumerate(requests):
            groups[request.params.block_length].append(i)
        batches = []
        for indices in groups.values():
            indices.sort(key=lambda i: len(requests[i].prompt_ids))
            for first in range(0, len(indices), self.max_batch_size):
                batches.append(indices[first : first + self.max_batch_size])
        return batches

    @torch.inference_mode()
    def _generate_batch(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        started = time.perf_counter()
        params = [r.params for r in requests]
        block_length = params[0].block_length
        max_tokens = [p.max_tokens for p in params]
        layout = build_layout(
            [r.prompt_ids for r in requests],
            gen_length=max(_round_up(m, block_length) for m in max_tokens),
            block_length=block_length,
            pad_token_id=self.loaded.pad_token_id,
            mask_token_id=self.loaded.mask_token_id,
            device=self.device,
            full_attention=self.full_attention,
        )
        noise = RowNoise([p.effective_seed for p in params], self.device)
        forward = make_forward(self.cache_mode, self.model, layout, logits_shift=self.logits_shift)

        forward_passes = [0] * len(requests)
        done = [False] * len(requests)
        healing_mask = first_token_mask([r.healing for r in requests], self.vocab_size, self.device)
        for block in range(layout.num_blocks):
            start, end = layout.block_span(block)
            block_passes = denoise_block(
                forward, layout.x, start, end, mask_token_id=self.loaded.mask_token_id,
                rows=params, active=[not d for d in done], noise=noise,
                first_allowed=healing_mask if block == 0 else None,  # generation starts at block 0
                history=self._history(layout.x[:, layout.prompt_length : start], params),
            )
            forward_passes = [total + n for total, n in zip(forward_passes, block_passes)]
            done = self._rows_done(layout.x[:, layout.prompt_length : end], max_tokens)
            done = self._hit_stop_string(layout.x[:, layout.prompt_length : end], requests, done)
            if all(done):
                break

        elapsed = time.perf_counter() - started
        generated = layout.x[:, layout.prompt_length :].tolist()
        return [
            self._result(request, row, passes, elapsed)
            for request, row, passes in zip(requests, generated, forward_passes)
        ]

    def _history(self, generated: torch.Tensor, params: list) -> torch.Tensor | None:
        """Counts of the tokens generated so far (B, V), when a row has a repetition penalty."""
        if generated.shape[1] == 0 or not any(p.penalised for p in params):
            return None
        return token_counts(generated, torch.ones_like(generated, dtype=torch.bool), self.vocab_size)

    def _rows_done(self, generated: torch.Tensor, max_tokens: list[int]) -> list[bool]:
        """A row is done once it reached max_tokens or emitted EOS within them. generated (B, T)."""
        length = generated.shape[1]
        limit = torch.tensor(max_tokens, device=generated.device)[:, None]  # (B, 1)
        within = torch.arange(length, device=generated.device)[None, :] < limit  # (B, T)
        done = limit[:, 0] <= length  # (B,)
        if self.loaded.eos_token_ids:
            ends = torch.tensor(self.loaded.eos_token_ids, device=generated.device)
            done |= (torch.isin(generated, ends) & within).any(dim=1)
        return done.tolist()

    def _hit_stop_string(self, generated: torch.Tensor, requests: list, done: list[bool]) -> list[bool]:
        """Also done: rows whose committed text already holds a stop string (block-causal attention
        means later blocks cannot change it, so stopping here only saves their compute)."""
        rows = [r for r, request in enumerate(requests) if request.params.stop and not done[r]]
        for r, token_ids in zip(rows, generated[rows].tolist()):
            params = requests[r].params
            kept, _ = cut_at_eos(token_ids[: params.max_tokens], self.loaded.eos_token_ids)
            done[r] = apply_stop(completion_text(self.tokenizer, kept, requests[r].healed_text), params.stop)[1]
        return done

    def _result(self, request, generated: list[int], forward_passes: int, elapsed: float) -> GenerationResult:
        params = request.params
        row = finish_row(
            generated,
            max_tokens=params.max_tokens,
            eos_token_ids=self.loaded.eos_token_ids,
            stop=params.stop,
            tokenizer=self.tokenizer,
            healed=request.healed_text,
        )
        return GenerationResult(
            token_ids=row.token_ids,
            text=row.text,
            finish_reason=row.finish_reason,
            prompt_tokens=len(request.prompt_ids),
            completion_tokens=len(row.token_ids),
            forward_passes=forward_passes,
            elapsed_s=elapsed,
        )
