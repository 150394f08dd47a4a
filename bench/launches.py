"""Host work per denoising pass: the operations the engine dispatches, counted, and the time a pass takes.

    python bench/launches.py [--model PATH] [--batch 1] [--new-tokens 64] [--caches exact,delayed]

On an accelerator a small or medium model's pass is bound by the host, not the chip: measured on an
H200 (bench/engine.py --device cuda, built-in model, batch 1), the GPU was busy 6% of a pass, and a
pass dispatched about 330 kernels. So the count of compute operations per pass (every aten operation
that does work, not views, allocations or casts to the same dtype) is the machine-independent figure
for that overhead; this script prints it on any machine, with the model's share of it, beside the
wall time per pass here. Run it at two commits to compare.
"""

from __future__ import annotations

import argparse
import sys
import time

from torch.profiler import ProfilerActivity, profile

from common.settings import Settings
from worker.engine.engine import Engine
from worker.engine.loader import load_model
from worker.engine.params import GenerationRequest, SamplingParams

# Operations that launch no kernel: views, allocations, dtype no-ops and the wrappers around real work.
NO_WORK = {
    "aten::view", "aten::as_strided", "aten::slice", "aten::transpose", "aten::t", "aten::expand",
    "aten::unsqueeze", "aten::squeeze", "aten::select", "aten::reshape", "aten::_unsafe_view", "aten::narrow",
    "aten::alias", "aten::split", "aten::split_with_sizes", "aten::chunk", "aten::detach", "aten::permute",
    "aten::_reshape_alias", "aten::unbind", "aten::contiguous", "aten::empty", "aten::empty_strided",
    "aten::resize_", "aten::to", "aten::_to_copy", "aten::matmul", "aten::linear", "aten::result_type",
    "aten::scaled_dot_product_attention", "aten::empty_like", "aten::lift_fresh", "aten::resolve_conj",
    "aten::resolve_neg", "aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::scalar_tensor",
}


def does_work(event) -> bool:
    return event.name.startswith("aten::") and event.name not in NO_WORK


def calls_work(event) -> bool:
    return any(does_work(c) or calls_work(c) for c in event.cpu_children)


def compute_ops(prof) -> int:
    """Innermost aten operations that do work (an operation calling others is counted through them)."""
    return sum(1 for e in prof.events() if does_work(e) and not calls_work(e))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint folder (default: the built-in model)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--caches", default="exact,delayed")
    args = parser.parse_args(argv[1:])
    loaded = load_model(args.model or str(Settings().model_path), device=args.device)

    print(f"command: {' '.join([sys.executable, *argv])}")
    print(f"{'cache':8} {'passes':>6} {'ops/pass':>8} {'model ops/forward':>17} {'forwards/pass':>13} {'ms/pass':>8}")
    for cache in args.caches.split(","):
        engine = Engine(loaded, max_batch_size=args.batch, cache=cache)
        requests = [GenerationRequest(engine.encode_completion(f"def f{i}(items):\n"),
                                      SamplingParams(max_tokens=args.new_tokens, sampler="reference"))
                    for i in range(args.batch)]
        engine.generate(requests)  # warm-up
        start = time.perf_counter()
        passes = engine.generate(requests)[0].forward_passes
        ms = 1000 * (time.perf_counter() - start) / passes
        forward = loaded.model.forward
        counts = []

        def counted(*a, forward=forward, counts=counts, **k):
            with profile(activities=[ProfilerActivity.CPU]) as inner:
                out = forward(*a, **k)
            counts.append(compute_ops(inner))
            return out

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            engine.generate(requests)
        total = compute_ops(prof)
        loaded.model.forward = counted
        try:
            engine.generate(requests)
        finally:
            del loaded.model.forward
        model_ops = sum(counts) / len(counts)
        print(f"{cache:8} {passes:>6} {total / passes:>8.0f} {model_ops:>17.0f} "
              f"{len(counts) / passes:>13.2f} {ms:>8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
