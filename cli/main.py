"""`diffbatch` command line. Each subcommand is a real entry point used by compose.yaml and `serve`."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from pydantic import ValidationError

from cli import checks
from cli import keys as keys_commands
from cli import people as people_commands
from cli import schedules as schedules_commands
from cli.keys import Handler
from common.settings import BUILTIN_MODEL_PATH, CONTROL_QUEUE, Settings


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for chatty in ("httpx", "alembic"):  # one line per poll or migration step drowns the progress bar
        logging.getLogger(chatty).setLevel(logging.WARNING)
    try:
        settings = Settings(**({"data_dir": args.data_dir} if getattr(args, "data_dir", None) else {}))
    except ValidationError as error:  # a DIFFBATCH_* variable: say which, not a traceback
        for problem in error.errors():  # a check across settings names its variables itself
            where = f"DIFFBATCH_{'_'.join(map(str, problem['loc'])).upper()}: " if problem["loc"] else ""
            print(f"diffbatch: {where}{problem['msg'].removeprefix('Value error, ')}", file=sys.stderr)
        return 2
    return args.handler(settings, args) or 0


USAGE = """Batch generation with diffusion language models, OpenAI Batch API compatible.

  diffbatch run batch.jsonl -o results.jsonl     run a file on this machine, start to end
  diffbatch serve                                serve the API; then from another shell:
  diffbatch submit batch.jsonl --wait            submit a file and watch it run
  diffbatch status | results BATCH | cancel BATCH

