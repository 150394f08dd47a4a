"""The published samplers of the aligned block-causal families, re-stated as the tests' oracle.

SDAR's ``generate.py`` and LLaDA2's ``generate`` decode alike: blocks cut from position 0 (the
prompt's last partial block decoded with the first new tokens), the whole sequence recomputed at
every step under a block-causal mask, greedy. SDAR's static remasking commits the most confident
masked position a step; LLaDA2's every position above its threshold, at least the most confident.
As diffbatch's samplers, [MASK] itself is never a prediction.
"""

import torch


def block_causal(length: int, block: int) -> torch.Tensor:
    """(1, 1, L, L) bool: position i sees j when j's block is not after i's."""
    blocks = torch.arange(length) // block
    return (blocks[None, :] <= blocks[:, None])[None, None]


def aligned_block_decode(model, prompt: list[int], gen_length: int, *, block: int, mask_token_id: int,
                         threshold: float | None = None) -> list[int]:
    """The new tokens (whole blocks: at least ``gen_length``); ``threshold`` None = one a step."""
    total = -(-(len(prompt) + gen_length) // block) * block
    x = torch.full((1, total), mask_token_id)
    x[0, : len(prompt)] = torch.tensor(prompt)
    mask = block_causal(total, block)
    for start in range(len(prompt) // block * block, total, block):
        end = start + block
        while (x[0, start:end] == mask_token_id).any():
            logits = model(input_ids=x[:, :end], attention_mask=mask[..., :end, :end],
                           position_ids=torch.arange(end)[None]).logits[0, start:end].double()
            logits[:, mask_token_id] = float("-inf")
            confidence, x0 = logits.softmax(dim=-1).max(dim=-1)
            confidence[x[0, start:end] != mask_token_id] = float("-inf")
            chosen = torch.zeros_like(x0, dtype=torch.bool) if threshold is None else confidence > threshold
            if not chosen.any():
                chosen[confidence.argmax()] = True
            x[0, start:end] = torch.where(chosen, x0, x[0, start:end])
    return x[0, len(prompt):].tolist()
