"""Certainty-forcing self-distillation: teach the model to be sure of several block positions at once.

Why: the parallel samplers (threshold, factor) commit every position the model is confident of, but
a model trained only on the data's own text spreads its probability over the many ways a line can
go on, so far from the last committed token it is rarely sure of anything and the samplers commit
~1 token per forward pass (bench/quality.py: threshold 0.3 still 0.95 passes/token on run 2).

What (learned from dParallel, Chen et al. 2025, "Learnable Parallel Decoding for dLLMs",
arXiv:2509.26488, whose code we did not use): the model first writes completions of training
prompts with its own one-token-a-pass decoding (the *teacher* trajectories). Then it is fine-tuned on
prompt + its own completion with the usual block-diffusion loss, which makes the target one
continuation instead of many, plus an entropy penalty on the masked positions it already predicts
right, which pushes those predictions to high confidence in parallel. Sequence-level distillation
for parallel decoding is older (Gu et al. 2018, non-autoregressive translation, arXiv:1711.02281).

Teacher records (JSON lines): ``index`` (of the prompt), ``source``, ``prompt_ids`` (healed, as the
service would send them) and ``completion_ids`` (cut at the first end token).
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerFast

from worker.engine.builtin import DiffbatchMDMForMaskedDiffusion
from worker.engine.engine import Engine
from worker.engine.loader import load_model
from worker.engine.params import GenerationRequest, SamplingParams

from .completions import (
    CompletionPrompt,
    complete_lines,
    coverage,
    cut_at_function_end,
    distinct_ratio,
    function_prompts,
    parses,
    starts_validly,
)
from .corpus import SourceFile, list_sources, split
from .data import TokenStream, encode_files, step_generator
from .loop import TrainConfig, data_loss, run, update
from .objective import diffusion_loss
from .trajectory import decode_order

TEACHER_SHUFFLE_SEED = 20251130  # a time-limited run covers the corpus evenly


def training_prompts(train_files: list[SourceFile]) -> list[CompletionPrompt]:
    """Every function prompt of the training split, in the order a teacher record's ``index`` counts."""
    return function_prompts(train_files, limit=10**9)


def _teacher_prompts(out_path: Path, limit: int | None, corpus_root: Path | None) -> tuple[list, list[int], set[int]]:
    """The training split's function prompts, the indices of the first ``limit`` of them in a fixed
    shuffled order (a time-limited run covers the corpus evenly) and those ``out_path`` already holds."""
    done = {record["index"] for record in read_records(out_path)} if out_path.is_file() else set()
    train_files, _ = split(list_sources(corpus_root))
    prompts = training_prompts(train_files)
    order = list(range(len(prompts)))
    random.Random(TEACHER_SHUFFLE_SEED).shuffle(order)
    return prompts, [i for i in order[:limit] if i not in done], done


def write_teacher_completions(
    model_dir: Path, out_path: Path, *, new_tokens: int = 64, batch: int = 64, block_length: int = 32,
    presence_penalty: float = 0.8, max_minutes: float | None = None, limit: int | None = None,
    corpus_root: Path | None = None,
) -> int:
    """Append teacher completions of the training split's function prompts (``limit`` of them, in a
    fixed shuffled order) to ``out_path``. The teacher decodes as the reference sampler does, greedy,
    with ``presence_penalty`` (greedy decoding of a small model repeats itself without one; at 0.8,
    the service's example setting, 77% of the built-in model's completions pass the distinct-token
    filter, against 48% at 0.5). Prompts
    already in the file are skipped, so a stopped run resumes. Returns the number of records."""
    out_path = Path(out_path)
    prompts, order, done = _teacher_prompts(out_path, limit, corpus_root)
    engine = Engine(load_model(str(model_dir)), max_batch_size=batch)
    todo, requests = [], []
    for i in order:
        ids, healing = engine.heal(engine.encode_completion(prompts[i].prompt))
        params = SamplingParams(max_tokens=new_tokens, seed=i, sampler="reference", temperature=0.0,
                                block_length=block_length, presence_penalty=presence_penalty)
        todo.append((i, ids))
        requests.append(GenerationRequest(ids, params, healing=healing))
    deadline = None if max_minutes is None else time.monotonic() + 60 * max_minutes
    # A few batches at a time: the scheduler admits the shortest prompts first, so one call with
    # every request would spend a time limit on short prompts only.
    chunk = 4 * batch
    with out_path.open("a") as out:
        for first in range(0, len(requests), chunk):
            if deadline is not None and time.monotonic() >= deadline:  # 0 minutes: none written
                break
            for position, result in engine.stream(requests[first : first + chunk]):
                index, ids = todo[first + position]
                _write_record(out, index, prompts[index].source, ids, result.token_ids)
                done.add(index)
    return len(done)


