"""Engine behaviour: batching invariance, lengths, EOS, stop strings, request checks."""

import dataclasses

import pytest
from torch import nn

from worker.engine.caches.exact import ExactRound
from worker.engine.engine import Engine
from worker.engine.loader import load_model
from worker.engine.params import GenerationRequest, Healing, SamplingParams
from worker.engine.sampling import blocks
from worker.engine.schedulers import block as scheduler
from worker.engine.schedulers.block import prefill_spans

from .preferring import Preferring

MIXED = [
    ("a", dict(max_tokens=40, temperature=0.0, seed=None)),
    ("a much longer prompt than the others", dict(max_tokens=7, temperature=1.0, seed=3)),
    ("mid length", dict(max_tokens=64, temperature=0.8, seed=11, steps=4)),
    ("ünïcode ✓", dict(max_tokens=33, temperature=1.2, seed=5, top_p=0.9)),
    ("short", dict(max_tokens=1, temperature=0.0, seed=2, steps=16)),
]


def requests_for(engine, specs):
    return [GenerationRequest(engine.encode_completion(t), SamplingParams(**kw)) for t, kw in specs]


def test_batch_of_n_equals_n_batches_of_one(engine):
    requests = requests_for(engine, MIXED)
    batched = engine.generate(requests)
    for request, together in zip(requests, batched, strict=False):
        alone = engine.generate([request])[0]
        assert together.token_ids == alone.token_ids
        assert together.text == alone.text
        assert together.finish_reason == alone.finish_reason


def test_steps_over_the_working_rows_alone_change_no_token(engine, monkeypatch):
    """Once some rows have finished their block, a step runs the forward over the others alone
    (sampling/blocks.py): tokens and passes must be those of a forward over the whole batch."""
    requests = requests_for(engine, [*MIXED, ("b", dict(max_tokens=48, sampler="threshold", threshold=0.3)),
                                     ("c", dict(max_tokens=48, sampler="threshold", threshold=0.05))])
    monkeypatch.setattr(blocks, "SUBSET_SHARE", 0.0)  # never: every step over the whole batch
    whole = engine.generate(requests)
    calls = []
    monkeypatch.setattr(blocks, "SUBSET_SHARE", 1.0)  # as soon as one row has finished its block

    gather = ExactRound.for_rows

    def for_rows(exact, index):
        calls.append(len(index))
        return gather(exact, index)

    monkeypatch.setattr(ExactRound, "for_rows", for_rows)
    subsets = engine.generate(requests)
    assert calls and max(calls) < len(requests)  # the subset path ran
    assert [(r.token_ids, r.forward_passes) for r in subsets] == [(r.token_ids, r.forward_passes) for r in whole]


def test_prompts_prefilled_a_few_rows_a_forward_give_the_same_tokens(engine, monkeypatch):
    """Prefill caps the prompt tokens of a forward (memory); the rows' caches must not depend on it."""
    requests = requests_for(engine, MIXED)
    together = engine.generate(requests)
    monkeypatch.setattr(scheduler, "PREFILL_TOKENS", 1)  # one row a forward
    assert [r.token_ids for r in engine.generate(requests)] == [r.token_ids for r in together]


def test_prefill_spans_hold_at_most_the_budget_and_a_long_prompt_alone():
    assert prefill_spans([3, 3, 3, 5, 5, 20, 2], 10) == [(0, 3), (3, 5), (5, 6), (6, 7)]
    assert prefill_spans([4], 1) == [(0, 1)]


def test_results_keep_input_order_across_batches(loaded):
    small = Engine(loaded, max_batch_size=2)
    specs = MIXED + [("other block size", dict(max_tokens=20, block_length=8, temperature=0.5, seed=1))]
    requests = requests_for(small, specs)
    results = small.generate(requests)
    assert [r.prompt_tokens for r in results] == [len(r.prompt_ids) for r in requests]
    for request, result in zip(requests, results, strict=False):
        assert result.token_ids == small.generate([request])[0].token_ids


