"""Engine speed, side by side in one run: samplers, KV cache, an autoregressive baseline, FLOP/s.

    python bench/engine.py [--device cpu|cuda] [--new-tokens 256] [--batches 1,8,32,64] [--prompts 64]
                           [--samplers "threshold 0.9,factor 1.0"] [--caches exact,graph,delayed]
                           [--random-shape 2048x24x16 [--family sdar|llada2|fast_dllm_v2]]

Prints tokens/s and ratios for, at each batch size:
  - the reference sampler (LLaDA, one token a pass) with full recomputation: the published baseline;
  - the reference sampler with the exact block KV cache;
  - the parallel samplers (threshold, factor) with the cache;
  - with --caches exact,delayed, each sampler again with the delayed in-block cache (approximate:
    committed positions of the active block are not run again; worker/engine/caches/delayed.py);
  - with --caches exact,graph (the default on CUDA), each sampler again with the exact cache and each
    round's step replayed from a CUDA graph (worker/engine/cuda_graph.py); "exact" rows run eagerly;
    under each graph row, the host time its rounds spent outside replays (eager first steps, captures);
  - an autoregressive Llama of the same width and depth decoding with its KV cache
    (transformers' generate, greedy, exactly --new-tokens tokens), and with --ar-static (the default on
    CUDA) again with transformers' static cache, which generate compiles with CUDA graphs: the ratios
    are against the faster of the two; for an SDAR model, a Qwen3 of
    its shape (the architecture SDAR was trained from), for a LLaDA2 model a GLM-4.5-style mixture
    of experts of its shape (the same router, shared expert and partial rotation), for Fast-dLLM v2
    a Qwen2 of its shape (its own architecture);
and, per engine mode, forward passes per token, achieved FLOP/s as a share of this machine's
measured matmul peak, and peak memory (CUDA: allocated bytes; CPU: process RSS high-water mark).
The model is the built-in trained one (`--model PATH` for another); the parallel samplers run at
their documented defaults, whose quality bench/quality.py measures on the same model.
`--random-shape HIDDENxLAYERSxHEADS` swaps in random weights of the built-in architecture at that
shape (built-in tokenizer): speed only, for sizes where the accelerator, not launches, sets the pace.
With `--family sdar` those weights are SDAR's architecture instead (Qwen3: half as many key/value
heads as query heads, q/k norm, untied head; blocks aligned from position 0, trained block 4), and
with `--family llada2` LLaDA2's (LLaDA2.0-mini's proportions: a quarter as many key/value heads, 256
experts of a quarter of the hidden width, 8 chosen in the 4 best of 8 groups, one shared expert, the
first layer dense; block 32), and with `--family fast_dllm_v2` Fast-dLLM v2's (Qwen2: a quarter as
many key/value heads, q/k/v biases; block 32, each block opened autoregressively, sub-blocks of 8).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import resource
import sys
import time

import torch
from quality import sampler_options  # bench/ is the script's folder, so first on sys.path

from common.settings import Settings
from worker.engine import cuda_graph
from worker.engine.builtin import DiffbatchMDMForMaskedDiffusion
from worker.engine.builtin.create import config_for
from worker.engine.engine import Engine
from worker.engine.families import (
    FastDLLMv2Config,
    FastDLLMv2ForBlockDiffusion,
    LLaDA2Config,
    LLaDA2ForBlockDiffusion,
    SDARConfig,
    SDARForBlockDiffusion,
)
from worker.engine.loader import load_model
from worker.engine.params import GenerationRequest, SamplingParams

PROMPT = 'def {name}(items, key=None):\n    """Return the {name} of items, by key if given."""\n'
NAMES = ("median", "mode", "largest", "smallest", "first_duplicate", "running_total", "histogram", "spread")


def modes(parallel: str, caches: str = "exact", blocks: tuple[int, ...] = (32,)) -> dict:
    """label: (sampler options, cache). The recompute baseline at the first block length, then
    reference and each parallel sampler with each cache ("exact": the block KV cache, labelled
    "kv cache"; "graph": the same, steps replayed from a CUDA graph; "delayed"), at each block length
    (labelled when not the first)."""
    table = {"reference, recompute": ({"sampler": "reference", "block_length": blocks[0]}, "none")}
    for block in blocks:
        suffix = "" if block == blocks[0] else f", block {block}"
        for cache in caches.split(","):
            name = {"exact": "kv cache", "graph": "kv cache, cuda graph"}.get(cache, f"{cache} cache")
            for label in ["reference", *parallel.split(",")]:
                options = {**sampler_options(label), "block_length": block}
                table[f"{label.strip()}, {name}{suffix}"] = (options, cache)
    return table


def count_flops(model) -> dict:
    """Matmul FLOPs of every forward: 2 x weights x tokens, plus attention scores and values."""
    config, total = model.config, {"flops": 0.0}
    hidden, layers = config.hidden_size, config.num_hidden_layers
    # Layer matrices only: the embedding is a lookup, the output projection is counted per kept logit
    # (named_parameters lists a tied lm_head once, under the embedding's name).
    weights = sum(p.numel() for n, p in model.named_parameters()
                  if p.dim() == 2 and "embed" not in n and "lm_head" not in n)
    # Stacked experts (E, out, in): a token passes through num_experts_per_tok of them.
    weights += sum(p.numel() * config.num_experts_per_tok // p.shape[0]
                   for p in model.parameters() if p.dim() == 3)

    def hook(_module, args, kwargs, output) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        queries = ids.numel()
        keys = kwargs["attention_mask"].shape[-1] if kwargs.get("attention_mask") is not None else ids.shape[1]
        logits = output.logits.shape[0] * output.logits.shape[1]
        total["flops"] += 2 * weights * queries  # layers
        total["flops"] += 2 * config.vocab_size * hidden * logits  # kept logits only
        total["flops"] += 4 * layers * hidden * queries * keys  # QK^T and AV

    def counted_hook(_module, args, kwargs, output) -> None:
        before = total["flops"]
        hook(_module, args, kwargs, output)
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            # Captured, not run: each replay of that graph runs it (below).
            total["captured"], total["flops"] = total["flops"] - before, before

    model.register_forward_hook(counted_hook, with_kwargs=True)
    if torch.cuda.is_available():
        replay = torch.cuda.CUDAGraph.replay

        def counted_replay(graph) -> None:  # a round's graph replays only until the next capture
            total["flops"] += total.get("captured", 0.0)
            replay(graph)

        torch.cuda.CUDAGraph.replay = counted_replay
    return total


def time_graph_rounds() -> dict:
    """Host seconds the CUDA-graph rounds spend outside their replays: the eager first step of each
    round and its capture (worker/engine/cuda_graph.py), summed since the caller last reset them."""
    spent = {"captures": 0, "capture_s": 0.0, "first_step_s": 0.0}

    def timed(name: str, fn):
        def wrapper(*args):
            start = time.perf_counter()
            try:
                return fn(*args)
            finally:
                spent[name] += time.perf_counter() - start
                spent["captures"] += name == "capture_s"
        return wrapper

    cuda_graph._capture = timed("capture_s", cuda_graph._capture)
    cuda_graph._on_side_stream = timed("first_step_s", cuda_graph._on_side_stream)
    return spent


def with_random_weights(loaded, shape: str, device: str, family: str = "block_causal"):
    """The built-in architecture (or SDAR's, LLaDA2's or Fast-dLLM v2's) at HIDDENxLAYERSxHEADS (MLP width 8/3 hidden,
    rounded to 64), random weights built on the device in the loaded model's dtype; tokenizer and special ids
    unchanged."""
    hidden, layers, heads = (int(v) for v in shape.lower().split("x"))
    sizes = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                 intermediate_size=64 * round(hidden * 8 / 3 / 64), max_position_embeddings=loaded.max_positions)
    tokenizer = loaded.tokenizer
    special = dict(vocab_size=len(tokenizer), mask_token_id=tokenizer.mask_token_id,
                   pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                   bos_token_id=tokenizer.bos_token_id, diffbatch_name=f"random-{family}-{shape}")
    if family == "llada2":
        config = LLaDA2Config(**{**sizes, "intermediate_size": 64 * round(hidden * 2.5 / 64)},
                              num_key_value_heads=max(1, heads // 4), head_dim=hidden // heads, num_experts=256,
                              num_experts_per_tok=8, n_group=8, topk_group=4, moe_intermediate_size=hidden // 4,
                              num_shared_experts=1, first_k_dense_replace=1, use_bias=False, **special)
        model_class, family_name = LLaDA2ForBlockDiffusion, "llada2"
    elif family == "fast_dllm_v2":
        config = FastDLLMv2Config(**sizes, num_key_value_heads=max(1, heads // 4), head_dim=hidden // heads, **special)
        model_class, family_name = FastDLLMv2ForBlockDiffusion, "fast_dllm_v2"
    elif family == "sdar":
        config = SDARConfig(**sizes, num_key_value_heads=max(1, heads // 2), head_dim=hidden // heads, **special)
        model_class, family_name = SDARForBlockDiffusion, "sdar"
    else:
        config = config_for(loaded.tokenizer, name=f"random-{shape}", block_length=loaded.config.block_length,
                            **sizes)
        model_class, family_name = DiffbatchMDMForMaskedDiffusion, loaded.family
    dtype = next(loaded.model.parameters()).dtype
    torch.manual_seed(0)
    with torch.device(device):
        model = model_class(config).to(dtype).eval()
    return dataclasses.replace(loaded, model=model, config=config, name=config.diffbatch_name, family=family_name)


def matmul_peak(device: str, dtype: torch.dtype, repeat: int = 10) -> tuple[float, int]:
    """FLOP/s of a square matmul: 2048 on the CPU, 8192 on an accelerator (2048 is launch-bound there)."""
    size = 8192 if device.startswith("cuda") else 2048
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(repeat):
        a @ b
    sync(device)
    return 2 * size**3 * repeat / (time.perf_counter() - start), size


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_memory_mb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def run_engine(loaded, device, batch, prompts, new_tokens, options, cache, counter, rounds) -> dict:
    engine = Engine(loaded, max_batch_size=batch, cache="exact" if cache == "graph" else cache,
                    graphs=cache == "graph")
    requests = [GenerationRequest(engine.encode_completion(p), SamplingParams(max_tokens=new_tokens, **options))
                for p in prompts]
    engine.generate(requests[:batch])  # warm-up
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    counter["flops"] = 0.0
    rounds.update(captures=0, capture_s=0.0, first_step_s=0.0)
    sync(device)
    start = time.perf_counter()
    results = engine.generate(requests)
    sync(device)
    seconds = time.perf_counter() - start
    tokens = sum(len(r.token_ids) for r in results)
    passes = sum(r.forward_passes for r in results) / len(results)
    return {"tokens": tokens, "seconds": seconds, "passes_per_token": passes / new_tokens,
            "flops": counter["flops"], "memory_mb": peak_memory_mb(device), "rounds": dict(rounds)}


def run_autoregressive(config, device, dtype, batch, prompts, new_tokens, tokenizer, static: bool = False) -> dict:
    """A Llama of the same width and depth (a Qwen3 of the same shape for SDAR, a GLM-4.5-style
    mixture of experts for LLaDA2, a Qwen2 for Fast-dLLM v2), random weights, greedy, KV cache:
    tokens/s only. ``static``: transformers' static KV cache, which its ``generate`` compiles with
    ``torch.compile`` (CUDA graphs, "reduce-overhead") on an accelerator: what an autoregressive server
    does to stop the host from setting the pace. Every call then has one shape (prompts padded to the
    longest), so the compiled graph is built once, in the warm-up."""
    from transformers import (
        Glm4MoeConfig,
        Glm4MoeForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    shape = dict(vocab_size=config.vocab_size, hidden_size=config.hidden_size,
                 intermediate_size=config.intermediate_size, num_hidden_layers=config.num_hidden_layers,
                 num_attention_heads=config.num_attention_heads,
                 max_position_embeddings=config.max_position_embeddings,
                 pad_token_id=tokenizer.pad_token_id, eos_token_id=None, bos_token_id=None)
    torch.manual_seed(0)
    if isinstance(config, LLaDA2Config):
        model = Glm4MoeForCausalLM(Glm4MoeConfig(
            **shape, num_key_value_heads=config.num_key_value_heads, head_dim=config.head_dim,
            partial_rotary_factor=config.partial_rotary_factor, use_qk_norm=True, n_routed_experts=config.num_experts,
            num_experts_per_tok=config.num_experts_per_tok, n_group=config.n_group, topk_group=config.topk_group,
            moe_intermediate_size=config.moe_intermediate_size, n_shared_experts=config.num_shared_experts,
            routed_scaling_factor=config.routed_scaling_factor, first_k_dense_replace=config.first_k_dense_replace,
            num_mtp_layers=0))
    elif isinstance(config, FastDLLMv2Config):
        model = Qwen2ForCausalLM(Qwen2Config(**shape, num_key_value_heads=config.num_key_value_heads,
                                             tie_word_embeddings=False))
    elif isinstance(config, SDARConfig):
        model = Qwen3ForCausalLM(Qwen3Config(**shape, num_key_value_heads=config.num_key_value_heads,
                                             head_dim=config.head_dim, tie_word_embeddings=False))
    else:
        model = LlamaForCausalLM(LlamaConfig(**shape))
    model = model.to(device=device, dtype=dtype).eval()
    counter = count_flops(model)
    tokenizer.padding_side = "left"
    longest = max(len(tokenizer(p)["input_ids"]) for p in prompts)
    padding = {"padding": "max_length", "max_length": longest} if static else {"padding": True}
    options = {"cache_implementation": "static"} if static else {}
    # Warm-up at this batch shape, as the engine gets: the first generate call pays one-off costs
    # (on CUDA, kernel selection for new shapes; with the static cache, the compilation) that would
    # otherwise be charged to the baseline. The static cache's length is the timed calls' own.
    warm = tokenizer(prompts[:batch], return_tensors="pt", **padding).to(device)
    with torch.inference_mode():
        model.generate(**warm, max_new_tokens=new_tokens if static else 8, min_new_tokens=8, do_sample=False,
                       use_cache=True, **options)
    counter["flops"] = 0.0
    tokens, seconds = 0, 0.0
    for first in range(0, len(prompts), batch):
        encoded = tokenizer(prompts[first:first + batch], return_tensors="pt", **padding).to(device)
        with torch.inference_mode():
            sync(device)
            start = time.perf_counter()
            out = model.generate(**encoded, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                 do_sample=False, use_cache=True, **options)
            sync(device)
        seconds += time.perf_counter() - start
        tokens += (out.shape[1] - encoded["input_ids"].shape[1]) * out.shape[0]
    return {"tokens": tokens, "seconds": seconds, "flops": counter["flops"]}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", help="checkpoint folder (default: the built-in model)")
    parser.add_argument("--dtype", default="auto", help="float32, bfloat16 or auto (the engine's default: "
                        "bfloat16 on CUDA, float32 elsewhere)")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--batches", default="1,8,32,64", help="comma-separated batch sizes")
    parser.add_argument("--recompute-up-to", type=int, default=32,
                        help="run the recompute baseline only up to this batch size (it is slow)")
    parser.add_argument("--prompts", type=int, default=32, help="requests per measurement (>= each batch)")
    parser.add_argument("--samplers", default="threshold 0.9,factor 1.0",
                        help="parallel samplers to run with the cache: 'threshold TAU', 'factor F' (comma-separated; "
                        "default: their documented defaults)")
    parser.add_argument("--caches", help="comma-separated caches for the cached rows: exact (eager steps), "
                        "graph (CUDA only), delayed (default: exact, and graph on CUDA)")
    parser.add_argument("--block-lengths", help="comma-separated; the first is the baseline's (default: "
                        "the trained block, 32, then the model's default block if it differs)")
    parser.add_argument("--random-shape", help="HIDDENxLAYERSxHEADS: random weights of the built-in "
                        "architecture at this shape instead of the checkpoint's (speed only)")
    parser.add_argument("--family", default="block_causal",
                        choices=["block_causal", "sdar", "llada2", "fast_dllm_v2"],
                        help="with --random-shape: the built-in architecture, SDAR's, LLaDA2's or Fast-dLLM v2's")
    parser.add_argument("--ar-static", action=argparse.BooleanOptionalAction, default=None,
                        help="also run the autoregressive baseline with a static KV cache, compiled on an "
                        "accelerator (default: on CUDA)")
    args = parser.parse_args(argv[1:])
    if args.ar_static is None:
        args.ar_static = args.device.startswith("cuda")
    path = args.model or str(Settings().model_path)
    loaded = load_model(path, device=args.device, dtype=args.dtype)
    if args.random_shape:
        loaded = with_random_weights(loaded, args.random_shape, args.device, args.family)
        path = f"{loaded.name} ({sum(p.numel() for p in loaded.model.parameters()) / 1e6:.0f}M parameters)"
    dtype = next(loaded.model.parameters()).dtype
    counter = count_flops(loaded.model)
    rounds = time_graph_rounds()
    default_block = Engine(loaded).default_block_length
    try:
        Engine(loaded, cache="none")
    except ValueError as error:  # Fast-dLLM v2: its blocks open from the exact cache's commit pass
        print(f"no recompute baseline: {error}")
        args.recompute_up_to = 0
    blocks = tuple(int(b) for b in args.block_lengths.split(",")) if args.block_lengths else tuple(
        dict.fromkeys([32, default_block]))
    peak, size = matmul_peak(args.device, dtype)
    print(f"command: {' '.join([sys.executable, *argv])}")
    print(f"machine: {os.cpu_count()} CPUs {platform.machine()}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), device {args.device}, {dtype}; model {path}")
    print(f"measured matmul peak: {peak / 1e9:.1f} GFLOP/s ({dtype}, {size}x{size})\n")
    print(f"{'batch':>5} {'mode':40} {'tokens':>7} {'seconds':>8} {'tok/s':>9} {'vs ref':>7} {'vs AR':>6} "
          f"{'passes/tok':>10} {'MFLOP/tok':>9} {'GFLOP/s':>8} {'% peak':>7} {'peak MB':>8}")
    caches = args.caches or ("exact,graph" if args.device.startswith("cuda") else "exact")
    for batch in [int(b) for b in args.batches.split(",")]:
        prompts = [PROMPT.format(name=NAMES[i % len(NAMES)]) for i in range(max(args.prompts, batch))]
        baselines = {"autoregressive (generate)": run_autoregressive(
            loaded.config, args.device, dtype, batch, prompts, args.new_tokens, loaded.tokenizer)}
        if args.ar_static:
            compiled = ", compiled" if args.device.startswith("cuda") else ""  # generate compiles on accelerators
            baselines[f"autoregressive (static cache{compiled})"] = run_autoregressive(
                loaded.config, args.device, dtype, batch, prompts, args.new_tokens, loaded.tokenizer, static=True)
        # Ratios are against the faster baseline: the one a user would run.
        ar_label, ar = max(baselines.items(), key=lambda item: item[1]["tokens"] / item[1]["seconds"])
        ar_rate = ar["tokens"] / ar["seconds"]
        rows, baseline = [], None
        for label, (options, cache) in modes(args.samplers, caches, blocks).items():
            if cache == "none" and batch > args.recompute_up_to:
                continue
            row = run_engine(loaded, args.device, batch, prompts, args.new_tokens, options, cache, counter, rounds)
            rate = row["tokens"] / row["seconds"]
            baseline = baseline or (rate if cache == "none" else None)
            achieved = row["flops"] / row["seconds"]
            versus = f"{rate / baseline:>6.2f}x" if baseline else f"{'-':>7}"
            print(f"{batch:>5} {label:40} {row['tokens']:>7} {row['seconds']:>8.2f} {rate:>9.1f} {versus} "
                  f"{rate / ar_rate:>5.2f}x {row['passes_per_token']:>10.3f} "
                  f"{row['flops'] / row['tokens'] / 1e6:>9.1f} "
                  f"{achieved / 1e9:>8.2f} {100 * achieved / peak:>6.1f}% {row['memory_mb']:>8.0f}")
            if row["rounds"]["captures"]:
                spent = row["rounds"]
                print(f"{'':>5}   of which, host time: {spent['first_step_s']:.2f} s in the eager first steps and "
                      f"{spent['capture_s']:.2f} s in the captures of {spent['captures']} rounds")
            rows.append((label, rate))
        for label, run in baselines.items():
            rate = run["tokens"] / run["seconds"]
            versus = f"{rate / baseline:>6.2f}x" if baseline else f"{'-':>7}"
            print(f"{batch:>5} {label:40} {run['tokens']:>7} {run['seconds']:>8.2f} {rate:>9.1f} {versus} "
                  f"{rate / ar_rate:>5.2f}x {1.0:>10.3f} {run['flops'] / run['tokens'] / 1e6:>9.1f}")
        best = max(rows, key=lambda r: r[1])
        print(f"{batch:>5} fastest engine mode: {best[0]} at {best[1] / ar_rate:.2f}x the faster autoregressive "
              f"baseline ({ar_label})\n")
    print("vs ref: tokens/s over 'reference, recompute' at the same batch size (LLaDA's published sampler). "
          "vs AR: over the faster of transformers' generate with a KV cache and, with --ar-static, its static "
          "cache compiled (CUDA graphs). passes/tok: denoising passes per generated "
          "token per request (cache-filling passes not counted). MFLOP/tok: matmul FLOPs per generated token.")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
