"""Does the engine give the same tokens on an accelerator as on the CPU? One run, side by side.

    python bench/device_agreement.py --device cuda [--prompts 16] [--new-tokens 64] [--batch 8]
                                     [--random-shape 512x8x8 [--family sdar|llada2|fast_dllm_v2]]
                                     [--sampler "threshold 0.5 edit 0.3"]

Greedy sampling (reference unless --sampler names another, as bench/quality.py's labels: e.g.
LLaDA2.1's editing, whose state a captured step keeps on the device) on the built-in model (or
--model PATH, or random weights of the built-in, SDAR, LLaDA2 or Fast-dLLM v2 architecture at
--random-shape, made once on the CPU so every copy has the same weights), exact block cache, held-out
function prompts. Prints, for each comparison, how many requests came out token for token equal
and the mean position of the first differing token among those that did not:
  - the device in float32 against the CPU in float32 (kernels differ, so ties may break apart);
  - on the device, a batch of N against N batches of 1, in float32 and in the device's default dtype;
  - on the device, the block cache against full recomputation, in float32;
  - on the device, steps replayed from a CUDA graph (the default there) against eager steps, in
    float32 and in the default dtype (worker/engine/cuda_graph.py).
The tests hold the batch, cache and graph comparisons exactly on the CPU; this shows how far they
hold on the device.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys

import torch
from engine import with_random_weights  # bench/ is the script's folder, so first on sys.path
from quality import sampler_options

from common.settings import Settings
from training.completions import function_prompts
from training.corpus import list_sources, split
from worker.engine.engine import Engine
from worker.engine.loader import load_model
from worker.engine.params import GenerationRequest, SamplingParams

SAMPLER = {"sampler": "reference"}  # main() sets --sampler's options


def generate(loaded, prompts, new_tokens: int, batch: int, cache: str = "exact",
             graphs: bool | None = None) -> list[list[int]]:
    engine = Engine(loaded, max_batch_size=batch, cache=cache, graphs=graphs)
    params = SamplingParams(max_tokens=new_tokens, block_length=engine.default_block_length, **SAMPLER)
    requests = [GenerationRequest(engine.encode_completion(p), params) for p in prompts]
    return [list(r.token_ids) for r in engine.generate(requests)]


def compare(label: str, left: list[list[int]], right: list[list[int]]) -> None:
    firsts = [next((i for i, (a, b) in enumerate(zip(x, y, strict=False)) if a != b), min(len(x), len(y)))
              for x, y in zip(left, right, strict=False) if x != y]
    where = f", first difference at token {sum(firsts) / len(firsts):.1f} on average" if firsts else ""
    print(f"{label:52} {len(left) - len(firsts):>3}/{len(left)} identical{where}")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", help="checkpoint folder (default: the built-in model)")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--random-shape", help="HIDDENxLAYERSxHEADS: random weights instead of the checkpoint's")
    parser.add_argument("--family", default="block_causal", choices=["block_causal", "sdar", "llada2", "fast_dllm_v2"],
                        help="with --random-shape: the built-in architecture, SDAR's, LLaDA2's or Fast-dLLM v2's")
    parser.add_argument("--sampler", default="reference", help="a bench/quality.py label, run greedily")
    args = parser.parse_args(argv[1:])
    SAMPLER.update(sampler_options(args.sampler))
    path = args.model or str(Settings().model_path)
    prompts = [p.prompt for p in function_prompts(split(list_sources())[1], limit=args.prompts)]
    cpu = load_model(path, device="cpu", dtype="float32")
    if args.random_shape:
        cpu = with_random_weights(cpu, args.random_shape, "cpu", args.family)
        path = f"{cpu.name} (random {args.family} weights)"

        def on_device(dtype):
            return dataclasses.replace(cpu, model=copy.deepcopy(cpu.model).to(device=args.device, dtype=dtype))

        exact = on_device(torch.float32)
        native = on_device(torch.bfloat16 if args.device.startswith("cuda") else torch.float32)
    else:
        exact = load_model(path, device=args.device, dtype="float32")
        native = load_model(path, device=args.device)
    print(f"model {path}; {len(prompts)} prompts, {args.new_tokens} new tokens, greedy {args.sampler!r}; "
          f"device {args.device} ({torch.cuda.get_device_name() if args.device.startswith('cuda') else ''}), "
          f"default dtype {next(native.model.parameters()).dtype}")
    on_cpu = generate(cpu, prompts, args.new_tokens, args.batch)
    batched = generate(exact, prompts, args.new_tokens, args.batch)
    compare(f"{args.device} float32 vs cpu float32 (batch {args.batch})", batched, on_cpu)
    compare(f"{args.device} float32: batch {args.batch} vs batches of 1", batched,
            generate(exact, prompts, args.new_tokens, 1))
    native_batched = generate(native, prompts, args.new_tokens, args.batch)
    compare(f"{args.device} default dtype: batch {args.batch} vs batches of 1", native_batched,
            generate(native, prompts, args.new_tokens, 1))
    compare(f"{args.device} default dtype vs float32 (batch {args.batch})", native_batched, batched)
    if exact.family != "fast_dllm_v2":  # it runs with the exact cache only (engine.py)
        compare(f"{args.device} float32: block cache vs recompute (batch {args.batch})", batched,
                generate(exact, prompts, args.new_tokens, args.batch, cache="none"))
    compare(f"{args.device} float32: graph vs eager steps (batch {args.batch})", batched,
            generate(exact, prompts, args.new_tokens, args.batch, graphs=False))
    compare(f"{args.device} default dtype: graph vs eager steps (batch {args.batch})", native_batched,
            generate(native, prompts, args.new_tokens, args.batch, graphs=False))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
