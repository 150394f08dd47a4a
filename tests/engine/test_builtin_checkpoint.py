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