def test_max_tokens_and_counts(engine):
    results = engine.generate(requests_for(engine, MIXED))
    for (_, kw), result in zip(MIXED, results, strict=False):
        assert len(result.token_ids) <= kw["max_tokens"]
        assert result.completion_tokens == len(result.token_ids)
        if result.finish_reason == "length":
            assert len(result.token_ids) == kw["max_tokens"]
    assert results[4].token_ids and len(results[4].token_ids) == 1
    # A row counts the passes that worked on it, whatever its batch-mates needed: its steps per block,
    # except in a last block that its max_tokens cuts, where it stops once the positions it keeps are
    # committed (at least the steps that commit that many); fewer if it met EOS.
    for (_, kw), result in zip(MIXED, results, strict=False):
        block = kw.get("block_length", 32)
        steps = kw.get("steps") or block
        whole, kept = divmod(kw["max_tokens"], block)
        full = (whole + (kept > 0)) * steps
        least = whole * steps + -(-kept * steps // block)
        if result.finish_reason == "length":
            assert least <= result.forward_passes <= full
        else:
            assert result.forward_passes <= full


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_a_row_stops_once_the_positions_it_keeps_are_committed(engine, temperature):
    """max_tokens inside a block: the same tokens as the whole block's first ones (what a row keeps
    never changes once committed), in fewer passes than the whole block takes."""
    prompt = engine.encode_completion("def add(a, b):\n")
    whole, cut = (engine.generate([GenerationRequest(prompt, SamplingParams(
        max_tokens=n, block_length=16, temperature=temperature, seed=4))])[0] for n in (32, 21))
    assert whole.finish_reason == cut.finish_reason == "length"
    assert cut.token_ids == whole.token_ids[:21]
    assert 21 <= cut.forward_passes < whole.forward_passes == 32


def test_short_requests_leave_the_batch_early_and_waiting_ones_take_their_place(loaded):
    """Continuous batching: results stream out as rows finish, and a batch of 2 serves 5 requests
    without waiting for its longest row."""
    engine = Engine(loaded, max_batch_size=2)
    specs = [("long one", dict(max_tokens=96)), ("short", dict(max_tokens=5)), ("another short", dict(max_tokens=8)),
             ("mid", dict(max_tokens=40)), ("last", dict(max_tokens=3))]
    requests = requests_for(engine, specs)
    order = [i for i, _ in engine.stream(requests)]
    assert sorted(order) == [0, 1, 2, 3, 4]
    assert order.index(0) == 4  # the 96-token row (3 blocks) finishes last, the others pass it
    alone = [engine.generate([r])[0].token_ids for r in requests]
    assert [r.token_ids for r in engine.generate(requests)] == alone


def test_steps_set_forward_passes(engine):
    prompt = engine.encode_completion("steps")
    result = engine.generate([GenerationRequest(prompt, SamplingParams(max_tokens=96, steps=4))])[0]
    assert result.forward_passes == 3 * 4
    assert len(result.token_ids) == 96 and result.finish_reason == "length"


class EosAtPosition(nn.Module):
    """Wraps the model so that EOS is overwhelmingly likely at one absolute position."""

    def __init__(self, model, eos_id, position):
        super().__init__()
        self.inner, self.eos_id, self.position = model, eos_id, position

    def forward(self, input_ids, attention_mask, position_ids, **kwargs):
        output = self.inner(input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs)
        at = kwargs.get("logits_at")  # the block positions whose logits the engine asked for
        kept_positions = position_ids[:, -output.logits.shape[1]:] if at is None else position_ids.gather(1, at)
        output.logits[..., self.eos_id] += 100.0 * (kept_positions == self.position)
        return output


@pytest.mark.parametrize("kv_cache", [True, False], ids=["kv-cache", "canvas-recompute"])
@pytest.mark.parametrize(("max_tokens", "budget", "most_rows"), [(8, 30, 2), (24, 40, 1)])
def test_the_token_budget_caps_the_rows_of_a_pass(loaded, kv_cache, max_tokens, budget, most_rows):
    """max_batch_tokens bounds rows x columns of the running batch for its whole run (each row's
    remaining blocks reserved), whatever max_batch_size allows; a row waits for room and gets the
    tokens it gets alone. Prompts of 2-5 tokens, block 8: one block each reaches 10-13 columns
    (two rows fit in 30); three blocks reach 26-29, so two rows that would fit the first round
    (2 x 13) would not fit the last (2 x 29 > 40)."""
    widths = []

    def record(_module, args, kwargs, _output) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        mask = kwargs["attention_mask"]
        widths.append((ids.shape[0], mask.shape[-1]))  # rows, and the columns they attend over

    free = Engine(loaded, max_batch_size=8, kv_cache=kv_cache)
    requests = requests_for(free, [(p, dict(max_tokens=max_tokens, block_length=8))
                                   for p in ("a", "bb", "ccc", "dddd")])
    capped = Engine(loaded, max_batch_size=8, kv_cache=kv_cache, max_batch_tokens=budget)
    handle = loaded.model.register_forward_hook(record, with_kwargs=True)
    try:
        results = capped.generate(requests)
    finally:
        handle.remove()
    assert max(rows for rows, _ in widths) == most_rows
    assert all(rows * columns <= budget for rows, columns in widths if rows > 1)
    assert [r.token_ids for r in results] == [r.token_ids for r in free.generate(requests)]


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graph-protocol"])
@pytest.mark.parametrize("kv_cache", [True, False], ids=["kv-cache", "canvas-recompute"])
def test_eos_cuts_output_and_stops_the_row_within_its_block(loaded, kv_cache, graphs):
    """An EOS ends the row at the block boundary, and within the block its passes stop once every
    position before the EOS is committed: the same tokens as a model whose EOS ends nothing, in fewer
    passes than the block."""
    prompt = loaded.tokenizer("eos please")["input_ids"]
    wrapped = dataclasses.replace(
        loaded, model=EosAtPosition(loaded.model, loaded.eos_token_id, len(prompt) + 5)
    )
    request = [GenerationRequest(prompt, SamplingParams(max_tokens=128, block_length=32))]
    result = Engine(wrapped, kv_cache=kv_cache, graphs=graphs and kv_cache).generate(request)[0]
    assert len(result.token_ids) == 5
    assert loaded.eos_token_id not in result.token_ids
    assert result.finish_reason == "stop"
    assert result.completion_tokens == 5

    endless = dataclasses.replace(wrapped, eos_token_ids=(loaded.pad_token_id,))
    full = Engine(endless, kv_cache=kv_cache).generate(
        [GenerationRequest(prompt, SamplingParams(max_tokens=32, block_length=32))])[0]
    assert full.token_ids[:6] == [*result.token_ids, loaded.eos_token_id]
    assert full.forward_passes == 32  # one token a pass: the whole block
    # The EOS (certain) is committed first, then the five before it, among the block's other masks.
    assert 6 <= result.forward_passes < 32

    # A batch-mate whose prompt covers that position decodes on, and each row gets its tokens alone.
    mate = GenerationRequest(loaded.tokenizer("a longer prompt that has no eos")["input_ids"],
                             SamplingParams(max_tokens=40, block_length=32))
    batched = Engine(wrapped, kv_cache=kv_cache, graphs=graphs and kv_cache).generate([*request, mate])
    alone = Engine(wrapped, kv_cache=kv_cache).generate([mate])[0]
    assert [r.token_ids for r in batched] == [result.token_ids, alone.token_ids]
    assert len(alone.token_ids) == 40 and batched[0].forward_passes == result.forward_passes


@pytest.mark.parametrize("kv_cache", [True, False], ids=["kv-cache", "canvas-recompute"])
def test_any_end_token_ends_the_completion(loaded, kv_cache):
    """A chat checkpoint ends turns with a token its config may not list as eos (LLaDA's <|eot_id|>):
    every id in eos_token_ids ends the row, in both engine paths."""
    turn_end = loaded.tokenizer.convert_tokens_to_ids("~")  # any non-special id stands in for it
    prompt = loaded.tokenizer("turn end please")["input_ids"]
    wrapped = dataclasses.replace(loaded, model=EosAtPosition(loaded.model, turn_end, len(prompt) + 3),
                                  eos_token_ids=(loaded.eos_token_id, turn_end))
    result = Engine(wrapped, kv_cache=kv_cache).generate([GenerationRequest(prompt, SamplingParams(max_tokens=96))])[0]
    assert len(result.token_ids) == 3 and result.finish_reason == "stop"
    assert result.forward_passes < 32  # stopped within the block that ended, as at an eos_token_id


def test_the_loader_reads_every_end_token(tiny_path, tmp_path):
    import json
    import shutil

    from transformers import AutoTokenizer

    folder = tmp_path / "chat-model"
    shutil.copytree(tiny_path, folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_end|>"]})
    tokenizer.save_pretrained(folder)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 5]}))
    loaded = load_model(str(folder))
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert loaded.eos_token_ids == (2, 5, im_end) and loaded.eos_token_id == 2