Exit codes: 0 done (every line succeeded), 3 done with failed lines, 1 the batch failed, expired or was
cancelled (or the server said no), 2 a wrong argument or a startup check (the message says the fix),
130 interrupted."""


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("diffbatch")
    except PackageNotFoundError:  # run from a checkout that was not installed
        return "unknown"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffbatch", description=USAGE,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"diffbatch {_version()}")
    sub = parser.add_subparsers(required=True, metavar="COMMAND")

    def command(name: str, handler: Handler, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        p.add_argument("--data-dir", type=Path, help="data folder (default ./diffbatch-data, "
                       "or DIFFBATCH_DATA_DIR)")
        p.set_defaults(handler=handler, command=name)
        return p

    p = command("run", _run, "run a whole batch file through diffbatch and write the results")
    p.add_argument("input", type=Path, help="batch input file (OpenAI Batch JSONL)")
    p.add_argument("-o", "--output", type=Path, required=True, help="where to write the result lines")
    p.add_argument("--errors", type=Path, help="where to write error lines (default OUTPUT.errors.jsonl)")
    p.add_argument("--url", help="use a running diffbatch server instead of starting the embedded one "
                   "(the URL `serve` prints)")
    p.add_argument("--model", type=Path, help="the checkpoint folder to run (default DIFFBATCH_MODEL, else the "
                   "built-in model)")
    p = command("serve", _serve, "start API, worker, control process and scheduler (embedded: SQLite, no servers)")
    p.add_argument("--host", help="address to listen on (default 127.0.0.1; another needs an API key)")
    p.add_argument("--port", type=int, help="port to listen on (default DIFFBATCH_API_PORT, 8000)")
    people_commands.register(command)  # submit, status, results, cancel, models, workers
    p = command("api", _api, "start the HTTP API")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    command("worker", _worker, "start a worker for DIFFBATCH_MODEL (one per GPU)")
    command("control", _control, "start the control process: validation, finalizing and reconciling on a CPU, "
            "never behind generation (run at least one)")
    command("beat", _beat, "start the scheduler (periodic reconcile); run exactly one")
    p = command("db", _db, "database maintenance")
    p.add_argument("action", choices=["upgrade"])
    keys_commands.register(command)  # `diffbatch keys ...` and `diffbatch tenants ...`
    schedules_commands.register(command)  # `diffbatch schedules ...`
    p = command("train-builtin", _train_builtin, "train the built-in model on this Python's standard "
                "library (resumes from OUT/state.pt)")
    p.add_argument("--out", type=Path, default=Path("train-builtin"), help="run folder (default ./train-builtin)")
    p.add_argument("--steps", type=int, default=TRAIN_STEPS, help="length of the learning-rate schedule")
    p.add_argument("--max-minutes", type=float, help="stop (resumably) after this many minutes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init-from", type=Path, help="start from this exported model folder (weights and "
                   "tokenizer) with a fresh optimizer and schedule")
    p.add_argument("--lr", type=float, help="peak learning rate (default 2e-3)")
    p.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    p.add_argument("--export-to", type=Path, help="only export the run's last saved state to this folder")
    p.add_argument("--objective", choices=["diffusion", "ar"], default="diffusion",
                   help="diffusion (the built-in model) or ar: its autoregressive twin, same shape, data and "
                   "schedule, a transformers Llama model (bench/vs_ar.py)")
    p.add_argument("--tokenizer-from", type=Path, help="model folder whose tokenizer a new run uses (default: "
                   "trained on the corpus; with --objective ar, the built-in model's)")
    p = command("distill-builtin", _distill_builtin, "fine-tune a model on its own completions so the "
                "parallel samplers commit more tokens per pass (resumes from OUT)")
    p.add_argument("--out", type=Path, default=Path("distill-builtin"), help="run folder (default ./distill-builtin)")
    p.add_argument("--init-from", type=Path, help="model folder to distil (default: the built-in model)")
    p.add_argument("--teacher-minutes", type=float, default=30.0,
                   help="time for the teacher's completions (OUT/teacher.jsonl; default 30)")
    p.add_argument("--teacher-tokens", type=int, default=64, help="tokens per teacher completion (default 64)")
    p.add_argument("--teacher-twin", type=Path, help="the autoregressive twin's model folder (train-builtin "
                   "--objective ar) as the teacher, sampled, instead of the model itself (greedy)")
    p.add_argument("--teacher-temperature", type=float, default=0.8, help="the twin's sampling temperature (0.8)")
    p.add_argument("--teacher-top-p", type=float, default=0.95, help="the twin's nucleus (0.95)")
    p.add_argument("--teacher-presence-penalty", type=float, default=0.0,
                   help="the twin's presence_penalty, as the engine applies it (default 0; with "
                   "--teacher-temperature 0 a greedy teacher that does not loop, docs/benchmarks.md)")
    p.add_argument("--batch-size", type=int, default=32, help="teacher rows a fine-tuning step (default 32)")
    p.add_argument("--unlikelihood-weight", type=float, default=0.0,
                   help="weight of token-level unlikelihood on tokens written earlier in the row, against "
                   "loops under greedy decoding (default 0: off; docs/benchmarks.md)")
    p.add_argument("--min-distinct", type=float, default=0.4,
                   help="leave out teacher completions below this distinct-token ratio, loops (default 0.4)")
    p.add_argument("--min-completion-tokens", type=int, default=0,
                   help="leave out teacher completions shorter than this once cut where the function ends, so "
                   "a later round does not learn to end functions ever earlier (default 0)")
    p.add_argument("--min-coverage", type=float, default=0.0,
                   help="leave out teacher completions that, cut where the function ends, span less than this "
                   "share of the real function's rest (bench/quality.py's covers; default 0)")
    p.add_argument("--must-parse", action="store_true",
                   help="keep only teacher completions that, cut where the function ends, parse with their prompt "
                   "(those the token budget cut inside the function: that are a valid start)")
    p.add_argument("--whole-completions", action="store_true",
                   help="train on the teacher's completions as written, not cut where the prompt's function "
                   "ends (the cut, followed by EOS, teaches the model to stop there)")
    p.add_argument("--steps", type=int, default=600, help="length of the learning-rate schedule")
    p.add_argument("--max-minutes", type=float, help="stop the fine-tuning (resumably) after this many minutes")
    p.add_argument("--lr", type=float, help="peak learning rate (default 5e-4)")
    p.add_argument("--certainty-weight", type=float, default=1.0,
                   help="weight of the certainty-forcing term (default 1.0; 0.3 kept more quality, docs/benchmarks.md)")
    p.add_argument("--data-weight", type=float, default=0.0,
                   help="weight of a diffusion loss on the training corpus next to the teacher's; keeps the held-out "
                   "loss but also fewer tokens a pass (default 0: teacher completions only; docs/benchmarks.md)")
    p.add_argument("--trajectory-masking", type=float, default=0.0, metavar="SHARE",
                   help="share of training blocks masked in the order the starting model would unmask the "
                   "teacher's text, not at random (d3LLM's pseudo-trajectories; default 0: off; 0.25-0.5 helped, 1 did "
                   "not: docs/benchmarks.md)")
    p.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    return parser


# The shipped checkpoint's schedule (see worker/engine/builtin/diffbatch-py-mini/README.md).
TRAIN_STEPS = 1600
JEMALLOC_PATHS = ("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2", "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2",
                  "/usr/lib64/libjemalloc.so.2", "/usr/local/lib/libjemalloc.so.2")


def _run(settings: Settings, args: argparse.Namespace) -> int:
    import httpx

    from cli.client import ServerError, run_batch
    from cli.stack import EmbeddedStack, free_port

    if not args.input.is_file():
        print(f"diffbatch run: no such file: {args.input}", file=sys.stderr)
        return 2
    errors = args.errors or args.output.with_name(args.output.stem + ".errors.jsonl")
    for path in (args.output, errors):  # found out now, not once the batch has run
        if not path.parent.is_dir():
            print(f"diffbatch run: cannot write {path}: no such folder {path.parent}", file=sys.stderr)
            return 2
    if args.model and args.url:
        print("diffbatch run: --model starts the embedded stack; with --url the server's workers hold the "
              "model (leave out one of them)", file=sys.stderr)
        return 2
    if args.model:
        settings = settings.model_copy(update={"model": str(args.model.resolve())})
    if not args.url and not _checked("run", settings, checks.check_data_dir, checks.check_database,
                                     checks.check_broker, checks.check_model):
        return 2
    _stop_on_signals()
    try:
        if args.url:
            return run_batch(args.url, args.input, args.output, errors, check=_raise_if_interrupted)
        with EmbeddedStack(settings, port=free_port()) as stack:
            print(f"starting the embedded stack in {settings.data_dir} (logs in {stack.log_dir}) ...",
                  file=sys.stderr)
            stack.wait_ready()

            def check() -> None:
                _raise_if_interrupted()
                stack.check_alive()
            return run_batch(stack.url, args.input, args.output, errors, check=check)
    except (ServerError, RuntimeError, TimeoutError, OSError) as exc:
        print(f"diffbatch run: {exc}", file=sys.stderr)
        return 1
    except httpx.HTTPError as exc:  # the server at --url is down, or went away mid-run
        print(f"diffbatch run: cannot reach {args.url or 'the embedded server'}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        where = args.url or settings.data_dir
        print(f"diffbatch run: interrupted; the batch stays in {where} and resumes when it is served again",
              file=sys.stderr)
        return 130


def _serve(settings: Settings, args: argparse.Namespace) -> int:
    from cli.stack import EmbeddedStack

    settings = settings.model_copy(update={"api_host": args.host or settings.api_host})
    port = args.port or settings.api_port
    if not _checked("serve", settings, checks.check_data_dir, checks.check_database, checks.check_broker,
                    checks.check_model, _check_keys, lambda s: checks.check_port(s.api_host, port)):
        return 2
    stack = EmbeddedStack(settings, port=port)
    _stop_on_signals()
    with stack:
        try:
            if left := stack.unfinished_work():
                print(f"resuming {left} left by the previous run", flush=True)
            stack.wait_ready()
            print(f"diffbatch is serving at {stack.url}/v1 (data in {settings.data_dir}); Ctrl-C stops it",
                  flush=True)
            while True:
                _raise_if_interrupted()
                stack.check_alive()
                time.sleep(1)
        except KeyboardInterrupt:
            print("stopping ...", file=sys.stderr)
        except (RuntimeError, TimeoutError) as exc:
            print(f"diffbatch serve: {exc}", file=sys.stderr)
            return 1
    return 0


_interrupted = threading.Event()


def _stop_on_signals() -> None:
    """Ctrl-C and `kill` both stop the stack."""
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)


def _interrupt(*_args: object) -> None:
    _interrupted.set()
    raise KeyboardInterrupt


def _raise_if_interrupted() -> None:
    """Raise the interrupt again at the next poll: Python drops (prints) an exception a signal handler
    raises while the main thread runs a finalizer (a __del__, a weakref callback), and a `kill` landing
    there would let a run carry on to the end of its batch."""
    if _interrupted.is_set():
        raise KeyboardInterrupt


def _checked(command: str, settings: Settings, *steps: Callable[[Settings], None]) -> bool:
    """Run startup checks in order; the first that fails is one line on stderr, and False (the caller exits 2)."""
    try:
        for step in steps:
            step(settings)
    except checks.StartupError as exc:
        print(f"diffbatch {command}: {exc}", file=sys.stderr)
        return False
    return True


def _check_keys(settings: Settings) -> None:
    """Off loopback, the API refuses to start without a key: said before the stack starts, not after."""
    from api.auth import CREATE_KEY_HINT, is_loopback_host

    if not is_loopback_host(settings.api_host) and not keys_commands.keys_exist(settings):
        raise checks.StartupError(f"refusing to serve on {settings.api_host} without an API key; "
                                  f"{CREATE_KEY_HINT} (or leave out --host to serve on 127.0.0.1)")


def _not_a_poll(record: logging.LogRecord) -> bool:
    """uvicorn's access log without successful GETs: a client polling a batch would fill api.log."""
    args = record.args
    if isinstance(args, tuple) and len(args) == 5:  # (client, method, path, http version, status)
        method, status = args[1], args[4]
        return not (method == "GET" and isinstance(status, int) and status < 400)
    return True


