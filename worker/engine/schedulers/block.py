"""Continuous batching for block-causal models over their exact KV cache (caches/exact.py).

The running batch keeps its cache between rounds. Every round denoises one block for all rows and
one more pass over the clean block caches it; joining rows have their prompts prefilled (a few rows a
forward) and their caches left-padded and joined.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import torch

from ..caches.base import StepForward
from ..caches.delayed import DelayedBlockForward
from ..caches.exact import ExactRound, RunningBatch
from ..cuda_graph import BlockForwardGraph, CapturedCall
from ..sampling.blocks import denoise_block
from ..sampling.greedy import GreedyBlockSteps
from ..sampling.noise import RowNoise
from .base import ContinuousScheduler, Row

# Prompt tokens prefilled in one forward at most (rows x the longest prompt among them): a forward's
# activations grow with it (the MLP's alone are rows x length x 2 x intermediate_size), while the
# tokens computed do not depend on how the rows are grouped. A longer prompt is prefilled alone.
PREFILL_TOKENS = 8192


def prefill_spans(lengths: list[int], tokens: int) -> list[tuple[int, int]]:
    """Consecutive runs [start, end) of prompts whose padded lengths hold at most ``tokens`` each."""
    spans, start, longest = [], 0, 0
    for i, length in enumerate(lengths):
        if i > start and (i - start + 1) * max(longest, length) > tokens:
            spans.append((start, i))
            start, longest = i, 0
        longest = max(longest, length)
    return spans + [(start, len(lengths))]


class BlockScheduler(ContinuousScheduler):
    """The scheduler of the exact and delayed caches: its batch is a RunningBatch (caches/exact.py)."""

    def __init__(self, model, *, delayed: bool = False, graphs: bool = False, logits_shift: int = 0,
                 sub_block: int | None = None, **common):
        """``delayed``: the delayed cache within the block (caches/delayed.py). ``graphs``: a round's step
        as a CUDA graph (cuda_graph.py). ``logits_shift`` 1 (Fast-dLLM v2): logits read one position back,
        each block opened by ``Row.first``. ``sub_block``: see BlockRules. ``common``: the base's arguments."""
        super().__init__(model, **common)
        self.delayed = delayed
        self.graphs = graphs and not delayed
        self.logits_shift, self.sub_block = logits_shift, sub_block

    def _admit(self, batch: RunningBatch | None, waiting: deque, block_length: int) -> RunningBatch:
        rows = [] if batch is None else batch.rows
        behind = batch.key_valid.shape[1] if batch is not None and rows else 0  # the cache's columns
        chosen = self._choose(rows, behind, waiting, block_length)
        if not chosen and batch is not None:
            return batch
        joined = self._prefill(self._new_rows(chosen, block_length), block_length)
        if batch is None or not batch.rows:
            return joined
        batch.join(joined)
        return batch

    def _prefill(self, rows: list[Row], block_length: int) -> RunningBatch:
        """The new rows' caches from their heads (left-padded), a few rows a forward (``PREFILL_TOKENS``).
        A head is one bidirectional block, or with ``aligned`` whole blocks of ``block_length``, block-causal."""
        heads = [row.head for row in rows]
        longest = max(1, *(len(head) for head in heads))  # an aligned row's head may be empty
        ids = torch.full((len(rows), longest), self.pad_token_id, dtype=torch.long)
        valid = torch.zeros((len(rows), longest), dtype=torch.bool)
        for r, head in enumerate(heads):
            if head:
                ids[r, longest - len(head):] = torch.tensor(head)
                valid[r, longest - len(head):] = True
        ids, valid = ids.to(self.device), valid.to(self.device)
        positions = (valid.long().cumsum(dim=1) - 1).clamp(min=0)  # padding does not shift them
        key_values: list[tuple[torch.Tensor, torch.Tensor]] = []
        for start, end in prefill_spans([max(1, len(head)) for head in heads], PREFILL_TOKENS):
            width = max(1, *(len(head) for head in heads[start:end]))  # the span's own left padding
            span_valid, span_positions = valid[start:end, -width:], positions[start:end, -width:]
            output = self.model(input_ids=ids[start:end, -width:], position_ids=span_positions,
                                attention_mask=self._prompt_mask(span_valid, span_positions, block_length),
                                use_cache=True, logits_to_keep=1)
            if self.logits_shift:  # a prompt of whole blocks: its last position predicts the first token
                self._predict_first(rows[start:end], output.logits[:, -1], first_generated=True)
            if not key_values:  # with room for every block the rows still have to denoise
                capacity = longest + max(row.ahead(block_length) for row in rows)
                key_values = [(k.new_zeros((len(rows), k.shape[1], capacity, k.shape[3])),
                               v.new_zeros((len(rows), v.shape[1], capacity, v.shape[3])))
                              for k, v in output.key_values]
            for (keys, values), (k, v) in zip(key_values, output.key_values, strict=False):
                keys[start:end, :, longest - width : longest] = k
                values[start:end, :, longest - width : longest] = v
        return RunningBatch(rows=rows, key_values=key_values, key_valid=valid, next_position=valid.sum(dim=1))

    def _prompt_mask(self, valid: torch.Tensor, positions: torch.Tensor, block_length: int) -> torch.Tensor:
        """A prefill's mask over left-padded prompts (B, L): key padding only (the model keeps it
        (B, 1, 1, L)); with ``aligned``, block-causal by position (B, 1, L, L)."""
        # Aligned: padding queries see every column, so that no softmax runs over nothing.
        if not self.aligned:
            return valid
        blocks = positions // block_length
        return ((blocks[:, None, :] <= blocks[:, :, None]) & valid[:, None, :] | ~valid[:, :, None])[:, None]

    def _denoise_round(self, batch: RunningBatch, block_length: int) -> None:
        """Denoise one block for every row, then cache it (one more pass over the clean block)."""
        block, fixed = self._canvas(batch.rows, block_length)  # (B, K) each
        exact = ExactRound(self.model, batch, block_length, logits_shift=self.logits_shift)
        context = self._block_context(batch.rows, block_length, fixed, self.sub_block)
        if self.graphs and context.rules.greedy:
            steps = GreedyBlockSteps(block, context, logits_shift=self.logits_shift)
            step = CapturedCall(lambda: steps(exact.run), self.device)
            passes = steps.run(step)
            # No kept mask is left: the step changes no token a row keeps and leaves the block's keys
            # and values cached (a row's positions past its max_tokens or an EOS may stay [MASK]; it ends here).
            step()
            last = None if steps.last_logits is None else steps.last_logits[:, None]
        else:
            forward, commit = self._step_forward(exact, block)
            noise = RowNoise.from_generators([row.generator for row in batch.rows], self.device)
            passes = denoise_block(forward, block, 0, block_length, context, noise)
            last = commit(block)  # (B, 1, V), or None from a captured commit pass
        exact.advance(batch)
        self._commit(batch.rows, block, passes)
        if self.logits_shift and last is not None:  # the clean block's last position predicts the next first token
            self._predict_first(batch.rows, last[:, -1])

    def _step_forward(self, exact: ExactRound,
                      block: torch.Tensor) -> tuple[StepForward, Callable[[torch.Tensor], torch.Tensor | None]]:
        """The eager loop's step forward for this round, and its commit pass over the clean block."""
        if self.delayed:
            return DelayedBlockForward(self.model, exact.key_values, exact.key_valid, exact.positions,
                                       self.mask_token_id), exact.commit
        if self.graphs and not self.logits_shift:  # rows that sample: the forward alone is captured
            graph = BlockForwardGraph(exact.run, block)
            return graph, graph.commit
        return exact, exact.commit

    def _predict_first(self, rows: list[Row], logits: torch.Tensor, *, first_generated: bool = False) -> None:
        """Each row's next block's first token (``Row.first``): the greedy prediction ``logits`` (B, V)
        of the position before it, as the published sampler takes it; never [MASK], and the first
        generated token obeys token healing. Rows whose lead still opens the next block take none."""
        logits = logits.clone()
        logits[:, self.mask_token_id] = float("-inf")
        allowed = self._first_token(rows)[0] if first_generated else None
        if allowed is not None:
            logits.masked_fill_(~allowed, float("-inf"))
        for row, token in zip(rows, logits.argmax(dim=-1).tolist(), strict=False):
            row.first = None if len(row.lead) > len(row.generated) else token
