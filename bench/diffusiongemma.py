"""DiffusionGemma: diffbatch's continuously batched engine vs transformers' model.generate(), one run.

    python bench/diffusiongemma.py [--requests 48] [--batch-size 8] [--max-steps 16]
    python bench/diffusiongemma.py --device cuda --full-size [--batches 1,8,64]
    python bench/diffusiongemma.py --memory [--batches 1,8,32] [--canvas 16] [--max-steps 4]

Default (CPU): a tiny random DiffusionGemma saved to a temporary folder and loaded through the
engine's loader, and a mixed workload: max_tokens drawn log-uniformly from 16 to 1,024, prompts of
1 to 400 bytes, a third of the rows with stop strings, and EOS wherever the random model emits it.
Both sides use the same checkpoint settings (canvas, max denoising steps, entropy bound, temperature
schedule, adaptive stop). model.generate() runs the requests in fixed batches of --batch-size, in
submission order, left-padded, as a transformers user would; its output is cut like the engine's
(max_tokens, EOS, stop strings) before counting tokens. The engine holds --batch-size rows.

--full-size (CUDA, bf16): random weights in roughly the shape of DiffusionGemma 26B-A4B, built on the GPU
from its config, batch sizes --batches, one request shape (prompt 512, max_tokens 512) per batch size:
tokens/s, decoder canvas rows per second and the allocator's peak of each side (an out-of-memory is
reported, not raised: transformers' generate() holds float32 canvas x vocabulary temporaries per row).

--memory: peak memory above the weights, per row, of the engine's default (entropy_bound, continuous
batching) against model.generate() on the same rows, and the engine's reference sampler on them (its
tokens must equal generate()'s). The model is a random DiffusionGemma with the real 262,144-token
vocabulary and a small hidden size (worker/engine/diffusion_gemma/tiny.py), so the vocabulary-sized
tensors dominate as they do at full size. Method: every case (side, rows) runs in a fresh Python process,
which loads the checkpoint, builds its requests, runs one row (warm-up: lazy imports, thread pools), and
reads its resident memory (VmRSS) as the baseline; it then resets the kernel's high-water mark
(``echo 5 > /proc/self/clear_refs``, Linux), runs, and reads the high-water mark (VmHWM). The peak
resident memory of the run less the baseline is what the run held at its peak, tensors and all. glibc's
malloc runs with a fixed mmap threshold (MALLOC_MMAP_THRESHOLD_), so a freed large tensor goes back to
the kernel instead of into a heap the next one may not fit. Where clear_refs is not writable, the peak
is ru_maxrss (loading included, so an upper bound). With --device cuda, torch.cuda's allocator
statistics (max_memory_allocated) replace both. "Rows in the same memory" runs the engine at 4x the
largest batch and compares its peak with generate()'s at the largest batch.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import random
import re
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from worker.engine.diffusion_gemma.engine import DiffusionGemmaEngine  # noqa: E402
from worker.engine.loader import LoadedModel, load_model  # noqa: E402
from worker.engine.params import GenerationRequest, SamplingParams  # noqa: E402
from worker.engine.postprocess import finish_row  # noqa: E402

STOP_CHOICES = (("e", "t"), ("\n",), ("a", "o", "i"))
# Roughly DiffusionGemma 26B-A4B's text tower (Gemma 4 26B-A4B); random weights, so no download.
FULL_SIZE_TEXT = dict(vocab_size=262_144, hidden_size=2816, intermediate_size=2112, num_hidden_layers=30,
                      num_attention_heads=16, num_key_value_heads=8, head_dim=256, global_head_dim=512,
                      num_global_key_value_heads=2, num_experts=128, top_k_experts=8, moe_intermediate_size=704,
                      sliding_window=1024, max_position_embeddings=262_144)


@dataclass
class Side:
    label: str
    seconds: float
    tokens: int
    row_passes: int  # canvas rows the decoder computed: sum over decoder calls of their batch size
    peak_bytes: int = 0  # CUDA: the allocator's peak during the run (weights included); 0 elsewhere
    failed: str = ""  # why the run did not finish (CUDA out of memory), or ""


def cuda_peak(run, *args):
    """``run(*args)`` -> Side with the CUDA allocator's peak recorded; an out-of-memory ends it as failed."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    try:
        side = run(*args)
    except torch.OutOfMemoryError:
        side = Side("(out of memory)", float("nan"), 0, 0, failed="CUDA out of memory")
    torch.cuda.synchronize()
    side.peak_bytes = torch.cuda.max_memory_allocated()
    return side


