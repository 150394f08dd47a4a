"""The commands a person types against a running server: submit, status, results, cancel, models, workers.

Each takes --url (the URL `serve` prints, with or without /v1; default DIFFBATCH_URL, else the local
API port) and --json (the server's objects, for scripts). Exit codes: cli.client.exit_code for a batch
followed to its end; 1 for an error the server or the network gave; 2 for a wrong argument.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import IO, Any

import httpx
from rich.console import Console
from rich.table import Table

from cli.client import TERMINAL, Api, ServerError, console, exit_code, expected_tokens
from cli.keys import Command, Handler
from cli.progress import clock, snapshot
from common.lines import ENDPOINTS
from common.settings import Settings

URL_VARIABLE = "DIFFBATCH_URL"
EXIT_ERROR, EXIT_USAGE = 1, 2
POLL_S = 1.0

out = Console()  # tables on stdout; progress and messages go to stderr (cli.client.console)


def register(command: Command) -> None:
    """Add the commands through cli.main's ``command(name, handler, help)``."""
    p = command("submit", _submit, "upload a batch input file (or a template and its rows) and create its batch; "
                "prints the batch id")
    p.add_argument("input", type=Path, nargs="?", help="batch input file (OpenAI Batch JSONL); or --template "
                   "and --rows")
    p.add_argument("--template", type=Path, help="a request body (JSON) whose string values hold {{column}} "
                   "placeholders: one request per row of --rows (a diffbatch extension)")
    p.add_argument("--rows", type=Path, help="the template's rows: .csv with a header row, or .jsonl (one object "
                   "of column values a line)")
    p.add_argument("--custom-id-column", help="the column that gives each request its custom_id (default: "
                   "row-1, row-2, ...)")
    p.add_argument("--endpoint", choices=list(ENDPOINTS), help="the template's endpoint (default: "
                   "/v1/chat/completions when it has messages, /v1/responses when it has input, "
                   "else /v1/completions)")
    p.add_argument("--priority", type=int, help="higher runs first on its model: -100 to 100 (default 0)")
    p.add_argument("--wait", action="store_true", help="follow it to its end; the exit code says how it ended")
    _common(p)
    p = command("status", _status, "a table of recent batches, or one batch's progress, followed to its end")
    p.add_argument("batch", nargs="?", help="a batch id (default: list the recent batches)")
    p.add_argument("--limit", type=int, default=20, help="batches in the table (default 20, at most 100)")
    _common(p)
    p = command("results", _results, "write a batch's result lines (output file) to stdout or -o FILE")
    p.add_argument("batch", help="a batch id")
    p.add_argument("-o", "--output", type=Path, help="write them here (default: stdout)")
    p.add_argument("--errors", action="store_true", help="the error lines (error file) instead")
    p.add_argument("--follow", action="store_true", help="write each line as its request finishes, until the "
                   "batch ends (in the order they finish)")
    _common(p, as_json=False)
    p = command("cancel", _cancel, "cancel a batch (running requests finish first)")
    p.add_argument("batch", help="a batch id")
    _common(p)
    _common(command("models", _models, "the models live workers serve"))
    _common(command("workers", _workers, "the workers: model, queue and seconds since their last heartbeat"))


def _common(p: argparse.ArgumentParser, *, as_json: bool = True) -> None:
    p.add_argument("--url", help=f"the server (default ${URL_VARIABLE}, else http://127.0.0.1:PORT with "
                   "DIFFBATCH_API_PORT)")
    if as_json:
        p.add_argument("--json", action="store_true", help="print the server's JSON objects")


def server_url(settings: Settings, given: str | None) -> str:
    return given or os.environ.get(URL_VARIABLE) or f"http://{settings.api_host}:{settings.api_port}"


def _api(settings: Settings, args: argparse.Namespace) -> Api:
    return Api(server_url(settings, args.url))


def _reporting(handler: Handler) -> Handler:
    """The handler, with the server's errors and an unreachable server as one line on stderr and exit 1."""

    @functools.wraps(handler)
    def run(settings: Settings, args: argparse.Namespace) -> int:
        try:
            return handler(settings, args)
        except ServerError as exc:
            print(f"diffbatch {args.command}: {exc}", file=sys.stderr)
        except httpx.HTTPError as exc:
            print(f"diffbatch {args.command}: cannot reach {server_url(settings, args.url)}: {exc}; is "
                  f"`diffbatch serve` running there (--url, ${URL_VARIABLE})?", file=sys.stderr)
        return EXIT_ERROR
    return run


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2))


def _show(value: Any, text: str, *, as_json: bool) -> None:
    """``value`` as JSON for a script, else ``text`` for a person (both on stdout)."""
    if as_json:
        _print_json(value)
    else:
        print(text)


