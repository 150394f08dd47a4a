"""Service efficiency: tokens/s of one N-request batch through the whole service vs the engine alone.

Runs the same request file through the engine called directly (groups of max_batch_size), the
embedded stack (SQLite database, SQLAlchemy broker) and the production stack (PostgreSQL, Redis).
The service is timed from upload to downloaded output; its start-up is reported apart. The engine
runs again after each service run and a service's ratio uses the engine runs on either side of it;
every mode runs --repeat times and the medians are reported: on a shared VM one 10 s run of the same
code varies by up to 30%, more than the effect being measured. Most of that variance is glibc malloc
returning torch's freed buffers to the OS (1-3.5 million page faults per 1000 requests), so the
bench re-executes itself with cli.stack.CPU_ALLOCATOR (what the embedded CPU worker gets) unless
GLIBC_TUNABLES or LD_PRELOAD is already set: baseline and service run under the same allocator.
Exits 1 if any mode lost or duplicated a custom_id.

`--mixed` draws each request's max_tokens log-uniformly from 8..256 (seeded), where a chunk's last rows
used to run at low occupancy; its engine-alone baseline is then one continuous run over every request
(the engine's best), not fixed groups. Each service mode runs once per `--feed-ahead` value
(DIFFBATCH_FEED_AHEAD_CHUNKS: 0 is one chunk a run, the behaviour before cross-chunk feeding).

    python bench/service.py [--requests 1000] [--repeat 3] [--chunk-size 64] [--skip-production] [--mixed]
        [--feed-ahead 2,0]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import random
import secrets
import shlex
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from statistics import median

import torch

from cli.client import run_batch
from cli.stack import CPU_ALLOCATOR
from common.settings import Settings

POSTGRES_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
REDIS_URL = "redis://127.0.0.1:6379/5"
SNIPPETS = ("def {name}(items):\n", "class {Name}:\n    def __init__(self):\n", "# {name}\nimport os\n\n",
            "def test_{name}():\n    assert ", "async def {name}(client, url):\n", "{name} = [x * 2 for x in ")
NAMES = ("parse_config", "merge_sorted", "read_csv", "retry_request", "flatten", "top_k", "slugify",
         "cache_get", "lru_cache", "binary_search", "chunked", "dedupe", "normalize_path")


@dataclass
class Row:
    mode: str
    requests: int
    tokens: int
    seconds: float
    ready_s: float | None = None  # service start-up, not part of `seconds`
    id_faults: int = 0  # custom_ids lost, duplicated or unknown
    error_lines: int = 0

    @property
    def rate(self) -> float:
        return self.tokens / self.seconds


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--block-length", type=int, default=32)
    parser.add_argument("--mixed", action="store_true", help="max_tokens log-uniform in 8..256 (seeded)")
    parser.add_argument("--feed-ahead", default="2,0",
                        help="DIFFBATCH_FEED_AHEAD_CHUNKS values to run each service mode with (comma-separated)")
    parser.add_argument("--model", help="checkpoint folder (default: the built-in model)")
    parser.add_argument("--chunk-size", type=int, help="DIFFBATCH_CHUNK_SIZE for the service modes")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each mode (medians reported)")
    parser.add_argument("--poll-s", type=float, default=0.5, help="client status poll interval")
    parser.add_argument("--skip-production", action="store_true", help="no PostgreSQL/Redis mode")
    parser.add_argument("--skip-embedded", action="store_true", help="no SQLite/SQLAlchemy-broker mode")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs, outputs)")
    return parser.parse_args(argv)


def write_requests(path: Path, args: argparse.Namespace, model_name: str) -> list[dict]:
    """Deterministic varied code prompts, one seed per line."""
    lines, draw = [], random.Random(0)
    for i in range(args.requests):
        max_tokens = round(math.exp(draw.uniform(math.log(8), math.log(256)))) if args.mixed else args.max_tokens
        name = NAMES[i % len(NAMES)]
        snippet = SNIPPETS[(i // len(NAMES)) % len(SNIPPETS)]
        prompt = snippet.format(name=name, Name=name.title().replace("_", "")) + "    " * (i % 3)
        body = {"model": model_name, "prompt": prompt, "max_tokens": max_tokens, "seed": i,
                "diffusion": {"block_length": args.block_length}}
        lines.append({"custom_id": f"req-{i}", "method": "POST", "url": "/v1/completions", "body": body})
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return lines


def load_engine(model_path: Path, line: dict):
    from worker.engine.engine import Engine
    from worker.engine.loader import load_model
    from worker.responses import to_generation_request

    settings = Settings()
    engine = Engine(load_model(str(model_path), device=settings.device, dtype=settings.dtype,
                               trust_remote_code=settings.trust_remote_code),
                    max_batch_size=settings.max_batch_size)
    engine.generate([to_generation_request(engine, line["url"], line["body"])])  # warm-up
    return engine


def bench_engine(engine, lines: list[dict], mode: str, continuous: bool = False) -> Row:
    """``continuous``: one engine run over every request (rows join as others finish), else fixed groups
    of max_batch_size."""
    from worker.responses import to_generation_request

    started = time.perf_counter()
    requests = [to_generation_request(engine, line["url"], line["body"]) for line in lines]
    tokens = 0
    if continuous:
        tokens = sum(result.completion_tokens for _, result in engine.stream(requests))
        return Row(mode, len(lines), tokens, time.perf_counter() - started)
    for first in range(0, len(requests), engine.max_batch_size):
        results = engine.generate(requests[first:first + engine.max_batch_size])
        tokens += sum(r.completion_tokens for r in results)
    return Row(mode, len(lines), tokens, time.perf_counter() - started)


def bench_service(mode: str, input_path: Path, data_dir: Path, lines: list[dict], poll_s: float) -> Row:
    from cli.stack import EmbeddedStack, free_port

    output, errors = data_dir / "output.jsonl", data_dir / "errors.jsonl"
    began = time.perf_counter()
    with EmbeddedStack(Settings(data_dir=data_dir), port=free_port()) as stack:
        stack.wait_ready()
        ready_s = time.perf_counter() - began
        started = time.perf_counter()
        run_batch(stack.url, input_path, output, errors, poll_s=poll_s, check=stack.check_alive)
        seconds = time.perf_counter() - started
    results = [json.loads(raw) for path in (output, errors) if path.exists()
               for raw in path.read_text().splitlines() if raw.strip()]
    tokens = sum(r["response"]["body"]["usage"]["completion_tokens"] for r in results
                 if r.get("response") and r["response"].get("status_code") == 200)
    failed = sum(1 for r in results if r.get("error"))
    return Row(mode, len(lines), tokens, seconds, ready_s, count_id_faults(lines, results), failed)


def count_id_faults(lines: list[dict], results: list[dict]) -> int:
    """Input custom_ids missing or repeated across output and error lines, plus unknown ones."""
    counts = {line["custom_id"]: 0 for line in lines}
    unknown = 0
    for result in results:
        if result["custom_id"] in counts:
            counts[result["custom_id"]] += 1
        else:
            unknown += 1
    return unknown + sum(1 for n in counts.values() if n != 1)


@contextlib.contextmanager
def environment(**values: str | None):
    """Set (or, with None, unset) variables for this process and the stack's children."""
    saved = {key: os.environ.get(key) for key in values}

    def apply(items) -> None:
        for key, value in items:
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)

    apply(values.items())
    try:
        yield
    finally:
        apply(saved.items())


