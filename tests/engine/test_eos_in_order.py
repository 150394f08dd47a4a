"""diffbatch_eos_in_order: a parallel row commits an EOS only at its first mask, so a model sure of
EOS far from its text (trained on EOS-padded completions) cannot end an answer before writing it."""

import json
import shutil

import pytest
import torch

from worker.engine.engine import Engine
from worker.engine.loader import load_model
from worker.engine.params import GenerationRequest, SamplingParams
from worker.engine.sampling.kept import Kept
from worker.engine.sampling.rules import BlockRules
from worker.engine.sampling.step import BlockContext, commit_step

MASK, EOS, VOCAB, K = 9, 8, 10, 6


def _logits(predictions: list[list[tuple[int, float]]]) -> torch.Tensor:
    """(B, K, V) logits whose softmax gives each position's (token, probability)."""
    logits = torch.full((len(predictions), K, VOCAB), -30.0, dtype=torch.float64)
    for b, row in enumerate(predictions):
        for k, (token, p) in enumerate(row):
            logits[b, k, token] = 0.0
            logits[b, k, (token + 1) % EOS] = torch.log(torch.tensor((1 - p) / p, dtype=torch.float64))
    return logits


def _step(params: list[SamplingParams], predictions, *, eos_in_order: bool) -> torch.Tensor:
    block = torch.full((len(params), K), MASK)
    kept = Kept(None, torch.tensor([EOS]), torch.zeros((len(params), 1), dtype=torch.long),
                eos_in_order=eos_in_order)
    rules = BlockRules(params, K, torch.device("cpu"))
    context = BlockContext(rules, MASK, kept=kept)
    slots = torch.arange(K).expand(len(params), K)
    commit_step(context, block, _logits(predictions), slots, block == MASK, rules.schedule_t[:, 0])
    return block


THRESHOLD = SamplingParams(max_tokens=K, block_length=K, sampler="threshold", threshold=0.9)
# Text at 0-2 (the model is sure of 0 and 2 only), EOS padding at 3-5 (surer than any text).
PADDED = [(1, 0.95), (2, 0.6), (3, 0.92), (EOS, 0.99), (EOS, 0.99), (EOS, 0.99)]


def test_a_threshold_row_commits_a_sure_eos_ahead_of_its_text_unless_eos_is_in_order():
    free = _step([THRESHOLD], [PADDED], eos_in_order=False)[0].tolist()
    assert free == [1, MASK, 3, EOS, EOS, EOS]  # the answer is cut at 3 before position 1 is written
    ordered = _step([THRESHOLD], [PADDED], eos_in_order=True)[0].tolist()
    assert ordered == [1, MASK, 3, MASK, MASK, MASK]  # the text commits; the EOS waits its turn


def test_an_eos_at_the_first_mask_commits_and_a_row_with_nothing_else_sure_still_moves():
    first = [(EOS, 0.99)] + [(EOS, 0.99)] * (K - 1)
    assert _step([THRESHOLD], [first], eos_in_order=True)[0].tolist() == [EOS] + [MASK] * (K - 1)
    # Nothing but EOS is sure past a text position: that position (the most confident left) commits.
    unsure = [(1, 0.6)] + [(EOS, 0.99)] * (K - 1)
    assert _step([THRESHOLD], [unsure], eos_in_order=True)[0].tolist() == [1] + [MASK] * (K - 1)


def test_a_reference_row_keeps_its_schedule_beside_a_row_that_holds_eos_back():
    reference = SamplingParams(max_tokens=K, block_length=K, steps=2)  # 3 tokens a step, the most confident
    block = _step([THRESHOLD, reference], [PADDED, PADDED], eos_in_order=True)
    assert block[0].tolist() == [1, MASK, 3, MASK, MASK, MASK]
    assert block[1].tolist() == [MASK, MASK, MASK, EOS, EOS, EOS]


@pytest.fixture(scope="module")
def in_order_path(tiny_path, tmp_path_factory):
    """A copy of the tiny checkpoint whose config.json sets diffbatch_eos_in_order."""
    copy = tmp_path_factory.mktemp("eos") / "tiny-eos-in-order"
    shutil.copytree(tiny_path, copy)
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "diffbatch_eos_in_order": True}))
    return copy


def test_the_checkpoint_flag_holds_eos_back_alike_in_every_engine_path(in_order_path, loaded):
    """The static-shape greedy steps, the eager block loop and the canvas scheduler decode a row under
    the rule to the same tokens, alone or batched, with nothing kept past an EOS."""
    ordered = load_model(str(in_order_path))
    assert Engine(ordered).scheduler.eos_in_order and not Engine(loaded).scheduler.eos_in_order
    prompts = ["def f(x):\n    return", "class A:\n", "import os\n"]
    params = SamplingParams(max_tokens=24, block_length=8, sampler="threshold", threshold=0.5)
    outputs = []
    for options in ({"graphs": True}, {}, {"kv_cache": False}):
        engine = Engine(ordered, max_batch_size=2, **options)
        requests = [GenerationRequest(engine.encode_completion(p), params) for p in prompts]
        batched = [r.token_ids for r in engine.generate(requests)]
        assert batched == [engine.generate([r])[0].token_ids for r in requests]
        outputs.append(batched)
    assert outputs[0] == outputs[1] == outputs[2]
    eos = set(Engine(ordered).eos_token_ids)
    assert all(not eos & set(tokens) for tokens in outputs[0])


def test_a_flag_that_is_not_a_boolean_is_refused_by_name(tiny_path, tmp_path):
    copy = tmp_path / "bad"
    shutil.copytree(tiny_path, copy)
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "diffbatch_eos_in_order": "yes"}))
    with pytest.raises(ValueError, match="diffbatch_eos_in_order 'yes'"):
        Engine(load_model(str(copy)))
