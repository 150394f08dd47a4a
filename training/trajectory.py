"""The order in which a model would unmask a known text: masks for fine-tuning on the states its
confidence-ordered sampler meets.

Why: fine-tuning masks tokens at random, so it spends most of its updates on states a decoder never
meets (a hard token revealed while the easy ones next to it are still masked). The threshold sampler
commits the positions it is surest of first, so what it sees at every step is a block whose easy
tokens are written and whose hard ones are masked. Measured on the built-in model
(docs/benchmarks.md, t7-t10): a quarter to half of the blocks masked this way, the rest at random,
lifted the parse share from 18.8% to 30-36%; every block this way did not (18.1%).

What (learned from d3LLM's pseudo-trajectory distillation, Qian et al. 2026, arXiv:2601.07568, whose
code we did not use): the starting model decodes each teacher text one token a step, forced to
write the teacher's token, committing in each block the masked position whose teacher token it
gives the highest probability. The step at which a position was unmasked is its place in the
order; a training state at noise level t then masks the last t share of each block's order.
"""

from __future__ import annotations

import torch

from .objective import block_ids, two_stream_mask


@torch.no_grad()
def decode_order(model, x0: torch.Tensor, *, prompt_length: int, block_length: int,
                 mask_token_id: int) -> torch.Tensor:
    """(B, L) long: for each position of x0 (B, L) after ``prompt_length``, the step (0 first) at which
    the model, writing x0 one token a step per block against the clean earlier blocks, unmasks it;
    -1 in the prompt. Every block decodes in parallel, as the training layout does (objective.py)."""
    batch, length = x0.shape
    blocks = block_ids(length, prompt_length, block_length)  # (L,)
    in_block = blocks[None, :] == torch.arange(int(blocks.max()) + 1)[:, None]  # (nb, L)
    attention = two_stream_mask(blocks)
    positions = torch.arange(length).repeat(2)[None, :].expand(batch, 2 * length)
    noisy = (blocks > 0)[None, :].expand(batch, length)
    xt = torch.where(noisy, mask_token_id, x0)
    order = torch.full_like(x0, -1)
    rows = torch.arange(batch)[:, None]
    was_training = model.training
    model.eval()
    for step in range(block_length):
        masked = (order < 0) & noisy
        if not masked.any():
            break
        hidden, _ = model.model(torch.cat([xt, x0], dim=1), attention_mask=attention, position_ids=positions)
        logits = model.lm_head(hidden[:, :length][masked]).float()  # (M, V): only where still masked
        p_target = torch.softmax(logits, dim=-1).gather(1, x0[masked][:, None])[:, 0]
        score = torch.full(x0.shape, -1.0).masked_scatter(masked, p_target)  # (B, L); -1: not a choice
        per_block = score[:, None, :].masked_fill(~in_block[None], -2.0)  # (B, nb, L)
        best, chosen = per_block.max(dim=-1)  # (B, nb)
        open_block = best >= 0  # the block still has a mask
        row_index, column = rows.expand_as(chosen)[open_block], chosen[open_block]
        order[row_index, column] = step
        xt[row_index, column] = x0[row_index, column]
    model.train(was_training)
    return order
