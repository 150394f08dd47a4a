"""A round's per-row sampling settings as device tensors, made once per block (not per step)."""

from __future__ import annotations

import torch

from common.samplers import Sampler

from ..params import SamplingParams
from .transfer import num_transfer_schedule


class BlockRules:
    """The rows' samplers, schedules, penalties and editing settings for one block of ``block_length``
    (K); tensors are (B,) unless noted. ``sub_block``: decode the block in sub-blocks of this size,
    left to right (Fast-dLLM v2): a step chooses among the first one with a mask; None = the whole block."""

    def __init__(self, rows: list[SamplingParams], block_length: int, device: torch.device,
                 sub_block: int | None = None):
        def as_tensor(values: list, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=device)

        self.sub_block = sub_block if sub_block and sub_block < block_length else None
        self.temperature = [float(p.temperature) for p in rows]
        self.temperature_t = as_tensor(self.temperature, torch.float64)
        use_top_p = any(p.temperature > 0 and p.top_p < 1 for p in rows)
        self.top_p_t = as_tensor([float(p.top_p) for p in rows], torch.float64) if use_top_p else None
        self.is_reference = as_tensor([p.sampler == Sampler.REFERENCE for p in rows], torch.bool)
        self.any_parallel = any(p.sampler != Sampler.REFERENCE for p in rows)
        self.by_threshold = as_tensor([p.sampler == Sampler.THRESHOLD for p in rows], torch.bool)
        self.threshold_t = as_tensor([float(p.threshold) for p in rows], torch.float64)
        self.factor_t = as_tensor([float(p.factor) for p in rows], torch.float64)
        self.schedule = num_transfer_schedule(block_length, [p.steps_per_block for p in rows],
                                              [p.schedule_kind for p in rows])
        self.schedule_t = as_tensor([row + [0] * (block_length - len(row)) for row in self.schedule],
                                    torch.long)  # (B, K)
        # LLaDA2.1's token editing (threshold rows with an editing_threshold; +inf: the row never edits).
        self.edits = [p.edits for p in rows]
        self.any_editing = any(self.edits)
        self.editing_t = as_tensor([float(p.editing_threshold) if p.editing_threshold is not None else float("inf")
                                    for p in rows], torch.float64)
        self.max_post_steps = [p.post_steps_limit for p in rows]
        self.penalised = any(p.penalised for p in rows)
        self.frequency_t = as_tensor([float(p.frequency_penalty) for p in rows], torch.float64)
        self.presence_t = as_tensor([float(p.presence_penalty) for p in rows], torch.float64)

    @property
    def greedy(self) -> bool:
        return not any(t > 0 for t in self.temperature)
