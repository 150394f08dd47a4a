"""Continuous batching for block-causal models: rows leave and join the batch at block boundaries.

A block-causal model's finished blocks never change and never attend forward, so a row's whole
history is its exact KV cache (computed once per finished block) plus the position of its next block. The
running batch is therefore only: per layer (keys, values) of shape (B, H, C, D), a (B, C) mask of
real keys (rows are left-padded to the longest history), and each row's next position. Every round
denoises one block for all rows, appends the committed block to the cache, then

  - evicts rows that are done (max_tokens reached, EOS or a stop string in the committed text), and
  - admits waiting rows (their prompts prefilled in one pass, their caches left-padded and joined)
    while the batch has fewer than ``max_batch_size`` rows and the padded cache stays within
    ``max_batch_tokens``.

So the batch stays full while there is work, and a short request does not wait for the longest one
of its batch. A request's tokens depend only on its prompt, parameters and seed (its own
torch.Generator), not on its batch-mates. (Scheduling in the spirit of nano-vllm's scheduler and
SDAR/JetEngine's block-diffusion serving; written for this engine.)
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from .params import GenerationRequest, GenerationResult
from .healing import first_token_mask
from .postprocess import apply_stop, completion_text, cut_at_eos, finish_row
from .cuda_graph import BlockForwardGraph, CapturedCall
from .delayed_cache import DelayedBlockForward
from .samplers import GreedyBlockSteps, RowNoise, denoise_block, token_counts


@dataclass
class Row:
    index: int  # position in the caller's request list
    request: GenerationRequest
    generator: torch.Generator
    admitted_at: float
    generated: list[int] = field(default_factory=list)  # committed tokens, whole blocks
    passes: int = 0


@dataclass
class RunningBatch:
    rows: list[Row]
    key_values: list[tuple[torch.Tensor, torch.Tensor]]  # per layer, (B, H, C, D) each
    key_valid: torch.Tensor  # (B, C) bool: real keys; False = left padding
    next_position: torch.Tensor  # (B,) long: position id of each row's next token

    def keep(self, kept: list[bool]) -> None:
        """Drop the rows not kept, then the padding columns no remaining row needs."""
        index = torch.tensor([i for i, k in enumerate(kept) if k], dtype=torch.long,
                             device=self.key_valid.device)
        self.rows = [row for row, k in zip(self.rows, kept) if k]
        valid = self.key_valid.index_select(0, index)
        first = int(valid.any(dim=0).long().argmax()) if self.rows else 0  # first column in use
        self.key_valid = valid[:, first:]
        self.next_position = self.next_position.index_select(0, index)
        self.key_values = [(k.index_select(0, index)[:, :, first:], v.index_select(0, index)[:, :, first:])
                           for k, v in self.key_values]

    def join(self, other: RunningBatch) -> None:
        """Append ``other``'s rows; the shorter caches are left-padded with masked zeros."""
        length = max(self.key_valid.shape[1], other.key_valid.shape[1])
        self.rows += other.rows
        self.key_valid = torch.cat([_left_pad(self.key_valid, length, dim=1),
                                    _left_pad(other.key_valid, length, dim=1)])
        self.next_position = torch.cat([self.next_position, other.next_position])
        self.key_values = [
            (torch.cat([_left_pad(k, length, dim=2), _left_pad(k2, length, dim=2)]),
             torch.cat([_left_pad(v, length, dim=2), _left_pad(v2, length, dim=2)]))
            for (k, v), (k2, v2) in zip(self.key_values, other.key_values)
        ]


def _extend(tensor: torch.Tensor, columns: int) -> torch.Tensor:
    """(B, H, C, D) -> (B, H, C + columns, D), the new columns zero."""
    batch, heads, _, dim = tensor.shape
    return torch.cat([tensor, tensor.new_zeros((batch, heads, columns, dim))], dim=2)


def _left_pad(tensor: torch.Tensor, length: int, *, dim: int) -> torch.Tensor:
    missing = length - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


