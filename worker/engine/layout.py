"""Token canvas, position ids and block-causal attention mask of a padded batch.

Layout of one batch (P = longest prompt, G = generation length, a multiple of block_length):

    columns  [0, P)            the prompts, left-padded so every prompt ends at column P
    columns  [P, P + G)        G [MASK] tokens, generation block j = columns P + j*bl .. P + (j+1)*bl

Block index of a column: 0 for the prompt (one bidirectional prefix block, as a prefix LM), and
1 + j for generation block j. A query may attend to a key iff the key is not padding and the key's
block index <= the query's. Left padding makes the block boundaries the same columns in every
row, so one mask slice and one forward over x[:, :end] serve the whole batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class BatchLayout:
    x: torch.Tensor  # (B, P + G) long: prompts and [MASK]s, denoised in place
    position_ids: torch.Tensor  # (B, P + G) long
    attention_mask: torch.Tensor  # (B, 1, P + G, P + G) bool, True = may attend
    prompt_length: int  # P
    gen_length: int  # G
    block_length: int
    full_attention: bool = False  # padding-only mask: every column sees every real column

    @property
    def num_blocks(self) -> int:
        return self.gen_length // self.block_length

    def block_span(self, block: int) -> tuple[int, int]:
        """Columns [start, end) of generation block ``block``."""
        start = self.prompt_length + block * self.block_length
        return start, start + self.block_length


def build_layout(
    prompts: list[list[int]],
    *,
    gen_length: int,
    block_length: int,
    pad_token_id: int,
    mask_token_id: int,
    device: torch.device | str,
    full_attention: bool = False,
) -> BatchLayout:
    """``full_attention`` (LLaDA, Dream): every token attends to every real token, the whole canvas,
    prompt and all blocks, as those models were trained; the mask then only hides padding."""
    if gen_length % block_length != 0:
        raise ValueError(f"gen_length {gen_length} is not a multiple of block_length {block_length}")
    batch = len(prompts)
    prompt_length = max(len(p) for p in prompts)
    total = prompt_length + gen_length

    x = torch.full((batch, total), mask_token_id, dtype=torch.long)
    is_real = torch.ones((batch, total), dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        pad = prompt_length - len(prompt)
        x[row, :pad] = pad_token_id
        x[row, pad:prompt_length] = torch.tensor(prompt, dtype=torch.long)
        is_real[row, :pad] = False

    # Positions count real tokens only, so a row's positions do not depend on its padding.
    position_ids = (is_real.long().cumsum(dim=1) - 1).clamp(min=0)  # (B, L)
    columns = torch.arange(total)
    block_index = torch.where(
        columns < prompt_length, 0, 1 + (columns - prompt_length) // block_length
    )  # (L,)
    causal_blocks = block_index[None, :] <= block_index[:, None]  # (Lq, Lk)
    if full_attention:
        causal_blocks = torch.ones_like(causal_blocks)
    attention_mask = causal_blocks[None, None] & is_real[:, None, None, :]  # (B, 1, Lq, Lk)

    return BatchLayout(
        x=x.to(device),
        position_ids=position_ids.to(device),
        attention_mask=attention_mask.to(device),
        prompt_length=prompt_length,
        gen_length=gen_length,
        block_length=block_length,
        full_attention=full_attention,
    )