def test_a_checkpoint_names_the_sampler_of_requests_that_name_none(tiny_path, tmp_path):
    import json
    import shutil

    from common.lines import DiffusionOptions

    folder = tmp_path / "distilled"
    shutil.copytree(tiny_path, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "diffbatch_default_sampler": "threshold"}))
    engine = Engine(load_model(str(folder)))
    assert engine.default_sampler == "threshold"
    assert DiffusionOptions().with_default_sampler(engine.default_sampler).sampler == "threshold"
    (folder / "config.json").write_text(json.dumps({**config, "diffbatch_default_sampler": "fastest"}))
    with pytest.raises(ValueError, match="diffbatch_default_sampler 'fastest' is not one of"):
        Engine(load_model(str(folder)))


@pytest.mark.parametrize("value", [0, "16", 16.0, True, 2048])
def test_a_checkpoint_default_block_must_be_a_block_length(tiny_path, tmp_path, value):
    import json
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tiny_path, folder)
    config = json.loads((folder / "config.json").read_text())
    assert Engine(load_model(str(folder))).default_block_length == 32  # none named
    (folder / "config.json").write_text(json.dumps({**config, "diffbatch_default_block_length": value}))
    with pytest.raises(ValueError, match="diffbatch_default_block_length .* is not an integer in"):
        Engine(load_model(str(folder)))