class BlockScheduler:
    def __init__(self, model, *, tokenizer, mask_token_id: int, pad_token_id: int, eos_token_ids: tuple[int, ...],
                 max_batch_size: int, max_batch_tokens: int, device: torch.device, vocab_size: int,
                 delayed: bool = False, graphs: bool = False):
        """``delayed``: inside the active block, stop recomputing committed positions
        (delayed_cache.py; approximate). Finished blocks are cached exactly either way.
        ``graphs`` (exact cache only): each round's step forward is one static-shape forward,
        captured as a CUDA graph on a CUDA device and replayed at every step (cuda_graph.py)."""
        self.model, self.tokenizer, self.device, self.vocab_size = model, tokenizer, device, vocab_size
        self.delayed = delayed
        self.graphs = graphs and not delayed
        self.mask_token_id, self.pad_token_id, self.eos_token_ids = mask_token_id, pad_token_id, eos_token_ids
        self.max_batch_size, self.max_batch_tokens = max_batch_size, max_batch_tokens

    @torch.inference_mode()
    def run(self, requests: list[tuple[int, GenerationRequest]]) -> Iterator[tuple[int, GenerationResult]]:
        """Yield (index, result) as rows finish. All requests share one block_length."""
        block_length = requests[0][1].params.block_length
        if any(r.params.block_length != block_length for _, r in requests):
            raise ValueError("one scheduler run serves one diffusion.block_length")
        waiting = deque(sorted(requests, key=lambda item: len(item[1].prompt_ids)))  # less padding
        batch: RunningBatch | None = None
        while waiting or (batch and batch.rows):
            batch = self._admit(batch, waiting, block_length)
            self._denoise_round(batch, block_length)
            done = [self._is_done(row) for row in batch.rows]
            for row, finished in zip(batch.rows, done):
                if finished:
                    yield row.index, self._result(row)
            batch.keep([not d for d in done])

    def _admit(self, batch: RunningBatch | None, waiting: deque, block_length: int) -> RunningBatch:
        rows = 0 if batch is None else len(batch.rows)
        length = 0 if batch is None else batch.key_valid.shape[1]
        chosen = []
        while waiting and rows + len(chosen) < self.max_batch_size:
            needed = max(length, len(waiting[0][1].prompt_ids)) + block_length  # cache after this round
            if (rows + len(chosen) + 1) * needed > self.max_batch_tokens and rows + len(chosen) > 0:
                break  # the budget allows this row later, when others have left
            chosen.append(waiting.popleft())
            length = max(length, len(chosen[-1][1].prompt_ids))
        if not chosen:
            return batch
        joined = self._prefill(chosen)
        if batch is None or not batch.rows:
            return joined
        batch.join(joined)
        return batch

    def _prefill(self, chosen: list[tuple[int, GenerationRequest]]) -> RunningBatch:
        """One pass over the new prompts (left-padded, each a bidirectional block) fills their caches."""
        longest = max(len(r.prompt_ids) for _, r in chosen)
        ids = torch.full((len(chosen), longest), self.pad_token_id, dtype=torch.long)
        valid = torch.zeros((len(chosen), longest), dtype=torch.bool)
        for row, (_, request) in enumerate(chosen):
            ids[row, longest - len(request.prompt_ids):] = torch.tensor(request.prompt_ids)
            valid[row, longest - len(request.prompt_ids):] = True
        ids, valid = ids.to(self.device), valid.to(self.device)
        positions = (valid.long().cumsum(dim=1) - 1).clamp(min=0)
        mask = valid[:, None, None, :].expand(-1, 1, longest, -1)  # (Bn, 1, L, L)
        output = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                            logits_to_keep=1)
        now = time.perf_counter()
        rows = [Row(index=index, request=request, admitted_at=now,
                    generator=torch.Generator(device=self.device).manual_seed(request.params.effective_seed))
                for index, request in chosen]
        return RunningBatch(rows=rows, key_values=output.key_values, key_valid=valid,
                            next_position=valid.sum(dim=1))

    def _denoise_round(self, batch: RunningBatch, block_length: int) -> None:
        """Denoise one block for every row, then cache it (one more pass over the clean block)."""
        size = len(batch.rows)
        block = self._canvas(batch.rows, block_length)
        positions = batch.next_position[:, None] + torch.arange(block_length, device=self.device)  # (B, K)
        keys = torch.cat([batch.key_valid, torch.ones((size, block_length), dtype=torch.bool,
                                                      device=self.device)], dim=1)
        mask = keys[:, None, None, :].expand(-1, 1, block_length, -1)  # (B, 1, K, C + K)

        # The cache grows by the block once per round; every step writes the block's keys and values
        # into the new columns in place, and the last pass leaves the committed block's there.
        cached = batch.key_valid.shape[1]
        key_values = [(_extend(k, block_length), _extend(v, block_length)) for k, v in batch.key_values]

        def run(active_block: torch.Tensor, **logits) -> torch.Tensor:
            return self.model(input_ids=active_block, past_key_values=key_values, write_offset=cached,
                              attention_mask=mask, position_ids=positions, **logits).logits

        params = [row.request.params for row in batch.rows]
        # Token healing binds a row's first generated token, which opens its first block.
        healings = [None if row.generated else row.request.healing for row in batch.rows]
        first_allowed = first_token_mask(healings, self.vocab_size, self.device)
        history = self._history(batch.rows)
        if self.graphs and all(p.temperature == 0 for p in params):
            steps = GreedyBlockSteps(block, params, mask_token_id=self.mask_token_id,
                                     first_allowed=first_allowed, history=history)
            step = CapturedCall(lambda: steps(run), self.device)
            passes = steps.run(step)
            step()  # no mask is left: the step only leaves the clean block's keys and values cached
        else:
            forward, commit = self._step_forward(run, block, key_values, batch.key_valid, positions)
            noise = RowNoise.from_generators([row.generator for row in batch.rows], self.device)
            passes = denoise_block(forward, block, 0, block_length, mask_token_id=self.mask_token_id,
                                   rows=params, active=[True] * size, noise=noise, first_allowed=first_allowed,
                                   history=history)
            commit(block)
        batch.key_values, batch.key_valid = key_values, keys
        batch.next_position = batch.next_position + block_length
        for row, tokens, n in zip(batch.rows, block.tolist(), passes):
            row.generated.extend(tokens)
            row.passes += n

    def _step_forward(self, run, block, key_values, key_valid, positions):
        """The eager loop's ``forward(block, slots)`` for this round, and its commit pass."""
        commit = lambda clean: run(clean, logits_to_keep=1)  # noqa: E731
        if self.delayed:
            return DelayedBlockForward(self.model, key_values, key_valid, positions, self.mask_token_id), commit
        if self.graphs:  # rows that sample: the forward alone is captured
            graph = BlockForwardGraph(run, block)
            return graph, graph.commit
        # Logits at the still-masked positions only: the vocabulary projection is ~a fifth of the
        # built-in model's FLOPs a position, and half the block is filled on average.
        return (lambda active_block, slots: run(active_block, logits_at=slots)), commit

    def _history(self, rows: list[Row]) -> torch.Tensor | None:
        """Counts of each row's generated tokens (B, V), when a row has a repetition penalty."""
        longest = max(len(row.generated) for row in rows)  # rows joined in different rounds
        if longest == 0 or not any(row.request.params.penalised for row in rows):
            return None
        ids = torch.zeros((len(rows), longest), dtype=torch.long)
        counted = torch.zeros((len(rows), longest), dtype=torch.bool)
        for r, row in enumerate(rows):  # once per block, not per step
            ids[r, : len(row.generated)] = torch.tensor(row.generated, dtype=torch.long)
            counted[r, : len(row.generated)] = True
        return token_counts(ids.to(self.device), counted.to(self.device), self.vocab_size)

    def _canvas(self, rows: list[Row], block_length: int) -> torch.Tensor:
        """The next block of every row: [MASK] everywhere but where an infilling template fixes text."""
        block = torch.full((len(rows), block_length), self.mask_token_id, dtype=torch.long)
        for r, row in enumerate(rows):  # once per block, not per step
            template = row.request.template_ids
            if template:
                part = template[len(row.generated) : len(row.generated) + block_length]
                block[r, : len(part)] = torch.tensor([self.mask_token_id if t is None else t for t in part])
        return block.to(self.device)

    def _eos_for(self, row: Row) -> tuple[int, ...]:
        # A template's length is fixed: an EOS a hole holds does not end it (decoding drops it).
        return () if row.request.template_ids else self.eos_token_ids

    def _is_done(self, row: Row) -> bool:
        params = row.request.params
        if len(row.generated) >= params.max_tokens:
            return True
        kept, hit_eos = cut_at_eos(row.generated, self._eos_for(row))
        if hit_eos or not params.stop:
            return hit_eos
        # Committed blocks never change, so a stop string found now is final.
        return apply_stop(completion_text(self.tokenizer, kept, row.request.healed_text), params.stop)[1]

    def _result(self, row: Row) -> GenerationResult:
        params = row.request.params
        finished = finish_row(row.generated, max_tokens=params.max_tokens, eos_token_ids=self._eos_for(row),
                              stop=params.stop, tokenizer=self.tokenizer, healed=row.request.healed_text)
        return GenerationResult(token_ids=finished.token_ids, text=finished.text,
                                finish_reason=finished.finish_reason, prompt_tokens=len(row.request.prompt_ids),
                                completion_tokens=len(finished.token_ids), forward_passes=row.passes,
                                elapsed_s=time.perf_counter() - row.admitted_at)
