"""Certainty-forcing self-distillation: teacher records, the certainty term, and the effect a user
runs it for (the threshold sampler commits more tokens per forward pass afterwards)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from training.corpus import list_sources, split
from training.distill import (
    DistillConfig,
    distill,
    read_records,
    teacher_batch,
    training_prompts,
    write_teacher_completions,
    write_twin_teacher_completions,
)
from training.loop import TrainConfig, train
from training.objective import certainty_entropy, unlikelihood_of_earlier_tokens
from worker.engine.engine import Engine
from worker.engine.loader import load_model
from worker.engine.params import GenerationRequest, SamplingParams

# Functions with a docstring and several body lines, so training/completions.py makes prompts of them.
CODE = '''def scale_{i}(values, factor):
    """Return values multiplied by factor and shifted by {i}."""
    result = []
    for value in values:
        result.append(value * factor + {i})
    return result


def total_{i}(values):
    """Return the sum of values plus {i}."""
    total = {i}
    for value in values:
        total += value
    return total
'''

TINY = dict(vocab_size=320, hidden_size=48, num_hidden_layers=2, num_attention_heads=2, intermediate_size=96,
            block_length=8, seq_length=64, batch_size=16, warmup_steps=5, eval_every=10**6, eval_windows=8)


@pytest.fixture(scope="module")
def teacher_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    for i in range(40):
        (root / f"mod_{i}.py").write_text(CODE.format(i=i))
    out = tmp_path_factory.mktemp("run")
    torch.set_num_threads(1)
    train(TrainConfig(out_dir=out, steps=150, corpus_root=root, learning_rate=3e-3, **TINY))
    return root, out / "model"


def test_certainty_term_counts_only_right_predictions_and_falls_as_they_sharpen():
    targets = torch.tensor([0, 1])
    wrong = torch.tensor([[0.0, 2.0, 0.0], [2.0, 0.0, 0.0]])
    assert certainty_entropy(wrong, targets, 1.0).item() == 0.0
    unsure = torch.tensor([[1.0, 0.5, 0.5], [2.0, 0.0, 0.0]])  # row 0 right, row 1 wrong
    sure = torch.tensor([[6.0, 0.5, 0.5], [2.0, 0.0, 0.0]])
    p = torch.softmax(unsure[0] / 1.0, dim=-1)
    assert math.isclose(certainty_entropy(unsure, targets, 1.0).item(), float(-(p * p.log()).sum()), rel_tol=1e-5)
    assert certainty_entropy(sure, targets, 1.0) < certainty_entropy(unsure, targets, 1.0)


def test_unlikelihood_pushes_down_earlier_tokens_other_than_the_target():
    x0 = torch.tensor([[5, 6, 5, 7]])
    masked = torch.tensor([[False, False, True, True]])
    logits = torch.randn(2, 9)
    p = torch.softmax(logits, dim=-1)
    # Position 2 (target 5) has seen 5 and 6: only 6 is a candidate; position 3 (target 7): 5 and 6.
    want = (-torch.log(1 - p[0, 6]) - torch.log(1 - p[1, 5]) - torch.log(1 - p[1, 6])) / 2
    assert math.isclose(unlikelihood_of_earlier_tokens(logits, x0, masked).item(), want.item(), rel_tol=1e-5)
    # Putting the mass on the target instead of a repeat lowers it.
    sure = logits.clone()
    sure[0, 5], sure[1, 7] = 20.0, 20.0
    assert unlikelihood_of_earlier_tokens(sure, x0, masked) < unlikelihood_of_earlier_tokens(logits, x0, masked)


def test_teacher_batch_shares_one_prompt_length_and_pads_short_completions_with_eos():
    records = [{"prompt_ids": [1, 10, 11, 12], "completion_ids": [20, 21, 22]},
               {"prompt_ids": [1, 13, 14], "completion_ids": [23]}]
    x0, prompt_length = teacher_batch(records, [0, 1], completion_tokens=3, max_length=16, eos_token_id=2)
    assert prompt_length == 3  # the shorter prompt's; the longer one loses its oldest token
    assert x0.tolist() == [[10, 11, 12, 20, 21, 22], [1, 13, 14, 23, 2, 2]]
    x0, prompt_length = teacher_batch(records, [0], completion_tokens=3, max_length=5, eos_token_id=2)
    assert prompt_length == 2 and x0.tolist() == [[11, 12, 20, 21, 22]]


def _decode(model_dir, records, sampler: str) -> tuple[float, list[list[int]]]:
    """(forward passes per token, tokens) for the teacher's prompts; threshold 0.5 because a model
    this small and this briefly distilled is seldom 90% sure. The EOS that ends a row counts as a
    token: a pass commits it, though the result leaves it out."""
    engine = Engine(load_model(str(model_dir)), max_batch_size=16)
    params = SamplingParams(max_tokens=16, block_length=8, sampler=sampler, threshold=0.5)
    results = engine.generate([GenerationRequest(r["prompt_ids"], params) for r in records])
    tokens = sum(len(r.token_ids) + (r.finish_reason == "stop") for r in results)
    return sum(r.forward_passes for r in results) / tokens, [r.token_ids for r in results]


def test_distillation_lets_the_threshold_sampler_commit_more_tokens_per_pass(teacher_model, tmp_path):
    root, model = teacher_model
    teacher = tmp_path / "teacher.jsonl"
    count = write_teacher_completions(model, teacher, new_tokens=16, batch=16, block_length=8,
                                      presence_penalty=0.0, limit=16, corpus_root=root)
    records = read_records(teacher)
    assert count == len(records) == 16
    assert all(len(r["completion_ids"]) <= 16 and r["prompt_ids"] for r in records)
    # A second call finds every prompt done and writes nothing twice.
    assert write_teacher_completions(model, teacher, new_tokens=16, batch=16, block_length=8, limit=16,
                                     corpus_root=root) == 16
    assert len(read_records(teacher)) == 16
    # No teacher time: nothing written (a run that reuses a teacher file it was given).
    assert write_teacher_completions(model, tmp_path / "none.jsonl", new_tokens=16, batch=16, max_minutes=0,
                                     corpus_root=root) == 0

    with pytest.raises(ValueError, match="distinct-token ratio"):  # every completion filtered out
        distill(DistillConfig(out_dir=tmp_path / "none", teacher=teacher, init_from=model, min_distinct=1.01,
                              corpus_root=root, **TINY))

    before, _ = _decode(model, records, "threshold")
    # min_distinct 0: this tiny teacher repeats itself, and the test is about certainty, not loops.
    result = distill(DistillConfig(out_dir=tmp_path / "distilled", teacher=teacher, init_from=model, steps=40,
                                   completion_tokens=16, corpus_root=root, learning_rate=2e-3, min_distinct=0.0,
                                   **TINY))
    assert result["step"] == 40
    config = json.loads((tmp_path / "distilled" / "model" / "config.json").read_text())
    assert config["diffbatch_default_sampler"] == "threshold"  # what the service runs when a request names none
    after, parallel = _decode(tmp_path / "distilled" / "model", records, "threshold")
    assert after < 0.75 * before, (before, after)
    # Parallel acceptance writes what the distilled model writes one token a pass.
    _, sequential = _decode(tmp_path / "distilled" / "model", records, "reference")
    assert sum(p == s for p, s in zip(parallel, sequential, strict=False)) >= len(records) * 3 // 4

    # --data-weight adds the corpus's own diffusion loss: the same run then drifts less far from
    # the held-out loss it started at.
    start = json.loads((tmp_path / "distilled" / "log.jsonl").read_text().splitlines()[0])["eval"]
    mixed = distill(DistillConfig(out_dir=tmp_path / "with-corpus", teacher=teacher, init_from=model, steps=40,
                                  completion_tokens=16, corpus_root=root, learning_rate=2e-3, min_distinct=0.0,
                                  data_weight=1.0, **TINY))
    drift = mixed["elbo_bits_per_byte"] - start["elbo_bits_per_byte"]
    assert drift < result["elbo_bits_per_byte"] - start["elbo_bits_per_byte"], (start, result, mixed)


def test_cut_teacher_completions_teach_the_model_to_stop_where_the_function_ends(teacher_model, tmp_path):
    """A plain request has no stop sequence: trained on completions cut where the prompt's function
    ends (then EOS), the model ends its answer there; trained on them whole, it writes on into the next
    function. The teacher here writes what the corpus holds (this tiny model's own completions are noise)."""
    root, model = teacher_model
    engine = Engine(load_model(str(model)))
    teacher, records = tmp_path / "teacher.jsonl", []
    for i in range(16):
        text = CODE.format(i=100 + i)  # functions the model has not seen
        prompt = text[: text.index("for value in values:\n") + len("for value in values:\n")]
        prompt_ids, _ = engine.heal(engine.encode_completion(prompt))
        rest = text[len(engine.tokenizer.decode(prompt_ids, skip_special_tokens=True)):]
        completion_ids = engine.tokenizer.encode(rest, add_special_tokens=False)[:40]  # into "def total_"
        records.append({"index": i, "source": "mod.py", "prompt_ids": prompt_ids, "completion_ids": completion_ids})
    teacher.write_text("".join(json.dumps(r) + "\n" for r in records))

    def stops(model_dir) -> int:
        engine = Engine(load_model(str(model_dir)), max_batch_size=16)
        params = SamplingParams(max_tokens=40, block_length=8, sampler="reference")
        results = engine.generate([GenerationRequest(r["prompt_ids"], params) for r in records])
        return sum(r.finish_reason == "stop" and "def" not in r.text for r in results)

    options = dict(teacher=teacher, init_from=model, steps=40, completion_tokens=40, corpus_root=root,
                   learning_rate=2e-3, min_distinct=0.0, **TINY)
    distill(DistillConfig(out_dir=tmp_path / "cut", **options))
    distill(DistillConfig(out_dir=tmp_path / "whole", end_functions=False, **options))
    cut, whole = stops(tmp_path / "cut" / "model"), stops(tmp_path / "whole" / "model")
    assert cut >= 12 and whole <= 2, (cut, whole)

    # A teacher that ended the function at once (blank lines, then the next def) would teach the model
    # to answer with EOS alone: such records are left out.
    blank = tmp_path / "blank.jsonl"
    blank.write_text("".join(json.dumps({**r, "completion_ids": engine.tokenizer.encode(
        "\n\n\ndef total(values):\n    return 0\n", add_special_tokens=False)}) + "\n" for r in records))
    with pytest.raises(ValueError, match="complete non-blank line"):
        distill(DistillConfig(out_dir=tmp_path / "blank", **{**options, "teacher": blank}))

    # --min-completion-tokens leaves out functions the teacher ended sooner than that (here: all).
    with pytest.raises(ValueError, match="41 or more tokens"):
        distill(DistillConfig(out_dir=tmp_path / "short", min_completion_tokens=41, **options))


def test_the_autoregressive_twin_writes_sampled_teacher_records_the_student_trains_on(teacher_model, tmp_path):
    """--teacher-twin: the twin (same tokenizer) writes the records, healed as the student's service would
    run the prompts; sampled, reproducibly, and resumable like the student's own teacher run."""
    root, model = teacher_model
    twin_dir = tmp_path / "twin"
    train(TrainConfig(out_dir=twin_dir, steps=60, corpus_root=root, objective="ar", tokenizer_from=model,
                      learning_rate=3e-3, **TINY))
    sampled, again, greedy = tmp_path / "sampled.jsonl", tmp_path / "again.jsonl", tmp_path / "greedy.jsonl"
    options = dict(new_tokens=16, batch=8, limit=16, corpus_root=root)
    assert write_twin_teacher_completions(twin_dir / "model", model, sampled, temperature=1.0, **options) == 16
    write_twin_teacher_completions(twin_dir / "model", model, again, temperature=1.0, **options)
    write_twin_teacher_completions(twin_dir / "model", model, greedy, temperature=0.0, **options)
    records = read_records(sampled)
    assert read_records(again) == records  # seeded
    assert [r["completion_ids"] for r in read_records(greedy)] != [r["completion_ids"] for r in records]
    engine = Engine(load_model(str(model)))
    for record in records:
        assert len(record["completion_ids"]) <= 16
        assert engine.tokenizer.eos_token_id not in record["completion_ids"]
    # The prompts are the student's healed ones: what the engine runs for the same text.
    prompts = training_prompts(split(list_sources(root))[0])
    for record in records[:4]:
        assert record["prompt_ids"] == engine.heal(engine.encode_completion(prompts[record["index"]].prompt))[0]
    assert write_twin_teacher_completions(twin_dir / "model", model, sampled, temperature=1.0, **options) == 16
    assert len(read_records(sampled)) == 16  # resumed: nothing written twice

    result = distill(DistillConfig(out_dir=tmp_path / "student", teacher=sampled, init_from=model, steps=5,
                                   completion_tokens=16, corpus_root=root, min_distinct=0.0, **TINY))
    assert result["step"] == 5


def test_the_twin_teachers_presence_penalty_lowers_generated_tokens_only():
    """--teacher-presence-penalty: as the engine's presence_penalty, tokens the row has generated lose
    ``penalty`` from their logit once, however often they came; the prompt's tokens are not penalised."""
    from training.ar import PresencePenalty

    prompt_width = 3
    input_ids = torch.tensor([[5, 6, 7, 1, 1, 2],    # generated 1 twice and 2
                              [0, 5, 6, 7, 7, 7]])   # generated only tokens that the prompt also has
    scores = torch.zeros(2, 10)
    penalised = PresencePenalty(prompt_width, 0.75)(input_ids, scores.clone())
    expected = torch.zeros(2, 10)
    expected[0, [1, 2]] = -0.75
    expected[1, 7] = -0.75
    assert torch.equal(penalised, expected)
    # Before any token is generated nothing changes, the prompt's tokens included.
    assert torch.equal(PresencePenalty(6, 0.75)(input_ids, scores.clone()), scores)


def _real_bodies_with_every_other_spoilt(model, root, tmp_path, spoil) -> Path:
    """A teacher file of 8 records: each prompt's real rest of the function, the odd ones passed through
    ``spoil``, every one followed by the next function (which the cut leaves out)."""
    engine = Engine(load_model(str(model)))
    prompts = training_prompts(split(list_sources(root))[0])[:8]
    records = []
    for index, prompt in enumerate(prompts):
        prompt_ids, _ = engine.heal(engine.encode_completion(prompt.prompt))
        rest = (prompt.prompt + prompt.body)[len(engine.tokenizer.decode(prompt_ids, skip_special_tokens=True)):]
        if index % 2:
            rest = spoil(rest)
        records.append({"index": index, "source": prompt.source, "prompt_ids": prompt_ids,
                        "completion_ids": engine.tokenizer.encode(rest + "\n\ndef next_one():\n",
                                                                  add_special_tokens=False)})
    teacher = tmp_path / "teacher.jsonl"
    teacher.write_text("".join(json.dumps(r) + "\n" for r in records))
    return teacher


def _kept(tmp_path, out: str, **options) -> int:
    """How many teacher records a distillation run with ``options`` trained on."""
    distill(DistillConfig(out_dir=tmp_path / out, steps=2, completion_tokens=40, min_distinct=0.0, **options, **TINY))
    return json.loads((tmp_path / out / "log.jsonl").read_text().splitlines()[0])["records"]


def test_min_coverage_leaves_out_completions_that_end_the_function_early(teacher_model, tmp_path):
    """--min-coverage compares each completion with the rest of its own prompt's real function, so a
    teacher's early ends go and its whole bodies stay, whatever their length in tokens."""
    root, model = teacher_model
    # An early end: the first body line only, then the function's margin.
    teacher = _real_bodies_with_every_other_spoilt(
        model, root, tmp_path, lambda rest: rest[: rest.index("\n", 1) + 1] + "\n\ndef other():\n    pass\n")
    options = dict(teacher=teacher, init_from=model, corpus_root=root)
    assert _kept(tmp_path, "all", min_coverage=0.0, **options) == 8
    assert _kept(tmp_path, "whole-bodies", min_coverage=0.9, **options) == 4

    stranger = tmp_path / "stranger.jsonl"  # a file written on another corpus names prompts this one lacks
    stranger.write_text(json.dumps({**read_records(teacher)[0], "index": 10**6}) + "\n")
    with pytest.raises(ValueError, match="is not one of the .* training prompts"):
        _kept(tmp_path, "stranger", min_coverage=0.5, **{**options, "teacher": stranger})


def test_must_parse_leaves_out_completions_that_do_not_parse_with_their_prompt(teacher_model, tmp_path):
    """--must-parse: a sampled teacher's broken bodies (here an unclosed bracket) are not learnt; whole
    real bodies, cut where the function ends, parse after their healed prompt and stay."""
    root, model = teacher_model
    teacher = _real_bodies_with_every_other_spoilt(
        model, root, tmp_path, lambda rest: rest[: rest.index("\n", 1) + 1] + "    return (\n")
    options = dict(teacher=teacher, init_from=model, corpus_root=root)
    assert _kept(tmp_path, "all", **options) == 8
    assert _kept(tmp_path, "parsing", must_parse=True, **options) == 4

    # A completion the token budget (here 40) cut inside its function need only be a valid start:
    # kept with an open bracket at the cut, left out with a syntax error before it. Whole parsing
    # would leave both out, and so keep mostly the short functions a teacher happened to end.
    tokenizer = Engine(load_model(str(model))).tokenizer
    record = read_records(teacher)[0]
    valid = tokenizer.encode("    values = [\n" + "        1,\n" * 20, add_special_tokens=False)[:40]
    spoilt = tokenizer.encode("    return )\n" + "        1,\n" * 20, add_special_tokens=False)[:40]
    cut = tmp_path / "cut.jsonl"
    cut.write_text("".join(json.dumps({**record, "completion_ids": ids}) + "\n" for ids in (valid, spoilt)))
    assert _kept(tmp_path, "valid-starts", must_parse=True, **{**options, "teacher": cut}) == 1


def test_trajectory_masking_distils_a_model_that_commits_more_tokens_per_pass(teacher_model, tmp_path):
    """--trajectory-masking: trained only on the states its own confidence order meets, the model too
    commits more tokens a pass under the threshold sampler afterwards."""
    root, model = teacher_model
    teacher = tmp_path / "teacher.jsonl"
    write_teacher_completions(model, teacher, new_tokens=16, batch=16, block_length=8, presence_penalty=0.0,
                              limit=16, corpus_root=root)
    records = read_records(teacher)
    options = dict(teacher=teacher, init_from=model, steps=40, completion_tokens=16, corpus_root=root,
                   learning_rate=2e-3, min_distinct=0.0, **TINY)
    with pytest.raises(ValueError, match="from 0 to 1"):
        distill(DistillConfig(out_dir=tmp_path / "bad", trajectory_share=1.5, **options))
    before, _ = _decode(model, records, "threshold")
    distill(DistillConfig(out_dir=tmp_path / "ordered", trajectory_share=1.0, **options))
    after, _ = _decode(tmp_path / "ordered" / "model", records, "threshold")
    assert after < 0.75 * before, (before, after)
