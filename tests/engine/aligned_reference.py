"""The published samplers of the aligned block-causal families, re-stated as the tests' oracle.

SDAR's ``generate.py`` and LLaDA2's ``generate`` decode alike: blocks cut from position 0 (the
prompt's last partial block decoded with the first new tokens), the whole sequence recomputed at
every step under a block-causal mask, greedy. SDAR's static remasking commits a fixed count of the
most confident masked positions a step; LLaDA2's (and SDAR's dynamic) every position above its
threshold, or that count if they are fewer.
As diffbatch's samplers, [MASK] itself is never a prediction.
"""

import torch


def assert_row_matches(result, request, expected: list[int], eos_token_ids) -> None:
    """The engine's row is the oracle's tokens up to where it stopped: its max_tokens, or an EOS
    (where the engine stops at the block's end and the oracle decodes on)."""
    assert result.token_ids == expected[: len(result.token_ids)]
    if result.finish_reason == "length":
        assert len(result.token_ids) == request.params.max_tokens
    else:
        assert expected[len(result.token_ids)] in eos_token_ids


def block_causal(length: int, block: int) -> torch.Tensor:
    """(1, 1, L, L) bool: position i sees j when j's block is not after i's."""
    blocks = torch.arange(length) // block
    return (blocks[None, :] <= blocks[:, None])[None, None]


def aligned_block_decode(model, prompt: list[int], gen_length: int, *, block: int, mask_token_id: int,
                         threshold: float | None = None, steps: int | None = None) -> list[int]:
    """The new tokens (whole blocks: at least ``gen_length``). Each step commits the schedule's
    count (``block / steps``, the remainder to the first steps; one a step by default) of the most
    confident masked positions, or with a ``threshold`` every position above it if they are more."""
    steps = steps or block
    schedule = [block // steps + (s < block % steps) for s in range(steps)]
    total = -(-(len(prompt) + gen_length) // block) * block
    x = torch.full((1, total), mask_token_id)
    x[0, : len(prompt)] = torch.tensor(prompt)
    mask = block_causal(total, block)
    for start in range(len(prompt) // block * block, total, block):
        end = start + block
        for step in range(steps):
            masked = x[0, start:end] == mask_token_id
            if not masked.any():
                break
            logits = model(input_ids=x[:, :end], attention_mask=mask[..., :end, :end],
                           position_ids=torch.arange(end)[None]).logits[0, start:end].double()
            logits[:, mask_token_id] = float("-inf")
            confidence, x0 = logits.softmax(dim=-1).max(dim=-1)
            confidence[~masked] = float("-inf")
            count = schedule[step] if threshold is None else max(schedule[step], int((confidence > threshold).sum()))
            chosen = confidence.topk(min(count, int(masked.sum()))).indices
            x[0, start + chosen] = x0[chosen]
    return x[0, len(prompt):].tolist()


def editing_block_decode(model, prompt: list[int], gen_length: int, *, block: int, mask_token_id: int,
                         threshold: float, editing_threshold: float,
                         max_post_steps: int) -> tuple[list[int], int, int]:
    """LLaDA2.1's ``generate`` re-stated (greedy): per aligned block, a loop of passes that commits
    every masked position above ``threshold`` (at least the most confident one) and, in the same
    write, replaces every generated token of the block (not the prompt's) whose prediction differs
    above ``editing_threshold``; the block ends after a pass that began with no mask and changed
    nothing, or once more than ``max_post_steps`` passes would have begun with no mask.
    Returns the new tokens (whole blocks), how many edits were made and the forward passes."""
    total = -(-(len(prompt) + gen_length) // block) * block
    x = torch.full((1, total), mask_token_id)
    x[0, : len(prompt)] = torch.tensor(prompt)
    mask, edits, passes = block_causal(total, block), 0, 0
    for start in range(len(prompt) // block * block, total, block):
        end = start + block
        generated = torch.arange(start, end) >= len(prompt)
        post_steps = 0
        while True:
            old = x[0, start:end].clone()
            masked = old == mask_token_id
            post_steps += not masked.any()
            if post_steps > max_post_steps:
                break
            logits = model(input_ids=x[:, :end], attention_mask=mask[..., :end, :end],
                           position_ids=torch.arange(end)[None]).logits[0, start:end].double()
            passes += 1
            logits[:, mask_token_id] = float("-inf")
            confidence, x0 = logits.softmax(dim=-1).max(dim=-1)
            unmask = masked & (confidence > threshold)
            if masked.any() and not unmask.any():
                unmask[torch.where(masked, confidence, float("-inf")).argmax()] = True
            edit = ~masked & generated & (confidence > editing_threshold) & (x0 != old)
            x[0, start:end] = torch.where(unmask | edit, x0, old)
            edits += int(edit.sum())
            if not masked.any() and not edit.any():
                break
    return x[0, len(prompt):].tolist(), edits, passes
