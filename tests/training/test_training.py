"""Training the built-in model: tokenizer, objective, a few real steps, resume, and the export."""

from __future__ import annotations

import json

import pytest
import torch

from training.corpus import is_held_out, list_sources, split
from training.loop import TrainConfig, train
from training.objective import block_ids, two_stream_mask
from training.tokenizer import train_bpe_tokenizer
from worker.engine.engine import Engine
from worker.engine.loader import load_model
from worker.engine.params import GenerationRequest, SamplingParams

CODE = '''def add_{i}(a, b):
    """Return the sum of a and b plus {i}."""
    total = a + b
    return total + {i}


class Counter{i}:
    def __init__(self):
        self.count = {i}

    def bump(self):
        self.count += 1
        return self.count
'''

TINY = dict(vocab_size=320, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
            block_length=8, seq_length=64, batch_size=8, warmup_steps=5, eval_every=10**6, eval_windows=8,
            learning_rate=3e-3)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    for i in range(40):
        (root / f"mod_{i}.py").write_text(CODE.format(i=i))
    (root / "tests").mkdir()
    (root / "tests" / "mod_x.py").write_text("excluded = True\n")
    (root / "test_skip.py").write_text("excluded = True\n")
    return root


def test_corpus_leaves_out_tests_and_holds_out_a_stable_share(corpus):
    sources = list_sources(corpus)
    names = [s.name for s in sources]
    assert len(names) == 40 and all(n.startswith("mod_") for n in names)
    train_files, held_out = split(sources)
    assert held_out and len(train_files) + len(held_out) == 40
    assert [s.name for s in held_out] == [n for n in names if is_held_out(n)]


def test_bpe_tokenizer_round_trips_text_and_keeps_the_special_ids(corpus):
    tokenizer = train_bpe_tokenizer([s.text for s in list_sources(corpus)], vocab_size=320)
    text = 'def f(x):\n\treturn "héllo, 世界" + x  # ünïcode\n'
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id == 1
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.mask_token_id) == (0, 2, 3)
    # Merges learnt from the corpus: a frequent line is fewer tokens than bytes.
    assert len(tokenizer("        return total")["input_ids"]) < 8


def test_two_stream_mask_lets_noisy_blocks_see_only_their_block_and_clean_history():
    blocks = block_ids(6, prompt_length=2, block_length=2)  # prompt, block 1, block 2
    assert blocks.tolist() == [0, 0, 1, 1, 2, 2]
    mask = two_stream_mask(blocks)[0, 0]
    noisy_block1, clean = 2, slice(6, 12)
    assert mask[noisy_block1, :6].tolist() == [False, False, True, True, False, False]
    assert mask[noisy_block1, clean].tolist() == [True, True, False, False, False, False]
    clean_block1 = 6 + 2
    assert not mask[clean_block1, :6].any()
    assert mask[clean_block1, clean].tolist() == [True, True, True, True, False, False]


def _evals(out_dir):
    return [r for r in map(json.loads, (out_dir / "log.jsonl").read_text().splitlines()) if "eval" in r]


def test_a_few_steps_lower_the_held_out_loss_and_the_export_serves(corpus, tmp_path):
    torch.set_num_threads(1)
    result = train(TrainConfig(out_dir=tmp_path, steps=40, corpus_root=corpus, **TINY))
    evals = _evals(tmp_path)
    assert evals[0]["step"] == 0 and result["step"] == 40
    assert result["masked_ce"] < evals[0]["eval"]["masked_ce"] - 1.0  # ln(320) = 5.8 at the start

    loaded = load_model(str(tmp_path / "model"))  # the worker's path: safetensors + tokenizer files
    assert loaded.name == "diffbatch-py-mini" and loaded.family == "block_causal"
    engine = Engine(loaded)
    params = SamplingParams(max_tokens=16, block_length=8)
    [out] = engine.generate([GenerationRequest(engine.encode_completion("def add_3(a, b):\n"), params)])
    assert out.completion_tokens > 0 and isinstance(out.text, str)