def test_a_checkpoint_default_steps_bound_the_passes_of_plain_bodies(tiny_path, tmp_path):
    import json
    import shutil

    from worker.responses import to_generation_request

    folder = tmp_path / "parallel"
    shutil.copytree(tiny_path, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "diffbatch_default_sampler": "threshold",
                                                    "diffbatch_default_block_length": 16,
                                                    "diffbatch_default_steps": 4}))
    engine = Engine(load_model(str(folder)))
    body = {"model": engine.name, "prompt": "def add(a, b):", "max_tokens": 64}

    def built(**fields):
        return to_generation_request(engine, "/v1/completions", {**body, **fields}).params

    plain = built()
    assert (plain.sampler, plain.block_length, plain.steps) == ("threshold", 16, 4)
    assert built(diffusion={"block_length": 32}).steps == 8  # the same tokens a pass on a longer block
    assert built(diffusion={"block_length": 5}).steps == 2  # rounded up: never more tokens a pass
    assert built(diffusion={"steps": 16}).steps == 16  # the request's own
    assert built(diffusion={"sampler": "threshold"}).steps is None  # a named sampler runs as named
    result = engine.generate([to_generation_request(engine, "/v1/completions", body)])[0]
    assert len(result.token_ids) == 64
    assert result.forward_passes <= 4 * 64 // 16  # at least 16 / 4 tokens committed a pass


@pytest.mark.parametrize("value", [0, 17, "4", 4.0, True])
def test_a_checkpoint_default_steps_must_fit_its_default_block(tiny_path, tmp_path, value):
    import json
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tiny_path, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "diffbatch_default_block_length": 16,
                                                    "diffbatch_default_steps": value}))
    with pytest.raises(ValueError, match=r"diffbatch_default_steps .* is not an integer in \[1, 16\]"):
        Engine(load_model(str(folder)))


def test_stop_string_trims_text(engine):
    prompt = engine.encode_completion("stop me")
    plain = engine.generate([GenerationRequest(prompt, SamplingParams(max_tokens=48, temperature=1.0, seed=4))])[0]
    stop = next(plain.text[i : i + 2] for i in range(3, len(plain.text)) if "\ufffd" not in plain.text[i : i + 2])
    cut = plain.text[: plain.text.index(stop)]
    params = SamplingParams(max_tokens=48, temperature=1.0, seed=4, stop=("never there", stop))
    result = engine.generate([GenerationRequest(prompt, params)])[0]
    assert result.text == cut
    assert result.finish_reason == "stop"
    assert result.token_ids == plain.token_ids[: len(result.token_ids)]
    assert engine.tokenizer.decode(result.token_ids, skip_special_tokens=True).startswith(cut)
    assert result.completion_tokens == len(result.token_ids) < len(plain.token_ids)


