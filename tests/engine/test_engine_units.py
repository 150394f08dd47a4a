"""Building blocks: the transfer schedule, top-k by rank, nucleus filter, layout, stop/EOS cuts."""

import pytest
import torch

from worker.engine.builtin.tokenizer import build_byte_tokenizer
from worker.engine.engine import Engine
from worker.engine.layout import build_layout
from worker.engine.params import GenerationRequest, SamplingParams
from worker.engine.postprocess import apply_stop, covering_prefix, cut_at_eos, finish_row
from worker.engine.sampling.predict import predict_x0, repetition_penalty, token_counts, top_p_filter
from worker.engine.sampling.transfer import num_transfer_schedule, select_transfer


def test_schedule_splits_block_evenly_remainder_first():
    assert num_transfer_schedule(32, [32]) == [[1] * 32]
    assert num_transfer_schedule(32, [5, 2, 1]) == [
        [7, 7, 6, 6, 6], [16, 16, 0, 0, 0], [32, 0, 0, 0, 0],
    ]
    assert all(sum(row) == 32 for row in num_transfer_schedule(32, [3, 7, 32]))


def test_select_transfer_takes_top_k_masked_per_row():
    confidence = torch.tensor([[0.1, 0.9, 0.5, 0.7], [0.4, 0.3, 0.2, 0.1]], dtype=torch.float64)
    mask_index = torch.tensor([[True, False, True, True], [True, True, True, True]])
    transfer = select_transfer(confidence, mask_index, torch.tensor([2, 1]))
    assert transfer.tolist() == [[False, False, True, True], [True, False, False, False]]
    none = select_transfer(confidence, mask_index, torch.tensor([0, 0]))
    assert not none.any()


def test_top_p_filter_keeps_nucleus_only_for_sampling_rows():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64)
    logits = probs.log().expand(3, 1, 4)  # (B, K, V)
    filtered = top_p_filter(logits, torch.tensor([1.0, 1.0, 0.0]).double(), torch.tensor([0.7, 0.85, 0.1]).double())
    kept = torch.isfinite(filtered[:, 0]).tolist()
    assert kept[0] == [True, True, False, False]  # 0.5 < 0.7 so the second token is still needed
    assert kept[1] == [True, True, True, False]  # 0.8 < 0.85 needs the third
    assert kept[2] == [True, True, True, True]  # temperature 0: argmax, no filtering


def test_layout_pads_left_and_builds_block_causal_mask():
    layout = build_layout([[5, 6, 7], [8]], gen_length=4, block_length=2, pad_token_id=0,
                          mask_token_id=3, device="cpu")
    assert layout.x.tolist() == [[5, 6, 7, 3, 3, 3, 3], [0, 0, 8, 3, 3, 3, 3]]
    assert layout.position_ids.tolist() == [[0, 1, 2, 3, 4, 5, 6], [0, 0, 0, 1, 2, 3, 4]]
    assert layout.num_blocks == 2 and layout.block_span(1) == (5, 7)
    mask = layout.attention_mask[:, 0].int().tolist()
    # Row 0: the prompt block (cols 0-2) sees itself; block 1 (cols 3-4) sees prompt + itself ...
    assert mask[0][0] == [1, 1, 1, 0, 0, 0, 0]
    assert mask[0][3] == [1, 1, 1, 1, 1, 0, 0]
    assert mask[0][6] == [1, 1, 1, 1, 1, 1, 1]
    # ... and row 1 never attends to its two padding columns.
    assert mask[1][2] == [0, 0, 1, 0, 0, 0, 0]
    assert mask[1][5] == [0, 0, 1, 1, 1, 1, 1]
    with pytest.raises(ValueError, match="multiple of block_length"):
        build_layout([[1]], gen_length=3, block_length=2, pad_token_id=0, mask_token_id=3, device="cpu")


def test_apply_stop_cuts_at_earliest_stop():
    assert apply_stop("abc STOP def END", ("END", "STOP")) == ("abc ", True)
    assert apply_stop("abc", ("x",)) == ("abc", False)
    assert apply_stop("abc", ()) == ("abc", False)
    assert apply_stop("STOP", ("STOP",)) == ("", True)


def test_cut_at_eos():
    assert cut_at_eos([5, 6, 2, 7, 2], (2,)) == ([5, 6], True)
    assert cut_at_eos([5, 6], (2,)) == ([5, 6], False)
    assert cut_at_eos([5, 6], ()) == ([5, 6], False)
    assert cut_at_eos([5, 9, 6, 2], (2, 9)) == ([5], True)  # the first of any end token


