"""Dream's ``reference`` sampler against Dream's own generation, token for token, on tiny random models.

``official_tokens`` restates, in this file's own code, what Dream's ``diffusion_generate`` does at
temperature 0 on one row (learnt from NVlabs/Fast-dLLM ``dream/model/generation_utils.py``): the
whole completion is one masked canvas; each step reads position i's logits at position i - 1, keeps
the 50 largest logits of each masked position (the config's top_k), takes the most likely token and
its renormalised probability, and commits the most confident positions (``torch.topk``), as many as
its algorithm says: ``confidence_threshold`` at threshold 0 commits completion / steps a step, the
default ``maskgit_plus`` int(m * (1 - t_(i+1) / t_i)) of the m masks left. [MASK] is never a
prediction, as in diffbatch (the official code leaves that to the trained model). Confidences are
float64 here, as diffbatch's: the official ones are in the logits' dtype, where nearly flat
predictions (scale 0.1 and below) give exact float32 ties that ``torch.topk`` breaks its own way.
"""

import pytest
import torch

from worker.engine.builtin.tokenizer import build_byte_tokenizer
from worker.engine.engine import Engine
from worker.engine.families import DreamConfig, DreamForMaskedDiffusion
from worker.engine.loader import load_model
from worker.engine.params import GenerationRequest, InvalidRequest, SamplingParams
from worker.engine.sampling.transfer import maskgit_plus_schedule

# Every parameter drawn N(0, scale), peaked to flat predictions. Flatter ones (0.02) tie to within the
# float32 rounding that a batch-mate's padding changes in the logits (~1e-9), which decides between them.
SCALES = (1.0, 0.35, 0.1)
PROMPTS = ["", "hi", "The quick brown fox jumps over", "def f(x):\n    return"]
# (completion length = block_length, steps, schedule)
SETTINGS = [(16, 16, "linear"), (16, 8, "linear"), (16, 4, "linear"), (8, 8, "linear"), (32, 16, "linear"),
            (16, 16, "maskgit_plus"), (16, 8, "maskgit_plus"), (16, 5, "maskgit_plus"), (32, 32, "maskgit_plus")]
OFFICIAL_TOP_K, EPS = 50, 1e-3


def official_tokens(model, prompt: list[int], length: int, steps: int, schedule: str, mask_id: int) -> list[int]:
    """The completion Dream's generation gives ``prompt`` at temperature 0 (module docstring)."""
    x = torch.tensor(prompt + [mask_id] * length)
    times = torch.linspace(1, EPS, steps + 1)
    for i in range(steps):
        masked = x == mask_id
        logits = model(input_ids=x[None]).logits[0].double()  # (L, V)
        logits = torch.cat([logits[:1], logits[:-1]])  # position i is scored at i - 1
        logits[:, mask_id] = float("-inf")
        candidates = logits[masked]  # (M, V)
        kth = candidates.topk(OFFICIAL_TOP_K, dim=-1).values[:, -1:]
        candidates = candidates.masked_fill(candidates < kth, torch.finfo(candidates.dtype).min)
        confidence, x0 = candidates.softmax(dim=-1).max(dim=-1)  # (M,)
        if schedule == "linear":  # confidence_threshold, threshold 0
            count = length // steps
        else:
            left = masked.sum() / 1  # a float32 count, as there
            count = int(left * (1 - times[i + 1] / times[i])) if i < steps - 1 else int(left)
        scores = torch.full(x.shape, float("-inf"), dtype=confidence.dtype).masked_scatter(masked, confidence)
        proposal = x.masked_scatter(masked, x0)
        if count:
            chosen = scores.topk(count).indices
            x[chosen] = proposal[chosen]
    return x[len(prompt):].tolist()


def cut_at_eos(tokens: list[int], eos_ids) -> list[int]:
    ends = [i for i, t in enumerate(tokens) if t in eos_ids]
    return tokens[: ends[0]] if ends else tokens


@pytest.fixture(scope="module", params=SCALES, ids=lambda s: f"scale{s}")
def dream(request, tmp_path_factory):
    tokenizer = build_byte_tokenizer()
    config = DreamConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=512,
                         rope_theta=10000.0, mask_token_id=tokenizer.mask_token_id,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = DreamForMaskedDiffusion(config)
        with torch.no_grad():
            for parameter in model.parameters():  # norms and q/k/v biases too
                parameter.normal_(0.0, request.param)
    folder = tmp_path_factory.mktemp("dream") / "tiny-dream"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return load_model(str(folder))


def test_maskgit_plus_schedule_is_dreams():
    assert maskgit_plus_schedule(16, 16) == [0] + [1] * 14 + [2]
    for masked, steps in [(16, 8), (16, 5), (32, 32), (7, 3), (256, 256)]:
        row = maskgit_plus_schedule(masked, steps)
        assert len(row) == steps and sum(row) == masked and min(row) >= 0


@pytest.mark.parametrize("kw, message", [
    (dict(schedule="cosine"), "diffusion.schedule must be one of"),
    (dict(sampler="threshold", schedule="maskgit_plus"), "diffusion.schedule applies to the reference sampler"),
    (dict(sampler="factor", schedule="linear"), "diffusion.schedule applies to the reference sampler"),
])
def test_schedule_is_named_when_refused(kw, message):
    with pytest.raises(InvalidRequest, match=message) as refused:
        SamplingParams(**kw).validate()
    assert refused.value.param == "diffusion.schedule"


def test_reference_gives_dreams_tokens_whatever_the_batch(dream):
    """Every prompt and setting alone, then all together next to a sampling batch-mate, then two at a
    time (rows join as others leave): the official tokens (before the first EOS) each time."""
    cases = [(p, *s) for p in PROMPTS for s in SETTINGS]
    engine = Engine(dream, max_batch_size=64, cache="none")
    requests, expected = [], []
    with torch.no_grad():
        for prompt, length, steps, schedule in cases:
            ids = engine.encode_completion(prompt)
            params = SamplingParams(max_tokens=length, block_length=length, steps=steps, schedule=schedule)
            requests.append(GenerationRequest(ids, params))
            tokens = official_tokens(dream.model, ids, length, steps, schedule, dream.mask_token_id)
            expected.append(cut_at_eos(tokens, dream.eos_token_ids))
    alone = [engine.generate([request])[0].token_ids for request in requests]
    assert alone == expected
    by_length = {}
    for i, request in enumerate(requests):
        by_length.setdefault(request.params.block_length, []).append(i)
    for length, indices in by_length.items():  # one engine run serves one block length
        mate = GenerationRequest(engine.encode_completion("mate"), SamplingParams(
            max_tokens=length, block_length=length, temperature=0.8, seed=1))
        together = engine.generate([requests[i] for i in indices] + [mate])
        assert [r.token_ids for r in together[: len(indices)]] == [expected[i] for i in indices]
        pairs = Engine(dream, max_batch_size=2, cache="none").generate([requests[i] for i in indices])
        assert [r.token_ids for r in pairs] == [expected[i] for i in indices]