def test_training_is_reproducible_and_resumes_where_it_stopped(corpus, tmp_path):
    torch.set_num_threads(1)
    straight = train(TrainConfig(out_dir=tmp_path / "a", steps=20, corpus_root=corpus, **TINY))
    again = train(TrainConfig(out_dir=tmp_path / "b", steps=20, corpus_root=corpus, **TINY))
    assert straight == again

    resumed = train(TrainConfig(out_dir=tmp_path / "a", steps=30, corpus_root=corpus, **TINY))
    assert resumed["step"] == 30
    state = torch.load(tmp_path / "a" / "state.pt", weights_only=True)
    assert state["step"] == 30
    logged_steps = [json.loads(line)["step"] for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert logged_steps.count(0) == 1  # the baseline is not evaluated again on resume


def test_a_run_can_start_from_an_exported_model(corpus, tmp_path):
    """--init-from: the new run begins where the exported model is (not at a random start), with its tokenizer."""
    torch.set_num_threads(1)
    first = train(TrainConfig(out_dir=tmp_path / "a", steps=30, corpus_root=corpus, **TINY))
    fresh = _evals(tmp_path / "a")[0]["eval"]["masked_ce"]
    go_on = train(TrainConfig(out_dir=tmp_path / "b", steps=10, seed=1, corpus_root=corpus,
                              init_from=tmp_path / "a" / "model", **TINY))
    start = _evals(tmp_path / "b")[0]["eval"]["masked_ce"]
    assert abs(start - first["masked_ce"]) < 0.05  # the bf16 export, evaluated again
    assert start < fresh - 1.0 and go_on["step"] == 10
    assert (tmp_path / "b" / "tokenizer" / "tokenizer.json").read_text() == \
        (tmp_path / "a" / "model" / "tokenizer.json").read_text()


def test_the_autoregressive_twin_trains_on_the_same_data_and_generates_with_a_kv_cache(corpus, tmp_path):
    """--objective ar: a Llama model of the same shape and tokenizer, which transformers' generate() runs."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    twin_dir, diffusion_dir = tmp_path / "ar", tmp_path / "mdm"
    train(TrainConfig(out_dir=diffusion_dir, steps=2, corpus_root=corpus, **TINY))
    result = train(TrainConfig(out_dir=twin_dir, steps=40, corpus_root=corpus, objective="ar",
                               tokenizer_from=diffusion_dir / "model", **TINY))
    evals = _evals(twin_dir)
    assert result["masked_ce"] < evals[0]["eval"]["masked_ce"] - 1.0  # next-token loss fell from ~ln(320)
    same_ids = (diffusion_dir / "model" / "tokenizer.json").read_text()
    assert (twin_dir / "model" / "tokenizer.json").read_text() == same_ids

    twin = AutoModelForCausalLM.from_pretrained(twin_dir / "model")
    assert twin.config.model_type == "llama" and twin.config.hidden_size == TINY["hidden_size"]
    tokenizer = AutoTokenizer.from_pretrained(twin_dir / "model")
    prompt = tokenizer("def add_3(a, b):\n", return_tensors="pt")
    out = twin.generate(**prompt, max_new_tokens=12, do_sample=False, use_cache=True)
    no_cache = twin.generate(**prompt, max_new_tokens=12, do_sample=False, use_cache=False)
    assert out.shape[1] > prompt["input_ids"].shape[1] and torch.equal(out, no_cache)

    # The run folder remembers its objective: export reads it back, resuming as the other is refused.
    from training.loop import export_checkpoint

    assert export_checkpoint(TrainConfig(out_dir=twin_dir, **TINY), tmp_path / "again") == 40
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "again").config.model_type == "llama"
    with pytest.raises(ValueError, match="--objective ar"):
        train(TrainConfig(out_dir=twin_dir, steps=41, corpus_root=corpus, **TINY))
