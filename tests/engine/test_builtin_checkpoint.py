"""The trained built-in checkpoint shipped in the repository: it loads offline through the worker's
loader, its tokenizer round-trips text, and it writes Python."""

from __future__ import annotations

import pytest

from common.settings import BUILTIN_MODEL_PATH, Settings
from worker.engine.engine import Engine
from worker.engine.loader import load_model
from worker.engine.params import GenerationRequest, SamplingParams

MAX_CHECKPOINT_MB = 40


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


def test_it_continues_a_function_with_python(shipped):
    engine = Engine(shipped)
    prompt = 'def read_lines(path):\n    """Return the lines of the file at path."""\n'
    [result] = engine.generate([GenerationRequest(engine.encode_completion(prompt),
                                                  SamplingParams(max_tokens=64))])
    assert result.completion_tokens == 64 or result.finish_reason == "stop"
    lines = [line for line in result.text.splitlines() if line.strip()]
    assert lines, result.text
    # Python words, not noise: the model learnt the language's vocabulary and indentation.
    words = set(result.text.replace("(", " ").replace(")", " ").split())
    assert words & {"return", "if", "for", "with", "in", "=", "self", "not", "None"}, result.text
    assert any(line.startswith("    ") for line in lines), result.text
