"""The delayed in-block cache (cache="delayed"): what it computes, what it keeps, and that a row's
tokens still do not depend on its batch-mates."""

import pytest
import torch

from worker.engine.caches.delayed import REFRESH_EVERY, DelayedBlockForward
from worker.engine.engine import Engine
from worker.engine.params import GenerationRequest, SamplingParams

from .test_engine_generate import MIXED, requests_for


@torch.inference_mode()
def test_kept_positions_give_the_logits_of_a_full_block_pass_and_are_not_run_again(loaded):
    """Keys kept from a pass over the same block state are exactly what a full pass would use, so the
    masked positions' logits match; only those positions run the second time."""
    model, mask_id = loaded.model, loaded.mask_token_id
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(10, 200, (3, 12), generator=generator)
    valid = torch.ones((3, 12), dtype=torch.bool)
    valid[0, :4] = False  # a left-padded row
    prefill = model(input_ids=prompt, attention_mask=valid[:, None, None, :].expand(-1, 1, 12, -1),
                    position_ids=(valid.long().cumsum(1) - 1).clamp(min=0), use_cache=True)
    block = torch.full((3, 8), mask_id)
    committed = torch.tensor([[1, 0, 0, 0, 0, 0, 0, 1], [1, 1, 0, 1, 0, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1, 0]]).bool()
    block[committed] = torch.randint(10, 200, (int(committed.sum()),), generator=generator)
    positions = valid.sum(1)[:, None] + torch.arange(8)

    room = [tuple(torch.cat([t, t.new_zeros(3, t.shape[1], 8, t.shape[3])], dim=2) for t in kv)
            for kv in prefill.key_values]  # the cache with the block's columns after it
    forward = DelayedBlockForward(model, room, valid, positions, mask_id)
    every = torch.arange(8).expand(3, -1)  # logits at every block position
    first = forward(block, every).clone()
    assert forward.computed == 24 and torch.equal(forward.kept, committed)
    second = forward(block, every)
    assert forward.computed == 24 + int((~committed).sum())  # the masked ones only
    masked = ~committed
    torch.testing.assert_close(second[masked], first[masked], atol=1e-4, rtol=1e-4)
    # And those are the logits of the plain exact-cache pass over the whole block.
    mask = torch.cat([valid, torch.ones((3, 8), dtype=torch.bool)], 1)[:, None, None, :].expand(-1, 1, 8, -1)
    plain = model(input_ids=block, past_key_values=prefill.key_values, attention_mask=mask,
                  position_ids=positions).logits
    torch.testing.assert_close(second[masked], plain[masked], atol=1e-4, rtol=1e-4)
    # Every REFRESH_EVERY steps the whole block runs again, so no kept key grows older than that.
    for _ in range(REFRESH_EVERY - 2):
        forward(block, every)
    before = forward.computed
    forward(block, every)
    assert forward.computed - before == 24


def test_delayed_cache_batch_of_n_equals_n_batches_of_one(loaded):
    """Rows keep different numbers of positions, so batch-mates pad each other's steps: padding
    must not leak into a row's tokens."""
    engine = Engine(loaded, max_batch_size=8, cache="delayed")
    requests = requests_for(engine, MIXED)
    for request, together in zip(requests, engine.generate(requests), strict=False):
        alone = engine.generate([request])[0]
        assert together.token_ids == alone.token_ids and together.forward_passes == alone.forward_passes


def test_delayed_cache_keeps_the_reference_schedule_and_fills_templates(loaded):
    delayed, exact = Engine(loaded, max_batch_size=4, cache="delayed"), Engine(loaded, max_batch_size=4)
    # Whole blocks: within a block that max_tokens cuts, a row's passes depend on the order its
    # positions are committed in, which the approximate cache may change.
    requests = requests_for(delayed, [("a", dict(max_tokens=64, steps=8)), ("b c", dict(max_tokens=64))])
    for a, b in zip(delayed.generate(requests), exact.generate(requests), strict=False):
        assert a.forward_passes == b.forward_passes and len(a.token_ids) == len(b.token_ids)
    canvas = delayed.encode_template("x = {{fill:5}}\ny = {{fill:4}}\n")
    request = GenerationRequest(delayed.encode_completion("def f():\n"),
                                SamplingParams(max_tokens=len(canvas), block_length=8), template_ids=canvas)
    [result] = delayed.generate([request])
    assert all(got == want for got, want in zip(result.token_ids, canvas, strict=False) if want is not None)


def test_delayed_cache_is_for_block_causal_models_only():
    from worker.engine.caches.modes import resolve_cache_mode

    assert resolve_cache_mode("delayed", full_attention=False) == "delayed"
    with pytest.raises(ValueError, match="does not apply to full-attention"):
        resolve_cache_mode("delayed", full_attention=True)


def test_the_worker_setting_picks_the_cache(loaded):
    from worker.engine.factory import make_engine

    assert make_engine(loaded, cache="delayed").cache_mode == "delayed"
    assert make_engine(loaded).cache_mode == "exact"
