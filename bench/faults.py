"""Recovery under load: one batch through Redis + PostgreSQL and two workers, without and with kills.

Runs the same N-request batch twice on a fresh database and a private redis-server, with the real
processes (api, control, beat, two workers) and the DEFAULT recovery settings (whatever DIFFBATCH_*
variables the environment sets are printed): once undisturbed, then while one worker (alternately the
first and the second) is killed with SIGKILL and restarted at once every --kill-every seconds, as a
container's restart policy would. Reports custom_ids lost and duplicated (must be 0 and 0: exit 1
otherwise), each kill's recovery times, and tokens/s with kills against without.

    python bench/faults.py [--requests 5000] [--max-tokens 32] [--kill-every 60] [--tiny]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import secrets
import shlex
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.faults: the process harness

from service import write_requests  # noqa: E402 - bench/ is the script's folder, so first on sys.path

from cli.stack import CPU_ALLOCATOR  # noqa: E402
from common.settings import Settings  # noqa: E402
from tests.faults.client import TERMINAL, BatchClient  # noqa: E402
from tests.faults.servers import RedisServer  # noqa: E402
from tests.faults.stack import FaultStack  # noqa: E402

POSTGRES_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
WORKERS = ("worker-1", "worker-2")
POLL_S = 0.25
RECOVERY_SETTINGS = ("heartbeat_s", "worker_dead_after_s", "lost_message_grace_s", "reconcile_every_s",
                     "requeue_after_s", "max_attempts", "chunk_size", "max_batch_size")


@dataclass
class Kill:
    """One SIGKILL; times are seconds after the kill, None until seen (or never)."""

    worker: str
    dead_id: str  # the killed process's name in the database
    at_s: float  # after the batch was created
    killed_at: float  # time.monotonic()
    held: list[int]  # request ids the killed process was running
    new_worker_id: str = ""
    released_s: float | None = None
    resumed_s: float | None = None
    back_s: float | None = None


@dataclass
class Run:
    mode: str
    requests: int
    tokens: int = 0
    seconds: float = 0.0
    lost: int = 0
    duplicated: int = 0
    unknown: int = 0
    errors: Counter = field(default_factory=Counter)
    kills: list[Kill] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--block-length", type=int, default=16, help="the built-in model's default")
    parser.add_argument("--kill-every", type=float, default=60.0, help="seconds between kills")
    parser.add_argument("--model", help="checkpoint folder (default: the built-in model)")
    parser.add_argument("--tiny", action="store_true", help="a tiny random checkpoint: recovery, not the engine")
    parser.add_argument("--skip-baseline", action="store_true", help="only the run with kills")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs)")
    return parser.parse_args(argv)


@contextlib.contextmanager
def fresh_database():
    """A new PostgreSQL database (the stack migrates it), dropped afterwards."""
    import psycopg

    name = f"diffbatch_faults_{secrets.token_hex(4)}"
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def process_env() -> dict[str, str]:
    """What every process gets: the embedded CPU worker's allocator, and the cores split between the workers."""
    threads = str(max(1, (os.cpu_count() or 2) // len(WORKERS)))
    return {**CPU_ALLOCATOR, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}


def run_once(mode: str, lines: list[dict], model: Path, work: Path, kill_every: float | None) -> Run:
    with fresh_database() as database_url, contextlib.ExitStack() as cleanup:
        redis = RedisServer(work / f"{mode}-redis.log")
        redis.start()
        cleanup.callback(redis.stop)
        stack = FaultStack(model=model, database_url=database_url, broker_url=redis.url, data_dir=work / mode,
                           env=process_env(), patched_workers=False)
        cleanup.callback(stack.stop)
        log(f"{mode}: starting api, control, beat and two workers (logs in {stack.log_dir}) ...")
        stack.start_all(workers=len(WORKERS))
        client = BatchClient(stack.url)
        cleanup.callback(client.close)
        log(f"{mode}: submitting {len(lines)} requests ...")
        return follow(stack, client, Run(mode, len(lines)), lines, kill_every)


def follow(stack: FaultStack, client: BatchClient, run: Run, lines: list[dict], kill_every: float | None) -> Run:
    """Submit, kill a worker every ``kill_every`` s of the batch's run (None: never), wait, check the files."""
    batch = client.submit(lines)
    created = time.monotonic()
    next_kill = None
    while batch["status"] not in TERMINAL:
        time.sleep(POLL_S)
        batch = client.batch(batch["id"]) or batch
        now = time.monotonic()
        if kill_every and batch["status"] == "in_progress":
            next_kill = next_kill or now + kill_every
            if now >= next_kill:
                run.kills.append(kill_and_restart(stack, WORKERS[len(run.kills) % len(WORKERS)], created))
                next_kill += kill_every
        for kill in run.kills:
            observe(stack, kill)
    run.seconds = time.monotonic() - created
    for kill in run.kills:  # the batch is done: every held request was resumed and finished by now
        observe(stack, kill)
    run.tokens = batch["usage"]["output_tokens"]
    output, errors = client.results(batch)
    count_ids(run, lines, output + errors)
    run.errors = Counter(line["error"]["code"] for line in errors)
    log(f"{run.mode}: {batch['status']} in {run.seconds:.1f} s, {run.rate:.1f} tokens/s, {len(run.kills)} kills")
    return run


def kill_and_restart(stack: FaultStack, worker: str, created: float) -> Kill:
    dead_id = stack.worker_id(worker)
    held = held_requests(stack, dead_id)
    stack.kill(worker)
    kill = Kill(worker, dead_id, time.monotonic() - created, time.monotonic(), held)
    stack.start_worker(worker)
    kill.new_worker_id = stack.worker_id(worker)
    log(f"killed {worker} ({dead_id}) running {len(held)} requests; restarted as {kill.new_worker_id}")
    return kill


def held_requests(stack: FaultStack, worker_id: str) -> list[int]:
    from sqlalchemy import select

    from db.models import Request, RequestStatus

    with stack.db.connect() as conn:
        return list(conn.scalars(select(Request.id).where(Request.worker == worker_id,
                                                          Request.status == RequestStatus.running)))


def observe(stack: FaultStack, kill: Kill) -> None:
    """Note the first time each recovery step of ``kill`` shows in the database."""
    from sqlalchemy import func, select

    from db.models import Request, RequestStatus

    elapsed = time.monotonic() - kill.killed_at
    with stack.db.connect() as conn:
        if kill.held and (kill.released_s is None or kill.resumed_s is None):
            rows = conn.execute(select(Request.status, Request.worker).where(Request.id.in_(kill.held))).all()
            if kill.released_s is None and not any(status == RequestStatus.running and worker == kill.dead_id
                                                   for status, worker in rows):
                kill.released_s = elapsed
            if kill.resumed_s is None and any(status != RequestStatus.pending and worker not in (None, kill.dead_id)
                                              for status, worker in rows):
                kill.resumed_s = elapsed
        if kill.back_s is None and conn.scalar(select(func.count()).select_from(Request).where(
                Request.worker == kill.new_worker_id, Request.status != RequestStatus.pending)):
            kill.back_s = elapsed


def count_ids(run: Run, lines: list[dict], results: list[dict]) -> None:
    """Input custom_ids with no result line (lost), extra result lines of one (duplicated), and unknown ones."""
    seen = Counter(result["custom_id"] for result in results)
    inputs = {line["custom_id"] for line in lines}
    run.lost = len(inputs - set(seen))
    run.duplicated = sum(count - 1 for custom_id, count in seen.items() if custom_id in inputs)
    run.unknown = sum(count for custom_id, count in seen.items() if custom_id not in inputs)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def print_report(runs: list[Run], args: argparse.Namespace, model: Path, argv: list[str]) -> None:
    settings = Settings(model=str(model))
    print(f"\ncommand: {shlex.join([sys.executable, *argv])}")
    print(f"machine: {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, python "
          f"{platform.python_version()}; workers: {len(WORKERS)}, OMP_NUM_THREADS={process_env()['OMP_NUM_THREADS']}")
    print(f"model: {settings.served_model_name} ({model}); {args.requests} requests, max_tokens {args.max_tokens}, "
          f"block_length {args.block_length}")
    print("settings: " + ", ".join(f"{name}={getattr(settings, name)}" for name in RECOVERY_SETTINGS))
    print(f"\n{'run':<22} {'seconds':>8} {'out tokens':>10} {'tokens/s':>9} {'lost':>5} {'duplicated':>10} "
          f"{'unknown':>7} {'kills':>5}  error lines")
    for run in runs:
        errors = ", ".join(f"{code} {count}" for code, count in run.errors.items()) or "0"
        print(f"{run.mode:<22} {run.seconds:>8.1f} {run.tokens:>10} {run.rate:>9.1f} {run.lost:>5} "
              f"{run.duplicated:>10} {run.unknown:>7} {len(run.kills):>5}  {errors}")
    if len(runs) == 2 and runs[0].rate:
        print(f"tokens/s with kills / without: {runs[1].rate / runs[0].rate:.2f}")
    kills = [kill for run in runs for kill in run.kills]
    if kills:
        print(f"\n{'kill':>4} {'at s':>7} {'worker':<9} {'held':>5} {'released s':>10} {'resumed s':>9} "
              f"{'back s':>7}")
        for number, kill in enumerate(kills, 1):
            print(f"{number:>4} {kill.at_s:>7.1f} {kill.worker:<9} {len(kill.held):>5} {seconds(kill.released_s):>10} "
                  f"{seconds(kill.resumed_s):>9} {seconds(kill.back_s):>7}")
        print("at s: when the kill came, after the batch was created; held: requests the killed worker was\n"
              "running. Seconds after the kill until: released: none of them is held by the dead worker any\n"
              "more (the reconciler reclaimed its chunk); resumed: the first of them is claimed by another\n"
              "worker or finished (time to resume); back: the restarted worker runs requests (start-up and\n"
              f"model load included). Polled every ~{POLL_S} s; '-': never seen (held 0: it was idle).")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv if argv is None else argv
    args = parse_args(argv[1:])
    work = Path(tempfile.mkdtemp(prefix="diffbatch-bench-faults-"))
    if args.tiny:
        from worker.engine.builtin.create import create_tiny_random_model

        model = create_tiny_random_model(work / "tiny")
    else:
        from worker.runtime import ensure_model

        model = Path(args.model) if args.model else ensure_model(Settings(model="builtin"))
    lines = write_requests(work / "requests.jsonl", args, Settings(model=str(model)).served_model_name)
    runs = []
    try:
        if not args.skip_baseline:
            runs.append(run_once("no kills", lines, model, work, None))
        runs.append(run_once(f"kill every {args.kill_every:g} s", lines, model, work, args.kill_every))
    except BaseException:
        log(f"failed; logs kept in {work}")
        raise
    print_report(runs, args, model, argv)
    if args.keep:
        print(f"work folder (logs): {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if any(run.lost or run.duplicated or run.unknown for run in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