@contextlib.contextmanager
def production_servers():
    """A fresh PostgreSQL database at head and an empty Redis db; the database is dropped after."""
    import psycopg
    import redis

    from db.migrate import upgrade

    name = f"diffbatch_bench_{secrets.token_hex(4)}"
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    try:
        upgrade(url)
        redis.Redis.from_url(REDIS_URL).flushdb()
        with environment(DIFFBATCH_DATABASE_URL=url, DIFFBATCH_BROKER_URL=REDIS_URL):
            yield
    finally:
        redis.Redis.from_url(REDIS_URL).flushdb()
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def print_report(rows: list[Row], argv: list[str]) -> None:
    print(f"\ncommand: {shlex.join([sys.executable, *argv])}")
    print(f"machine: {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, torch "
          f"{torch.__version__} ({torch.get_num_threads()} threads), python {platform.python_version()}")
    allocator = {k: os.environ[k] for k in ("GLIBC_TUNABLES", "LD_PRELOAD") if os.environ.get(k)}
    print(f"allocator: {' '.join(f'{k}={v}' for k, v in allocator.items()) or 'glibc malloc defaults'}")
    print("runs, in order: " + ", ".join(f"{row.mode.split()[0]} {row.rate:.0f}" for row in rows) + " tokens/s")
    ratios = {i: row.rate * 2 / (rows[i - 1].rate + rows[i + 1].rate)
              for i, row in enumerate(rows) if row.ready_s is not None}
    print(f"\n{'mode':<38} {'requests':>8} {'out tokens':>10} {'seconds':>8} {'tokens/s':>9} {'ratio':>6} "
          f"{'(min-max)':>11} {'ready s':>8} {'id fault':>8} {'err line':>8}")
    for mode in dict.fromkeys(row.mode for row in rows):
        runs = [i for i, row in enumerate(rows) if row.mode == mode]
        seconds = median([rows[i].seconds for i in runs])
        if rows[runs[0]].ready_s is None:
            ratio, spread, ready = "1.00", "", "-"
        else:
            mode_ratios = [ratios[i] for i in runs]
            ratio, spread = f"{median(mode_ratios):.2f}", f"{min(mode_ratios):.2f}-{max(mode_ratios):.2f}"
            ready = f"{median([rows[i].ready_s or 0.0 for i in runs]):.1f}"
        first = rows[runs[0]]
        print(f"{mode:<38} {first.requests:>8} {first.tokens:>10} {seconds:>8.1f} {first.tokens / seconds:>9.1f} "
              f"{ratio:>6} {spread:>11} {ready:>8} {sum(rows[i].id_faults for i in runs):>8} "
              f"{sum(rows[i].error_lines for i in runs):>8}")
    print("Medians over the runs. ratio: a service run's tokens/s / the mean of the engine-alone runs just\n"
          "before and after it; ready s: start-up, not timed; id fault: custom_ids lost, duplicated or\n"
          "unknown across the output and error files (must be 0); err line: lines in the error file.")


