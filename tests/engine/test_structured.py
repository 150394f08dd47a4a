"""Structured output by infilling: every completed line parses and fits its schema, on the shipped model
and tiny random ones, whatever the sampler, temperature and cache; the token masks, not the rendering,
keep each hole's tokens in its class; refusals name response_format."""

from __future__ import annotations

import dataclasses
import itertools
import json

import jsonschema
import pytest
import torch

from common.settings import BUILTIN_MODEL_PATH
from worker.engine.engine import Engine
from worker.engine.loader import load_model
from worker.engine.params import GenerationRequest, Healing, InvalidRequest, SamplingParams
from worker.engine.structured import TokenClasses
from worker.structured_output import structured_request

from .test_families import save_tiny
from .test_llada2 import llada2  # noqa: F401  (a fixture, asked for by name below)
from .test_sdar import sdar  # noqa: F401  (likewise)

SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]},
    {"type": "object", "properties": {"n": {"type": "integer"}, "x": {"type": "number"}, "ok": {"type": "boolean"}},
     "required": ["n", "x", "ok"], "additionalProperties": False},
    {"type": "object", "title": "Colour", "description": "ignored",
     "properties": {"colour": {"enum": ["red", "green", "blue", "light green"]}}},
    {"type": "object", "properties": {"v": {"enum": [1, 2.5, -3, True, None, "x"]}, "c": {"const": "fixed"}}},
    {"type": "object", "properties": {"code": {"type": "string", "minLength": 2, "maxLength": 4},
                                      "short": {"type": "string", "maxLength": 1},
                                      "empty": {"type": "string", "maxLength": 0}}},
    {"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string", "maxLength": 6},
                                               "maxItems": 5}}},
    {"type": "object", "properties": {"point": {"type": "object", "properties": {
        "x": {"type": "integer"}, "y": {"type": "integer"}}, "required": ["x", "y"]}}},
    {"type": "object", "properties": {"items": {"type": "array", "minItems": 1, "maxItems": 2, "items": {
        "type": "object", "properties": {"id": {"type": "integer"}, "on": {"type": "boolean"}}}}}},
    {"type": "object", "properties": {"none": {"type": "array", "items": {"type": "integer"}, "maxItems": 0},
                                      "grid": {"type": "array", "maxItems": 2, "items": {
                                          "type": "array", "maxItems": 2, "items": {"type": "number"}}}}},
    {"type": "object", "properties": {'say "hi"\\': {"type": "string", "maxLength": 5},
                                      "naïve 名": {"enum": ["é", "名前", ""]}}},
    {"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {"type": "object", "properties": {
        "c": {"type": "string", "minLength": 3}}}}}}},
    {"type": "object", "properties": {"level": {"type": "string", "enum": ["low", "lower", "lowest"]},
                                      "score": {"type": "number"}, "count": {"type": "integer"},
                                      "flags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3}}},
]


def _prompts(engine) -> list[list[int]]:
    return [engine.encode_chat([{"role": "user", "content": "Give me the JSON object."}]),
            engine.encode_completion("# settings\nconfig = "),
            engine.encode_completion("x")]


def _requests(engine, prompts=2, samplers=("reference", "threshold"), temperatures=(0.0, 1.0), **params):
    requests, schemas = [], []
    for seed, (schema, prompt, sampler, temperature) in enumerate(
            itertools.product(SCHEMAS, _prompts(engine)[:prompts], samplers, temperatures)):
        sampling = SamplingParams(sampler=sampler, temperature=temperature, seed=seed, **params)
        requests.append(structured_request(engine, schema, GenerationRequest(prompt, sampling)))
        schemas.append(schema)
    return requests, schemas


def _assert_valid(engine, requests, schemas, results):
    for request, schema, result in zip(requests, schemas, results, strict=True):
        jsonschema.validate(json.loads(result.text), schema)  # raises on the first that does not fit
        assert result.finish_reason == "stop"
        canvas = request.structured.canvas
        tokens = torch.tensor(result.token_ids)
        assert len(tokens) == len(canvas.template)
        fixed = canvas.classes < 0
        assert tokens[fixed].tolist() == [t for t in canvas.template if t is not None]
        # Each hole position's token is one its mask allows: the masks do the work, not the rendering.
        assert canvas.masks[canvas.classes[~fixed], tokens[~fixed]].all()


@pytest.fixture(scope="module")
def shipped():
    return Engine(load_model(str(BUILTIN_MODEL_PATH)), max_batch_size=32)


def test_every_output_of_the_shipped_model_fits_its_schema(shipped):
    """12 schemas x 2 prompts x reference and threshold x temperatures 0 and 1: 96 lines, 100% valid."""
    requests, schemas = _requests(shipped, block_length=16, steps=2)  # 8 tokens a step: fewer passes
    _assert_valid(shipped, requests, schemas, shipped.generate(requests))


@pytest.fixture(scope="module")
def llada(tmp_path_factory):
    return load_model(str(save_tiny("llada", tmp_path_factory.mktemp("llada") / "llada")))


@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
def test_every_output_of_a_tiny_random_llada_fits_its_schema(llada, cache):
    engine = Engine(llada, max_batch_size=32, cache=cache)
    requests, schemas = _requests(engine, block_length=16, steps=4)
    _assert_valid(engine, requests, schemas, engine.generate(requests))


@pytest.mark.parametrize("cache, graphs", [("exact", False), ("exact", True), ("delayed", False), ("none", False)])
def test_every_cache_and_sampler_of_the_block_scheduler_honours_the_masks(loaded, cache, graphs):
    """The tiny random built-in model (byte tokenizer): exact, delayed and recomputing caches, the captured
    greedy loop's code path (graphs on a CPU), and the factor sampler too."""
    engine = Engine(loaded, max_batch_size=16, cache=cache, graphs=graphs)
    requests, schemas = _requests(engine, prompts=1, samplers=("reference", "threshold", "factor"), block_length=8)
    _assert_valid(engine, requests, schemas, engine.generate(requests))


@pytest.mark.parametrize("family, samplers, options", [
    ("sdar", ("reference", "threshold"), {}),  # aligned: a prompt's lead opens the first block
    ("llada2", ("threshold",), {"editing_threshold": 0.1}),  # aligned, and edits committed tokens
    ("dream", ("reference", "threshold"), {}),  # full attention, logits read one position back
])
def test_aligned_editing_and_shifted_families_honour_the_masks(request, tmp_path, family, samplers, options):
    if family == "dream":
        loaded = load_model(str(save_tiny("dream", tmp_path / "dream")))
    else:
        loaded = request.getfixturevalue(family)[0]
    engine = Engine(loaded, max_batch_size=16)
    requests, schemas = _requests(engine, prompts=1, samplers=samplers, block_length=4 if family != "dream" else 8,
                                  **options)
    _assert_valid(engine, requests, schemas, engine.generate(requests))


def test_a_structured_row_gets_the_tokens_it_gets_alone_beside_other_kinds_of_rows(loaded):
    """Rows of two schemas, a healed row and a free row in one batch, joining as others leave: each
    row's tokens are the ones it gets alone (the rows' mask tables are laid side by side per block)."""
    engine = Engine(loaded, max_batch_size=3)
    prompt = engine.encode_completion("def f(a):")
    requests = [structured_request(engine, SCHEMAS[i % 3 + 5], GenerationRequest(
        prompt[: 2 + i], SamplingParams(temperature=1.0, seed=i, block_length=8))) for i in range(4)]
    requests.insert(1, GenerationRequest(prompt, SamplingParams(max_tokens=12, block_length=8),
                                         healing=Healing(text="x", allowed=(7 + ord("x"),))))
    requests.insert(3, GenerationRequest(prompt, SamplingParams(max_tokens=20, block_length=8)))
    together = engine.generate(requests)
    alone = [engine.generate([request])[0] for request in requests]
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]
    assert together[1].token_ids[0] == 7 + ord("x")


