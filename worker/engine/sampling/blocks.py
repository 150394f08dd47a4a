"""The eager block loop: denoise one block of every row, a forward and a decision a step."""

from __future__ import annotations

import torch

from ..caches.base import StepForward
from .editing import BlockEditing
from .noise import RowNoise
from .step import BlockContext, commit_step

# A step runs the forward over the working rows alone once at most this share of the batch works: a
# subset forward first gathers those rows' cache (caches/exact.py), which costs more than it saves
# while most rows still work.
SUBSET_SHARE = 0.75


def denoise_block(forward: StepForward, x: torch.Tensor, start: int, end: int, context: BlockContext,
                  noise: RowNoise) -> list[int]:
    """Denoise x[:, start:end] (B, K) in place until no row has a mask left that it keeps (``context.kept``);
    ``forward(x[:, :end], slots)`` gives the block's logits at ``slots``. Returns, per row, the forward
    passes in which it still had such masks. A reference row takes exactly its steps; a parallel one fewer."""
    rules, mask_token_id = context.rules, context.mask_token_id
    block_length = end - start
    passes = [0] * x.shape[0]
    subset: tuple[list[int], torch.Tensor, StepForward] | None = None  # rows, as an index, their forward
    editing = BlockEditing(rules, x[:, start:end] == mask_token_id) if rules.any_editing else None
    for step in range(block_length + max(rules.max_post_steps) + 1):
        block = x[:, start:end]  # (B, K)
        mask_index = block == mask_token_id  # (B, K)
        left = mask_index if context.kept is None else context.kept.masks_left(block, mask_index)
        working_t = left.any(dim=-1) if editing is None else editing.start(mask_index, left.any(dim=-1))  # (B,)
        # The step's one host sync: who works, how wide.
        masked_counts, working = torch.stack([mask_index.sum(dim=-1), working_t.long()]).tolist()
        if not any(working):
            break
        passes = [n + w for n, w in zip(passes, working, strict=False)]
        # Only masked positions are sampled: gathered to the front, the float64 work of a step runs
        # over max(masked) positions instead of the whole block (x0 and confidence are per position,
        # so this changes no token), and the forward projects logits for those positions alone. A
        # row that edits is scored at every position.
        edit_now = editing is not None and any(w and e for w, e in zip(working, rules.edits, strict=False))
        width = block_length if edit_now else max(masked_counts)
        slots = (~mask_index).to(torch.int8).argsort(dim=-1, stable=True)[:, :width]  # (B, n)
        subset = _working_rows(forward, working, subset, x.device)
        if subset is None:
            logits_n = forward(x[:, :end], slots)  # (B, n, V)
        else:  # rows left out have finished their block: zero logits, as they have no kept mask to fill
            _, rows, forward_rows = subset
            some = forward_rows(x[rows, :end], slots[rows])  # (W, n, V)
            logits_n = some.new_zeros((x.shape[0], *some.shape[1:]))
            logits_n[rows] = some
        noisy_rows = [r for r, w in enumerate(working) if w and rules.temperature[r] > 0]
        denominator = noise.gumbel_denominator(noisy_rows, rules.temperature, masked_counts, logits_n.shape)
        # Past its last mask an editing row's passes commit nothing new.
        num_transfer = rules.schedule_t[:, step] if step < block_length else torch.zeros_like(rules.schedule_t[:, 0])
        editable = editing.editable_now(working_t) if editing is not None and edit_now else None
        edited = commit_step(context, block, logits_n, slots, mask_index, num_transfer, denominator=denominator,
                             editable=editable)
        if editing is not None:
            editing.stepped(edited)
    return passes


def _working_rows(forward: StepForward, working: list[int],
                  subset: tuple[list[int], torch.Tensor, StepForward] | None,
                  device: torch.device) -> tuple[list[int], torch.Tensor, StepForward] | None:
    """Rows to run the step's forward over and their forward, when ``forward`` offers one (``for_rows``)
    and few enough rows work (SUBSET_SHARE); None: the whole batch. ``subset``, the last step's, is
    kept while it holds every working row and they are more than SUBSET_SHARE of it: gathering the
    cache again each time one more row finishes (reference rows finish at their EOS, one by one) would
    cost more than the finished rows it leaves out."""
    rows = [r for r, w in enumerate(working) if w]
    for_rows = getattr(forward, "for_rows", None)
    if for_rows is None or len(rows) == len(working) or len(rows) > SUBSET_SHARE * len(working):
        return None
    if subset is not None and set(rows) <= set(subset[0]) and len(rows) > SUBSET_SHARE * len(subset[0]):
        return subset
    index = torch.tensor(rows, device=device)
    return rows, index, for_rows(index)
