"""Structured output by infilling against generating the same JSON freely, on one model.

    python bench/json_schema.py [--model PATH] [--samplers reference,threshold] [--temperature 0]
                                [--per-schema 8] [--block-length 16] [--device cpu|cuda]

For each schema, ``--per-schema`` requests (seeds 0..n-1) with the same prompt (a comment that shows
the schema and asks for an object, then ``value = ``) are run twice, each set as one engine call:

- skeleton: ``response_format`` (worker/structured_output.py): the schema's skeleton filled in one canvas;
- free: the same prompt, model and sampler, ``max_tokens`` twice the skeleton's canvas; its output is
  read as the first JSON value in the text (``json.JSONDecoder.raw_decode`` after leading spaces).

Prints, per schema and mode: forward passes per object (GenerationResult.forward_passes), wall time per
object (the call's time over its requests, batched as the service runs them), completion tokens, and the
share of outputs that parse as JSON and that validate against the schema (the ``jsonschema`` package).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

import jsonschema
import torch

from common.settings import BUILTIN_MODEL_PATH
from worker.engine.engine import Engine
from worker.engine.loader import load_model
from worker.engine.params import GenerationRequest, GenerationResult, SamplingParams
from worker.structured_output import structured_request

SCHEMAS = {
    "point": {"type": "object", "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}},
              "required": ["x", "y"]},
    "user": {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 16}, "age": {"type": "integer"}, "admin": {"type": "boolean"}},
        "required": ["name", "age", "admin"]},
    "item": {"type": "object", "properties": {
        "sku": {"type": "string", "maxLength": 8}, "price": {"type": "number"},
        "size": {"enum": ["small", "medium", "large"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3}},
        "required": ["sku", "price", "size", "tags"]},
    "config": {"type": "object", "properties": {
        "debug": {"type": "boolean"}, "level": {"enum": ["info", "warning", "error"]},
        "retry": {"type": "object", "properties": {"count": {"type": "integer"}, "delay": {"type": "number"}},
                  "required": ["count", "delay"]}},
        "required": ["debug", "level", "retry"]},
}


def prompt_for(name: str, schema: dict) -> str:
    return f"# A {name} as a JSON object matching this JSON schema:\n# {json.dumps(schema)}\nvalue = "


def first_json_value(text: str) -> object | None:
    try:
        return json.JSONDecoder().raw_decode(text.lstrip())[0]
    except ValueError:
        return None


def summarise(schema: dict, results: list[GenerationResult], wall_s: float, *, free: bool) -> dict:
    parsed = [first_json_value(r.text) if free else json.loads(r.text) for r in results]
    validator = jsonschema.Draft202012Validator(schema)
    return {
        "passes": statistics.mean(r.forward_passes for r in results),
        "ms_per_object": 1000 * wall_s / len(results),
        "tokens": statistics.mean(r.completion_tokens for r in results),
        "parse": sum(isinstance(p, dict) for p in parsed) / len(results),
        "valid": sum(isinstance(p, dict) and validator.is_valid(p) for p in parsed) / len(results),
    }


def timed(engine: Engine, requests: list[GenerationRequest]) -> tuple[list[GenerationResult], float]:
    engine.generate(requests[:1])  # warm-up (and the token classes, built once per engine)
    start = time.perf_counter()
    results = engine.generate(requests)
    return results, time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(BUILTIN_MODEL_PATH))
    parser.add_argument("--samplers", default="reference,threshold")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--per-schema", type=int, default=8)
    parser.add_argument("--block-length", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch's intra-op threads (default: its own)")
    parser.add_argument("--show", action="store_true", help="print each mode's first output per schema")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    engine = Engine(load_model(args.model, device=args.device), max_batch_size=32)
    print(f"model {engine.name}, block {args.block_length}, temperature {args.temperature}, "
          f"{args.per_schema} objects a schema, device {args.device}")
    print(f"{'schema':8} {'sampler':10} {'mode':9} {'passes':>7} {'ms/obj':>8} {'tokens':>7} {'parse':>6} {'valid':>6}")
    for sampler in args.samplers.split(","):
        for name, schema in SCHEMAS.items():
            prompt = engine.encode_completion(prompt_for(name, schema))
            params = [SamplingParams(sampler=sampler, temperature=args.temperature, seed=seed,
                                     block_length=args.block_length) for seed in range(args.per_schema)]
            structured = [structured_request(engine, schema, GenerationRequest(prompt, p)) for p in params]
            canvas = structured[0].params.max_tokens  # the skeleton's canvas
            free = [GenerationRequest(prompt, dataclasses.replace(p, max_tokens=2 * canvas)) for p in params]
            for mode, requests in (("skeleton", structured), ("free", free)):
                results, wall = timed(engine, requests)
                row = summarise(schema, results, wall, free=mode == "free")
                print(f"{name:8} {sampler:10} {mode:9} {row['passes']:7.1f} {row['ms_per_object']:8.1f} "
                      f"{row['tokens']:7.1f} {row['parse']:6.0%} {row['valid']:6.0%}", flush=True)
                if args.show:
                    print(f"    {results[0].text!r}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
