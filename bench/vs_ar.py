"""The premise, measured: the built-in diffusion model against its autoregressive twin, same run.

    python bench/vs_ar.py [--twin bench/twin] [--model PATH] [--prompts 256] [--new-tokens 128]
                          [--batches 1,8,32,64] [--speed-prompts 64]

The twin is `diffbatch train-builtin --objective ar` (training/ar.py): the same shape, tokenizer, data,
windows and schedule, as a transformers Llama. Both continue the same held-out functions
(training/completions.py) at temperature 0, with the same token healing (the service heals a completion
prompt's last token; the twin gets the same constraint on its first token through a logits
processor, training/ar.py), and both stop at their end-of-text token. The twin runs ``generate``'s
static batches: a finished row keeps its place until the batch's longest row ends, where the engine
admits the next request (continuous batching), one reason the ratio moves with the batch size.
The diffusion model runs with what a plain OpenAI body gets: its default sampler and block length.

Printed: parse share and distinct-token ratio (quality); then at each batch size tokens/s of both, the
ratio, forward passes per token and matmul FLOPs per generated token (bench/engine.py's counter: layers,
kept logits, attention). The twin decodes with transformers' dynamic KV cache, eagerly: on a CPU the
host is not the bottleneck it is on a GPU (see bench/engine.py --device cuda for a compiled baseline).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from engine import count_flops  # bench/ is the script's folder, so first on sys.path
from quality import measure

from common.settings import Settings
from training.ar import twin_complete
from training.completions import distinct_ratio, function_prompts, parses
from training.corpus import list_sources, split
from worker.engine.engine import Engine
from worker.engine.loader import load_model


def twin_generate(model, tokenizer, engine: Engine, prompts: list[str], new_tokens: int, batch: int) -> dict:
    """Greedy completions of ``prompts`` by the twin, ``batch`` at a time, healed as the engine heals."""
    completions, seconds = twin_complete(model, tokenizer, lambda p: engine.heal(engine.encode_completion(p)),
                                         prompts, new_tokens=new_tokens, batch=batch)
    token_rows = [c.token_ids for c in completions]
    return {"texts": [c.text for c in completions], "token_rows": token_rows,
            "tokens": sum(len(r) for r in token_rows), "seconds": seconds}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--twin", default=str(Path(__file__).parent / "twin"),
                        help="the autoregressive twin's model folder (default: bench/twin)")
    parser.add_argument("--model", help="the diffusion model (default: the built-in model)")
    parser.add_argument("--prompts", type=int, default=256, help="held-out prompts for the quality figures")
    parser.add_argument("--speed-prompts", type=int, default=64, help="held-out prompts timed at each batch size")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batches", default="1,8,32,64")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv[1:])
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = args.model or str(Settings().model_path)
    loaded = load_model(path, dtype="float32")
    twin = AutoModelForCausalLM.from_pretrained(args.twin, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.twin)
    if tokenizer.get_vocab() != loaded.tokenizer.get_vocab():
        raise SystemExit("the twin's tokenizer differs from the diffusion model's: train it with --objective ar")
    _, held_out = split(list_sources())
    prompts = function_prompts(held_out, limit=args.prompts)
    texts = [p.prompt for p in prompts]
    print(f"command: {' '.join([sys.executable, *argv])}")
    print(f"diffusion {path}; twin {args.twin}; torch {torch.__version__} ({torch.get_num_threads()} threads)")

    figures: dict = {"quality": {}, "speed": {}}
    engine = Engine(loaded, max_batch_size=32)
    ours = measure(engine, prompts, args.new_tokens, {}, healing=True)
    theirs = twin_generate(twin, tokenizer, engine, texts, args.new_tokens, batch=32)
    twin_parse = sum(parses(p.prompt, t) for p, t in zip(prompts, theirs["texts"], strict=True)) / len(prompts)
    twin_distinct = sum(distinct_ratio(r) for r in theirs["token_rows"]) / len(prompts)
    figures["quality"] = {
        "diffusion": {"parse_share": ours["parse_share"], "distinct_ratio": ours["distinct_ratio"],
                      "passes_per_token": ours["passes_per_token"]},
        "twin": {"parse_share": twin_parse, "distinct_ratio": twin_distinct}}
    print(f"\n{len(prompts)} held-out prompts, {args.new_tokens} new tokens, temperature 0, sampler "
          f"{engine.default_sampler}, block {engine.default_block_length}")
    print(f"{'model':<12} {'parses':>7} {'distinct':>9}")
    print(f"{'diffusion':<12} {100 * ours['parse_share']:>6.1f}% {ours['distinct_ratio']:>9.3f}")
    print(f"{'twin':<12} {100 * twin_parse:>6.1f}% {twin_distinct:>9.3f}")

    speed_prompts = prompts[:args.speed_prompts]
    engine_flops, twin_flops = count_flops(loaded.model), count_flops(twin)
    print(f"\n{'batch':>5} {'diffusion tok/s':>16} {'twin tok/s':>11} {'ratio':>6} {'passes/tok':>10} "
          f"{'MFLOP/tok diffusion':>20} {'twin':>6}")
    for batch in (int(b) for b in args.batches.split(",")):
        engine = Engine(loaded, max_batch_size=batch)
        measure(engine, speed_prompts[:batch], 8, {}, healing=True)  # warm-up at this batch shape
        twin_generate(twin, tokenizer, engine, [p.prompt for p in speed_prompts[:batch]], 8, batch)
        engine_flops["flops"] = 0.0
        ours = measure(engine, speed_prompts, args.new_tokens, {}, healing=True)
        ours_flops = engine_flops["flops"]
        twin_flops["flops"] = 0.0
        theirs = twin_generate(twin, tokenizer, engine, [p.prompt for p in speed_prompts], args.new_tokens, batch)
        ours_tokens = ours["tokens_per_s"]
        theirs_tokens = theirs["tokens"] / theirs["seconds"]
        generated = ours["tokens"]
        row = {"diffusion_tokens_per_s": ours_tokens, "twin_tokens_per_s": theirs_tokens,
               "ratio": ours_tokens / theirs_tokens, "passes_per_token": ours["passes_per_token"],
               "diffusion_mflop_per_token": ours_flops / max(1, generated) / 1e6,
               "twin_mflop_per_token": twin_flops["flops"] / max(1, theirs["tokens"]) / 1e6}
        figures["speed"][batch] = row
        print(f"{batch:>5} {ours_tokens:>16.1f} {theirs_tokens:>11.1f} {row['ratio']:>5.2f}x "
              f"{row['passes_per_token']:>10.3f} {row['diffusion_mflop_per_token']:>20.1f} "
              f"{row['twin_mflop_per_token']:>6.1f}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(figures, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
