"""The batched reference sampler against a plain re-implementation of LLaDA's procedure.

The oracle below follows Nie et al. 2025 ("Large Language Diffusion Models", Algorithm of
semi-autoregressive low-confidence remasking; github.com/ML-GSAI/LLaDA generate.py) for one
prompt at a time: the whole sequence (prompt + every generation block) is recomputed at every
step, with no batching, padding or prefix slicing. It uses the block-causal attention of the
built-in family (prompt = one bidirectional block, then blocks of block_length that see only
earlier blocks).

Noise convention shared with the engine (worker/engine/sampling/noise.py, RowNoise): a torch.Generator seeded with the
request's seed draws one float64 tensor u of shape (masked positions of the block, vocab_size),
rows in block order, at each step that commits tokens when temperature > 0; the Gumbel-max score is
exp(logits) / (-log u) ** T.
The one deliberate deviation from generate.py, also in the engine: [MASK] is never predicted.
"""

import math

import pytest
import torch

from worker.engine.params import GenerationRequest, SamplingParams


def new_canvas(prompt, max_tokens, block_length, mask_id):
    """The prompt then masked blocks, and the block-causal mask: (x, allowed (L, L) bool)."""
    gen_length = math.ceil(max_tokens / block_length) * block_length
    x = list(prompt) + [mask_id] * gen_length
    block_of = [0] * len(prompt) + [1 + j // block_length for j in range(gen_length)]
    allowed = torch.tensor([[block_of[k] <= block_of[q] for k in range(len(x))] for q in range(len(x))])
    return x, allowed


def predict_block(model, x, allowed, lo, hi, *, temperature, generator, mask_id):
    """Full recomputation; x0 and softmax probabilities for columns [lo, hi), Gumbel-max at T."""
    with torch.no_grad():
        logits = model(torch.tensor([x]), attention_mask=allowed[None, None],
                       position_ids=torch.arange(len(x))[None]).logits[0].double()  # (L, V)
    logits[:, mask_id] = -math.inf
    block_logits = logits[lo:hi]  # (K, V)
    x0 = block_logits.argmax(-1)
    if temperature > 0:
        masked = [j for j in range(hi - lo) if x[lo + j] == mask_id]
        u = torch.rand((len(masked), logits.shape[-1]), dtype=torch.float64, generator=generator)
        x0[masked] = (block_logits[masked].exp() / (-torch.log(u)) ** temperature).argmax(-1)
    return x0, torch.softmax(block_logits, -1)


def oracle_generate(model, prompt, *, max_tokens, block_length, steps, temperature, seed, mask_id):
    x, allowed = new_canvas(prompt, max_tokens, block_length, mask_id)
    generator = torch.Generator().manual_seed(seed)

    for lo in range(len(prompt), len(x), block_length):
        hi = lo + block_length
        masked = sum(t == mask_id for t in x[lo:hi])
        per_step = [masked // steps + (1 if i < masked % steps else 0) for i in range(steps)]
        for i in range(steps):
            x0, probs = predict_block(model, x, allowed, lo, hi, temperature=temperature,
                                      generator=generator, mask_id=mask_id)
            confidence = torch.full((block_length,), -math.inf, dtype=torch.float64)
            for j in range(block_length):
                if x[lo + j] == mask_id:
                    confidence[j] = probs[j, x0[j]]
            for j in torch.topk(confidence, per_step[i]).indices.tolist():
                x[lo + j] = int(x0[j])
    return x[len(prompt):]


def kept_tokens(tokens, max_tokens, eos_id):
    tokens = tokens[:max_tokens]
    return tokens[: tokens.index(eos_id)] if eos_id in tokens else tokens


PROMPTS = ["Hello", "The quick brown fox jumps", "x", "日本語のテキスト"]


@pytest.mark.parametrize(
    "temperature, steps, max_tokens",
    [(0.0, None, 40), (0.0, 8, 64), (1.0, None, 40), (0.7, 5, 33)],
)
def test_engine_matches_oracle(engine, loaded, temperature, steps, max_tokens):
    for seed, text in enumerate(PROMPTS):
        prompt = engine.encode_completion(text)
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed, steps=steps)
        expected = oracle_generate(
            loaded.model, prompt, max_tokens=max_tokens, block_length=params.block_length,
            steps=params.steps_per_block, temperature=temperature, seed=seed,
            mask_id=loaded.mask_token_id,
        )
        result = engine.generate([GenerationRequest(prompt, params)])[0]
        assert result.token_ids == kept_tokens(expected, max_tokens, loaded.eos_token_id), text
        assert loaded.mask_token_id not in result.token_ids


def test_sampling_depends_on_seed_only(engine):
    prompt = engine.encode_completion("seeded")
    a, b, c = engine.generate([
        GenerationRequest(prompt, SamplingParams(max_tokens=32, temperature=1.0, seed=7)),
        GenerationRequest(prompt, SamplingParams(max_tokens=32, temperature=1.0, seed=7)),
        GenerationRequest(prompt, SamplingParams(max_tokens=32, temperature=1.0, seed=8)),
    ])
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


def parallel_oracle(model, prompt, *, max_tokens, block_length, rule, cutoff, temperature, seed, mask_id):
    """Fast-dLLM's parallel acceptance (arXiv:2505.22618 §3.3), one prompt, full recomputation.

    Each step commits the most confident masked positions: all with confidence >= cutoff (rule
    "threshold"), or the n most confident with (n + 1)(1 - c_n) < cutoff (rule "factor"); always at
    least one. Noise as above: one draw per step while the block still has masks.
    """
    x, allowed = new_canvas(prompt, max_tokens, block_length, mask_id)
    generator = torch.Generator().manual_seed(seed)
    passes = 0
    for lo in range(len(prompt), len(x), block_length):
        while mask_id in x[lo:lo + block_length]:
            # A row stops once its positions up to max_tokens are committed: later steps only fill
            # the ones it cuts off (the engine runs none; the oracle runs them, changing nothing kept).
            passes += mask_id in x[lo:min(lo + block_length, len(prompt) + max_tokens)]
            x0, probs = predict_block(model, x, allowed, lo, lo + block_length, temperature=temperature,
                                      generator=generator, mask_id=mask_id)
            masked = [j for j in range(block_length) if x[lo + j] == mask_id]
            ranked = sorted(masked, key=lambda j: -float(probs[j, x0[j]]))
            confidences = [float(probs[j, x0[j]]) for j in ranked]
            if rule == "threshold":
                n = sum(c >= cutoff for c in confidences)
            else:
                n = sum((i + 2) * (1 - c) < cutoff for i, c in enumerate(confidences))
            for j in ranked[:max(n, 1)]:
                x[lo + j] = int(x0[j])
    return x[len(prompt):], passes


@pytest.mark.parametrize("rule, cutoff, temperature", [
    ("threshold", 0.0045, 0.0), ("threshold", 0.004, 0.8), ("factor", 4.0, 0.0), ("factor", 6.0, 1.0)])
def test_parallel_samplers_match_oracle(engine, loaded, rule, cutoff, temperature):
    for seed, text in enumerate(PROMPTS):
        prompt = engine.encode_completion(text)
        params = SamplingParams(max_tokens=40, temperature=temperature, seed=seed, sampler=rule,
                                **{rule: cutoff})
        expected, passes = parallel_oracle(
            loaded.model, prompt, max_tokens=40, block_length=params.block_length, rule=rule,
            cutoff=cutoff, temperature=temperature, seed=seed, mask_id=loaded.mask_token_id)
        result = engine.generate([GenerationRequest(prompt, params)])[0]
        assert result.token_ids == kept_tokens(expected, 40, loaded.eos_token_id), text
        if result.finish_reason == "length":
            assert result.forward_passes == passes


def test_factor_sampler_commits_several_tokens_per_pass(engine):
    """Even the untrained model (confidence ~1/V) gets (n + 1)(1 - c) < 4 for n <= 2: 3 tokens a pass."""
    prompt = engine.encode_completion("def f():")
    reference, factor = engine.generate([
        GenerationRequest(prompt, SamplingParams(max_tokens=64)),
        GenerationRequest(prompt, SamplingParams(max_tokens=64, sampler="factor", factor=4.0)),
    ])
    assert reference.forward_passes == 64
    assert factor.forward_passes == 2 * math.ceil(32 / 3)