def _api(settings: Settings, args: argparse.Namespace) -> int:
    import uvicorn

    from api.app import create_app
    from api.auth import CREATE_KEY_HINT, is_loopback_host

    settings = settings.model_copy(update={"api_host": args.host or settings.api_host})  # keyless only on loopback
    if not is_loopback_host(settings.api_host) and not keys_commands.keys_exist(settings):
        print(f"diffbatch api: refusing to serve on {settings.api_host} without an API key; {CREATE_KEY_HINT} "
              "(or bind to 127.0.0.1)", file=sys.stderr)
        return 2
    port = args.port or settings.api_port
    if not _checked("api", settings, checks.check_database, checks.check_broker,
                    lambda s: checks.check_port(s.api_host, port)):
        return 2
    logging.getLogger("uvicorn.access").addFilter(_not_a_poll)
    uvicorn.run(create_app(settings), host=settings.api_host, port=port, log_level="info")
    return 0


def _worker(settings: Settings, args: argparse.Namespace) -> int:
    from celery.signals import worker_ready, worker_shutdown

    from common.ids import now
    from db import repo
    from worker.celery_app import app
    from worker.heartbeat import beat_worker_row
    from worker.leases import retire_worker
    from worker.runtime import Runtime, set_runtime

    if not _checked("worker", settings, checks.check_database, checks.check_broker, checks.check_model):
        return 2
    runtime = Runtime(settings, celery=app)
    set_runtime(runtime)
    engine = runtime.engine  # load the model before taking work

    def _register(**_kwargs: object) -> None:
        # Only now is Celery consuming: `/v1/models` lists this model once work sent to it is taken.
        with runtime.session() as session, session.begin():
            repo.upsert_worker(session, name=runtime.name, model=runtime.model_name,
                               queue=runtime.model_queue, max_positions=engine.max_positions, now=now())
        threading.Thread(target=beat_worker_row, args=(runtime,), daemon=True).start()

    def _retire(**_kwargs: object) -> None:
        # A clean stop hands its chunks back at once, so a restarted stack resumes them without waiting
        # for this worker to be declared dead.
        retire_worker(runtime)

    # Connected by a call, not as decorators (Celery is untyped); the signals hold them weakly, and these
    # names keep them alive while the worker runs.
    worker_ready.connect(_register)
    worker_shutdown.connect(_retire)

    # The model's queue only: validation, finalizing and reconciling belong to `diffbatch control`, so they
    # never wait behind a chunk and never spend GPU time.
    app.worker_main(["worker", "--pool", "solo", "--queues", runtime.model_queue,
                     "--hostname", f"{runtime.model_name}@{runtime.name}", "--loglevel", "INFO",
                     "--without-gossip", "--without-mingle"])
    return 0


