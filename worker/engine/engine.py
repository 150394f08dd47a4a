"""The engine: prompts in, denoised completions out, in padded block-causal batches."""

from __future__ import annotations

import time
from collections import defaultdict

import torch

from .cache import ExactBlockCache, Recompute
from .layout import build_layout
from .loader import LoadedModel
from .params import ContextLengthError, GenerationRequest, GenerationResult
from .postprocess import apply_stop, cut_at_eos, finish_row
from .samplers import RowNoise, denoise_block

SUPPORTED_FAMILIES = ("block_causal",)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class Engine:
    def __init__(self, loaded: LoadedModel, *, max_batch_size: int = 32, kv_cache: bool = True):
        """``kv_cache``: reuse finished blocks' keys and values (exact for block-causal models);
        False recomputes the whole prefix at every step, the baseline the cache is tested against."""
        if not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ValueError("max_batch_size must be a positive integer")
        if loaded.family not in SUPPORTED_FAMILIES:
            raise ValueError(
                f"model family {loaded.family!r} is not supported yet; supported: {list(SUPPORTED_FAMILIES)}"
            )
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.name = loaded.name
        self.max_positions = loaded.max_positions
        self.max_batch_size = max_batch_size
        self.kv_cache = kv_cache
        self.vocab_size = int(loaded.config.vocab_size)
        self.device = next(self.model.parameters()).device

    # ---- prompts -------------------------------------------------------------------------

    def encode_completion(self, prompt: str) -> list[int]:
        if not isinstance(prompt, str):
            raise ValueError("prompt must be a string")
        return list(self.tokenizer(prompt)["input_ids"])

    def encode_chat(self, messages: list[dict]) -> list[int]:
        if not isinstance(messages, list) or not messages:
            raise ValueError("messages must be a non-empty list")
        for message in messages:
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise ValueError("each message must be an object with a string role")
            if not isinstance(message.get("content"), str):
                raise ValueError("only text message content is supported")
        try:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as error:  # jinja raises its own types, e.g. for an unknown role
            raise ValueError(f"chat template failed: {error}") from error
        # The template writes the special tokens itself.
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    # ---- generation ----------------------------------------------------------------------

    def check(self, request: GenerationRequest) -> None:
        """Raise ValueError if ``request`` cannot run; lets a caller reject one request alone."""
        params = request.params
        params.validate()
        prompt = request.prompt_ids
        if not isinstance(prompt, list) or not prompt:
            raise ValueError("prompt must contain at least one token")
        if not all(isinstance(t, int) and 0 <= t < self.vocab_size for t in prompt):
            raise ValueError(f"prompt token ids must be integers in [0, {self.vocab_size})")
        gen_length = _round_up(params.max_tokens, params.block_length)
        if len(prompt) + gen_length > self.max_positions:
            raise ContextLengthError(
                f"prompt of {len(prompt)} tokens + max_tokens={params.max_tokens} (rounded up to "
                f"{gen_length}, a multiple of diffusion.block_length={params.block_length}) needs "
                f"{len(prompt) + gen_length} positions; the model supports {self.max_positions}"
            )

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        """Results in the order of ``requests``; raises ValueError if any request is invalid."""
        for request in requests:
            self.check(request)
        results: list[GenerationResult | None] = [None] * len(requests)
        for indices in self._plan_batches(requests):
            batch_results = self._generate_batch([requests[i] for i in indices])
            for i, result in zip(indices, batch_results):
                results[i] = result
        return results

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
        )
        noise = RowNoise([p.effective_seed for p in params], self.device)
        forward = (ExactBlockCache if self.kv_cache else Recompute)(self.model, layout)

        forward_passes = [0] * len(requests)
        done = [False] * len(requests)
        for block in range(layout.num_blocks):
            start, end = layout.block_span(block)
            block_passes = denoise_block(
                forward, layout.x, start, end, mask_token_id=self.loaded.mask_token_id,
                rows=params, active=[not d for d in done], noise=noise,
            )
            forward_passes = [total + n for total, n in zip(forward_passes, block_passes)]
            done = self._rows_done(layout.x[:, layout.prompt_length : end], max_tokens)
            done = self._hit_stop_string(layout.x[:, layout.prompt_length : end], params, done)
            if all(done):
                break

        elapsed = time.perf_counter() - started
        generated = layout.x[:, layout.prompt_length :].tolist()
        return [
            self._result(request, row, passes, elapsed)
            for request, row, passes in zip(requests, generated, forward_passes)
        ]

    def _rows_done(self, generated: torch.Tensor, max_tokens: list[int]) -> list[bool]:
        """A row is done once it reached max_tokens or emitted EOS within them. generated (B, T)."""
        length = generated.shape[1]
        limit = torch.tensor(max_tokens, device=generated.device)[:, None]  # (B, 1)
        within = torch.arange(length, device=generated.device)[None, :] < limit  # (B, T)
        done = limit[:, 0] <= length  # (B,)
        if self.loaded.eos_token_id is not None:
            done |= ((generated == self.loaded.eos_token_id) & within).any(dim=1)
        return done.tolist()

    def _hit_stop_string(self, generated: torch.Tensor, params: list, done: list[bool]) -> list[bool]:
        """Also done: rows whose committed text already holds a stop string (block-causal attention
        means later blocks cannot change it, so stopping here only saves their compute)."""
        rows = [r for r, p in enumerate(params) if p.stop and not done[r]]
        for r, token_ids in zip(rows, generated[rows].tolist()):
            kept, _ = cut_at_eos(token_ids[: params[r].max_tokens], self.loaded.eos_token_id)
            done[r] = apply_stop(self.tokenizer.decode(kept, skip_special_tokens=True), params[r].stop)[1]
        return done

    def _result(self, request, generated: list[int], forward_passes: int, elapsed: float) -> GenerationResult:
        params = request.params
        row = finish_row(
            generated,
            max_tokens=params.max_tokens,
            eos_token_id=self.loaded.eos_token_id,
            stop=params.stop,
            tokenizer=self.tokenizer,
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
