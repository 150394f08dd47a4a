"""The exact KV cache of block-causal models: the running batch's whole state between rounds.

A block-causal model's finished blocks never change and never attend forward, so a row's history is
its keys and values (computed once per finished block) plus the position of its next block. Rows are
left-padded to the longest history; a round writes its block into the next columns in place.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ..schedulers.base import Row


@dataclass
class RunningBatch:
    """The running rows and their cache: buffers with room past the columns in use (``key_valid``'s),
    so that a round writes its block in place instead of copying the cache a block wider."""

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


def _left_pad(tensor: torch.Tensor, length: int, *, dim: int) -> torch.Tensor:
    missing = length - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


class ExactRound:
    """One round over a running batch's exact cache: the block's position ids (B, K), key mask
    (B, C + K) and cache views with room for it, and ``run``, the forward that writes the block's keys
    and values into those columns (every step overwrites them; the last pass leaves the clean block's)."""

    def __init__(self, model, batch: RunningBatch, block_length: int, *, logits_shift: int = 0):
        device, size = batch.key_valid.device, len(batch.rows)
        self.model, self.block_length, self.logits_shift = model, block_length, logits_shift
        self.positions = batch.next_position[:, None] + torch.arange(block_length, device=device)  # (B, K)
        self.key_valid = batch.key_valid  # (B, C): the cache before this round
        self.keys = torch.cat([batch.key_valid, torch.ones((size, block_length), dtype=torch.bool, device=device)],
                              dim=1)  # (B, C + K)
        self.cached = batch.key_valid.shape[1]
        # The cache grows by the block once per round, with room for the rows' later blocks.
        self.key_values = batch.widened(block_length, reserve=max(row.ahead(block_length) for row in batch.rows)
                                        - block_length)

    def run(self, block: torch.Tensor, **logits) -> torch.Tensor:
        """The block's (B, K) forward; ``logits``: the model's logits_to_keep or logits_at."""
        # Key padding only, as every query of the block sees the same keys: the model keeps the mask
        # (B, 1, 1, C + K), not a row per query.
        return self.model(input_ids=block, past_key_values=self.key_values, write_offset=self.cached,
                          attention_mask=self.keys, position_ids=self.positions, **logits).logits

    def __call__(self, block: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """A ``StepForward``: logits (B, n, V) at the still-masked ``slots`` (B, n) only."""
        # The vocabulary projection is ~a fifth of the built-in model's FLOPs a position, and half the
        # block is filled on average. A shifted model's logits are those of the positions before them;
        # a block's first position is never masked, so a slot 0 is a row's filler, read anywhere.
        return self.run(block, logits_at=(slots - self.logits_shift).clamp(min=0))

    def for_rows(self, index: torch.Tensor) -> ExactRound:
        """This round's step forward over the rows ``index`` (W,) alone, for steps where the others have
        finished their block: on a CPU a forward costs about its rows, so a batch of parallel rows would
        otherwise pay for its slowest row's passes in every row. Their cache is gathered into a copy once;
        the block's keys and values a step writes there are dropped, which is safe because the round's
        commit pass writes every row's clean block into the cache itself."""
        rows = copy.copy(self)
        rows.key_values = [(k.index_select(0, index), v.index_select(0, index)) for k, v in self.key_values]
        rows.keys, rows.positions = self.keys.index_select(0, index), self.positions.index_select(0, index)
        rows.key_valid = self.key_valid.index_select(0, index)
        return rows

    def commit(self, clean: torch.Tensor) -> torch.Tensor:
        """The round's last pass over the clean block (B, K): its keys and values stay; logits (B, 1, V)."""
        return self.run(clean, logits_to_keep=1)

    def advance(self, batch: RunningBatch) -> None:
        """The batch after the round: the block is cached and every row's next position moves past it."""
        batch.key_valid = self.keys
        batch.next_position = batch.next_position + self.block_length