@pytest.fixture(scope="module")
def tokenizer():
    return build_byte_tokenizer()


def test_finish_row_orders_max_tokens_eos_stop(tokenizer):
    ids = tokenizer("héllo wörld STOP more", add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    row = finish_row(ids + [eos, 50], max_tokens=100, eos_token_ids=(eos,), stop=("STOP",), tokenizer=tokenizer)
    assert (row.text, row.finish_reason) == ("héllo wörld ", "stop")
    assert row.token_ids == tokenizer("héllo wörld ", add_special_tokens=False)["input_ids"]
    row = finish_row(ids + [eos], max_tokens=100, eos_token_ids=(eos,), stop=(), tokenizer=tokenizer)
    assert (row.text, row.finish_reason, row.token_ids) == ("héllo wörld STOP more", "stop", ids)
    row = finish_row(ids + [eos], max_tokens=3, eos_token_ids=(eos,), stop=(), tokenizer=tokenizer)
    assert (row.token_ids, row.finish_reason) == (ids[:3], "length")  # EOS beyond max_tokens


def test_covering_prefix_keeps_straddling_multibyte_token(tokenizer):
    ids = tokenizer("aé", add_special_tokens=False)["input_ids"]  # é is two byte tokens
    assert len(ids) == 3
    assert covering_prefix(tokenizer, ids, "a") == ids[:1]
    assert covering_prefix(tokenizer, ids, "aé") == ids
    assert covering_prefix(tokenizer, ids, "") == []


# ---- token healing -------------------------------------------------------------------------------

def test_the_healer_gives_back_a_last_token_that_longer_tokens_extend():
    from transformers import AutoTokenizer

    from common.settings import BUILTIN_MODEL_PATH
    from worker.engine.healing import TokenHealer

    tokenizer = AutoTokenizer.from_pretrained(BUILTIN_MODEL_PATH)
    healer = TokenHealer(tokenizer, len(tokenizer))
    ids = tokenizer("def f(x):\n    y = 1\n")["input_ids"]
    healed_ids, healing = healer.heal(ids)
    assert healed_ids == ids[:-1] and healing.text == "\n"
    spellings = [tokenizer.decode([t]) for t in healing.allowed]
    assert "\n" in spellings and "\n   " in spellings and all(s.startswith("\n") for s in spellings)
    assert tokenizer.eos_token_id not in healing.allowed
    # A prompt that ends in a special token is left alone.
    ends_special = ids + [tokenizer.eos_token_id]
    assert healer.heal(ends_special) == (ends_special, None)


def test_no_healing_with_a_tokenizer_whose_tokens_spell_differently_alone():
    """SentencePiece-style decoding drops a lone token's leading space: healing there would repeat
    or lose text, so the healer leaves such prompts alone."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from worker.engine.healing import TokenHealer

    vocab = {"<unk>": 0, "▁the": 1, "▁there": 2, "▁cat": 3, "the": 4}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    ids = tokenizer("cat the", add_special_tokens=False)["input_ids"]
    assert ids == [3, 1]
    assert TokenHealer(tokenizer, len(vocab)).heal(ids) == (ids, None)


@pytest.mark.parametrize("kv_cache", [True, False], ids=["kv-cache", "canvas-recompute"])
def test_a_healed_request_starts_with_an_allowed_token_and_reports_text_after_the_healed_part(loaded, kv_cache):
    from worker.engine.params import Healing

    engine = Engine(loaded, max_batch_size=4, kv_cache=kv_cache)
    x, y = engine.tokenizer.convert_tokens_to_ids(["x", "y"])
    healing = Healing(text="x", allowed=(x,))
    prompt = engine.encode_completion("def f():\n    return ")
    requests = [GenerationRequest(prompt, SamplingParams(max_tokens=12, seed=s, temperature=1.0), healing=healing)
                for s in range(4)]
    requests.append(GenerationRequest(prompt, SamplingParams(max_tokens=12, seed=0, stop=("x",)), healing=healing))
    results = engine.generate(requests)
    for result in results[:4]:
        assert result.token_ids[0] == x  # a random model would pick "x" first 1 time in ~260
        assert result.text == engine.tokenizer.decode(result.token_ids, skip_special_tokens=True)[1:]
    # The healed "x" belongs to the prompt: a stop string "x" is searched for after it.
    stopped = results[4]
    assert stopped.token_ids[0] == x and "x" not in stopped.text
    assert engine.tokenizer.decode(stopped.token_ids, skip_special_tokens=True).startswith("x" + stopped.text)


# ---- frequency and presence penalties ------------------------------------------------------------

def test_sampling_does_not_overflow_on_large_logits():
    """Gumbel-max samples from the logits' differences: adding a constant changes no draw, even one
    past exp()'s range (a negative frequency penalty adds 2 a repeat: 355 repeats pass 709)."""
    torch.manual_seed(0)
    logits = torch.randn(2, 16, 50, dtype=torch.float64) * 3
    u = torch.rand(2, 16, 50, dtype=torch.float64)
    denominator = -torch.log(u)  # temperature 1
    temperature = torch.tensor([1.0, 1.0], dtype=torch.float64)
    draws = [predict_x0(logits + shift, temperature, None, denominator, mask_token_id=49)[0]
             for shift in (0.0, 1000.0)]
    assert torch.equal(draws[0], draws[1])
    assert len(set(draws[0].flatten().tolist())) > 5  # the draws differ by position: real sampling


def test_penalties_count_generated_tokens_per_occurrence_and_presence():
    ids = torch.tensor([[3, 3, 5, 0], [1, 2, 2, 2]])
    counted = torch.tensor([[True, True, True, False], [True, True, True, True]])
    counts = token_counts(ids, counted, vocab_size=6)
    assert counts.tolist() == [[0, 0, 0, 2, 0, 1], [0, 1, 3, 0, 0, 0]]
    penalty = repetition_penalty(counts, frequency=torch.tensor([0.5, 0.0], dtype=torch.float64),
                                 presence=torch.tensor([0.0, 1.5], dtype=torch.float64))
    assert penalty.tolist() == [[0, 0, 0, 1.0, 0, 0.5], [0, 1.5, 1.5, 0, 0, 0]]


def test_a_penalised_request_gives_the_same_tokens_in_both_engine_paths(loaded):
    """The penalty counts earlier blocks and this block's committed positions: the KV-cache scheduler
    and the canvas scheduler (recomputation) must count the same, alone or batched."""
    prompts = ["def f(x):\n", "class A:\n    pass\n", "x"]
    params = [SamplingParams(max_tokens=40, block_length=8, frequency_penalty=1.5, presence_penalty=0.5),
              SamplingParams(max_tokens=24, block_length=8, presence_penalty=2.0, temperature=0.8, seed=3),
              SamplingParams(max_tokens=40, block_length=8)]
    outputs = []
    for kv_cache in (True, False):
        engine = Engine(loaded, max_batch_size=2, kv_cache=kv_cache)
        requests = [GenerationRequest(engine.encode_completion(p), q) for p, q in zip(prompts, params, strict=False)]
        batched = [r.token_ids for r in engine.generate(requests)]
        assert batched == [engine.generate([r])[0].token_ids for r in requests]
        outputs.append(batched)
    assert outputs[0] == outputs[1]
    unpenalised = Engine(loaded).generate([GenerationRequest(Engine(loaded).encode_completion(prompts[0]),
                                                             SamplingParams(max_tokens=40, block_length=8))])
    assert unpenalised[0].token_ids != outputs[0][0]  # the penalty changed what was written


def test_a_prefilled_cache_holds_only_its_keys_and_values(loaded):
    """Keys and values come out of larger projection tensors; the cache must not keep those alive
    (it held 2.6x its size for the built-in model, 1.8 GB more at 32 prompts of 1.9K tokens)."""
    prompts = [[5] * 30, [6] * 20]
    ids = torch.tensor([p + [0] * (30 - len(p)) for p in prompts])
    with torch.inference_mode():
        output = loaded.model(input_ids=ids, use_cache=True, logits_to_keep=1)
    for keys, values in output.key_values:
        for tensor in (keys, values):
            assert tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()


def test_rounds_write_the_running_cache_in_place(loaded):
    """The cache has room for every block the rows still have to denoise: a round where no row
    leaves or joins must not copy it (a copy a round held it twice at once)."""
    engine = Engine(loaded, max_batch_size=4)
    scheduler = engine.scheduler
    requests = [GenerationRequest([5 + i] * (10 + i), SamplingParams(max_tokens=3 * 8, block_length=8))
                for i in range(3)]
    with torch.inference_mode():
        batch = scheduler._prefill(scheduler._new_rows(list(enumerate(requests)), 8), 8)
        buffers = [k.data_ptr() for k, _ in batch.key_values]
        for _ in range(3):
            scheduler._denoise_round(batch, 8)
            batch.keep([True] * len(batch.rows))
            assert [k.data_ptr() for k, _ in batch.key_values] == buffers
    assert all(len(row.generated) == 24 for row in batch.rows)