def write_twin_teacher_completions(
    twin_dir: Path, model_dir: Path, out_path: Path, *, new_tokens: int = 64, batch: int = 64,
    temperature: float = 0.8, top_p: float = 0.95, presence_penalty: float = 0.0, max_minutes: float | None = None,
    limit: int | None = None, corpus_root: Path | None = None,
) -> int:
    """As write_teacher_completions, with the autoregressive twin (training/ar.py) as the teacher: a
    better model of the same data (held-out bits per byte) that writes fast with its KV cache, sampled
    (``temperature``, ``top_p``) or greedy with the engine's ``presence_penalty``, so its completions do
    not loop as plain greedy decoding of a small model does. ``model_dir`` (the student) heals the
    prompts, as the service will. Sequence-level distillation from a stronger teacher is what
    non-autoregressive translation trains its parallel decoders on (Kim & Rush 2016,
    arXiv:1606.07947; Gu et al. 2018, arXiv:1711.02281)."""
    from transformers import AutoModelForCausalLM

    from .ar import twin_complete

    out_path = Path(out_path)
    prompts, order, done = _teacher_prompts(out_path, limit, corpus_root)
    engine = Engine(load_model(str(model_dir)), max_batch_size=batch)
    twin = AutoModelForCausalLM.from_pretrained(twin_dir, dtype=torch.float32).eval()
    if PreTrainedTokenizerFast.from_pretrained(twin_dir).get_vocab() != engine.tokenizer.get_vocab():
        raise ValueError(f"the twin {twin_dir} reads text with another tokenizer than {model_dir}: train it "
                         "with --objective ar --tokenizer-from the student")
    deadline = None if max_minutes is None else time.monotonic() + 60 * max_minutes
    with out_path.open("a") as out:
        for first in range(0, len(order), batch):
            if deadline is not None and time.monotonic() >= deadline:
                break
            indices = order[first:first + batch]
            completions, _ = twin_complete(
                twin, engine.tokenizer, lambda text: engine.heal(engine.encode_completion(text)),
                [prompts[i].prompt for i in indices], new_tokens=new_tokens, batch=batch,
                temperature=temperature, top_p=top_p, presence_penalty=presence_penalty, seed=indices[0])
            for index, completion in zip(indices, completions, strict=True):
                _write_record(out, index, prompts[index].source, completion.prompt_ids, completion.token_ids)
                done.add(index)
    return len(done)


def _write_record(out, index: int, source: str, prompt_ids: list[int], completion_ids: list[int]) -> None:
    out.write(json.dumps({"index": index, "source": source, "prompt_ids": prompt_ids,
                          "completion_ids": completion_ids}) + "\n")
    out.flush()


def read_records(path: Path) -> list[dict]:
    with Path(path).open() as handle:
        return [json.loads(line) for line in handle if line.strip()]


@dataclass
class DistillConfig(TrainConfig):
    """A fine-tuning run of ``init_from`` on teacher records. The model's shape comes from its folder
    (hidden_size and the like are not used); ``block_length`` must be the one the teacher decoded with."""
    teacher: Path | None = None  # the JSON-lines file write_teacher_completions wrote
    completion_tokens: int = 64  # teacher completions are padded with EOS (or cut) to this length
    # Our choices, not dParallel's published values (their model is 600x larger): weight 1 and a
    # sharpening temperature of 0.5, so the term acts on middling confidences, not on settled ones.
    certainty_weight: float = 1.0
    certainty_temperature: float = 0.5
    # Teacher completions below this distinct-token ratio (loops such as ") ) ) )") are left out: a
    # first run on all of them (README, distill-builtin) learnt the loops and became surer of
    # them, and no presence penalty got it out of them again.
    min_distinct: float = 0.4
    # Cut each teacher completion where the prompt's function ends, so the EOS padding after it
    # teaches the model to stop there (a plain request has no stop sequence, and what a small model
    # writes after the function soon loops: bench/quality.py's distinct ratio).
    end_functions: bool = True
    # Teacher completions shorter than this (after the cut) are left out. A model's own completions
    # end its function early now and then, and each round that trains on them ends earlier still
    # (docs/benchmarks.md: a second round wrote 32 tokens a completion where held-out bodies have a
    # median of 105), so later rounds keep only the bodies that go on.
    min_completion_tokens: int = 0
    # Teacher completions that span less than this share of the rest of the real function (after the
    # cut; bodies longer than ``completion_tokens`` count as that long) are left out. Unlike a token
    # floor it follows each function's own length: a round's early ends on long functions go, short
    # functions that really end stay (training/completions.py: coverage, the figure bench/quality.py
    # prints as covers).
    min_coverage: float = 0.0
    # Keep only the completions that, cut where the function ends, parse with their prompt (the
    # measure bench/quality.py counts): rejection sampling, so a sampled teacher's broken bodies are
    # not learnt (rejection-sampling fine-tuning, Yuan et al. 2023, arXiv:2308.01825). A completion
    # the token budget cut inside its function need only be a valid start (starts_validly): whole
    # parsing kept 71% of the completions that ended but 9.5% of those cut (kept median: 33 tokens),
    # and the students of that data ended their answers ever earlier (docs/benchmarks.md).
    must_parse: bool = False
    # With ``data_weight`` > 0 each step also takes the usual diffusion loss on ``data_batch_size``
    # windows of the training corpus (8 windows of 256 tokens cost about what the 32 teacher rows
    # do). Measured (README): at weight 1 it keeps the held-out ELBO (1.67 -> 1.77 bits/byte, against
    # 2.13 without) but also takes away what distillation is for (threshold 0.9: 0.946 passes/token,
    # against 0.823 without) and does not stop the repetition (distinct ratio 0.20). So off by default.
    data_weight: float = 0.0
    data_batch_size: int = 8
    # Weight of token-level unlikelihood on earlier tokens (objective.py): 0, off, by default.
    unlikelihood_weight: float = 0.0
    # Share of (row, block)s masked along the starting model's own decode order of the teacher's text
    # (training/trajectory.py) instead of at random: 0, off, by default.
    trajectory_share: float = 0.0
    steps: int = 600
    learning_rate: float = 5e-4
    warmup_steps: int = 30


