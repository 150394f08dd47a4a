"""Masks along a decoder's order (training/trajectory.py, objective.draw_masks): the states a
confidence-ordered sampler meets, and the order the starting model would unmask a teacher's text in."""

from __future__ import annotations

import pytest
import torch

from training.loop import TrainConfig, train
from training.objective import block_ids, draw_masks, two_stream_mask
from training.trajectory import decode_order
from worker.engine.builtin import DiffbatchMDMForMaskedDiffusion

TINY = dict(vocab_size=320, hidden_size=48, num_hidden_layers=2, num_attention_heads=2, intermediate_size=96,
            block_length=8, seq_length=64, batch_size=8, warmup_steps=2, eval_every=10**6, eval_windows=4)


def test_without_an_order_share_the_masks_are_drawn_as_before():
    """A run that does not ask for trajectory masks draws the same masks and noise as it always did."""
    blocks = block_ids(40, prompt_length=8, block_length=8)
    order = torch.randint(0, 8, (4, 40))
    plain = draw_masks(4, blocks, torch.Generator().manual_seed(5))
    unused = draw_masks(4, blocks, torch.Generator().manual_seed(5), order=order, order_share=0.0)
    assert torch.equal(plain[0], unused[0]) and torch.equal(plain[1], unused[1])
    assert not plain[0][:, :8].any()  # the prompt is never masked


def test_an_order_share_of_one_masks_the_last_positions_of_each_blocks_order():
    """Every block masks exactly the round(t n) positions (at least one) a decoder would unmask last,
    so what is left visible is what that decoder had already written."""
    prompt, block, batch = 5, 8, 16
    blocks = block_ids(prompt + 3 * block + 3, prompt_length=prompt, block_length=block)  # a short last block
    order = torch.full((batch, blocks.shape[0]), -1)
    for b in range(1, int(blocks.max()) + 1):
        columns = (blocks == b).nonzero()[:, 0]
        for row in range(batch):
            order[row, columns] = torch.randperm(len(columns))
    masked, t_per_token = draw_masks(batch, blocks, torch.Generator().manual_seed(0), order=order, order_share=1.0)
    assert not masked[:, :prompt].any()
    for b in range(1, int(blocks.max()) + 1):
        columns = (blocks == b).nonzero()[:, 0]
        for row in range(batch):
            hidden, seen = order[row, columns][masked[row, columns]], order[row, columns][~masked[row, columns]]
            t = float(t_per_token[row, columns[0]])
            assert len(hidden) == min(len(columns), max(1, round(t * len(columns))))
            assert seen.numel() == 0 or hidden.min() > seen.max()


def test_a_share_of_one_half_orders_about_half_the_blocks():
    blocks = block_ids(8 + 64, prompt_length=8, block_length=8)
    order = torch.arange(72).remainder(8).expand(400, 72)  # every block decoded left to right
    masked, _ = draw_masks(400, blocks, torch.Generator().manual_seed(1), order=order, order_share=0.5)
    per_block = masked[:, 8:].reshape(400, 8, 8)
    # A block masked along this order is a run of masks at its end: no visible token after a mask.
    suffix = (per_block.int().cummax(dim=-1).values == per_block.int()).all(dim=-1) & per_block.any(dim=-1)
    assert 0.45 < suffix.float().mean() < 0.75  # the ordered half, plus random ones that happen to be suffixes


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    for i in range(20):
        (root / f"m{i}.py").write_text(f"def f_{i}(x):\n    y = x + {i}\n    return y * {i}\n\n" * 4)
    out = tmp_path_factory.mktemp("run")
    torch.set_num_threads(1)
    train(TrainConfig(out_dir=out, steps=30, corpus_root=root, learning_rate=3e-3, **TINY))
    return DiffbatchMDMForMaskedDiffusion.from_pretrained(out / "model", dtype=torch.float32)


def test_the_decode_order_unmasks_each_block_once_surest_first(tiny_model):
    """Each block's positions get the steps 0..n-1 once each, and step 0 goes to the position whose
    teacher token the model, seeing none of the block, gives the highest probability."""
    torch.manual_seed(0)
    prompt, block = 6, 8
    x0 = torch.randint(4, tiny_model.config.vocab_size, (3, prompt + 2 * block + 5))
    order = decode_order(tiny_model, x0, prompt_length=prompt, block_length=block, mask_token_id=3)
    blocks = block_ids(x0.shape[1], prompt, block)
    assert (order[:, :prompt] == -1).all()
    for b in (1, 2, 3):
        columns = (blocks == b).nonzero()[:, 0]
        for row in range(3):
            assert sorted(order[row, columns].tolist()) == list(range(len(columns)))
    # Step 0 against the model's own view of the fully masked blocks.
    xt = torch.where(blocks[None] > 0, 3, x0)
    positions = torch.arange(x0.shape[1]).repeat(2)[None].expand(3, -1)
    with torch.no_grad():
        hidden, _ = tiny_model.model(torch.cat([xt, x0], dim=1), attention_mask=two_stream_mask(blocks),
                                     position_ids=positions)
        p = torch.softmax(tiny_model.lm_head(hidden[:, : x0.shape[1]]).float(), -1).gather(-1, x0[..., None])[..., 0]
    for b in (1, 2, 3):
        columns = (blocks == b).nonzero()[:, 0]
        for row in range(3):
            first = columns[order[row, columns] == 0]
            assert p[row, first] == p[row, columns].max()