def run_modes(args: argparse.Namespace, model_path: Path, work: Path) -> list[Row]:
    """engine, then (service, engine) for each mode and round: every service run has an engine run
    on either side, so drift of the shared CPUs cancels out of its ratio."""
    input_path = work / "requests.jsonl"
    lines = write_requests(input_path, args, Settings(model=str(model_path)).served_model_name)
    chunk = str(args.chunk_size) if args.chunk_size else os.environ.get("DIFFBATCH_CHUNK_SIZE")
    engine = load_engine(model_path, lines[0])
    log(f"{len(lines)} requests in {input_path}; engine alone ...")
    baseline = "engine alone, one run" if args.mixed else "engine alone"
    rows = [bench_engine(engine, lines, baseline, continuous=args.mixed)]
    feeds = [value.strip() for value in args.feed_ahead.split(",") if value.strip()]
    candidates: list[tuple[str, Callable[[], contextlib.AbstractContextManager[object]], bool]] = [
        ("embedded sqlite+sqla", contextlib.nullcontext, args.skip_embedded),
        ("production postgres+redis", production_servers, args.skip_production)]
    modes = [(mode, servers) for mode, servers, skip in candidates if not skip]
    with environment(DIFFBATCH_MODEL=str(model_path.resolve()), DIFFBATCH_CHUNK_SIZE=chunk,
                     DIFFBATCH_DATABASE_URL=None, DIFFBATCH_BROKER_URL=None):
        for round_ in range(args.repeat):
            for (mode, servers), feed in ((m, f) for m in modes for f in feeds):
                log(f"round {round_ + 1}/{args.repeat}: {mode} service, feed {feed}, then the engine alone ...")
                with servers(), environment(DIFFBATCH_FEED_AHEAD_CHUNKS=feed):
                    label = f"{mode} (chunk {Settings().chunk_size}, feed {feed})"
                    data_dir = work / f"{mode.split()[0]}-feed{feed}-{round_ + 1}"
                    rows.append(bench_service(label, input_path, data_dir, lines, args.poll_s))
                rows.append(bench_engine(engine, lines, baseline, continuous=args.mixed))
    return rows


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv if argv is None else argv
    if "GLIBC_TUNABLES" not in os.environ and "LD_PRELOAD" not in os.environ:
        # The embedded worker runs with CPU_ALLOCATOR; the engine-alone baseline must too (glibc reads
        # tunables only at start-up, hence the re-exec).
        os.execve(sys.executable, [sys.executable, *argv], {**os.environ, **CPU_ALLOCATOR})
    args = parse_args(argv[1:])
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the stack's processes on the way out
    work = Path(tempfile.mkdtemp(prefix="diffbatch-bench-"))
    from worker.runtime import ensure_model

    model_path = Path(args.model) if args.model else ensure_model(Settings(data_dir=work, model="builtin"))
    try:
        rows = run_modes(args, model_path, work)
    except BaseException:
        log(f"failed; logs and outputs kept in {work}")
        raise
    print_report(rows, argv)
    if args.keep:
        print(f"work folder (logs, outputs): {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if any(row.id_faults for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
