"""Quality next to speed for the built-in model: held-out Python completions, per sampler.

    python bench/quality.py [--model PATH] [--prompts 64] [--new-tokens 128] [--batch 32] [--caches exact,delayed]
                             [--step-rows working,all]

For held-out functions of the standard library (signature + docstring + first lines as the prompt,
see training/completions.py), each sampler writes --new-tokens tokens (temperature 0 by default). Printed per
sampler: the share of completions that parse with at least one complete generated line, the mean
distinct-token ratio, tokens per completion (fewer than --new-tokens where the model wrote EOS),
``covers`` (the mean share of the real function body's length, up to --new-tokens, that a completion
spans: a model that ends functions early parses more and repeats less, and shows here), tokens/s and
forward passes per token, all measured in this one run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from common.settings import Settings
from training.completions import coverage, distinct_ratio, function_prompts, parses
from training.corpus import list_sources, split
from worker.engine.engine import Engine
from worker.engine.loader import load_model
from worker.engine.params import GenerationRequest, SamplingParams
from worker.engine.sampling import blocks
from worker.responses import to_generation_request

DEFAULT_SAMPLERS = "reference,threshold 0.9,factor 1.0"
WORKING_SHARE = blocks.SUBSET_SHARE


def sampler_options(label: str) -> dict | None:
    """Diffusion options for a label: ``reference``, ``reference STEPS`` (steps per block),
    ``threshold TAU [steps S] [edit E]`` (S: the dynamic rule finishes a block in at most S passes; E:
    LLaDA2.1's token editing), ``factor F``; or None for ``default``: what a plain OpenAI body gets
    (the checkpoint's own sampler, block and steps, through the service's request builder)."""
    name, *values = label.split()
    if name == "default" and not values:
        return None
    if name == "reference" and len(values) <= 1:
        return {"sampler": "reference", **({"steps": int(values[0])} if values else {})}
    if name == "factor" and len(values) == 1:
        return {"sampler": name, name: float(values[0])}
    extras = dict(zip(values[1::2], values[2::2], strict=False))
    if name == "threshold" and len(values) % 2 == 1 and set(extras) <= {"steps", "edit"} \
            and len(extras) == len(values) // 2:
        return {"sampler": name, name: float(values[0]),
                **({"steps": int(extras["steps"])} if "steps" in extras else {}),
                **({"editing_threshold": float(extras["edit"])} if "edit" in extras else {})}
    raise SystemExit(f"--samplers: {label!r} is not 'default', 'reference', 'reference STEPS', "
                     "'threshold TAU [steps S] [edit E]' or 'factor F'")


# The stop sequences of the Codex/HumanEval evaluation (Chen et al. 2021, arXiv:2107.03374): a line
# at the left margin ends the completed function, so what follows it is not judged.
CODEX_STOPS = ["\nclass", "\ndef", "\n#", "\nif"]


def measure(engine: Engine, prompts, new_tokens: int, options: dict | None, sampling: dict, healing: bool) -> dict:
    """``options`` None: each prompt as a plain /v1/completions body with ``sampling``'s fields, built
    into a request as a worker builds it."""
    requests = []
    for i, p in enumerate(prompts):
        if options is None:
            body = {"model": engine.name, "prompt": p.prompt, "max_tokens": new_tokens, "seed": i,
                    **sampling, "diffusion": {"token_healing": healing}}
            requests.append(to_generation_request(engine, "/v1/completions", body))
            continue
        ids, healed = engine.heal(engine.encode_completion(p.prompt)) if healing else (
            engine.encode_completion(p.prompt), None)
        requests.append(GenerationRequest(ids, SamplingParams(max_tokens=new_tokens, seed=i, **options, **sampling),
                                          healing=healed))
    started = time.perf_counter()
    results = engine.generate(requests)
    seconds = time.perf_counter() - started
    tokens = sum(len(r.token_ids) for r in results)
    covers = [coverage(len(r.token_ids), len(engine.tokenizer.encode(p.body, add_special_tokens=False)), new_tokens)
              for p, r in zip(prompts, results, strict=True)]
    return {
        "parse_share": sum(parses(p.prompt, r.text) for p, r in zip(prompts, results, strict=False)) / len(prompts),
        "distinct_ratio": sum(distinct_ratio(r.token_ids) for r in results) / len(results),
        "coverage": sum(covers) / len(covers),
        "tokens": tokens,
        "tokens_per_s": tokens / seconds,
        "passes_per_token": sum(r.forward_passes for r in results) / max(1, tokens),
        "samples": [(p.source, p.prompt, r.text) for p, r in zip(prompts[:3], results[:3], strict=False)],
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint folder (default: the built-in model)")
    parser.add_argument("--dtype", default="auto", help="float32, bfloat16 or auto (the engine's default: "
                        "bfloat16 on CUDA, float32 elsewhere)")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--block-length", type=int, help="default: the model's (config.json)")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--frequency-penalty", type=float, default=0.0)
    parser.add_argument("--presence-penalty", type=float, default=0.0)
    parser.add_argument("--stop", action="append", default=[],
                        help=f"a stop sequence (repeatable); --stop codex for the Codex set {CODEX_STOPS}")
    parser.add_argument("--samplers", default=DEFAULT_SAMPLERS,
                        help="comma-separated: default (a plain body: the model's own sampler), reference, "
                        "'reference STEPS', 'threshold TAU [steps S] [edit E]', 'factor F'")
    parser.add_argument("--caches", default="exact",
                        help="comma-separated KV caches each sampler runs with: exact, delayed (engine.py)")
    parser.add_argument("--step-rows", default="working",
                        help="comma-separated: working (a step runs over the rows still working on their block, "
                        "the engine's way), all (over the whole batch until its slowest row is done)")
    parser.add_argument("--no-healing", action="store_true", help="run the prompts' tokens as they are "
                        "(the service heals a completion prompt's last token by default)")
    parser.add_argument("--samples", action="store_true", help="print three completions per sampler")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv[1:])
    path = args.model or str(Settings().model_path)
    loaded = load_model(path, dtype=args.dtype)
    engines = {cache: Engine(loaded, max_batch_size=args.batch, cache=cache) for cache in args.caches.split(",")}
    args.block_length = args.block_length or next(iter(engines.values())).default_block_length
    _, held_out = split(list_sources())
    prompts = function_prompts(held_out, limit=args.prompts)
    stops = CODEX_STOPS if args.stop == ["codex"] else args.stop
    print(f"command: {' '.join([sys.executable, *argv])}")
    print(f"model {path}; {len(prompts)} held-out prompts, {args.new_tokens} new tokens, batch {args.batch}, "
          f"block {args.block_length}, temperature {args.temperature}, top_p {args.top_p}, "
          f"frequency/presence penalty {args.frequency_penalty}/{args.presence_penalty}, stop {stops}, "
          f"token healing {not args.no_healing}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads)\n")
    print(f"{'sampler':<24} {'parses':>7} {'distinct':>9} {'tok/req':>8} {'covers':>7} "
          f"{'tok/s':>8} {'vs ref':>7} {'passes/tok':>10}")
    figures, baseline = {}, None
    for label, cache, step_rows in [(label, cache, rows) for label in args.samplers.split(",") for cache in engines
                                    for rows in args.step_rows.split(",")]:
        blocks.SUBSET_SHARE = {"working": WORKING_SHARE, "all": 0.0}[step_rows]
        options = sampler_options(label)
        if options is not None:
            options = {**options, "block_length": args.block_length}
        sampling = {"temperature": args.temperature, "top_p": args.top_p, "stop": stops,
                    "frequency_penalty": args.frequency_penalty, "presence_penalty": args.presence_penalty}
        row = measure(engines[cache], prompts, args.new_tokens, options, sampling, healing=not args.no_healing)
        baseline = baseline or row["tokens_per_s"]
        label = label if cache == "exact" else f"{label}, {cache}"
        label = label if step_rows == "working" else f"{label}, all rows"
        figures[label] = {k: v for k, v in row.items() if k != "samples"}
        print(f"{label:<24} {100 * row['parse_share']:>6.1f}% {row['distinct_ratio']:>9.3f} "
              f"{row['tokens'] / len(prompts):>8.1f} {row['coverage']:>7.2f} "
              f"{row['tokens_per_s']:>8.1f} {row['tokens_per_s'] / baseline:>6.2f}x {row['passes_per_token']:>10.3f}")
        if args.samples:
            for source, prompt, text in row["samples"]:
                print(f"--- {source}\n{prompt}\033[1m{text}\033[0m\n")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(figures, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