def workload(engine, count: int, seed: int) -> list[GenerationRequest]:
    rng = random.Random(seed)
    requests = []
    for i in range(count):
        max_tokens = int(round(math.exp(rng.uniform(math.log(16), math.log(1024)))))
        prompt = "".join(rng.choice("abcdefghij klmnop\n") for _ in range(rng.randint(1, 400)))
        stop = STOP_CHOICES[i % len(STOP_CHOICES)] if i % 3 == 0 else ()
        params = SamplingParams(max_tokens=max_tokens, stop=stop, seed=i, sampler="entropy_bound",
                                block_length=engine.canvas_length)
        requests.append(GenerationRequest(engine.encode_completion(prompt), params))
    return requests


class DecoderRows:
    """Counts the canvas rows every decoder call computes (finished rows riding along included)."""

    def __init__(self, model):
        self.rows = 0
        self.handle = model.model.decoder.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module, args, kwargs):
        canvas = kwargs.get("decoder_input_ids", args[0] if args else None)
        self.rows += canvas.shape[0]

    def close(self) -> int:
        self.handle.remove()
        return self.rows


def run_engine(engine, requests) -> Side:
    counter = DecoderRows(engine.model)
    started = time.perf_counter()
    results = engine.generate(requests)
    seconds = time.perf_counter() - started
    return Side("diffbatch engine (entropy_bound, continuous)", seconds,
                sum(r.completion_tokens for r in results), counter.close())


