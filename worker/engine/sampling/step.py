"""One denoising step's decision: predict x0, then commit what each row's sampler chooses."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .kept import Kept
from .predict import predict_x0, repetition_penalty, token_counts
from .rules import BlockRules
from .transfer import in_first_open_sub_block, parallel_transfer_count, select_transfer


@dataclass
class BlockContext:
    """What every step of one block shares (B rows, K positions, V tokens): the rows' ``rules`` and
    the constraints on their tokens. ``allowed`` (C, V) bool is a table of token sets and ``allowed_at``
    (B, K) long each block position's row in it (-1: free); ``history`` (B, V) counts earlier blocks'
    tokens; ``fixed`` (B, K) marks given text; ``top_k``: the model's sampling top-k (predict_x0), the
    same for every row, or None."""

    rules: BlockRules
    mask_token_id: int
    allowed: torch.Tensor | None = None  # token healing's first token, structured output's holes; None: all free
    allowed_at: torch.Tensor | None = None
    history: torch.Tensor | None = None  # for frequency and presence penalties; None: nothing generated yet
    fixed: torch.Tensor | None = None  # prompt or template text, which the penalties do not count
    kept: Kept | None = None  # the positions each row keeps; None: all
    top_k: int | None = None  # a family whose own generation samples from the top-k logits (Dream)


def commit_step(context: BlockContext, block: torch.Tensor, logits_n: torch.Tensor, slots: torch.Tensor,
                mask_index: torch.Tensor, num_transfer: torch.Tensor, *, denominator: torch.Tensor | None = None,
                editable: torch.Tensor | None = None) -> torch.Tensor | None:
    """Write the step into ``block`` (B, K): x0 at ``slots`` (B, n) from ``logits_n`` (B, n, V), the
    schedule's ``num_transfer`` (B,) or the confidences choosing; ``editable`` (B, K; slots then all)
    the positions an editing row may change. Returns which rows edited a token (B,) bool, or None."""
    rules, mask_token_id = context.rules, context.mask_token_id
    penalty = None
    if rules.penalised:  # what this block generated so far counts too
        generated = block != mask_token_id if context.fixed is None else (block != mask_token_id) & ~context.fixed
        counts = token_counts(block, generated, logits_n.shape[-1])
        counts = counts if context.history is None else counts + context.history
        penalty = repetition_penalty(counts, rules.frequency_t, rules.presence_t)
    allowed_index = None
    if context.allowed is not None:
        if context.allowed_at is None:
            raise ValueError("allowed needs allowed_at")
        allowed_index = context.allowed_at.gather(1, slots)  # (B, n)
    x0_n, confidence_n = predict_x0(logits_n, rules.temperature_t, rules.top_p_t, denominator, mask_token_id,
                                    context.allowed, penalty, allowed_index=allowed_index, top_k=context.top_k)
    x0 = block.scatter(1, slots, x0_n)  # (B, K); committed positions keep their tokens
    confidence = confidence_n.new_zeros(block.shape).scatter_(1, slots, confidence_n)  # (B, K)
    edit = None
    if editable is not None:
        # LLaDA2.1's Token-to-Token step: a committed token the model now predicts otherwise, at the
        # row's editing threshold, is replaced in the step that commits masks; judged on the step's start.
        edit = editable & ~mask_index & (confidence >= rules.editing_t[:, None]) & (x0 != block)  # (B, K)
    if rules.sub_block:
        mask_index = mask_index & in_first_open_sub_block(mask_index, rules.sub_block)
    if rules.any_parallel:
        parallel = parallel_transfer_count(confidence, mask_index, rules.by_threshold, rules.threshold_t,
                                           rules.factor_t)
        # At least the schedule's count: one a step unless a threshold row names fewer steps (then it
        # is LLaDA2's and SDAR's dynamic rule, which finishes a block in at most those steps).
        num_transfer = torch.where(rules.is_reference, num_transfer, torch.maximum(parallel, num_transfer))
    transfer = select_transfer(confidence, mask_index, num_transfer)
    if edit is None:
        block.copy_(torch.where(transfer, x0, block))
        return None
    block.copy_(torch.where(transfer | edit, x0, block))
    return edit.any(dim=-1)
