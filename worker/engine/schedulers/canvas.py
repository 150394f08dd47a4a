"""Continuous batching without a cross-block cache: recomputation, and the approximate prefix and dual
caches of full-attention models (LLaDA, Dream).

Nothing is kept between rounds but the rows, so each round lays the running rows' canvases out again
(layout.py): every row's active block in the same columns. Under full attention a row sees its whole
canvas, masked future included, so its canvas is the one it would have alone: its tokens do not depend
on its batch-mates' lengths. A round's approximate cache is refreshed at its block's first step.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from ..caches.modes import make_forward
from ..layout import build_layout
from ..sampling.blocks import denoise_block
from ..sampling.noise import RowNoise
from .base import ContinuousScheduler, Row


@dataclass
class CanvasBatch:
    rows: list[Row]

    def keep(self, kept: list[bool]) -> None:
        self.rows = [row for row, k in zip(self.rows, kept, strict=False) if k]


class CanvasScheduler(ContinuousScheduler):
    """The scheduler of recomputation and the approximate caches: its batch is only the rows."""

    def __init__(self, model, *, cache_mode: str, full_attention: bool, logits_shift: int = 0, **common):
        """``cache_mode``: "none", or "prefix" / "dual" for full-attention models (caches/modes.py).
        ``common``: the base's arguments."""
        super().__init__(model, **common)
        self.cache_mode, self.full_attention, self.logits_shift = cache_mode, full_attention, logits_shift

    def _admit(self, batch: CanvasBatch | None, waiting: deque, block_length: int) -> CanvasBatch:
        rows = [] if batch is None else batch.rows
        behind = max((len(row.head) + len(row.generated) for row in rows), default=0)
        return CanvasBatch(rows + self._new_rows(self._choose(rows, behind, waiting, block_length), block_length))

    def _denoise_round(self, batch: CanvasBatch, block_length: int) -> None:
        rows = batch.rows
        layout = build_layout([row.head for row in rows],
                              gen_length=[row.ahead(block_length) for row in rows],
                              committed=[row.generated for row in rows], block_length=block_length,
                              pad_token_id=self.pad_token_id, mask_token_id=self.mask_token_id,
                              device=self.device, full_attention=self.full_attention, aligned=self.aligned)
        start, end = layout.block_span(0)
        fixed = None
        if any(row.lead or row.request.template_ids for row in rows):  # fixed text ahead, holes [MASK]
            canvas, fixed = self._canvas(rows, layout.gen_length)
            layout.x[:, start:] = canvas.where(layout.x[:, start:] == self.mask_token_id, layout.x[:, start:])
            fixed = None if fixed is None else fixed[:, : end - start]
        forward = make_forward(self.cache_mode, self.model, layout, logits_shift=self.logits_shift)
        context = self._block_context(rows, block_length, fixed)
        noise = RowNoise.from_generators([row.generator for row in rows], self.device)
        passes = denoise_block(forward, layout.x, start, end, context, noise)
        self._commit(rows, layout.x[:, start:end], passes)
