"""The base of the continuous schedulers: rows leave and join the running batch at block boundaries.

Every round denoises one block of every running row; then rows that are done (max_tokens, an EOS or
a stop string in the committed text) leave, and waiting rows join while the batch has room
(``_choose``). A request's tokens depend only on its prompt, parameters and seed (its own generator).
Subclasses: ``block.BlockScheduler`` (the exact and delayed caches: the batch keeps its KV cache) and
``canvas.CanvasScheduler`` (recomputation and the approximate caches: it keeps only the rows). In the
spirit of nano-vllm's scheduler and SDAR/JetEngine's block-diffusion serving; written for this engine.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from ..healing import first_token_mask
from ..layout import lead_length, whole_blocks
from ..params import GenerationRequest, GenerationResult
from ..postprocess import apply_stop, completion_text, cut_at_eos, finish_row
from ..sampling.kept import Kept
from ..sampling.predict import token_counts
from ..sampling.rules import BlockRules
from ..sampling.step import BlockContext


@dataclass
class Row:
    index: int  # position in the caller's request list
    request: GenerationRequest
    generator: torch.Generator
    admitted_at: float
    lead: list[int] = field(default_factory=list)  # prompt tokens that open the first block (layout.lead_length)
    generated: list[int] = field(default_factory=list)  # committed blocks, whole: the lead, then the completion
    passes: int = 0
    # A shifted block-causal model's next block opens with this token, predicted greedily by the last
    # position before it (block.py); None for other models and while the lead opens the block.
    first: int | None = None

    @property
    def head(self) -> list[int]:
        """The prompt before the first block: all of it unless the row has a lead."""
        return self.request.prompt_ids[: len(self.request.prompt_ids) - len(self.lead)]

    @property
    def completion(self) -> list[int]:
        return self.generated[len(self.lead):]

    @property
    def written(self) -> list[int]:
        """The completion's tokens the model wrote: a template's text, which the request gave as it
        gave the prompt, left out (the repetition penalties count these only)."""
        template = self.request.template_ids
        return self.completion if not template else [t for t, fixed in zip(self.completion, template, strict=False)
                                                      if fixed is None]

    def ahead(self, block_length: int) -> int:
        """Positions still to denoise: the lead and max_tokens rounded up to whole blocks, less what
        is committed."""
        return whole_blocks(len(self.lead) + self.request.params.max_tokens, block_length) - len(self.generated)


def _committed(row: Row) -> int:
    """The row's completion tokens committed so far, not counting a last block's positions past max_tokens."""
    return min(len(row.completion), row.request.params.max_tokens)


class ContinuousScheduler:
    """The base scheduler: the loop and the rows' bookkeeping. A subclass says how rows join (``_admit``)
    and how one block of every row is denoised (``_denoise_round``); its batch has ``rows`` and ``keep``."""

    def __init__(self, model, *, tokenizer, mask_token_id: int, pad_token_id: int, eos_token_ids: tuple[int, ...],
                 max_batch_size: int, max_batch_tokens: int, device: torch.device, vocab_size: int,
                 aligned: bool = False):
        """``aligned``: the model's blocks are aligned from position 0, the prompt's included
        (SDAR; layout.lead_length), instead of the prompt being one block."""
        self.model, self.tokenizer, self.device, self.vocab_size = model, tokenizer, device, vocab_size
        self.aligned = aligned
        self.mask_token_id, self.pad_token_id, self.eos_token_ids = mask_token_id, pad_token_id, eos_token_ids
        self.max_batch_size, self.max_batch_tokens = max_batch_size, max_batch_tokens
        # A family whose own generation samples from the top-k logits says so (Dream); None: all of them.
        self.top_k: int | None = getattr(model, "sampling_top_k", None)
        # Progress, read by the worker's heartbeat thread: completion tokens committed since the engine
        # loaded, and those of the rows still running (0 between runs).
        self.tokens_committed = 0
        self.tokens_in_flight = 0

    @torch.inference_mode()
    def run(self, requests: list[tuple[int, GenerationRequest]],
            more: Callable[[int], list[tuple[int, GenerationRequest]]] | None = None,
            ) -> Iterator[tuple[int, GenerationResult]]:
        """Yield (index, result) as rows finish. All requests share one block_length. ``more(free_rows)``:
        asked, when nothing waits and the batch has a free row, for further (index, request) pairs of the
        same block_length; they join as waiting rows do, so a row's tokens stay its own."""
        block_length = requests[0][1].params.block_length if requests else 0
        if any(r.params.block_length != block_length for _, r in requests):
            raise ValueError("one scheduler run serves one diffusion.block_length")
        waiting = deque(sorted(requests, key=lambda item: len(item[1].prompt_ids)))  # less padding
        batch = None
        try:
            while True:
                free = self.max_batch_size - (len(batch.rows) if batch else 0)
                if more is not None and not waiting and free > 0:
                    fed = more(free)
                    if any(r.params.block_length != block_length for _, r in fed):
                        raise ValueError("one scheduler run serves one diffusion.block_length")
                    waiting.extend(sorted(fed, key=lambda item: len(item[1].prompt_ids)))
                if not (waiting or (batch and batch.rows)):
                    break
                batch = self._admit(batch, waiting, block_length)
                before = sum(_committed(row) for row in batch.rows)
                self._denoise_round(batch, block_length)
                committed = [_committed(row) for row in batch.rows]
                done = [self._is_done(row) for row in batch.rows]
                self.tokens_committed += sum(committed) - before
                self.tokens_in_flight = sum(n for n, d in zip(committed, done, strict=True) if not d)
                for row, finished in zip(batch.rows, done, strict=False):
                    if finished:
                        yield row.index, self._result(row)
                batch.keep([not d for d in done])
        finally:  # also when the caller stops early (a cancelled batch)
            self.tokens_in_flight = 0

    def _admit(self, batch, waiting: deque, block_length: int):
        """The batch with the waiting rows that fit joined (a new one if ``batch`` is None or empty)."""
        raise NotImplementedError

    def _denoise_round(self, batch, block_length: int) -> None:
        raise NotImplementedError

    def _choose(self, rows: list[Row], behind: int, waiting: deque,
                block_length: int) -> list[tuple[int, GenerationRequest]]:
        """Waiting requests, in order, while the batch has room: at most ``max_batch_size`` rows, and rows x
        the columns it can reach within ``max_batch_tokens`` (a lone row always). ``behind``: the running
        batch's columns left of its active block."""
        # The columns reserve every row's remaining blocks (the longest history plus the most blocks any
        # row has still to denoise), so the budget bounds the cache or canvas for the whole run.
        ahead = [row.ahead(block_length) for row in rows]
        chosen: list[tuple[int, GenerationRequest]] = []
        while waiting and len(rows) + len(chosen) < self.max_batch_size:
            new = [r for _, r in chosen] + [waiting[0][1]]
            leads = [self._lead(r, block_length) for r in new]
            width = (max([behind, *(len(r.prompt_ids) - lead for r, lead in zip(new, leads, strict=False))])
                     + max(ahead + [whole_blocks(lead + r.params.max_tokens, block_length)
                                    for r, lead in zip(new, leads, strict=False)]))
            if len(rows) + len(new) > 1 and (len(rows) + len(new)) * width > self.max_batch_tokens:
                break  # the budget allows this row later, when others have left
            chosen.append(waiting.popleft())
        return chosen

    def _lead(self, request: GenerationRequest, block_length: int) -> int:
        return lead_length(len(request.prompt_ids), block_length, aligned=self.aligned)

    def _new_rows(self, chosen: list[tuple[int, GenerationRequest]], block_length: int) -> list[Row]:
        now = time.perf_counter()
        return [Row(index=index, request=request, admitted_at=now,
                    lead=request.prompt_ids[len(request.prompt_ids) - self._lead(request, block_length):],
                    generator=torch.Generator(device=self.device).manual_seed(request.params.effective_seed))
                for index, request in chosen]

    @staticmethod
    def _commit(rows: list[Row], block: torch.Tensor, passes: list[int]) -> None:
        """Append each row's denoised block (B, K) and the passes it took."""
        for row, tokens, n in zip(rows, block.tolist(), passes, strict=False):
            row.generated.extend(tokens)
            row.passes += n

    def _block_context(self, rows: list[Row], block_length: int, fixed: torch.Tensor | None,
                       sub_block: int | None = None) -> BlockContext:
        """What every step of the rows' next block shares (sampling.step.BlockContext)."""
        allowed, allowed_at = self._allowed(rows, block_length)
        return BlockContext(BlockRules([row.request.params for row in rows], block_length, self.device, sub_block),
                            self.mask_token_id, allowed=allowed, allowed_at=allowed_at,
                            history=self._history(rows), fixed=fixed, kept=self._kept(rows, block_length),
                            top_k=self.top_k)

    def _allowed(self, rows: list[Row], block_length: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The token sets bound positions of the rows' next block may take: a table (C, V) bool and each
        block position's row in it (B, K; -1: free), or (None, None) when none is bound. Token healing
        binds a row's first generated token (after its lead); structured output every hole position."""
        tables: list[torch.Tensor] = []
        offsets: dict[int, int] = {}  # rows of one schema share its canvas, so its table once
        at = torch.full((len(rows), block_length), -1, dtype=torch.long)
        size = 0
        for r, row in enumerate(rows):  # once per block, not per step
            healing, structured = row.request.healing, row.request.structured
            if healing is not None and not row.generated:
                mask = torch.zeros((1, self.vocab_size), dtype=torch.bool)
                mask[0, list(healing.allowed)] = True
                tables.append(mask.to(self.device))
                at[r, len(row.lead)] = size
                size += 1
            if structured is not None:
                canvas = structured.canvas
                if id(canvas) not in offsets:
                    offsets[id(canvas)] = size
                    tables.append(canvas.masks_on(self.device))
                    size += canvas.masks.shape[0]
                start = len(row.generated) - len(row.lead)  # the completion's position at the block's column 0
                classes = canvas.classes[max(start, 0) : start + block_length]
                column = max(-start, 0)
                at[r, column : column + len(classes)] = torch.where(classes >= 0, classes + offsets[id(canvas)], -1)
        if not tables:
            return None, None
        return torch.cat(tables), at.to(self.device)

    def _history(self, rows: list[Row]) -> torch.Tensor | None:
        """Counts of the tokens each row wrote (B, V; ``Row.written``), when a row has a repetition
        penalty."""
        if not any(row.request.params.penalised for row in rows):
            return None
        completions = [row.written for row in rows]
        longest = max(len(c) for c in completions)  # rows joined in different rounds
        if longest == 0:
            return None
        ids = torch.zeros((len(rows), longest), dtype=torch.long)
        counted = torch.zeros((len(rows), longest), dtype=torch.bool)
        for r, completion in enumerate(completions):  # once per block, not per step
            ids[r, : len(completion)] = torch.tensor(completion, dtype=torch.long)
            counted[r, : len(completion)] = True
        return token_counts(ids.to(self.device), counted.to(self.device), self.vocab_size)

    def _canvas(self, rows: list[Row], length: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, length): each row's next ``length`` positions, [MASK] but where its lead or template fixes
        text (or a shifted model's ``Row.first``); and which hold that text (B, length) bool, or None."""
        canvas = torch.full((len(rows), length), self.mask_token_id, dtype=torch.long)
        fixed = torch.zeros((len(rows), length), dtype=torch.bool)
        for r, row in enumerate(rows):  # once per block, not per step
            text = row.lead + (row.request.template_ids or [])
            part = text[len(row.generated) : len(row.generated) + length]
            if part:
                canvas[r, : len(part)] = torch.tensor([self.mask_token_id if t is None else t for t in part])
                fixed[r, : len(part)] = torch.tensor([t is not None for t in part])
            elif row.first is not None:
                canvas[r, 0] = row.first
        return canvas.to(self.device), fixed.to(self.device) if fixed.any() else None

    def _kept(self, rows: list[Row], block_length: int) -> Kept | None:
        """The positions of the next block each row keeps (sampling.kept.Kept), or None when every row
        keeps all: a row's last block ends at its max_tokens (with a lead, or max_tokens not a
        multiple of the block, inside the block), and nothing after an EOS it commits is kept."""
        left = [len(row.lead) + row.request.params.max_tokens - len(row.generated) for row in rows]
        upto = None if min(left) >= block_length else (
            torch.arange(block_length, device=self.device) < torch.tensor(left, device=self.device)[:, None])
        eos_from = [max(0, len(row.lead) - len(row.generated)) if self._eos_for(row) else block_length
                    for row in rows]
        if not self.eos_token_ids or min(eos_from) >= block_length:
            return None if upto is None else Kept(upto)
        eos_ids = torch.tensor(self.eos_token_ids, device=self.device)
        return Kept(upto, eos_ids, torch.tensor(eos_from, device=self.device)[:, None])

    def _first_token(self, rows: list[Row]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Token healing binds a row's first generated token, in its first block after its lead: the
        tokens each row's first token may take (B, V) and its column in the block (B,), or (None, None)."""
        allowed = first_token_mask([None if row.generated else row.request.healing for row in rows],
                                   self.vocab_size, self.device)
        if allowed is None:
            return None, None
        return allowed, torch.tensor([len(row.lead) for row in rows], device=self.device)

    def _eos_for(self, row: Row) -> tuple[int, ...]:
        # A template's length is fixed: an EOS a hole holds does not end it (decoding drops it).
        return () if row.request.template_ids else self.eos_token_ids

    def _is_done(self, row: Row) -> bool:
        params = row.request.params
        if len(row.completion) >= params.max_tokens:
            return True
        kept, hit_eos = cut_at_eos(row.completion, self._eos_for(row))
        if hit_eos or not params.stop:
            return hit_eos
        # Committed blocks never change, so a stop string found now is final.
        return apply_stop(completion_text(self.tokenizer, kept, row.request.healed_text), params.stop)[1]

    def _result(self, row: Row) -> GenerationResult:
        params = row.request.params
        finished = finish_row(row.completion, max_tokens=params.max_tokens, eos_token_ids=self._eos_for(row),
                              stop=params.stop, tokenizer=self.tokenizer, healed=row.request.healed_text)
        text, finish_reason = finished.text, finished.finish_reason
        structured = row.request.structured
        if structured is not None:  # the holes' texts rendered (a JSON document), complete: "stop"
            text = structured.render(structured.canvas.hole_texts(self.tokenizer, finished.token_ids))
            finish_reason = "stop"
        return GenerationResult(token_ids=finished.token_ids, text=text,
                                finish_reason=finish_reason, prompt_tokens=len(row.request.prompt_ids),
                                completion_tokens=len(finished.token_ids), forward_passes=row.passes,
                                elapsed_s=time.perf_counter() - row.admitted_at, stop_sequence=finished.stop_sequence)