def _control(settings: Settings, args: argparse.Namespace) -> int:
    from celery.signals import worker_ready

    from worker.celery_app import app
    from worker.reconcile import reconcile
    from worker.runtime import Runtime, set_runtime

    if not _checked("control", settings, checks.check_database, checks.check_broker, checks.check_model):
        return 2
    runtime = Runtime(settings, celery=app, weights=False)
    set_runtime(runtime)
    runtime.engine  # the tokenizer and the model's shape, to check request lines; no weights  # noqa: B018

    def _resume(**_kwargs: object) -> None:
        reconcile(runtime)  # pick up at once whatever a previous run left behind

    worker_ready.connect(_resume)

    # Threads: a long validation must not hold up a finalize or the reconciler behind it.
    app.worker_main(["worker", "--pool", "threads", "--concurrency", str(settings.control_concurrency),
                     "--queues", CONTROL_QUEUE, "--hostname", f"control@{runtime.name}", "--loglevel", "INFO",
                     "--without-gossip", "--without-mingle"])
    return 0


def _beat(settings: Settings, args: argparse.Namespace) -> int:
    from worker.celery_app import app

    if not _checked("beat", settings, checks.check_data_dir, checks.check_database, checks.check_broker):
        return 2
    app.start(["beat", "--schedule", str(settings.data_dir / "celerybeat-schedule"), "--loglevel", "INFO"])
    return 0