def distill(config: DistillConfig) -> dict:
    """Fine-tune ``config.init_from`` on its own teacher completions (resumable); returns the last
    held-out evaluation and the step."""
    if config.init_from is None or config.teacher is None:
        raise ValueError("distillation needs init_from (the model) and teacher (its completions)")
    if not 0 <= config.trajectory_share <= 1:
        raise ValueError(f"--trajectory-masking is a share of blocks, from 0 to 1, not {config.trajectory_share}")
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(config.init_from)
    train_files, held_out_files = split(list_sources(config.corpus_root))
    held_out = encode_files(tokenizer, held_out_files)
    corpus = encode_files(tokenizer, train_files) if config.data_weight > 0 else None
    records = read_records(config.teacher)
    if config.end_functions:
        for record in records:
            record["completion_ids"] = cut_at_function_end(tokenizer.decode, record["prompt_ids"],
                                                           record["completion_ids"])
    # A completion without one complete non-blank line (a function the teacher ended at once) would
    # teach the model to answer with EOS alone: one round trained on them did so on 71 of 512 prompts.
    covers = _coverage_of(config, tokenizer, train_files) if config.min_coverage > 0 else lambda record: 1.0
    records = [r for r in records if distinct_ratio(r["completion_ids"]) >= config.min_distinct
               and len(r["completion_ids"]) >= config.min_completion_tokens
               and covers(r) >= config.min_coverage
               and complete_lines(tokenizer.decode(r["completion_ids"])).strip()
               and (not config.must_parse or _parses(tokenizer, r, config.completion_tokens))]
    if not records:
        raise ValueError(f"no teacher completion in {config.teacher} has a distinct-token ratio "
                         f">= {config.min_distinct}, {config.min_completion_tokens} or more tokens, a "
                         f"coverage >= {config.min_coverage} and a complete non-blank line"
                         + (" that parses with its prompt" if config.must_parse else ""))
    # The starting model's own shape, whatever the config's shape fields say; state.pt, when there
    # is one, then replaces its weights.
    model = DiffbatchMDMForMaskedDiffusion.from_pretrained(config.init_from, dtype=torch.float32).train()
    # The export is made for the threshold sampler: requests that name none get it (engine.py).
    model.config.diffbatch_default_sampler = "threshold"
    mask_id, eos_id = tokenizer.mask_token_id, tokenizer.eos_token_id
    if config.trajectory_share > 0:  # the starting model's order, before any state.pt replaces it
        for record, order in zip(records, _decode_orders(model, config, records, mask_id, eos_id), strict=True):
            record["order"] = order
    return run(config, "distill", model, tokenizer, held_out,
               lambda optimizer, step: _distill_step(model, optimizer, config, records, corpus, step, mask_id,
                                                     eos_id),
               records=len(records))


