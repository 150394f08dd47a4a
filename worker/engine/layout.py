"""Token canvas, position ids and block-causal attention mask of a padded batch.

Layout of one batch (P = longest prompt with its committed blocks, G = longest generation still to
denoise, a multiple of block_length):

    columns  [0, P)            each row's prompt, then the blocks it has committed (continuous
                               batching lays rows out again each round), left-padded to end at P
    columns  [P, P + G)        [MASK] tokens, generation block j = columns P + j*bl .. P + (j+1)*bl;
                               a row with a shorter generation is right-padded past its own end

Block index of a column, per row: 0 for its prompt (one bidirectional prefix block, as a prefix LM),
then one index per block after it, committed or not. With ``aligned`` (SDAR) the blocks are cut
from position 0, the prompt's included: a column's block is its position // block_length (the
prompts given are then the rows' whole prompt blocks, ``lead_length``). A query may attend to a
key iff the key is not padding and the key's block index <= the query's. Left padding puts every
row's active block (and those after it) at the same columns, so one mask slice and one forward over
x[:, :end] serve the whole batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def whole_blocks(tokens: int, block_length: int) -> int:
    """``tokens`` rounded up to whole blocks: the positions a generation of that length denoises."""
    return -(-tokens // block_length) * block_length


def lead_length(prompt_length: int, block_length: int, *, aligned: bool) -> int:
    """How many of a prompt's last tokens (its lead) open its first generation block as fixed text: with
    ``aligned`` the last partial block, else 0 (the prompt is one block of its own)."""
    # A model whose blocks are aligned from position 0 (SDAR) was trained with the prompt cut into
    # blocks like the rest, so its whole blocks are the prefix (SDAR's ``generate.py``).
    return prompt_length % block_length if aligned else 0


@dataclass
class BatchLayout:
    x: torch.Tensor  # (B, P + G) long: prompts and [MASK]s, denoised in place
    position_ids: torch.Tensor  # (B, P + G) long
    attention_mask: torch.Tensor  # (B, 1, P + G, P + G) bool, True = may attend (full attention: a view)
    prompt_length: int  # P: the active generation starts here (after prompts and committed blocks)
    gen_length: int  # G, the longest row's
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
    gen_length: int | list[int],
    block_length: int,
    pad_token_id: int,
    mask_token_id: int,
    device: torch.device | str,
    full_attention: bool = False,
    committed: list[list[int]] | None = None,
    aligned: bool = False,
) -> BatchLayout:
    """``gen_length``: one for every row, or each row's own; ``committed``: each row's whole generated
    blocks, placed after its prompt (P counts them). ``full_attention`` (LLaDA, Dream): the mask hides
    padding only. ``aligned``: blocks cut from position 0 (module docstring), prompts whole blocks."""
    # Under full attention every token sees the whole canvas, masked future included, as those models
    # were trained, so a row's canvas must be its own length: the masked columns it sees change its tokens.
    batch = len(prompts)
    gen_lengths = [gen_length] * batch if isinstance(gen_length, int) else list(gen_length)
    committed = committed or [[] for _ in prompts]
    if len(gen_lengths) != batch or len(committed) != batch:
        raise ValueError(f"{len(gen_lengths)} generation lengths and {len(committed)} histories "
                         f"for {batch} prompts")
    for length in [*gen_lengths, *(len(c) for c in committed), *(len(p) for p in prompts if aligned)]:
        if length % block_length != 0:
            raise ValueError(f"a span of {length} tokens (generation, history or aligned prompt) is not "
                             f"a multiple of block_length {block_length}")
    prompt_length = max(len(p) + len(c) for p, c in zip(prompts, committed, strict=False))
    gen_length = max(gen_lengths)
    total = prompt_length + gen_length

    x = torch.full((batch, total), mask_token_id, dtype=torch.long)
    is_real = torch.ones((batch, total), dtype=torch.bool)
    prompt_end = torch.empty((batch, 1), dtype=torch.long)  # the column after each row's prompt
    for row, (prompt, done, length) in enumerate(zip(prompts, committed, gen_lengths, strict=False)):
        pad = prompt_length - len(prompt) - len(done)
        x[row, :pad] = pad_token_id
        x[row, pad:prompt_length] = torch.tensor(prompt + done, dtype=torch.long)
        x[row, prompt_length + length :] = pad_token_id
        is_real[row, :pad] = False
        is_real[row, prompt_length + length :] = False
        prompt_end[row] = pad + len(prompt)

    # Positions count real tokens only, so a row's positions do not depend on its padding.
    position_ids = (is_real.long().cumsum(dim=1) - 1).clamp(min=0)  # (B, L)
    if full_attention:  # every query sees the same keys: a view of the (B, L) padding mask, no L x L copy
        attention_mask = is_real.to(device)[:, None, None, :].expand(batch, 1, total, total)
    else:
        columns = torch.arange(total)[None, :]
        block_index = (position_ids // block_length if aligned else
                       torch.where(columns < prompt_end, 0, 1 + (columns - prompt_end) // block_length))  # (B, L)
        causal_blocks = block_index[:, None, :] <= block_index[:, :, None]  # (B, Lq, Lk)
        attention_mask = (causal_blocks & is_real[:, None, :])[:, None].to(device)  # (B, 1, Lq, Lk)

    return BatchLayout(
        x=x.to(device),
        position_ids=position_ids.to(device),
        attention_mask=attention_mask,
        prompt_length=prompt_length,
        gen_length=gen_length,
        block_length=block_length,
        full_attention=full_attention,
    )
