"""Continuous batching for block-causal models over their exact KV cache (the loop: continuous.py).

A block-causal model's finished blocks never change and never attend forward, so a row's whole
history is its exact KV cache (computed once per finished block) plus the position of its next
block. The running batch is therefore only: per layer (keys, values) buffers (B, H, capacity, D)
with room for the rows' remaining blocks, a (B, C) mask of the real keys among the C columns in use
(rows are left-padded to the longest history), and each row's next position. Every round denoises
one block for all rows and writes the committed block into the next columns; joining rows have
their prompts prefilled (a few rows a forward) and their caches left-padded and joined.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch

from .continuous import ContinuousScheduler, Row
from .cuda_graph import BlockForwardGraph, CapturedCall
from .delayed_cache import DelayedBlockForward
from .samplers import GreedyBlockSteps, RowNoise, denoise_block


@dataclass
class RunningBatch:
    """The running rows and their cache. ``key_values`` are buffers with room past the columns in use
    (``key_valid``'s): a round writes its block into the next columns in place, so the cache is not
    copied a block wider every round (which held it twice at once)."""

    rows: list[Row]
    key_values: list[tuple[torch.Tensor, torch.Tensor]]  # per layer, (B, H, capacity, D) each
    key_valid: torch.Tensor  # (B, C) bool: real keys; False = left padding
    next_position: torch.Tensor  # (B,) long: position id of each row's next token

    def widened(self, columns: int, reserve: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (keys, values) views of the cache ``columns`` wider than in use. Only when the
        buffers lack the room are they copied, into buffers with ``reserve`` columns more."""
        used = self.key_valid.shape[1]
        if used + columns > self.key_values[0][0].shape[2]:
            self.key_values = [(_with_room(k, used, columns + reserve), _with_room(v, used, columns + reserve))
                               for k, v in self.key_values]
        return [(k[:, :, : used + columns], v[:, :, : used + columns]) for k, v in self.key_values]

    def keep(self, kept: list[bool]) -> None:
        """Drop the rows not kept, then the padding columns no remaining row needs."""
        if all(kept):
            return  # nothing to drop: no copy of the cache
        index = torch.tensor([i for i, k in enumerate(kept) if k], dtype=torch.long,
                             device=self.key_valid.device)
        self.rows = [row for row, k in zip(self.rows, kept, strict=False) if k]
        valid = self.key_valid.index_select(0, index)
        first = int(valid.any(dim=0).long().argmax()) if self.rows else 0  # first column in use
        self.key_valid = valid[:, first:]
        self.next_position = self.next_position.index_select(0, index)
        self.key_values = [(k[:, :, first:].index_select(0, index), v[:, :, first:].index_select(0, index))
                           for k, v in self.key_values]

    def join(self, other: RunningBatch) -> None:
        """Append ``other``'s rows; the shorter caches are left-padded with masked zeros."""
        length = max(self.key_valid.shape[1], other.key_valid.shape[1])
        room = max(part.key_values[0][0].shape[2] - part.key_valid.shape[1] for part in (self, other))
        self.key_values = [
            (_stacked(k, k2, self.key_valid.shape[1], other.key_valid.shape[1], length, room),
             _stacked(v, v2, self.key_valid.shape[1], other.key_valid.shape[1], length, room))
            for (k, v), (k2, v2) in zip(self.key_values, other.key_values, strict=False)
        ]
        self.rows += other.rows
        self.key_valid = torch.cat([_left_pad(self.key_valid, length, dim=1),
                                    _left_pad(other.key_valid, length, dim=1)])
        self.next_position = torch.cat([self.next_position, other.next_position])


def _with_room(buffer: torch.Tensor, used: int, room: int) -> torch.Tensor:
    """(B, H, ., D) -> (B, H, used + room, D): the ``used`` columns copied, the rest zero (masked
    keys must hold numbers: attention multiplies their values by a zero weight)."""
    batch, heads, _, dim = buffer.shape
    grown = buffer.new_zeros((batch, heads, used + room, dim))
    grown[:, :, :used] = buffer[:, :, :used]
    return grown


def _stacked(first: torch.Tensor, second: torch.Tensor, first_used: int, second_used: int, length: int,
             room: int) -> torch.Tensor:
    """Two caches' used columns stacked row-wise, each left-padded to end at ``length``, with
    ``room`` zero columns after."""
    stacked = first.new_zeros((first.shape[0] + second.shape[0], first.shape[1], length + room, first.shape[3]))
    stacked[: first.shape[0], :, length - first_used : length] = first[:, :, :first_used]
    stacked[first.shape[0]:, :, length - second_used : length] = second[:, :, :second_used]
    return stacked


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


def _left_pad(tensor: torch.Tensor, length: int, *, dim: int) -> torch.Tensor:
    missing = length - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


class BlockScheduler(ContinuousScheduler):
    def __init__(self, model, *, delayed: bool = False, graphs: bool = False, logits_shift: int = 0,
                 sub_block: int | None = None, **common):
        """``delayed``: inside the active block, stop recomputing committed positions
        (delayed_cache.py; approximate). Finished blocks are cached exactly either way.
        ``graphs`` (exact cache only): each round's step forward is one static-shape forward,
        captured as a CUDA graph on a CUDA device and replayed at every step (cuda_graph.py).
        ``logits_shift`` 1 (Fast-dLLM v2, exact cache only): a masked position reads the logits
        of the position before it, and each block opens with the greedy prediction of the last
        position before it (``Row.first``: from the prefill or the previous block's commit pass).
        ``sub_block``: decode each block in sub-blocks of this size, left to right (samplers.py).
        ``common``: ContinuousScheduler's arguments."""
        super().__init__(model, **common)
        self.delayed = delayed
        self.graphs = graphs and not delayed
        self.logits_shift, self.sub_block = logits_shift, sub_block

    def _admit(self, batch: RunningBatch | None, waiting: deque, block_length: int) -> RunningBatch:
        rows = [] if batch is None else batch.rows
        behind = batch.key_valid.shape[1] if rows else 0  # the cache's columns
        chosen = self._choose(rows, behind, waiting, block_length)
        if not chosen:
            return batch
        joined = self._prefill(self._new_rows(chosen, block_length), block_length)
        if batch is None or not batch.rows:
            return joined
        batch.join(joined)
        return batch

    def _prefill(self, rows: list[Row], block_length: int) -> RunningBatch:
        """The new rows' caches, from their prompts (left-padded), a few rows a forward
        (``PREFILL_TOKENS``) written into one cache. A prompt is one bidirectional block, or with
        ``aligned`` its whole blocks of ``block_length``, block-causal (its lead, the rest, opens
        the first block instead)."""
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
        key_values = None
        for start, end in prefill_spans([max(1, len(head)) for head in heads], PREFILL_TOKENS):
            width = max(1, *(len(head) for head in heads[start:end]))  # the span's own left padding
            span_valid, span_positions = valid[start:end, -width:], positions[start:end, -width:]
            output = self.model(input_ids=ids[start:end, -width:], position_ids=span_positions,
                                attention_mask=self._prompt_mask(span_valid, span_positions, block_length),
                                use_cache=True, logits_to_keep=1)
            if self.logits_shift:  # a prompt of whole blocks: its last position predicts the first token
                self._predict_first(rows[start:end], output.logits[:, -1], first_generated=True)
            if key_values is None:  # with room for every block the rows still have to denoise
                capacity = longest + max(row.ahead(block_length) for row in rows)
                key_values = [(k.new_zeros((len(rows), k.shape[1], capacity, k.shape[3])),
                               v.new_zeros((len(rows), v.shape[1], capacity, v.shape[3])))
                              for k, v in output.key_values]
            for (keys, values), (k, v) in zip(key_values, output.key_values, strict=False):
                keys[start:end, :, longest - width : longest] = k
                values[start:end, :, longest - width : longest] = v
        return RunningBatch(rows=rows, key_values=key_values, key_valid=valid, next_position=valid.sum(dim=1))

    def _prompt_mask(self, valid: torch.Tensor, positions: torch.Tensor, block_length: int) -> torch.Tensor:
        """The mask of a prefill over left-padded prompts (B, L): key padding only for a prompt that
        is one block (the model keeps it (B, 1, 1, L), not a row per query); block-causal by
        position when ``aligned``, where padding queries see every column, so that no softmax runs
        over nothing."""
        if not self.aligned:
            return valid
        blocks = positions // block_length
        return ((blocks[:, None, :] <= blocks[:, :, None]) & valid[:, None, :] | ~valid[:, :, None])[:, None]

    def _denoise_round(self, batch: RunningBatch, block_length: int) -> None:
        """Denoise one block for every row, then cache it (one more pass over the clean block)."""
        size = len(batch.rows)
        block, fixed = self._canvas(batch.rows, block_length)  # (B, K) each
        positions = batch.next_position[:, None] + torch.arange(block_length, device=self.device)  # (B, K)
        keys = torch.cat([batch.key_valid, torch.ones((size, block_length), dtype=torch.bool,
                                                      device=self.device)], dim=1)  # (B, C + K)

        # The cache grows by the block once per round; every step writes the block's keys and values
        # into the new columns in place, and the last pass leaves the committed block's there.
        cached = batch.key_valid.shape[1]
        key_values = batch.widened(block_length, reserve=max(row.ahead(block_length) for row in batch.rows)
                                   - block_length)  # the rows' later blocks

        def run(active_block: torch.Tensor, **logits) -> torch.Tensor:
            # Key padding only, as every query of the block sees the same keys: the model keeps the
            # mask (B, 1, 1, C + K), not a row per query.
            return self.model(input_ids=active_block, past_key_values=key_values, write_offset=cached,
                              attention_mask=keys, position_ids=positions, **logits).logits

        params = [row.request.params for row in batch.rows]
        first_allowed, first_slot = self._first_token(batch.rows)
        history, kept = self._history(batch.rows), self._kept(batch.rows, block_length)
        if self.graphs and all(p.temperature == 0 for p in params):
            steps = GreedyBlockSteps(block, params, mask_token_id=self.mask_token_id, first_allowed=first_allowed,
                                     first_slot=first_slot, history=history, fixed=fixed, kept=kept,
                                     sub_block=self.sub_block,
                                     logits_shift=self.logits_shift)
            step = CapturedCall(lambda: steps(run), self.device)
            passes = steps.run(step)
            # No kept mask is left: the step changes no token a row keeps and leaves the block's keys
            # and values cached (a row's positions past its max_tokens or an EOS may stay [MASK]; it
            # ends here).
            step()
            last = None if steps.last_logits is None else steps.last_logits[:, None]
        else:
            forward, commit = self._step_forward(run, block, key_values, batch.key_valid, positions)
            noise = RowNoise.from_generators([row.generator for row in batch.rows], self.device)
            passes = denoise_block(forward, block, 0, block_length, mask_token_id=self.mask_token_id,
                                   rows=params, noise=noise, first_allowed=first_allowed,
                                   first_slot=first_slot, history=history, fixed=fixed, kept=kept,
                                   sub_block=self.sub_block)
            last = commit(block)  # (B, 1, V), or None from a captured commit pass
        batch.key_valid = keys
        batch.next_position = batch.next_position + block_length
        self._commit(batch.rows, block, passes)
        if self.logits_shift:  # the clean block's last position predicts the next block's first token
            self._predict_first(batch.rows, last[:, -1])

    def _step_forward(self, run, block, key_values, key_valid, positions):
        """The eager loop's ``forward(block, slots)`` for this round, and its commit pass."""
        commit = lambda clean: run(clean, logits_to_keep=1)  # noqa: E731
        if self.delayed:
            return DelayedBlockForward(self.model, key_values, key_valid, positions, self.mask_token_id), commit
        if self.graphs and not self.logits_shift:  # rows that sample: the forward alone is captured
            graph = BlockForwardGraph(run, block)
            return graph, graph.commit
        # Logits at the still-masked positions only: the vocabulary projection is ~a fifth of the
        # built-in model's FLOPs a position, and half the block is filled on average. (A shifted
        # model's are those of the positions before them; a block's first position is never masked,
        # so a slot 0 is a row's filler, read anywhere.)
        shift = self.logits_shift
        return (lambda active_block, slots: run(active_block, logits_at=(slots - shift).clamp(min=0))), commit

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
