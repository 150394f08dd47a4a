"""How many positions a step commits, and which: LLaDA's linear and Dream's maskgit_plus schedules,
and Fast-dLLM's rules.

``threshold`` commits every masked position with confidence >= tau, ``factor`` the n most confident
where (n + 1)(1 - c_(n)) < f (Wu et al. 2025, "Fast-dLLM", arXiv:2505.22618, §3.3); both at least one.
"""

from __future__ import annotations

import torch


def num_transfer_schedule(block_length: int, steps: list[int], kinds: list[str] | None = None) -> list[list[int]]:
    """Tokens to commit at each step, per row: (B, max(steps)), zero past a row's own steps. ``kinds``:
    each row's schedule (None: all "linear"): "linear" splits the block evenly, the remainder to the
    first steps (LLaDA's linear noise schedule); "maskgit_plus" is Dream's (``maskgit_plus_schedule``)."""
    num_steps = max(steps)
    schedule = []
    for row_steps, kind in zip(steps, kinds or ["linear"] * len(steps), strict=True):
        if kind == "maskgit_plus":
            row = maskgit_plus_schedule(block_length, row_steps)
        else:
            base, remainder = divmod(block_length, row_steps)
            row = [base + (s < remainder) for s in range(row_steps)]
        schedule.append(row + [0] * (num_steps - row_steps))
    return schedule


def maskgit_plus_schedule(masked: int, steps: int, eps: float = 1e-3) -> list[int]:
    """Dream's default count (its ``diffusion_generate``, alg maskgit_plus): with t = linspace(1, eps,
    steps + 1), step i commits int(m_i * (1 - t_(i+1) / t_i)) of the m_i masks left, the last all of
    them; in float32, as there (16 masks in 16 steps: 0, then 1 x 14, then 2)."""
    times = torch.linspace(1, eps, steps + 1, dtype=torch.float32)
    row, left = [], masked
    for i in range(steps):
        count = int(torch.tensor(float(left)) * (1 - times[i + 1] / times[i])) if i < steps - 1 else left
        row.append(count)
        left -= count
    return row


def select_transfer(confidence: torch.Tensor, mask_index: torch.Tensor, num_transfer: torch.Tensor) -> torch.Tensor:
    """(B, K) bool: the num_transfer[b] (B,) most confident masked positions of each row, from
    ``confidence`` and ``mask_index`` (B, K)."""
    confidence = confidence.masked_fill(~mask_index, float("-inf"))
    # Ranking by a sort keeps it one batched op whatever each row's k is.
    order = confidence.argsort(dim=-1, descending=True, stable=True)  # (B, K)
    positions = torch.arange(confidence.shape[1], device=confidence.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(-1, order, positions)  # rank[b, i] of position i
    return (rank < num_transfer[:, None]) & mask_index


def parallel_transfer_count(
    confidence: torch.Tensor, mask_index: torch.Tensor, by_threshold: torch.Tensor,
    threshold: torch.Tensor, factor: torch.Tensor,
) -> torch.Tensor:
    """(B,) long: positions to commit under Fast-dLLM's rules, at least 1 where masks remain.
    confidence, mask_index (B, K); by_threshold (B,) bool (else the factor rule); threshold, factor (B,)."""
    ranked = confidence.masked_fill(~mask_index, float("-inf")).sort(dim=-1, descending=True).values
    n = torch.arange(1, ranked.shape[1] + 1, device=ranked.device, dtype=ranked.dtype)  # (K,)
    # Both rules keep a prefix of the confidences sorted high to low ((n + 1)(1 - c_(n)) grows with
    # n), so counting the positions that pass is enough.
    passing_threshold = (ranked >= threshold[:, None]).sum(dim=-1)
    passing_factor = ((n + 1) * (1 - ranked) < factor[:, None]).sum(dim=-1)
    count = torch.where(by_threshold, passing_threshold, passing_factor)
    return torch.where(mask_index.any(dim=-1), count.clamp(min=1), torch.zeros_like(count))


def in_first_open_sub_block(mask_index: torch.Tensor, sub_block: int) -> torch.Tensor:
    """(B, K) bool: the positions of each row's first sub-block that still holds a mask."""
    sub = torch.arange(mask_index.shape[1], device=mask_index.device) // sub_block  # (K,)
    first_open = sub[mask_index.int().argmax(dim=-1)]  # (B,): the first masked position's sub-block
    return sub[None, :] == first_open[:, None]