class _Usage(Exception):
    """A wrong argument: the message is printed and the command exits 2."""


@_reporting
def _submit(settings: Settings, args: argparse.Namespace) -> int:
    try:
        template = _submitted_template(args)
    except _Usage as exc:
        print(f"diffbatch submit: {exc}", file=sys.stderr)
        return EXIT_USAGE
    extensions = {} if args.priority is None else {"priority": args.priority}
    with _api(settings, args) as api:
        if template is None:
            _uploaded, batch = api.submit(args.input, **extensions)
            source, hint = args.input, expected_tokens(args.input)
        else:
            batch, source, hint = _submit_template(api, args, template, extensions), args.rows, None
        if not args.wait:
            _show(batch, batch["id"], as_json=args.json)
            return 0
        console.print(f"batch [bold]{batch['id']}[/] submitted ({source})")
        batch = api.follow(batch, poll_s=POLL_S, hint=hint)
        _show(batch, batch["id"], as_json=args.json)
        _outcome(batch)
        return exit_code(batch)


def _submitted_template(args: argparse.Namespace) -> dict[str, Any] | None:
    """The --template body, or None for a plain input file; _Usage when the arguments do not fit."""
    if args.template is None:
        for flag, value in (("--rows", args.rows), ("--custom-id-column", args.custom_id_column),
                            ("--endpoint", args.endpoint)):
            if value is not None:
                raise _Usage(f"{flag} goes with --template")
        if args.input is None:
            raise _Usage("give a batch input file, or --template T.json --rows FILE.csv|FILE.jsonl")
        if not args.input.is_file():
            raise _Usage(f"no such file: {args.input}")
        return None
    if args.input is not None:
        raise _Usage("give a batch input file or --template, not both")
    if args.rows is None:
        raise _Usage("--template needs --rows FILE.csv|FILE.jsonl")
    for path in (args.template, args.rows):
        if not path.is_file():
            raise _Usage(f"no such file: {path}")
    if args.rows.suffix.lower() not in ROW_SUFFIXES:
        raise _Usage(f"--rows {args.rows}: the server reads rows by the file's name: .csv (with a header row) "
                     "or .jsonl")
    try:
        template = json.loads(args.template.read_bytes())
    except (ValueError, RecursionError) as exc:
        raise _Usage(f"--template {args.template}: not valid JSON: {exc}") from exc
    if not isinstance(template, dict):
        raise _Usage(f"--template {args.template}: must be a JSON object (a request body)")
    return template


# The names api/templated.py reads rows files by.
ROW_SUFFIXES = (".csv", ".jsonl", ".ndjson")


def _submit_template(api: Api, args: argparse.Namespace, template: dict[str, Any],
                     extensions: dict[str, Any]) -> dict[str, Any]:
    """Upload the rows file (the server reads it as a stream) and create the templated batch."""
    uploaded = api.upload(args.rows)
    endpoint = args.endpoint or ("/v1/chat/completions" if "messages" in template else
                                 "/v1/responses" if "input" in template else "/v1/completions")
    body = {"template": template, "rows_file_id": uploaded["id"], "endpoint": endpoint, "completion_window": "24h",
            **extensions}
    if args.custom_id_column is not None:
        body["custom_id_column"] = args.custom_id_column
    return api.post("/batches", body)


@_reporting
def _status(settings: Settings, args: argparse.Namespace) -> int:
    with _api(settings, args) as api:
        if args.batch is None:
            page = api.get("/batches", limit=max(1, min(args.limit, 100)))
            if args.json:
                _print_json(page)
            else:
                _batch_table(page["data"])
            return 0
        batch = api.get(f"/batches/{args.batch}")
        if args.json:
            _print_json(batch)
            return 0
        if batch["status"] not in TERMINAL:
            batch = api.follow(batch, poll_s=POLL_S)
        _outcome(batch)
        return exit_code(batch)


@_reporting
def _results(settings: Settings, args: argparse.Namespace) -> int:
    with _api(settings, args) as api, _destination(args.output) as sink:
        batch = api.get(f"/batches/{args.batch}")
        key = "error_file_id" if args.errors else "output_file_id"
        if args.follow:
            batch = _follow_results(api, batch, sink, errors=args.errors)
        elif batch["status"] not in TERMINAL:
            counts = batch["request_counts"]
            print(f"diffbatch results: batch {args.batch} is {batch['status']} "
                  f"({counts['completed'] + counts['failed']}/{counts['total']} done); --follow writes the lines "
                  "as they finish", file=sys.stderr)
            return EXIT_ERROR
        elif batch.get(key):
            sink.write(api.content(batch[key]))
        other = "output_file_id" if args.errors else "error_file_id"
        if batch.get(other) and not args.follow:
            flag = "without --errors" if args.errors else "with --errors"
            print(f"diffbatch results: batch {args.batch} also has {other.split('_')[0]} lines ({flag})",
                  file=sys.stderr)
    return 0