def test_token_classes_are_built_once_per_engine_and_canvases_once_per_schema(loaded, monkeypatch):
    engine = Engine(loaded)
    built = []
    original = TokenClasses.__init__

    def counting(self, *args, **kwargs):
        built.append(1)
        original(self, *args, **kwargs)

    monkeypatch.setattr(TokenClasses, "__init__", counting)
    prompt = engine.encode_completion("x")
    first = structured_request(engine, SCHEMAS[1], GenerationRequest(prompt, SamplingParams()))
    again = structured_request(engine, SCHEMAS[1], GenerationRequest(prompt, SamplingParams(seed=1)))
    other = structured_request(engine, SCHEMAS[2], GenerationRequest(prompt, SamplingParams()))
    assert len(built) == 1
    assert first.structured.canvas is again.structured.canvas is not other.structured.canvas
    assert first.params.max_tokens == len(first.template_ids) == len(first.structured.canvas.template)


def test_unsupported_schemas_and_conflicting_options_are_refused_by_name(loaded):
    engine = Engine(loaded)
    prompt = engine.encode_completion("x")
    schema = {"type": "object", "properties": {"tags": {"type": "array", "maxItems": 2,
                                                        "items": {"oneOf": [{"type": "string"}]}}}}
    with pytest.raises(InvalidRequest, match=r"properties\.tags\.items\.oneOf") as error:
        structured_request(engine, schema, GenerationRequest(prompt, SamplingParams()))
    assert error.value.param == "response_format"
    with pytest.raises(InvalidRequest) as error:
        structured_request(engine, SCHEMAS[0], GenerationRequest(prompt, SamplingParams(stop=("}",))))
    assert error.value.param == "stop"
    healed = GenerationRequest(prompt, SamplingParams(), healing=Healing(text="x", allowed=(1,)))
    with pytest.raises(InvalidRequest) as error:
        structured_request(engine, SCHEMAS[0], healed)
    assert error.value.param == "diffusion.token_healing"


def test_a_canvas_longer_than_the_model_is_a_context_length_error_naming_response_format(loaded):
    engine = Engine(loaded)
    engine.max_positions = 64
    request = structured_request(engine, SCHEMAS[7], GenerationRequest([1, 2], SamplingParams()))
    with pytest.raises(InvalidRequest, match="response_format"):
        engine.check(request)


def test_a_request_altered_after_it_was_made_is_refused(loaded):
    engine = Engine(loaded)
    request = structured_request(engine, SCHEMAS[0], GenerationRequest([1, 2], SamplingParams()))
    with pytest.raises(InvalidRequest) as error:
        engine.check(dataclasses.replace(request, template_ids=[None] * len(request.template_ids)))
    assert error.value.param == "response_format"


def test_diffusion_gemma_refuses_structured_output_naming_response_format(tmp_path, loaded):
    from worker.engine.diffusion_gemma.tiny import create_tiny_diffusion_gemma
    from worker.engine.factory import make_engine

    gemma = make_engine(load_model(str(create_tiny_diffusion_gemma(tmp_path / "dg", canvas_length=8))))
    prompt = gemma.encode_completion("x")
    with pytest.raises(InvalidRequest) as error:
        structured_request(gemma, SCHEMAS[0], GenerationRequest(prompt, SamplingParams()))
    assert error.value.param == "response_format"
    made_elsewhere = structured_request(Engine(loaded), SCHEMAS[0], GenerationRequest(prompt, SamplingParams()))
    with pytest.raises(InvalidRequest) as error:
        gemma.check(made_elsewhere)
    assert error.value.param == "response_format"
