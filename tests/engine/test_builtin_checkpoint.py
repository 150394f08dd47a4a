"""The trained built-in checkpoint shipped in the repository: it loads offline through the worker's
loader, its tokenizer round-trips text, and it writes Python."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from common.settings import BUILTIN_MODEL_PATH, Settings
from worker.engine.engine import Engine
from worker.engine.loader import load_model
from worker.engine.params import GenerationRequest, SamplingParams
from worker.responses import to_generation_request

MAX_CHECKPOINT_MB = 40
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def shipped():
    return load_model(str(BUILTIN_MODEL_PATH))


def test_the_default_model_is_the_shipped_checkpoint(shipped):
    assert Settings().model_path == BUILTIN_MODEL_PATH
    assert shipped.name == Settings().served_model_name == "diffbatch-py-mini"
    assert shipped.family == "block_causal"
    size = sum(p.stat().st_size for p in BUILTIN_MODEL_PATH.iterdir()) / 2**20
    assert size <= MAX_CHECKPOINT_MB
    assert (BUILTIN_MODEL_PATH / "README.md").is_file()  # the model card ships with it


def test_tokenizer_round_trips_text(shipped):
    text = 'def área(r: float) -> float:\n\t"""π r², 面积"""\n    return 3.14159 * r ** 2\n'
    ids = shipped.tokenizer(text)["input_ids"]
    assert shipped.tokenizer.decode(ids, skip_special_tokens=True) == text
    code = "    for key, value in sorted(self.items()):\n        if value is not None:\n            return key\n"
    assert len(shipped.tokenizer(code)["input_ids"]) < len(code) / 3  # merges learnt on Python source


def _looks_like_python(text: str) -> bool:
    words = set(text.replace("(", " ").replace(")", " ").split())
    indented = any(line.startswith("    ") and line.strip() for line in text.splitlines())
    return indented and bool(words & {"return", "if", "for", "with", "in", "=", "self", "not", "None", "def"})


def test_it_continues_functions_with_python(shipped):
    """A weak model (see its card): it often repeats comment lines, but on most of the demo's
    prompts it writes indented Python; random weights write none."""
    engine = Engine(shipped)
    lines = [json.loads(line) for line in (REPO / "examples" / "batch.jsonl").read_text().splitlines()[:8]]
    requests = [GenerationRequest(engine.encode_completion(line["body"]["prompt"]),
                                  SamplingParams(max_tokens=64, seed=i)) for i, line in enumerate(lines)]
    results = engine.generate(requests)
    assert all(r.completion_tokens == 64 or r.finish_reason == "stop" for r in results)
    assert sum(_looks_like_python(r.text) for r in results) >= 4, [r.text for r in results]


def test_requests_that_name_no_block_get_the_checkpoints_and_steps_are_checked_against_it(shipped):
    """The shipped config.json names block 16 (bench/quality.py: the parse share of block 32 within
    2 points, about 1.8x the tokens/s at batch 32); a request may still name its own block."""
    engine = Engine(shipped)
    assert engine.default_block_length == 16
    body = {"model": "diffbatch-py-mini", "prompt": "def f(x):\n", "max_tokens": 8}
    assert to_generation_request(engine, "/v1/completions", body).params.block_length == 16
    named = to_generation_request(engine, "/v1/completions", {**body, "diffusion": {"block_length": 32}})
    assert named.params.block_length == 32
    with pytest.raises(ValueError, match=r"diffusion.steps must be an integer in \[1, block_length=16\]"):
        to_generation_request(engine, "/v1/completions", {**body, "diffusion": {"steps": 24}})


def _demo_requests(engine, *, healing: bool):
    lines = [json.loads(line) for line in (REPO / "examples" / "batch.jsonl").read_text().splitlines()[:8]]
    return [to_generation_request(engine, "/v1/completions", {**line["body"], "max_tokens": 32, "seed": i,
                                                               "diffusion": {"token_healing": healing}})
            for i, line in enumerate(lines)]


def test_token_healing_lets_it_continue_the_function_body(shipped):
    """The demo prompts end with a newline inside a function. Tokenised as is, that newline is a
    lone token, which in training only ever preceded a line at the left margin, so the model starts
    a new top-level line. Healed (the service default), the completion continues the indented body."""
    engine = Engine(shipped)
    healed = engine.generate(_demo_requests(engine, healing=True))
    raw = engine.generate(_demo_requests(engine, healing=False))
    indented = lambda results: sum(r.text.startswith("    ") for r in results)  # noqa: E731
    assert indented(healed) >= 6, [r.text for r in healed]
    assert indented(raw) <= 2, [r.text for r in raw]
    # The given-back newline is generated again but not reported: the text continues the prompt.
    assert all(engine.tokenizer.decode(r.token_ids, skip_special_tokens=True) == "\n" + r.text for r in healed)