def test_tiny_top_p_is_greedy(engine):
    prompt = engine.encode_completion("nucleus")
    greedy, nucleus = engine.generate([
        GenerationRequest(prompt, SamplingParams(max_tokens=40)),
        GenerationRequest(prompt, SamplingParams(max_tokens=40, temperature=1.0, top_p=1e-9, seed=9)),
    ])
    assert greedy.token_ids == nucleus.token_ids


def test_prompt_too_long(engine):
    prompt = [10] * 2000
    request = GenerationRequest(prompt, SamplingParams(max_tokens=49))  # rounded up to 64
    with pytest.raises(ValueError, match=r"2000 tokens.*64.*2064 positions.*2048"):
        engine.check(request)
    with pytest.raises(ValueError, match="2048"):
        engine.generate([request])
    engine.check(GenerationRequest(prompt, SamplingParams(max_tokens=48, block_length=16)))  # 2048 fits


@pytest.mark.parametrize(
    "prompt, error",
    [([], "at least one token"), ([1, 263], r"\[0, 263\)"), ([1, -1], "token ids"), ("abc", "at least one")],
)
def test_bad_prompt_ids(engine, prompt, error):
    with pytest.raises(ValueError, match=error):
        engine.check(GenerationRequest(prompt, SamplingParams()))


def test_one_bad_request_is_rejected_before_any_work(engine):
    good = GenerationRequest(engine.encode_completion("ok"), SamplingParams(max_tokens=4))
    bad = GenerationRequest(engine.encode_completion("ok"), SamplingParams(max_tokens=0))
    with pytest.raises(ValueError, match="max_tokens"):
        engine.generate([good, bad])


def test_engine_exposes_model_name_and_limits(engine):
    assert engine.name == "diffbatch-tiny-random"
    assert engine.max_positions == 2048
    with pytest.raises(ValueError, match="max_batch_size"):
        Engine(engine.loaded, max_batch_size=0)


@pytest.mark.parametrize("kw", [
    dict(max_tokens=70, temperature=0.0), dict(max_tokens=40, temperature=0.9, seed=4, steps=8),
    dict(max_tokens=64, sampler="factor", factor=4.0), dict(max_tokens=33, sampler="threshold", threshold=0.004,
                                                          temperature=0.5, seed=2)])
def test_exact_block_cache_gives_the_tokens_of_full_recomputation(loaded, kw):
    cached, recomputed = Engine(loaded, max_batch_size=4), Engine(loaded, max_batch_size=4, kv_cache=False)
    requests = requests_for(cached, [(text, kw) for text in ("a", "a longer prompt here", "ünï", "x = 1\n")])
    for a, b in zip(cached.generate(requests), recomputed.generate(requests), strict=False):
        assert a.token_ids == b.token_ids and a.forward_passes == b.forward_passes


@pytest.mark.parametrize("greedy", [True, False], ids=["greedy-whole-step", "sampling-forward-only"])
def test_step_graph_protocol_gives_the_tokens_of_the_eager_steps(loaded, engine, greedy):
    """The CUDA-graph rounds (cuda_graph.py) on a CPU run their protocol without capture. Greedy
    rounds: the whole step with static shapes (sampling.greedy.GreedyBlockSteps: every position scored,
    step count and passes on the device, the commit pass one more step). Rounds with sampling rows:
    one static input buffer, whole-block logits with the slots taken afterwards. Neither may change
    a token or a pass count, through continuous batching (batch of 2, rows joining), reference rows
    with fewer steps, parallel samplers, a presence penalty, token healing and an infilling template."""
    graphed, eager = Engine(loaded, max_batch_size=2, graphs=True), Engine(loaded, max_batch_size=2, graphs=False)
    assert graphed.scheduler.graphs and not eager.scheduler.graphs
    specs = [(text, kw) for text, kw in MIXED if greedy is (kw["temperature"] == 0)] + [
        ("x = 1\n", dict(max_tokens=48, sampler="threshold", threshold=0.004)),
        ("y", dict(max_tokens=40, sampler="factor", factor=4.0, presence_penalty=0.8)),
        ("z", dict(max_tokens=24, steps=8, frequency_penalty=0.5))]
    if not greedy:
        specs = [(text, {**kw, "temperature": 0.7, "seed": 1}) for text, kw in specs]
    requests = requests_for(engine, specs)
    healing = Healing(text="", allowed=(7, 11, 13))  # the first token bound, as token healing does
    requests.append(GenerationRequest(engine.encode_completion("def f(a, b):"),
                                      SamplingParams(max_tokens=20, temperature=requests[0].params.temperature),
                                      healing=healing))
    canvas = engine.encode_template("    total = {{fill:5}}\n    return total + {{fill:3}}\n")
    requests.append(GenerationRequest(engine.encode_completion("def f(a, b):\n"),
                                      SamplingParams(max_tokens=len(canvas), block_length=8), template_ids=canvas))
    results = graphed.generate(requests)
    assert results[-2].token_ids[0] in healing.allowed
    for a, b in zip(results, eager.generate(requests), strict=True):
        assert a.token_ids == b.token_ids and a.forward_passes == b.forward_passes