def _db(settings: Settings, args: argparse.Namespace) -> int:
    from db.migrate import upgrade

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(settings.resolved_database_url)
    print(f"database at head: {settings.resolved_database_url.split('@')[-1]}")
    return 0


def _train_builtin(settings: Settings, args: argparse.Namespace) -> int:
    import json

    if args.export_to:
        from training.loop import TrainConfig, export_checkpoint

        step = export_checkpoint(TrainConfig(out_dir=args.out, objective=args.objective), args.export_to)
        print(f"exported step {step} of {args.out} to {args.export_to}")
        return 0
    _use_jemalloc(args.command)

    import torch

    from training.loop import TrainConfig, train

    if args.threads:
        torch.set_num_threads(args.threads)
    # The twin reads text with the shipped model's tokenizer unless told otherwise: same ids, same data.
    tokenizer_from = args.tokenizer_from or (BUILTIN_MODEL_PATH if args.objective == "ar" else None)
    try:
        result = train(TrainConfig(out_dir=args.out, steps=args.steps, max_minutes=args.max_minutes,
                                   seed=args.seed, init_from=args.init_from, objective=args.objective,
                                   tokenizer_from=tokenizer_from, **({"learning_rate": args.lr} if args.lr else {})))
    except ValueError as exc:
        print(f"diffbatch train-builtin: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    print(f"model written to {args.out / 'model'}; serve it with DIFFBATCH_MODEL={args.out / 'model'}")
    return 0


def _distill_builtin(settings: Settings, args: argparse.Namespace) -> int:
    import json

    _use_jemalloc(args.command)

    import torch

    from training.distill import DistillConfig, distill, write_teacher_completions, write_twin_teacher_completions
    from worker.runtime import ensure_model

    if args.threads:
        torch.set_num_threads(args.threads)
    model = args.init_from or ensure_model(settings)
    teacher = args.out / "teacher.jsonl"
    args.out.mkdir(parents=True, exist_ok=True)
    if not (args.out / "state.pt").is_file():  # once fine-tuning began, its data stays as it is
        if args.teacher_twin:
            count = write_twin_teacher_completions(args.teacher_twin, model, teacher, new_tokens=args.teacher_tokens,
                                                   temperature=args.teacher_temperature, top_p=args.teacher_top_p,
                                                   presence_penalty=args.teacher_presence_penalty,
                                                   max_minutes=args.teacher_minutes)
        else:
            count = write_teacher_completions(model, teacher, new_tokens=args.teacher_tokens,
                                              max_minutes=args.teacher_minutes)
        print(f"{count} teacher completions in {teacher}")
    result = distill(DistillConfig(out_dir=args.out, teacher=teacher, init_from=model, steps=args.steps,
                                   completion_tokens=args.teacher_tokens, max_minutes=args.max_minutes,
                                   certainty_weight=args.certainty_weight, data_weight=args.data_weight,
                                   end_functions=not args.whole_completions, min_distinct=args.min_distinct,
                                   min_completion_tokens=args.min_completion_tokens,
                                   min_coverage=args.min_coverage, must_parse=args.must_parse,
                                   batch_size=args.batch_size, unlikelihood_weight=args.unlikelihood_weight,
                                   trajectory_share=args.trajectory_masking,
                                   **({"learning_rate": args.lr} if args.lr else {})))
    print(json.dumps(result))
    print(f"model written to {args.out / 'model'}; serve it with DIFFBATCH_MODEL={args.out / 'model'}")
    return 0


def _use_jemalloc(command: str) -> None:
    """Re-execute this command under jemalloc when it is installed and not yet preloaded."""
    import os

    jemalloc = next((p for p in JEMALLOC_PATHS if Path(p).is_file()), None)
    if "LD_PRELOAD" not in os.environ and jemalloc:
        # Each step's logits have a different size (the masked count varies). Under glibc malloc RSS
        # grew ~3 GB per 100 steps, and a fixed mmap threshold stopped that but spent half the time
        # in page faults; jemalloc, never returning pages, holds ~4 GB at full speed. The allocator
        # is chosen at start-up, hence the re-exec.
        env = {**os.environ, "LD_PRELOAD": jemalloc, "MALLOC_CONF": "dirty_decay_ms:-1,muzzy_decay_ms:-1"}
        os.execve(sys.executable, [sys.executable, "-m", "cli.main", *sys.argv[1:]], env)
    if not jemalloc:
        print(f"diffbatch {command}: libjemalloc not found (apt install libjemalloc2); with glibc "
              "malloc the process grows by GBs over a long run", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