def run_generate(engine, requests, batch_size: int) -> Side:
    """model.generate() in fixed batches; outputs cut like the engine's, tokens counted the same way."""
    model, pad = engine.model, engine.loaded.pad_token_id
    tokens, counter = 0, DecoderRows(model)
    started = time.perf_counter()
    for first in range(0, len(requests), batch_size):
        batch = requests[first : first + batch_size]
        length = max(len(r.prompt_ids) for r in batch)
        input_ids = torch.full((len(batch), length), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), length), dtype=torch.long)
        for row, r in enumerate(batch):
            input_ids[row, length - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
            attention_mask[row, length - len(r.prompt_ids):] = 1
        torch.manual_seed(first)
        device = engine.adapter.device
        output = model.generate(input_ids.to(device), attention_mask=attention_mask.to(device),
                                max_new_tokens=max(r.params.max_tokens for r in batch))
        for row, r in zip(output.sequences[:, length:].tolist(), batch, strict=False):
            tokens += len(finish_row(row, max_tokens=r.params.max_tokens, eos_token_ids=engine.eos_token_ids,
                                     stop=r.params.stop, tokenizer=engine.tokenizer).token_ids)
    seconds = time.perf_counter() - started
    return Side(f"transformers model.generate() (fixed batches of {batch_size})", seconds, tokens, counter.close())


def table(command: str, sides: list[Side], note: str) -> None:
    print(f"command: {command}")
    print(note)
    print(f"{'':56s} {'seconds':>8s} {'tokens':>8s} {'tokens/s':>9s} {'decoder rows':>13s} {'rows/s':>8s} "
          f"{'peak GiB':>9s}")
    for s in sides:
        if s.failed:
            print(f"{s.label:56s} {s.failed} (peak {s.peak_bytes / 2**30:.1f} GiB)")
            continue
        print(f"{s.label:56s} {s.seconds:8.2f} {s.tokens:8d} {s.tokens / s.seconds:9.1f} {s.row_passes:13d} "
              f"{s.row_passes / s.seconds:8.1f} {s.peak_bytes / 2**30 if s.peak_bytes else float('nan'):9.1f}")
    base, ours = sides[1], sides[0]
    if not (base.failed or ours.failed):
        ratio = (ours.tokens / ours.seconds) / (base.tokens / base.seconds)
        print(f"ratio (engine tokens/s / generate tokens/s): {ratio:.2f}x")


def tiny_engine(folder: Path, args) -> DiffusionGemmaEngine:
    from worker.engine.diffusion_gemma.tiny import create_tiny_diffusion_gemma

    path = create_tiny_diffusion_gemma(folder / "tiny-dg", canvas_length=args.canvas,
                                       max_denoising_steps=args.max_steps,
                                       max_positions=4096, hidden_size=64)
    return DiffusionGemmaEngine(load_model(str(path), device=args.device), max_batch_size=args.batch_size)


class _IdsTokenizer:
    """Full-size runs have no tokenizer: text is the ids, enough for the engine's bookkeeping."""

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


def full_size_engine(args, batch_size: int) -> DiffusionGemmaEngine:
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

    config = DiffusionGemmaConfig(text_config=dict(FULL_SIZE_TEXT), canvas_length=256)
    with torch.device(args.device):
        model = DiffusionGemmaForBlockDiffusion._from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    model.eval()
    text_config = config.get_text_config()
    # Equal settings on both sides: generate() stops at the EOS the engine stops at.
    model.generation_config.max_denoising_steps = args.max_steps
    model.generation_config.eos_token_id = text_config.eos_token_id
    model.generation_config.pad_token_id = text_config.pad_token_id
    loaded = LoadedModel(model=model, tokenizer=_IdsTokenizer(), config=config, name="diffusiongemma-random",
                         family="diffusion_gemma", max_positions=text_config.max_position_embeddings,
                         mask_token_id=None, eos_token_id=text_config.eos_token_id,
                         pad_token_id=text_config.pad_token_id,
                         eos_token_ids=(text_config.eos_token_id,))
    return DiffusionGemmaEngine(loaded, max_batch_size=batch_size)


# ---- --memory ------------------------------------------------------------------------------

MEMORY_VOCAB = 262_144  # DiffusionGemma's
MEMORY_SEED = 0  # reference rows share one seed: one generate() batch, as generate() has one generator


def memory_checkpoint(folder: Path, args) -> Path:
    from worker.engine.diffusion_gemma.tiny import create_tiny_diffusion_gemma

    # The random model never reaches the confidence bound, so both sides run every step of every canvas.
    return create_tiny_diffusion_gemma(folder / "dg-vocab", canvas_length=args.canvas, hidden_size=args.hidden,
                                       vocab_size=MEMORY_VOCAB, max_denoising_steps=args.max_steps,
                                       max_positions=4096)


def memory_rows(engine, rows: int, max_tokens: int, sampler: str) -> list[GenerationRequest]:
    """The same prompts for every case: 8 to 24 bytes of text, one per row."""
    rng = random.Random(1)
    prompts = ["".join(rng.choice("abcdefghij klmnop") for _ in range(rng.randint(8, 24))) for _ in range(rows)]
    return [GenerationRequest(engine.encode_completion(prompt), SamplingParams(
        max_tokens=max_tokens, sampler=sampler, seed=MEMORY_SEED if sampler == "reference" else row,
        block_length=engine.canvas_length)) for row, prompt in enumerate(prompts)]


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        match = re.search(rf"^{field}:\s+(\d+) kB", status.read(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"/proc/self/status has no {field}")
    return int(match.group(1))


class PeakMemory:
    """Bytes allocated at the peak of a block, above what was allocated when it began (see the docstring)."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.method = ""

    def __enter__(self):
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            self.baseline = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            self.method = "torch.cuda.max_memory_allocated"
            return self
        self.baseline = _status_kib("VmRSS") * 1024
        try:
            with open("/proc/self/clear_refs", "w") as clear_refs:
                clear_refs.write("5")  # the high-water mark restarts at the current resident size
            self.method = "VmHWM after clear_refs"
        except OSError:
            self.method = "ru_maxrss (loading included: an upper bound)"
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        elif self.method.startswith("VmHWM"):
            self.peak = _status_kib("VmHWM") * 1024
        else:
            self.peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    @property
    def above(self) -> int:
        return self.peak - self.baseline


def memory_case(args) -> None:
    """One side at one batch size, in this fresh process; prints one JSON line."""
    loaded = load_model(args.folder, device=args.device)
    engine = DiffusionGemmaEngine(loaded, max_batch_size=args.rows)
    sampler = "entropy_bound" if args.memory_case == "engine" else "reference"
    requests = memory_rows(engine, args.rows, args.max_tokens, sampler)
    weights = sum(t.numel() * t.element_size() for t in loaded.model.parameters())
    started = time.perf_counter()
    # Each side first runs one row, outside the measurement: lazy imports, thread pools and the
    # allocator's first arenas are not what a row costs.
    if args.memory_case == "generate":
        # What a transformers user writes: one left-padded batch, the global seed, model.generate().
        prompts = [r.prompt_ids for r in requests]
        length = max(map(len, prompts))
        input_ids = torch.full((len(prompts), length), loaded.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), length), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            input_ids[row, length - len(prompt):] = torch.tensor(prompt)
            attention_mask[row, length - len(prompt):] = 1
        input_ids, attention_mask = input_ids.to(args.device), attention_mask.to(args.device)
        loaded.model.generate(input_ids[:1], attention_mask=attention_mask[:1], max_new_tokens=args.max_tokens)
        with PeakMemory(args.device) as peak:
            torch.manual_seed(MEMORY_SEED)
            output = loaded.model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=args.max_tokens)
        tokens = [finish_row(row, max_tokens=args.max_tokens, eos_token_ids=engine.eos_token_ids, stop=(),
                             tokenizer=engine.tokenizer).token_ids for row in output.sequences[:, length:].tolist()]
    else:
        engine.generate(requests[:1])
        with PeakMemory(args.device) as peak:
            results = engine.generate(requests)
        tokens = [r.token_ids for r in results]
    print(json.dumps(dict(case=args.memory_case, rows=args.rows, above=peak.above, method=peak.method,
                          weights=weights, seconds=time.perf_counter() - started, tokens=tokens)))


def run_memory_case(args, folder: Path, case: str, rows: int) -> dict:
    command = [sys.executable, __file__, "--memory-case", case, "--rows", str(rows), "--folder", str(folder),
               "--max-tokens", str(args.max_tokens), "--device", args.device, "--threads", str(args.threads)]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", OMP_NUM_THREADS=str(args.threads),
               TOKENIZERS_PARALLELISM="false")
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{case} at {rows} rows failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def memory_table(args, command: str) -> None:
    batches = [int(b) for b in args.batches.split(",")]
    mib = 2**20
    with tempfile.TemporaryDirectory() as folder:
        path = memory_checkpoint(Path(folder), args)
        cases = {(case, rows): run_memory_case(args, path, case, rows)
                 for rows in batches for case in ("engine", "generate", "reference")}
        wide = 4 * batches[-1]
        cases["engine", wide] = run_memory_case(args, path, "engine", wide)
    first = cases["engine", batches[0]]
    print(f"command: {command}")
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}, "
          f"torch {torch.__version__}, device {args.device}, torch threads {args.threads}")
    print(f"model: random DiffusionGemma, vocabulary {MEMORY_VOCAB:,}, hidden {args.hidden}, 2 layers, canvas "
          f"{args.canvas}, {args.max_steps} denoising steps (no early stop), weights {first['weights'] / mib:.0f} "
          f"MiB; prompts of 8-24 bytes, max_tokens {args.max_tokens}")
    print(f"memory: peak above the loaded weights ({first['method']}), one fresh process per case")
    print(f"{'rows':>5s} {'engine MiB':>11s} {'/row':>7s} {'generate() MiB':>15s} {'/row':>7s} "
          f"{'reference MiB':>14s} {'generate/engine':>16s} {'reference == generate()':>24s}")
    for rows in batches:
        ours, theirs, reference = (cases[case, rows] for case in ("engine", "generate", "reference"))
        same = reference["tokens"] == theirs["tokens"]
        print(f"{rows:5d} {ours['above'] / mib:11.1f} {ours['above'] / mib / rows:7.1f} "
              f"{theirs['above'] / mib:15.1f} {theirs['above'] / mib / rows:7.1f} {reference['above'] / mib:14.1f} "
              f"{theirs['above'] / ours['above']:16.1f} {str(same):>24s}")
    largest, engine_wide = cases["generate", batches[-1]], cases["engine", wide]
    verdict = "fit" if engine_wide["above"] <= largest["above"] else "do NOT fit"
    print(f"engine at {wide} rows: {engine_wide['above'] / mib:.1f} MiB against generate() at {batches[-1]} rows: "
          f"{largest['above'] / mib:.1f} MiB: {wide} rows {verdict} in the memory generate() needs for "
          f"{batches[-1]} ({wide // batches[-1]}x)")
    seconds = {case: sum(c["seconds"] for (name, _), c in cases.items() if name == case)
               for case in ("engine", "generate", "reference")}
    print("seconds per side, all cases: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-steps", type=int, default=None,
                        help="max denoising steps per canvas, both sides (default 16; --memory: 4)")
    parser.add_argument("--canvas", type=int, default=None, help="canvas length of the tiny model (default 256; "
                                                                 "--memory: 16)")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads for torch (default 1: on a shared, busy machine OpenMP threads "
                             "that wait for a core distort timings)")
    parser.add_argument("--full-size", action="store_true")
    parser.add_argument("--batches", default=None, help="--full-size (default 1,8,64), --memory (1,8,32): batch sizes")
    parser.add_argument("--memory", action="store_true", help="peak memory per row against generate()")
    parser.add_argument("--hidden", type=int, default=32, help="--memory: hidden size of the random model")
    parser.add_argument("--max-tokens", type=int, default=32, help="--memory: max_tokens of every row")
    parser.add_argument("--memory-case", choices=("engine", "generate", "reference"), help=argparse.SUPPRESS)
    parser.add_argument("--rows", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    command = "python bench/diffusiongemma.py " + " ".join(sys.argv[1:])
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.memory_case:
        memory_case(args)
        return
    if args.memory:
        args.batches, args.canvas = args.batches or "1,8,32", args.canvas or 16
        args.max_steps = args.max_steps or 4
        memory_table(args, command)
        return
    args.batches, args.canvas, args.max_steps = args.batches or "1,8,64", args.canvas or 256, args.max_steps or 16
    if args.full_size:
        engine = None
        batches = [int(b) for b in args.batches.split(",")]
        for batch_size in batches:
            engine = engine or full_size_engine(args, batch_size)
            engine.max_batch_size = batch_size
            requests = [GenerationRequest(torch.randint(0, engine.vocab_size, (512,)).tolist(),
                                          SamplingParams(max_tokens=512, seed=i, sampler="entropy_bound",
                                                         block_length=engine.canvas_length))
                        for i in range(batch_size)]
            if batch_size == batches[0]:  # warm-up: kernels, allocator
                run_engine(engine, requests[:1]), run_generate(engine, requests[:1], 1)
            sides = [cuda_peak(run_engine, engine, requests), cuda_peak(run_generate, engine, requests, batch_size)]
            table(command, sides, f"full-size random DiffusionGemma, bf16, {args.device}, batch {batch_size}, "
                                  f"at most {args.max_steps} denoising steps per {engine.canvas_length}-token canvas; "
                                  f"peak GiB includes the weights")
        return
    with tempfile.TemporaryDirectory() as folder:
        engine = tiny_engine(Path(folder), args)
        requests = workload(engine, args.requests, seed=0)
        run_engine(engine, requests[:2])  # warm-up
        sides = [run_engine(engine, requests), run_generate(engine, requests, args.batch_size)]
    table(command, sides, f"tiny random DiffusionGemma (canvas {args.canvas}, {args.max_steps} max steps), "
                          f"{args.requests} requests, batch {args.batch_size}, torch threads {torch.get_num_threads()}")


if __name__ == "__main__":
    main()
