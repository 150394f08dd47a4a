"""`diffbatch run`'s client half: upload, create, follow with a progress bar, download, summarise."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import httpx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

TERMINAL = {"completed", "failed", "expired", "cancelled"}
EXIT_OK, EXIT_BATCH_FAILED, EXIT_SOME_LINES_FAILED = 0, 1, 3

console = Console(stderr=True)


def first_endpoint(path: Path) -> str:
    """The batch's endpoint is the url of its first request line that names one (a broken line
    before it is reported by the server, not taken as the endpoint of the lines after it)."""
    with open(path, "rb") as src:
        for raw in src:
            try:
                url = json.loads(raw).get("url") if raw.strip() else None
            except (ValueError, AttributeError, RecursionError):
                continue
            if isinstance(url, str):
                return url
    return "/v1/completions"  # the server reports what is wrong with the file


def auth_headers() -> dict[str, str]:
    """`Authorization: Bearer $DIFFBATCH_API_KEY` when that is set: a server that has keys needs one."""
    key = os.environ.get("DIFFBATCH_API_KEY", "").strip()
    return {"Authorization": f"Bearer {key}"} if key else {}


def run_batch(base_url: str, input_path: Path, output_path: Path, errors_path: Path,
              poll_s: float = 0.5, check: Callable[[], None] = lambda: None) -> int:
    """Submit, follow, download, summarise; `check` raises if the server side died meanwhile."""
    with httpx.Client(base_url=base_url.rstrip("/") + "/v1", timeout=60, headers=auth_headers()) as http:
        with open(input_path, "rb") as src:
            uploaded = _ok(http.post("/files", files={"file": (input_path.name, src)},
                                     data={"purpose": "batch"}))
        batch = _ok(http.post("/batches", json={"input_file_id": uploaded["id"], "completion_window": "24h",
                                                "endpoint": first_endpoint(input_path)}))
        for path in (output_path, errors_path):  # a file left by an earlier run would read as this one's
            path.unlink(missing_ok=True)
        console.print(f"batch [bold]{batch['id']}[/] submitted ({input_path}, {uploaded['bytes']} bytes)")
        started = time.monotonic()
        batch = _follow(http, batch, poll_s, check)
        elapsed = time.monotonic() - started
        for key, path in (("output_file_id", output_path), ("error_file_id", errors_path)):
            if batch.get(key):
                with open(path, "wb") as out:
                    out.write(_ok_bytes(http.get(f"/files/{batch[key]}/content")))
    return _summary(batch, elapsed, output_path, errors_path)


def _follow(http: httpx.Client, batch: dict, poll_s: float, check: Callable[[], None]) -> dict:
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[rate]:>8.1f} tok/s"), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(batch["status"], total=None, rate=0.0)
        began = time.monotonic()
        while batch["status"] not in TERMINAL:
            time.sleep(poll_s)
            check()
            batch = _ok(http.get(f"/batches/{batch['id']}"))
            counts = batch["request_counts"]
            rate = batch["usage"]["output_tokens"] / max(time.monotonic() - began, 1e-6)
            progress.update(task, description=batch["status"], total=counts["total"] or None,
                            completed=counts["completed"] + counts["failed"], rate=rate)
    return batch


def _summary(batch: dict, elapsed: float, output_path: Path, errors_path: Path) -> int:
    counts, usage = batch["request_counts"], batch["usage"]
    console.print(f"batch {batch['id']}: [bold]{batch['status']}[/] in {elapsed:.1f} s; "
                  f"{counts['completed']} succeeded, {counts['failed']} failed of {counts['total']}; "
                  f"{usage['output_tokens']} output tokens ({usage['output_tokens'] / max(elapsed, 1e-6):.1f} tok/s)")
    for error in (batch.get("errors") or {}).get("data", []):
        console.print(f"  [red]error[/] {error['code']}: {error['message']}")
    if batch.get("output_file_id"):
        console.print(f"results: {output_path}")
    if batch.get("error_file_id"):
        console.print(f"error lines: {errors_path}")
    if batch["status"] != "completed":
        return EXIT_BATCH_FAILED
    return EXIT_SOME_LINES_FAILED if counts["failed"] else EXIT_OK


class ServerError(RuntimeError):
    pass


def _ok(response: httpx.Response) -> dict:
    if response.status_code >= 400:
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text
        raise ServerError(f"{response.request.method} {response.request.url.path}: "
                          f"{response.status_code} {message}")
    return response.json()


def _ok_bytes(response: httpx.Response) -> bytes:
    if response.status_code >= 400:
        _ok(response)
    return response.content
