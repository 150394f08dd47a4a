"""DiffusionGemma: diffbatch's continuously batched engine vs transformers' model.generate(), one run.

    python bench/diffusiongemma.py [--requests 48] [--batch-size 8] [--max-steps 16]
    python bench/diffusiongemma.py --device cuda --full-size [--batches 1,8,64]

Default (CPU): a tiny random DiffusionGemma saved to a temporary folder and loaded through the
engine's loader, and a mixed workload: max_tokens drawn log-uniformly from 16 to 1,024, prompts of
1 to 400 bytes, a third of the rows with stop strings, and EOS wherever the random model emits it.
Both sides use the same checkpoint settings (canvas, max denoising steps, entropy bound, temperature
schedule, adaptive stop). model.generate() runs the requests in fixed batches of --batch-size, in
submission order, left-padded, as a transformers user would; its output is cut like the engine's
(max_tokens, EOS, stop strings) before counting tokens. The engine holds --batch-size rows.

--full-size (CUDA, bf16): random weights in roughly the shape of DiffusionGemma 26B-A4B, batch sizes
--batches, one request shape (prompt 512, max_tokens 512) per batch size.
"""

from __future__ import annotations

import argparse
import math
import random
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
            tokens += len(engine._finish(row, r.params).token_ids)
    seconds = time.perf_counter() - started
    return Side(f"transformers model.generate() (fixed batches of {batch_size})", seconds, tokens, counter.close())


def table(command: str, sides: list[Side], note: str) -> None:
    print(f"command: {command}")
    print(note)
    print(f"{'':56s} {'seconds':>8s} {'tokens':>8s} {'tokens/s':>9s} {'decoder rows':>13s}")
    for s in sides:
        print(f"{s.label:56s} {s.seconds:8.2f} {s.tokens:8d} {s.tokens / s.seconds:9.1f} {s.row_passes:13d}")
    base, ours = sides[1], sides[0]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-steps", type=int, default=16, help="max denoising steps per canvas (both sides)")
    parser.add_argument("--canvas", type=int, default=256, help="canvas length of the tiny model")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads for torch (default 1: on a shared, busy machine OpenMP threads "
                             "that wait for a core distort timings)")
    parser.add_argument("--full-size", action="store_true")
    parser.add_argument("--batches", default="1,8,64", help="--full-size: batch sizes")
    args = parser.parse_args()
    command = "python bench/diffusiongemma.py " + " ".join(sys.argv[1:])
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
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
            sides = [run_engine(engine, requests), run_generate(engine, requests, batch_size)]
            table(command, sides, f"full-size random DiffusionGemma, bf16, {args.device}, batch {batch_size}")
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
