"""DiffusionGemma's step a few canvases at a time: the same tokens as the unchunked step, less memory."""

from __future__ import annotations

import pytest
import torch

from worker.engine.diffusion_gemma import chunked
from worker.engine.diffusion_gemma import engine as engine_module
from worker.engine.diffusion_gemma.continuous import ContinuousDenoiser
from worker.engine.diffusion_gemma.denoise import (
    entropy_bound_accept,
    linear_temperature,
    sample_inverse_cdf_,
    stable_and_confident,
    token_entropy,
)
from worker.engine.diffusion_gemma.tiny import create_tiny_diffusion_gemma
from worker.engine.factory import make_engine
from worker.engine.loader import load_model
from worker.engine.params import GenerationRequest, SamplingParams

CANVAS = 16


def _straightforward(logits, temperature, uniform, embedding):
    """The unchunked formulas: every tensor spans all rows and the whole vocabulary."""
    processed = logits.clone().div_(temperature[:, None, None])
    probs = torch.softmax(processed, dim=-1)
    entropy = token_entropy(probs)
    soft = torch.matmul(processed.softmax(dim=-1, dtype=torch.float32), embedding)
    return entropy, sample_inverse_cdf_(probs, uniform), processed.argmax(dim=-1), soft


def _random_step(rows=5, vocab=3000, hidden=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn((rows, CANVAS, vocab), generator=generator) * 4
    # Ties: a whole position flat (argmax takes the first, the draw is uniform), and a tied maximum.
    logits[0, 3] = 1.5
    logits[1, 7, [10, 2000]] = logits[1, 7].max() + 1
    logits[2, :, 100:] = -30.0  # mass on a few tokens: draws land near the CDF's ends
    temperature = torch.tensor([0.4, 0.8, 0.55, 1.7, 0.05])[:rows]
    uniform = torch.rand((rows, CANVAS), generator=generator)
    uniform[0, :4] = torch.tensor([0.0, 0.5, 0.999999, 1.0 - 2**-24])
    return logits, temperature, uniform, torch.randn((vocab, hidden), generator=generator)


@pytest.mark.parametrize("per_chunk", [1, 2, 3, 5])
def test_chunked_step_equals_the_straightforward_formulas(per_chunk):
    logits, temperature, uniform, embedding = _random_step()
    entropy, drawn, argmax, soft = _straightforward(logits, temperature, uniform, embedding)
    heads: list[int] = []

    def head(rows):  # stands for the LM head: fresh logits of the rows it is given
        heads.append(rows.shape[0])
        return rows.clone()

    soft_out = torch.full_like(soft, float("nan"))
    draws = chunked.denoise_in_chunks(
        logits, temperature, uniform, head=head, per_chunk=per_chunk, self_conditioning_out=soft_out,
        self_conditioning=lambda processed, probs: torch.matmul(processed.softmax(dim=-1), embedding))
    assert heads == [min(per_chunk, 5 - start) for start in range(0, 5, per_chunk)]  # chunking happened
    assert torch.equal(draws.entropy, entropy)
    assert torch.equal(draws.drawn, drawn)  # the same token for the same uniform draw, at every position
    assert torch.equal(draws.argmax, argmax)
    assert torch.equal(soft_out, soft)
    assert draws.argmax[0, 3] == 0 and draws.argmax[1, 7] == 10  # ties go to the first index
    assert (draws.drawn[2] < 100).all()


def test_rows_per_chunk_follows_the_budget():
    assert chunked.rows_per_chunk(256, 262_144) == 1 and chunked.rows_per_chunk(16, 262_144) == 8
    assert chunked.rows_per_chunk(16, 262_144, budget=1) == 1  # never less than one canvas
    assert [(s.start, s.stop) for s in chunked.canvas_chunks(7, 3)] == [(0, 3), (3, 6), (6, 7)]


class UnchunkedDenoiser(ContinuousDenoiser):
    """The continuous step as it was before chunking: the model's own forward over the whole batch,
    (rows, canvas, vocabulary) logits kept for self-conditioning."""

    sc_logits: torch.Tensor | None = None

    def _per_slot(self):
        return super()._per_slot() + ([self.sc_logits] if self.sc_logits is not None else [])

    def _step(self, n, fresh):
        previous = self.sc_logits
        self_conditioning = None if fresh == n or previous is None else previous[:n]
        view, positions, masks = self.adapter.decoder_inputs(self.cache, n)
        logits = self.adapter.model(
            cache=view, decoder_input_ids=self.canvas[:n], self_conditioning_logits=self_conditioning,
            self_conditioning_mask=self.sc_valid[:n], decoder_position_ids=positions,
            decoder_attention_mask=masks).logits
        steps_done, max_steps = self.steps_done[:n], self.max_steps[:n]
        temperature = linear_temperature(self.t_min[:n], self.t_max[:n], max_steps - steps_done, max_steps)
        processed = logits.div_(temperature[:, None, None])
        probs = torch.softmax(processed, dim=-1)
        entropy = token_entropy(probs)
        rows = torch.arange(n)
        denoised = sample_inverse_cdf_(probs, self.uniform[rows, steps_done])
        accept = entropy_bound_accept(entropy, self.bound[:n])
        self.canvas[:n] = torch.where(accept, denoised, self.renoise[rows, steps_done])
        argmax = processed.argmax(dim=-1)
        stop = torch.zeros(n, dtype=torch.bool)
        if self.confidence is not None:
            history = None if self.history is None else self.history[:, :n]
            stop, history = stable_and_confident(history, argmax, entropy, self.confidence)
            if history is not None and self.history is not None:
                self.history[:, :n] = history
        if self.sc_logits is None:
            self.sc_logits = torch.zeros((self.max_rows, *processed.shape[1:]), dtype=self.adapter.embed_dtype)
        self.sc_logits[:n] = processed
        self.sc_valid[:n] = True
        self.argmax[:n] = argmax
        self.steps_done[:n] += 1
        self.passes[:n] += 1
        return (stop | (self.steps_done[:n] >= max_steps)).nonzero().flatten().tolist()


@pytest.fixture(scope="module", params=["plain", "early_stop"])
def loaded(request, tmp_path_factory):
    settings = {"plain": dict(max_denoising_steps=6),
                # sharper weights and a stop that canvases reach at different steps: rows join mid-way
                "early_stop": dict(max_denoising_steps=8, init_scale=2.0, stability_threshold=2,
                                   confidence_threshold=5.4)}[request.param]
    path = create_tiny_diffusion_gemma(tmp_path_factory.mktemp("dg") / request.param, canvas_length=CANVAS,
                                       **settings)
    return load_model(str(path))


SPECS = [("def add(a, b):\n    return", dict(max_tokens=40, seed=1)), ("hi", dict(max_tokens=16, seed=2)),
         ("import os\nimport sys\n", dict(max_tokens=70, seed=3)), ("x", dict(max_tokens=5, seed=4)),
         ("def add(a, b):\n    return", dict(max_tokens=33, seed=5, max_steps=3)),
         ("zzz", dict(max_tokens=50, seed=6, t_min=0.1, t_max=2.0, entropy_bound=1.0))]


@pytest.mark.parametrize("max_batch_size", [2, 6])
def test_continuous_tokens_equal_the_unchunked_step(loaded, max_batch_size, monkeypatch):
    engine = make_engine(loaded, max_batch_size=max_batch_size)
    requests = [GenerationRequest(engine.encode_completion(prompt),
                                  SamplingParams(block_length=CANVAS, sampler="entropy_bound", **kw))
                for prompt, kw in SPECS]
    monkeypatch.setattr(chunked, "CHUNK_ELEMENTS", 1)  # one canvas a chunk
    chunked_results = engine.generate(requests)
    monkeypatch.setattr(engine_module, "ContinuousDenoiser", UnchunkedDenoiser)
    unchunked_results = engine.generate(requests)
    assert [(r.token_ids, r.forward_passes) for r in chunked_results] == [
        (r.token_ids, r.forward_passes) for r in unchunked_results]
    assert len({r.forward_passes for r in chunked_results}) > 1


def _largest_allocation(run) -> int:
    """Bytes of the largest tensor allocated while ``run()`` runs (torch's CPU memory profiler)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    return max(event.cpu_memory_usage for event in prof.events())


def test_no_tensor_spans_the_batch_and_the_vocabulary(tmp_path, monkeypatch):
    """Eight rows, one canvas a chunk: no allocation holds more than a chunk's vocabulary-wide values
    (one of the unchunked step's logits would hold eight canvases')."""
    vocab = 32_768
    loaded = load_model(str(create_tiny_diffusion_gemma(tmp_path / "dg", canvas_length=CANVAS, vocab_size=vocab,
                                                        max_denoising_steps=2)))
    engine = make_engine(loaded, max_batch_size=8)
    requests = [GenerationRequest(engine.encode_completion("ab"),
                                  SamplingParams(block_length=CANVAS, sampler="entropy_bound", max_tokens=CANVAS,
                                                 seed=seed)) for seed in range(8)]
    one_canvas = CANVAS * vocab * 4  # float32
    monkeypatch.setattr(chunked, "CHUNK_ELEMENTS", 1)
    assert _largest_allocation(lambda: engine.generate(requests)) <= one_canvas
    monkeypatch.setattr(engine_module, "ContinuousDenoiser", UnchunkedDenoiser)
    assert _largest_allocation(lambda: engine.generate(requests)) >= 8 * one_canvas  # the test can fail