def _follow_results(api: Api, batch: dict[str, Any], sink: IO[bytes], *, errors: bool) -> dict[str, Any]:
    """Write each finished line once (``errors``: the failed ones, else the succeeded), as they finish; at
    the end, whatever the output files hold that was not written yet."""
    seen: set[str] = set()
    after: str | None = None
    batch_id = batch["id"]
    while True:
        ended = batch["status"] in TERMINAL
        page = api.get(f"/batches/{batch_id}/results", after=after, limit=1000)
        for line in page["data"]:
            after = line["id"]
            if (line["error"] is not None) == errors and line["custom_id"] not in seen:
                seen.add(line["custom_id"])
                sink.write(json.dumps(line).encode() + b"\n")
        sink.flush()
        if page["has_more"]:
            continue
        if ended:
            break
        time.sleep(POLL_S)
        batch = api.get(f"/batches/{batch_id}")
    # A line finishing after a later one was listed is behind the cursor: the final file has it.
    key = "error_file_id" if errors else "output_file_id"
    if batch.get(key):
        for raw in api.content(batch[key]).splitlines():
            if raw.strip() and json.loads(raw)["custom_id"] not in seen:
                sink.write(raw + b"\n")
    sink.flush()
    return batch


@contextmanager
def _destination(path: Path | None) -> Iterator[IO[bytes]]:
    if path is None:
        yield sys.stdout.buffer
        return
    with open(path, "wb") as sink:
        yield sink


@_reporting
def _cancel(settings: Settings, args: argparse.Namespace) -> int:
    with _api(settings, args) as api:
        batch = api.cancel(args.batch)
        _show(batch, f"{batch['id']}: {batch['status']}", as_json=args.json)
    return 0


@_reporting
def _models(settings: Settings, args: argparse.Namespace) -> int:
    with _api(settings, args) as api:
        page = api.get("/models")
    if args.json:
        _print_json(page)
    elif not page["data"]:
        print("no live workers: start one (`diffbatch worker`, or `diffbatch serve`)", file=sys.stderr)
    else:
        for model in page["data"]:
            print(model["id"])
    return 0


@_reporting
def _workers(settings: Settings, args: argparse.Namespace) -> int:
    with _api(settings, args) as api:
        page = api.get("/workers")
    if args.json:
        _print_json(page)
        return 0
    if not page["data"]:
        print("no workers have registered", file=sys.stderr)
    _table(("worker", "model", "queue", "last heartbeat", "state"),
           [(w["name"], w["model"], w["queue"], f"{w['heartbeat_age_s']} s ago", "live" if w["live"] else "dead")
            for w in page["data"]])
    return 0


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    """A rich table on a terminal; else one tab-separated line per row, whole values (for grep and cut)."""
    if not rows:
        return
    if not out.is_terminal:
        for row in rows:
            print("\t".join(row))
        return
    table = Table(*header)
    for row in rows:
        table.add_row(*row)
    out.print(table)


def _batch_table(batches: list[dict[str, Any]]) -> None:
    if not batches:
        print("no batches", file=sys.stderr)
        return
    rows: list[tuple[str, ...]] = []
    for batch in batches:
        snap = snapshot(batch)
        rows.append((batch["id"], snap.status, f"{snap.requests_done}/{snap.requests_total}", f"{snap.tokens_done:,}",
                     datetime.fromtimestamp(batch["created_at"]).strftime("%Y-%m-%d %H:%M")))
    _table(("batch", "status", "requests", "tokens", "created"), rows)


def _outcome(batch: dict[str, Any]) -> None:
    """One line on stderr: how the batch ended, and how long it took."""
    snap = snapshot(batch)
    took = (batch.get("completed_at") or batch.get("failed_at") or batch.get("cancelled_at")
            or batch.get("expired_at") or batch["created_at"]) - batch["created_at"]
    console.print(f"batch {batch['id']}: [bold]{snap.status}[/] after {clock(took)}; "
                  f"{batch['request_counts']['completed']} succeeded, {batch['request_counts']['failed']} failed "
                  f"of {snap.requests_total}; {batch['usage']['output_tokens']:,} output tokens", highlight=False)
    for error in (batch.get("errors") or {}).get("data", []):
        console.print(f"  [red]error[/] {error['code']}: {error['message']}")