def test_stop_string_ends_generation_at_the_block_where_it_appears(engine):
    prompt = engine.encode_completion("stop early")
    plain = engine.generate([GenerationRequest(prompt, SamplingParams(max_tokens=96, temperature=1.0, seed=9))])[0]
    first_block_text = engine.tokenizer.decode(plain.token_ids[:32], skip_special_tokens=True)
    stop = next(first_block_text[i:i + 2] for i in range(4, len(first_block_text) - 2)
                if "\ufffd" not in first_block_text[i:i + 2])
    params = SamplingParams(max_tokens=96, temperature=1.0, seed=9, stop=(stop,))
    stopped = engine.generate([GenerationRequest(prompt, params)])[0]
    assert plain.forward_passes == 96 and stopped.forward_passes == 32  # blocks 2 and 3 never ran
    assert stopped.text == plain.text[: plain.text.index(stop)] and stopped.finish_reason == "stop"


def test_infilling_keeps_the_template_text_and_fills_only_the_holes(engine):
    template = "    total = {{fill:5}}\n    return total + {{fill:3}}\n"
    canvas = engine.encode_template(template)
    assert canvas.count(None) == 8
    request = GenerationRequest(engine.encode_completion("def f(a, b):\n"),
                                SamplingParams(max_tokens=len(canvas), block_length=8), template_ids=canvas)
    [result] = engine.generate([request])
    assert len(result.token_ids) == len(canvas)
    assert all(got == want for got, want in zip(result.token_ids, canvas, strict=False) if want is not None)
    assert result.text.startswith("    total = ") and "\n    return total + " in result.text
    # The holes are denoised like any masked position: the same with batch-mates or alone.
    mates = requests_for(engine, MIXED[:2])
    assert engine.generate([*mates, request])[2].token_ids == result.token_ids


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graph-protocol"])
@pytest.mark.parametrize("kv_cache", [True, False], ids=["kv-cache", "canvas-recompute"])
@pytest.mark.parametrize("before", [[], [7, 7, 7]], ids=["same-block", "earlier-block"])
def test_a_templates_text_does_not_count_as_generated_for_penalties(loaded, kv_cache, graphs, before):
    """Penalties count generated tokens, not the request's own text: holes fill the same whether the
    template's text holds the model's favourite token or not, in its block or an earlier one."""
    favourite, runner_up = 20, 21
    model = dataclasses.replace(loaded, model=Preferring(loaded.model, favourite, runner_up))
    engine = Engine(model, kv_cache=kv_cache, graphs=graphs and kv_cache)

    def holes(text: int) -> list[int]:
        template = [text, *before, None, None, None]
        params = SamplingParams(max_tokens=len(template), block_length=4, presence_penalty=2.0)
        tokens = engine.generate([GenerationRequest([5, 6], params, template_ids=template)])[0].token_ids
        return [t for t, fixed in zip(tokens, template, strict=False) if fixed is None]

    # The favourite first (10 against 9), then the runner-up (8 once the favourite is present), then
    # the favourite again (8 against 7).
    assert holes(favourite) == holes(7) == [favourite, runner_up, favourite]


def test_bad_templates_are_refused(engine):
    with pytest.raises(ValueError, match="no \\{\\{fill:N\\}\\} hole"):
        engine.encode_template("no holes here")
    with pytest.raises(ValueError, match="1 to 1024 tokens"):
        engine.encode_template("x = {{fill:0}}")
    canvas = engine.encode_template("x = {{fill:4}}")
    wrong_length = GenerationRequest([1, 2], SamplingParams(max_tokens=3), template_ids=canvas)
    with pytest.raises(ValueError, match="max_tokens must equal"):
        engine.check(wrong_length)
