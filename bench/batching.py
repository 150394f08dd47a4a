"""Continuous batching against fixed batches, side by side in one run, on requests of mixed lengths.

    python bench/batching.py [--family llada|dream] [--shape 512x4x8] [--requests 32] [--batch 8]
                             [--max-tokens 32,256] [--caches none,dual] [--block-length 32]
                             [--device cpu|cuda]

A batch job's requests ask for different lengths. Fixed batches (how diffbatch ran full-attention
models before worker/engine/schedulers/) keep every row in the forward pass until the batch's longest row is
done, and lay every row's canvas out to that longest length. Continuous batching lets a finished
row leave at the next block boundary and a waiting one take its place, and each canvas ends at its
own row's length. The baseline runs on the same engine: each fixed batch is one engine call of
``--batch`` rows, every one asking for the batch's longest max_tokens (the work the fixed path did).

Random weights of the family's architecture at ``--shape`` HIDDENxLAYERSxHEADS (byte tokenizer), so
speed only; reference sampler, temperature 0, one token a pass. Prints tokens/s (the tokens the
requests get back, at their own lengths), the ratio, and the tokens the forward passes computed per
delivered token (machine-independent).
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import sys
import tempfile
import time

import torch

from worker.engine.builtin.tokenizer import build_byte_tokenizer
from worker.engine.engine import Engine
from worker.engine.families import DreamConfig, DreamForMaskedDiffusion, LLaDAConfig, LLaDAForMaskedDiffusion
from worker.engine.loader import load_model
from worker.engine.params import GenerationRequest, SamplingParams


def random_model(family: str, shape: str, folder: str, device: str):
    hidden, layers, heads = (int(n) for n in shape.split("x"))
    tokenizer = build_byte_tokenizer()
    ids = dict(mask_token_id=tokenizer.mask_token_id, pad_token_id=tokenizer.pad_token_id,
               eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    if family == "llada":
        config = LLaDAConfig(d_model=hidden, n_heads=heads, n_kv_heads=heads, n_layers=layers,
                             mlp_hidden_size=4 * hidden, activation_type="silu", block_type="llama",
                             layer_norm_type="rms", rope=True, vocab_size=len(tokenizer),
                             embedding_size=len(tokenizer), weight_tying=False, max_sequence_length=4096, **ids)
        model = LLaDAForMaskedDiffusion(config)
    else:
        config = DreamConfig(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                             num_attention_heads=heads, num_key_value_heads=heads, vocab_size=len(tokenizer),
                             max_position_embeddings=4096, **ids)
        model = DreamForMaskedDiffusion(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return load_model(folder, device=device)  # the engine's dtype: bf16 on CUDA, float32 elsewhere


def workload(engine: Engine, count: int, lengths: tuple[int, int], block: int) -> list[GenerationRequest]:
    """``count`` prompts of 8-64 characters, max_tokens uniform over the blocks in ``lengths``."""
    rng = random.Random(0)
    requests = []
    for i in range(count):
        prompt = engine.encode_completion(f"# task {i}: " + "x" * rng.randint(0, 52))
        max_tokens = rng.randrange(lengths[0], lengths[1] + 1, block)
        requests.append(GenerationRequest(prompt, SamplingParams(max_tokens=max_tokens, block_length=block,
                                                                 sampler="reference", temperature=0.0)))
    return requests


def fixed_batches(requests: list[GenerationRequest], batch: int) -> list[list[GenerationRequest]]:
    """The fixed path's batches (requests sorted by prompt length), each row asking for its batch's
    longest max_tokens, as the fixed path computed."""
    ordered = sorted(requests, key=lambda r: len(r.prompt_ids))
    batches = []
    for first in range(0, len(ordered), batch):
        group = ordered[first : first + batch]
        longest = max(r.params.max_tokens for r in group)
        batches.append([GenerationRequest(r.prompt_ids, dataclasses.replace(r.params, max_tokens=longest))
                        for r in group])
    return batches


def timed(engine: Engine, calls: list[list[GenerationRequest]], counted: dict) -> tuple[float, int, list]:
    """Seconds for the engine calls one after another, the tokens their forwards computed, results."""
    counted["tokens"] = 0
    start = time.perf_counter()
    results = [result for requests in calls for result in engine.generate(requests)]
    return time.perf_counter() - start, counted["tokens"], results


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="llada", choices=["llada", "dream"])
    parser.add_argument("--shape", default="512x4x8", help="HIDDENxLAYERSxHEADS of the random model")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-tokens", default="32,256", help="the range max_tokens is drawn from")
    parser.add_argument("--block-length", type=int, default=32)
    parser.add_argument("--caches", default="none,dual")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv[1:])
    low, high = (int(n) for n in args.max_tokens.split(","))
    with tempfile.TemporaryDirectory() as folder:
        loaded = random_model(args.family, args.shape, folder, args.device)
    counted = {"tokens": 0}

    def count_tokens(_module, positional, kwargs, _output) -> None:  # every token a forward runs
        counted["tokens"] += kwargs.get("input_ids", positional[0] if positional else None).numel()

    loaded.model.register_forward_hook(count_tokens, with_kwargs=True)
    print(f"command: {' '.join([sys.executable, *argv])}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.device}; "
          f"{args.family} {args.shape} random; "
          f"{args.requests} requests, max_tokens {low}-{high}, block {args.block_length}, batch {args.batch}")
    print(f"{'cache':6} {'batching':11} {'tokens':>7} {'seconds':>8} {'tok/s':>8} {'ratio':>6} {'computed/token':>15}")
    for cache in args.caches.split(","):
        engine = Engine(loaded, max_batch_size=args.batch, cache=cache)
        requests = workload(engine, args.requests, (low, high), args.block_length)
        engine.generate(requests[: args.batch])  # warm-up
        fixed_s, fixed_work, _ = timed(engine, fixed_batches(requests, args.batch), counted)
        cont_s, cont_work, results = timed(engine, [requests], counted)
        # The tokens delivered: each request's own completion (cut at its max_tokens or an EOS).
        delivered = sum(r.completion_tokens for r in results)
        for label, seconds, work in (("fixed", fixed_s, fixed_work), ("continuous", cont_s, cont_work)):
            print(f"{cache:6} {label:11} {delivered:>7} {seconds:>8.2f} {delivered / seconds:>8.1f} "
                  f"{fixed_s / seconds:>5.2f}x {work / delivered:>15.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
