"""x0 and its confidence at each position: Gumbel-max sampling, nucleus filter, repetition penalties.

As in LLaDA's ``generate.py`` (Nie et al. 2025, arXiv:2502.09992, github.com/ML-GSAI/LLaDA), but
batched with per-row temperature and top_p, and [MASK] never predicted.
"""

from __future__ import annotations

import torch


def top_p_filter(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """``logits`` (B, K, V) float64 with the tokens outside each row's nucleus of softmax(logits / T)
    set to -inf; temperature, top_p (B,). Rows with T == 0 or top_p == 1 pass through."""
    rows = (temperature > 0) & (top_p < 1)  # (B,)
    safe_t = torch.where(rows, temperature, torch.ones_like(temperature))[:, None, None]
    probs = torch.softmax(logits / safe_t, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    # Keep a token while the mass before it is below top_p; the most likely token always stays.
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    drop_sorted = mass_before >= top_p[:, None, None]
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)  # (B, K, V)
    drop &= rows[:, None, None]
    return logits.masked_fill(drop, float("-inf"))


def token_counts(ids: torch.Tensor, counted: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(B, V) float64: how often each token occurs in ``ids`` (B, T) where ``counted`` (B, T) holds."""
    counts = torch.zeros((ids.shape[0], vocab_size), dtype=torch.float64, device=ids.device)
    return counts.scatter_add_(1, ids, counted.to(torch.float64))


def repetition_penalty(counts: torch.Tensor, frequency: torch.Tensor, presence: torch.Tensor) -> torch.Tensor:
    """(B, V) to subtract from every position's logits: OpenAI's frequency penalty (per occurrence)
    plus presence penalty (once a token occurred), from the generated-token ``counts`` (B, V)."""
    return frequency[:, None] * counts + presence[:, None] * (counts > 0)


def predict_x0(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor | None,
    gumbel_denominator: torch.Tensor | None,
    mask_token_id: int,
    allowed: torch.Tensor | None = None,
    penalty: torch.Tensor | None = None,
    allowed_index: torch.Tensor | None = None,
    top_k: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x0 (B, K) and its confidence softmax(logits)[x0] (B, K) from ``logits`` (B, K, V); Gumbel-max
    where ``gumbel_denominator`` (B, K, V, ones for greedy rows; None: all greedy) says; top_p (B,) or None.
    ``allowed`` (C, V) bool is a table of token sets and ``allowed_index`` (B, K) each position's row in
    it (-1: free); penalty (B, V) is subtracted; top_k: only each position's top_k largest logits (ties
    at the k-th kept) count, for x0 and confidence."""
    logits64 = logits.to(torch.float64, copy=True)  # never write into the model's logits
    if penalty is not None:
        logits64 -= penalty[:, None, :]
    # Committing [MASK] would leave the position masked and break the schedule. A trained model gives
    # it ~zero probability anyway; an untrained one, whose tied embeddings echo the input, prefers it.
    logits64[..., mask_token_id] = float("-inf")
    if allowed is not None:  # token healing, structured output: the other tokens get no probability there
        if allowed_index is None:
            raise ValueError("allowed needs allowed_index")
        bound = allowed_index >= 0  # (B, K)
        permitted = allowed[allowed_index.clamp(min=0)]  # (B, K, V): gathered per step, stored per class
        logits64.masked_fill_(bound[..., None] & ~permitted, float("-inf"))
    if top_k is not None and top_k < logits64.shape[-1]:  # the model's own generation does (Dream's)
        kth = logits64.topk(top_k, dim=-1).values[..., -1:]  # (B, K, 1)
        logits64.masked_fill_(logits64 < kth, float("-inf"))
    if gumbel_denominator is None:
        x0 = logits64.argmax(dim=-1)  # (B, K)
    else:
        filtered = logits64 if top_p is None else top_p_filter(logits64, temperature, top_p)
        noisy = (temperature > 0)[:, None, None]
        # argmax of exp(logits) / (-log u) ** T samples softmax(logits / T), in float64 as in LLaDA (low
        # precision hurts quality, arXiv:2409.02908). Less each position's largest logit first: the same
        # argmax, and exp() cannot overflow (past ~709 every score would be inf and the lowest id win).
        shifted = filtered - filtered.amax(dim=-1, keepdim=True)
        scores = torch.where(noisy, shifted.exp() / gumbel_denominator, logits64)
        x0 = scores.argmax(dim=-1)  # (B, K)
    probs = torch.softmax(logits64, dim=-1)
    confidence = probs.gather(-1, x0[..., None]).squeeze(-1)  # (B, K)
    return x0, confidence