def _decode_orders(model, config: DistillConfig, records: list[dict], mask_id: int, eos_id: int,
                   batch: int = 32) -> list[list[int]]:
    """Each record's completion positions' decode order (training/trajectory.py), in batches of
    records of about one prompt length (a batch shares the shortest one)."""
    orders: list[list[int]] = [[] for _ in records]
    by_length = sorted(range(len(records)), key=lambda i: len(records[i]["prompt_ids"]))
    for first in range(0, len(by_length), batch):
        picks = by_length[first:first + batch]
        x0, prompt_length = teacher_batch(records, picks, config.completion_tokens, config.seq_length, eos_id)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.bf16):
            order = decode_order(model, x0, prompt_length=prompt_length, block_length=config.block_length,
                                 mask_token_id=mask_id)
        for pick, row in zip(picks, order[:, prompt_length:].tolist(), strict=True):
            orders[pick] = row
    return orders


def _parses(tokenizer, record: dict, budget: int) -> bool:
    """Whether the record's complete lines parse after its (healed) prompt's text; for a completion
    that ran to the ``budget`` without ending its function, whether they are a valid start."""
    check = starts_validly if len(record["completion_ids"]) >= budget else parses
    return check(tokenizer.decode(record["prompt_ids"], skip_special_tokens=True),
                 tokenizer.decode(record["completion_ids"], skip_special_tokens=True))


def _coverage_of(config: DistillConfig, tokenizer, train_files):
    """record -> the share of the rest of its prompt's real function that its completion spans. A
    record's index is its prompt's place in training_prompts, as the teacher wrote it."""
    prompts = training_prompts(train_files)

    def covers(record: dict) -> float:
        if not 0 <= record["index"] < len(prompts):
            raise ValueError(f"teacher record {record['index']} ({record['source']}) is not one of the "
                             f"{len(prompts)} training prompts: was {config.teacher} written on another corpus?")
        body = tokenizer.encode(prompts[record["index"]].body, add_special_tokens=False)
        return coverage(len(record["completion_ids"]), len(body), config.completion_tokens)

    return covers


def teacher_batch(records: list[dict], picks: list[int], completion_tokens: int, max_length: int,
                  eos_token_id: int) -> tuple[torch.Tensor, int]:
    """(B, P + completion_tokens) prompt + completion ids and P, the prompt length they share.

    Rows share one prompt length (the objective's layout has one prompt block), so longer prompts
    lose their oldest tokens; completions that ended early are padded with EOS, which is what the
    engine would have to write there (LLaDA's SFT pads with EOS the same way).
    """
    chosen = [records[i] for i in picks]
    prompt_length = min(min(len(r["prompt_ids"]) for r in chosen), max_length - completion_tokens)
    rows = []
    for record in chosen:
        completion = record["completion_ids"][:completion_tokens]
        completion = completion + [eos_token_id] * (completion_tokens - len(completion))
        rows.append(record["prompt_ids"][len(record["prompt_ids"]) - prompt_length:] + completion)
    return torch.tensor(rows, dtype=torch.long), prompt_length


def _distill_step(model, optimizer, config: DistillConfig, records, corpus: TokenStream | None, step: int,
                  mask_id: int, eos_id: int) -> dict:
    generator = step_generator(config.seed, step)
    picks = torch.randint(0, len(records), (config.batch_size,), generator=generator).tolist()
    x0, prompt_length = teacher_batch(records, picks, config.completion_tokens, config.seq_length, eos_id)
    order = None
    if config.trajectory_share > 0:
        completion_order = torch.tensor([records[i]["order"] for i in picks])
        order = torch.cat([torch.full((len(picks), prompt_length), -1), completion_order], dim=1)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.bf16):
        parts = diffusion_loss(model, x0, mask_token_id=mask_id, block_length=config.block_length,
                               prompt_length=prompt_length, generator=generator,
                               certainty_temperature=config.certainty_temperature,
                               unlikelihood=config.unlikelihood_weight > 0,
                               order=order, order_share=config.trajectory_share)
    certainty = parts.certainty
    assert certainty is not None  # asked for: config.certainty_temperature is a float
    loss = parts.loss + config.certainty_weight * certainty
    figures = {}
    if parts.unlikelihood is not None:
        loss = loss + config.unlikelihood_weight * parts.unlikelihood
        figures["unlikelihood"] = round(parts.unlikelihood.item(), 4)
    if corpus is not None:  # its own generator, so the teacher rows a step reads do not depend on it
        corpus_generator = step_generator(config.seed + 1, step)
        data = data_loss(model, config, corpus, config.data_batch_size, corpus_generator, mask_id)
        loss = loss + config.data_weight * data.loss
        figures["data"] = round(data.loss.item(), 4)
    update(model, optimizer, loss)
    return {"loss": round(loss.item(), 4), "diffusion": round(parts.loss.item(), 4),
            "certainty": round(certainty.item(), 4), **figures,
            "masked_ce": round(parts.masked_ce_sum.item() / max(1, parts.masked_count), 4)}
