"""Peak memory and time of the engine on long prompts, next to the KV cache they need.

    python bench/long_prompts.py [--model PATH] [--prompts 32] [--prompt-tokens 1800] [--new-tokens 128]
                                 [--block-length 16] [--device cpu|cuda]

Runs one batch of ``--prompts`` prompts of about ``--prompt-tokens`` tokens each and prints the
seconds, the process's peak resident memory above what it held with the model loaded, and the
bytes of the exact KV cache the batch needs at its end (layers x 2 x rows x kv heads x columns x
head_dim x dtype size), the floor any engine must hold: their ratio is the engine's overhead. The
peak is read with glibc's mmap threshold fixed at 128 KiB (the script re-runs itself so), so
tensors freed during the run leave the count instead of lingering in the heap. On CUDA the peak is
the allocator's (``torch.cuda.max_memory_allocated``) above the loaded model's. Block-causal models
(the built-in model's family and SDAR).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time

TUNABLE = "glibc.malloc.mmap_threshold=131072"


def peak_mb(device: str) -> float:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def main(argv: list[str]) -> int:
    if TUNABLE not in os.environ.get("GLIBC_TUNABLES", ""):
        os.environ["GLIBC_TUNABLES"] = TUNABLE  # read by glibc at start: run again with it
        os.execv(sys.executable, [sys.executable, *argv])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint folder (default: the built-in model)")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=1800)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--block-length", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv[1:])

    from common.settings import Settings
    from worker.engine.engine import Engine
    from worker.engine.loader import load_model
    from worker.engine.params import GenerationRequest, SamplingParams

    loaded = load_model(args.model or str(Settings().model_path), device=args.device)
    engine = Engine(loaded, max_batch_size=args.prompts)
    vocabulary = loaded.config.vocab_size
    requests = [GenerationRequest([10 + (i * 7 + j) % (vocabulary - 10) for j in range(args.prompt_tokens + i)],
                                  SamplingParams(max_tokens=args.new_tokens, block_length=args.block_length))
                for i in range(args.prompts)]
    loaded_mb = peak_mb(args.device)
    start = time.perf_counter()
    results = engine.generate(requests)
    seconds = time.perf_counter() - start
    config = loaded.config
    columns = max(len(r.prompt_ids) for r in requests) + args.new_tokens
    element = next(loaded.model.parameters()).element_size()
    cache_mb = (config.num_hidden_layers * 2 * args.prompts * config.num_key_value_heads * columns
                * config.head_dim * element / 2**20)
    tokens = sum(len(r.token_ids) for r in results)
    above = peak_mb(args.device) - loaded_mb
    print(f"command: {' '.join([sys.executable, *argv])}")
    print(f"{args.prompts} prompts of {args.prompt_tokens}-{args.prompt_tokens + args.prompts - 1} tokens, "
          f"{tokens} new tokens in {seconds:.1f} s ({tokens / seconds:.1f} tok/s)")
    print(f"peak memory above the loaded model: {above:.0f} MB; the KV cache at the end: {cache_mb:.0f} MB; "
          f"ratio {above / cache_mb:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
