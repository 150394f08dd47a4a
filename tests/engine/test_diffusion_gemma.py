"""DiffusionGemma: loading, the generate()-exact reference sampler, continuous batching, eviction."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from worker.engine.diffusion_gemma.engine import DiffusionGemmaEngine
from worker.engine.diffusion_gemma.tiny import create_tiny_diffusion_gemma
from worker.engine.factory import make_engine
from worker.engine.loader import load_model
from worker.engine.params import ContextLengthError, GenerationRequest, SamplingParams

CANVAS = 16
PROMPTS = ["def add(a, b):\n    return", "hi", "import os\nimport sys\n", "x"]


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    path = create_tiny_diffusion_gemma(tmp_path_factory.mktemp("dg") / "tiny-dg", canvas_length=CANVAS,
                                       max_denoising_steps=6)
    return load_model(str(path))


@pytest.fixture(scope="module")
def loaded_early_stop(tmp_path_factory):
    """Sharper random weights, no stability requirement and a confidence bound that the mean entropy
    crosses mid-canvas (it falls with the temperature): canvases stop at different steps."""
    path = create_tiny_diffusion_gemma(tmp_path_factory.mktemp("dg") / "tiny-dg-stop", canvas_length=CANVAS,
                                       max_denoising_steps=8, init_scale=2.0, stability_threshold=0,
                                       confidence_threshold=5.34)
    return load_model(str(path))


def _params(**kw) -> SamplingParams:
    return SamplingParams(**{"block_length": CANVAS, "sampler": "entropy_bound", **kw})


def _requests(engine, specs) -> list[GenerationRequest]:
    return [GenerationRequest(engine.encode_completion(prompt), _params(**kw)) for prompt, kw in specs]


def _generate_like_transformers(model, prompts, *, max_new_tokens, seed, pad_token_id):
    """What a transformers user writes: one left-padded batch, the global seed, model.generate()."""
    length = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), length), pad_token_id)
    attention_mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, length - len(prompt):] = torch.tensor(prompt)
        attention_mask[row, length - len(prompt):] = 1
    torch.manual_seed(seed)
    output = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens)
    return [row[length:] for row in output.sequences.tolist()]


def _cut(tokens, max_tokens, eos_ids):
    tokens = tokens[:max_tokens]
    ends = [i for i, t in enumerate(tokens) if t in eos_ids]
    return tokens[: ends[0]] if ends else tokens


def test_loader_reads_a_diffusion_gemma_folder(loaded):
    assert loaded.family == "diffusion_gemma" and loaded.mask_token_id is None
    assert loaded.eos_token_ids == (loaded.tokenizer.eos_token_id,)
    assert loaded.max_positions == 512
    engine = make_engine(loaded, max_batch_size=4)
    assert isinstance(engine, DiffusionGemmaEngine) and engine.default_sampler == "entropy_bound"
    assert engine.default_block_length == CANVAS
    chat = engine.encode_chat([{"role": "user", "content": "Hi"}])
    assert chat[0] == loaded.tokenizer.bos_token_id


@pytest.mark.parametrize("which", ["loaded", "loaded_early_stop"])
def test_reference_equals_model_generate(request, which):
    loaded = request.getfixturevalue(which)
    engine = make_engine(loaded, max_batch_size=8)
    prompts = [engine.encode_completion(p) for p in PROMPTS]
    max_tokens = 40  # three canvases, the last one cut
    results = engine.generate([GenerationRequest(p, _params(sampler="reference", max_tokens=max_tokens, seed=11))
                               for p in prompts])
    expected = _generate_like_transformers(loaded.model, prompts, max_new_tokens=max_tokens, seed=11,
                                           pad_token_id=loaded.pad_token_id)
    for result, row in zip(results, expected, strict=False):
        assert result.token_ids == _cut(row, max_tokens, loaded.eos_token_ids)
        assert result.forward_passes >= 1


def test_reference_follows_requested_settings(loaded):
    engine = make_engine(loaded)
    prompts = [engine.encode_completion(p) for p in PROMPTS[:2]]
    settings = dict(max_steps=3, entropy_bound=0.5, t_min=0.2, t_max=1.5)
    results = engine.generate([GenerationRequest(p, _params(sampler="reference", max_tokens=20, seed=5, **settings))
                               for p in prompts])
    length = max(map(len, prompts))
    ids = torch.tensor([[loaded.pad_token_id] * (length - len(p)) + p for p in prompts])
    torch.manual_seed(5)
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import EntropyBoundSamplerConfig
    output = loaded.model.generate(ids, attention_mask=(torch.arange(length)[None] >= torch.tensor(
        [length - len(p) for p in prompts])[:, None]).long(), max_new_tokens=20, max_denoising_steps=3,
        sampler_config=EntropyBoundSamplerConfig(entropy_bound=0.5), t_min=0.2, t_max=1.5)
    for result, row in zip(results, output.sequences[:, length:].tolist(), strict=False):
        assert result.token_ids == _cut(row, 20, loaded.eos_token_ids)


SPECS = [(PROMPTS[0], dict(max_tokens=40, seed=1)), (PROMPTS[1], dict(max_tokens=16, seed=2)),
         (PROMPTS[2], dict(max_tokens=70, seed=3)), (PROMPTS[3], dict(max_tokens=5, seed=4)),
         (PROMPTS[0], dict(max_tokens=33, seed=5, max_steps=3))]


@pytest.mark.parametrize("which", ["loaded", "loaded_early_stop"])
def test_continuous_batching_is_batch_invariant(request, which):
    """Per-request seeds: the same tokens alone, in a full batch, or joining as others leave."""
    engine = make_engine(request.getfixturevalue(which), max_batch_size=2)  # forces joins mid-way
    requests = _requests(engine, SPECS)
    together = engine.generate(requests)
    for request_, result in zip(requests, together, strict=False):
        alone = engine.generate([request_])[0]
        assert alone.token_ids == result.token_ids
        assert alone.forward_passes == result.forward_passes
    wide = make_engine(request.getfixturevalue(which), max_batch_size=8).generate(requests)
    assert [r.token_ids for r in wide] == [r.token_ids for r in together]


def test_rows_stop_denoising_at_their_own_step(loaded_early_stop):
    """Adaptive stop per row: a canvas that is done costs no more decoder passes."""
    engine = make_engine(loaded_early_stop, max_batch_size=8)
    results = engine.generate(_requests(engine, [(p, dict(max_tokens=CANVAS, seed=s)) for s, p in enumerate(PROMPTS)]))
    passes = [r.forward_passes for r in results]
    assert all(1 <= n < engine.defaults.max_steps for n in passes) and len(set(passes)) > 1, passes


def test_max_tokens_and_passes(loaded):
    engine = make_engine(loaded, max_batch_size=4)
    short, long_ = engine.generate(_requests(engine, [("a", dict(max_tokens=5, seed=9)),
                                                      ("a", dict(max_tokens=40, seed=9))]))
    steps = engine.defaults.max_steps  # this random model never stops a canvas early
    assert short.forward_passes == steps and long_.forward_passes == 3 * steps
    assert short.completion_tokens <= 5 and long_.completion_tokens <= 40
    assert short.token_ids == long_.token_ids[: len(short.token_ids)]  # same seed, same first canvas


def test_progress_counts_whole_canvases_while_the_batch_runs(loaded, monkeypatch):
    # The worker's heartbeat reports tokens_in_flight, so a long DiffusionGemma chunk shows progress
    # before any of its requests is stored.
    from worker.engine.diffusion_gemma.continuous import ContinuousDenoiser

    engine = make_engine(loaded, max_batch_size=2)
    seen: list[int] = []
    commit = ContinuousDenoiser._commit

    def observed(self, slots, finished):
        to_encode = commit(self, slots, finished)
        seen.append(engine.tokens_in_flight)
        return to_encode

    monkeypatch.setattr(ContinuousDenoiser, "_commit", observed)
    results = engine.generate(_requests(engine, [("a", dict(max_tokens=40, seed=1)),
                                                 ("b", dict(max_tokens=20, seed=2))]))
    assert seen == sorted(seen) and seen[0] == 0  # no canvas done before the first commit
    assert seen[-1] >= sum(r.completion_tokens for r in results) and seen[-1] % CANVAS == 0
    assert len(set(seen)) >= 3  # it moved canvas by canvas, not once at the end
    assert engine.tokens_in_flight == 0  # nothing running after the call


def test_eviction_at_eos(loaded):
    """A row that emits EOS leaves after that canvas: fewer decoder passes, finish_reason stop."""
    engine = make_engine(loaded, max_batch_size=4)
    [free] = engine.generate(_requests(engine, [("a", dict(max_tokens=48, seed=21))]))
    second_canvas = free.token_ids[CANVAS : 2 * CANVAS]
    eos = next(t for t in second_canvas if t not in free.token_ids[:CANVAS])
    # Declare that token the end of sequence: the same noise gives the same first two canvases.
    with_eos = DiffusionGemmaEngine(dataclasses.replace(loaded, eos_token_id=eos, eos_token_ids=(eos,)),
                                    max_batch_size=4)
    stopped, other = with_eos.generate(_requests(with_eos, [("a", dict(max_tokens=48, seed=21)),
                                                            ("b", dict(max_tokens=48, seed=22))]))
    assert stopped.token_ids == free.token_ids[: free.token_ids.index(eos)]
    assert stopped.finish_reason == "stop"
    assert stopped.forward_passes == 2 * engine.defaults.max_steps < free.forward_passes


def test_stop_string_ends_a_row(loaded):
    engine = make_engine(loaded)
    [free] = engine.generate(_requests(engine, [("a", dict(max_tokens=64, seed=4))]))
    text = free.text
    stop = text[CANVAS // 2 : CANVAS // 2 + 1] if len(text) > CANVAS else None
    if not stop or not stop.strip():
        pytest.skip("random text without a usable stop character")
    [cut] = engine.generate(_requests(engine, [("a", dict(max_tokens=64, seed=4, stop=(stop,)))]))
    assert cut.finish_reason == "stop" and cut.text == text[: text.index(stop)]
    assert cut.forward_passes < free.forward_passes


def test_prompt_longer_than_positions(loaded):
    engine = make_engine(loaded)
    prompt = [loaded.tokenizer.bos_token_id] * 500
    with pytest.raises(ContextLengthError, match="needs 516 positions; the model supports 512"):
        engine.check(GenerationRequest(prompt, _params(max_tokens=10)))
    with pytest.raises(ContextLengthError):
        engine.generate([GenerationRequest([1] * 600, _params(max_tokens=1))])


@pytest.mark.parametrize("kw, message", [
    (dict(sampler="threshold"), "diffusion.sampler 'threshold' does not apply to DiffusionGemma"),
    (dict(sampler="reference", steps=4), "diffusion.steps does not apply"),
    (dict(block_length=32), "diffusion.block_length is fixed by the checkpoint: canvas_length=16"),
    (dict(temperature=0.7), "temperature does not apply"),
    (dict(top_p=0.5), "top_p does not apply"),
    (dict(t_min=0.9), r"diffusion.t_min \(0.9\) must be >= 0 and below diffusion.t_max \(0.8\)"),
    (dict(max_steps=0), "diffusion.max_steps must be a positive integer"),
    (dict(sampler="reference", schedule="maskgit_plus"), "diffusion.schedule does not apply"),
])
def test_check_names_the_field(loaded, kw, message):
    engine = make_engine(loaded)
    with pytest.raises(ValueError, match=message):
        engine.check(GenerationRequest([1, 50], _params(**kw)))


def test_block_causal_engine_rejects_diffusion_gemma_options(tiny_model):
    engine = make_engine(load_model(str(tiny_model)))
    with pytest.raises(ValueError, match="diffusion.sampler 'entropy_bound' applies to DiffusionGemma"):
        engine.check(GenerationRequest([1, 50], SamplingParams(sampler="entropy_bound")))
    with pytest.raises(ValueError, match="diffusion.max_steps applies to DiffusionGemma"):
        engine.check(GenerationRequest([1, 50], SamplingParams(max_steps=4)))


def test_image_content_is_refused(loaded):
    engine = make_engine(loaded)
    image = [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]
    with pytest.raises(ValueError, match=r"messages\[0\].content: only text"):
        engine.encode_chat([{"role": "user", "content": image}])
