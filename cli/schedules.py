"""`diffbatch schedules create|list|pause|resume|delete`: scheduled batches on a running server, over HTTP.

Exit codes: 0 done, 1 the server refused (its message is printed) or cannot be reached, 2 a usage error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cli.keys import Command
from common.settings import Settings

if TYPE_CHECKING:  # the HTTP client loads only when the command runs
    import httpx

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
URL_VARIABLE = "DIFFBATCH_URL"


def register(command: Command) -> None:
    """Add `schedules` through cli.main's ``command(name, handler, help)``."""
    parser = command("schedules", _schedules, "scheduled batches: a cron expression, a time zone and a batch "
                     "template, run as a normal batch each time it is due")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    def action(name: str, help_: str, json_help: str = "print the answer as JSON") -> argparse.ArgumentParser:
        p = actions.add_parser(name, help=help_, description=help_)
        p.add_argument("--url", help=f"the server (default ${URL_VARIABLE}, else http://127.0.0.1:PORT of "
                       "DIFFBATCH_API_PORT); with or without /v1")
        p.add_argument("--json", action="store_true", help=json_help)
        # SUPPRESS: left out, it keeps a --data-dir given before the action instead of resetting it
        p.add_argument("--data-dir", type=Path, default=argparse.SUPPRESS, help="data folder")
        return p

    create = action("create", "create a schedule; its id is printed alone on the last line")
    create.add_argument("--cron", required=True, help="five cron fields or an alias, e.g. '0 9 * * *', '@hourly'")
    create.add_argument("--timezone", default="UTC", help="IANA time zone of the cron times (default UTC)")
    source = create.add_mutually_exclusive_group(required=True)
    source.add_argument("--file", type=Path, help="batch input file (JSONL) to upload and run each time")
    source.add_argument("--input-file-id", help="an uploaded batch input file to run each time")
    create.add_argument("--endpoint", help="the batch endpoint (default: the url of the file's first line)")
    create.add_argument("--metadata", action="append", default=[], metavar="KEY=VALUE",
                        help="metadata of each run's batch (repeatable)")
    create.add_argument("--webhook-url", help="called when each run's batch ends")
    action("list", "list schedules", "one JSON array instead of a table")
    for name, text in (("pause", "stop a schedule from firing"),
                       ("resume", "fire again from the first due time after now (runs due while paused are skipped)"),
                       ("delete", "delete a schedule (the batches it created stay)")):
        action(name, text).add_argument("schedule_id", metavar="SCHEDULE_ID")


def _schedules(settings: Settings, args: argparse.Namespace) -> int:
    import httpx

    from cli.client import ServerError, api_base, auth_headers

    url = api_base(args.url or os.environ.get(URL_VARIABLE) or f"http://127.0.0.1:{settings.api_port}")
    try:
        with httpx.Client(base_url=url + "/v1", timeout=60, headers=auth_headers()) as http:
            if args.action == "create":
                return _create(http, args)
            if args.action == "list":
                return _list(http, as_json=args.json)
            method, path = ("DELETE", "") if args.action == "delete" else ("POST", f"/{args.action}")
            answer = _call(http, method, f"/schedules/{args.schedule_id}{path}")
            print(json.dumps(answer, indent=2) if args.json else
                  f"schedule {answer['id']} {'deleted' if args.action == 'delete' else _state(answer)}")
            return EXIT_OK
    except ServerError as exc:
        print(f"diffbatch schedules: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except httpx.HTTPError as exc:
        print(f"diffbatch schedules: cannot reach {url}: {exc}", file=sys.stderr)
        return EXIT_FAILED


def _create(http: httpx.Client, args: argparse.Namespace) -> int:
    metadata: dict[str, str] = {}
    for pair in args.metadata:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            print(f"diffbatch schedules create: --metadata {pair!r}: expected KEY=VALUE", file=sys.stderr)
            return EXIT_USAGE
        metadata[key] = value
    if args.file is not None and not args.file.is_file():
        print(f"diffbatch schedules create: no such file: {args.file}", file=sys.stderr)
        return EXIT_USAGE
    if args.input_file_id and not args.endpoint:
        print("diffbatch schedules create: --endpoint is needed with --input-file-id", file=sys.stderr)
        return EXIT_USAGE
    file_id, endpoint = args.input_file_id, args.endpoint
    if args.file is not None:
        from cli.client import first_endpoint

        with open(args.file, "rb") as src:
            file_id = _call(http, "POST", "/files", files={"file": (args.file.name, src)},
                            data={"purpose": "batch"})["id"]
        endpoint = endpoint or first_endpoint(args.file)
    template: dict[str, Any] = {"input_file_id": file_id, "endpoint": endpoint, "completion_window": "24h"}
    if metadata:
        template["metadata"] = metadata
    if args.webhook_url:
        template["webhook_url"] = args.webhook_url
    schedule = _call(http, "POST", "/schedules", json={"cron": args.cron, "timezone": args.timezone,
                                                       "template": template})
    if args.json:
        print(json.dumps(schedule, indent=2))
    else:
        print(f"schedule {schedule['id']}: {schedule['cron']!r} in {schedule['timezone']}, {_state(schedule)}")
        print(schedule["id"])
    return EXIT_OK


def _list(http: httpx.Client, *, as_json: bool) -> int:
    rows, after = [], None
    while True:
        page = _call(http, "GET", "/schedules", params={"limit": 100, **({"after": after} if after else {})})
        rows += page["data"]
        if not page["has_more"]:
            break
        after = page["last_id"]
    if as_json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    table = [{"id": r["id"], "cron": r["cron"], "timezone": r["timezone"], "paused": "yes" if r["paused"] else "no",
              "next_run": _time(r["next_run_at"]), "last_run": _time(r["last_run_at"]),
              "last_batch": r["last_batch_id"] or "-"} for r in rows]
    if not table:
        print("(none)")
        return EXIT_OK
    cells = [list(table[0])] + [list(row.values()) for row in table]
    widths = [max(len(line[i]) for line in cells) for i in range(len(cells[0]))]
    for line in cells:
        print("  ".join(value.ljust(width) for value, width in zip(line, widths, strict=True)).rstrip())
    return EXIT_OK


def _state(schedule: dict[str, Any]) -> str:
    return "paused" if schedule["paused"] else f"next run {_time(schedule['next_run_at'])}"


def _time(stamp: int | None) -> str:
    return "-" if stamp is None else datetime.fromtimestamp(stamp, timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


def _call(http: httpx.Client, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
    """One request; a 4xx or 5xx raises ServerError with the server's message."""
    from cli.client import ServerError

    response = http.request(method, path, **kwargs)
    if response.status_code >= 400:
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text
        raise ServerError(f"{method} {response.request.url.path}: {response.status_code} {message}")
    body: dict[str, Any] = response.json()
    return body
