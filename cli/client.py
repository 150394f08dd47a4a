"""The client half of the CLI: the server's API as commands use it, and `diffbatch run`'s upload, follow,
download and summary."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console

from cli.progress import BatchView

TERMINAL = {"completed", "failed", "expired", "cancelled"}
EXIT_OK, EXIT_BATCH_FAILED, EXIT_SOME_LINES_FAILED = 0, 1, 3

COMPLETION_DEFAULT_TOKENS, CHAT_DEFAULT_TOKENS = 16, 256  # a line without a limit: common.lines' defaults

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


def api_base(url: str) -> str:
    """The server's root URL from what a person typed: the URL `serve` prints (ending in /v1) or the bare one."""
    base = url.strip().rstrip("/")
    return base.removesuffix("/v1") if base.endswith("/v1") else base


class Api:
    """The server's /v1 endpoints as a person's commands use them; errors raise ServerError (or httpx's)."""

    def __init__(self, url: str, timeout: float = 60) -> None:
        self.url = api_base(url)
        self.http = httpx.Client(base_url=self.url + "/v1", timeout=timeout, headers=auth_headers())

    def __enter__(self) -> Api:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.http.close()

    def get(self, path: str, **params: Any) -> dict[str, Any]:
        return _ok(self.http.get(path, params={k: v for k, v in params.items() if v is not None}))

    def content(self, file_id: str) -> bytes:
        return _ok_bytes(self.http.get(f"/files/{file_id}/content"))

    def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return _ok(self.http.post(path, json=body))

    def upload(self, path: Path) -> dict[str, Any]:
        """Upload a file of purpose "batch" under its own name: the file object."""
        with open(path, "rb") as src:
            return _ok(self.http.post("/files", files={"file": (path.name, src)}, data={"purpose": "batch"}))

    def submit(self, input_path: Path, **extensions: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        """Upload ``input_path`` and create its batch (with ``extensions``, create-body fields such as
        priority): (the file object, the batch object)."""
        uploaded = self.upload(input_path)
        batch = self.post("/batches", {"input_file_id": uploaded["id"], "completion_window": "24h",
                                       "endpoint": first_endpoint(input_path), **extensions})
        return uploaded, batch

    def cancel(self, batch_id: str) -> dict[str, Any]:
        return _ok(self.http.post(f"/batches/{batch_id}/cancel"))

    def follow(self, batch: dict[str, Any], *, poll_s: float = 0.5, hint: float | None = None,
               check: Callable[[], None] = lambda: None) -> dict[str, Any]:
        """Poll until the batch ends, showing its progress on stderr; the last batch object."""
        with BatchView(console, tokens_per_request_hint=hint) as view:
            view.update(batch)
            while batch["status"] not in TERMINAL:
                time.sleep(poll_s)
                check()
                batch = self.get(f"/batches/{batch['id']}")
                view.update(batch)
        return batch


def expected_tokens(path: Path) -> float | None:
    """The mean output limit of the file's request lines (the ETA's size of a request before one finishes)."""
    limits = []
    with open(path, "rb") as src:
        for raw in src:
            try:
                body = json.loads(raw).get("body")
            except (ValueError, AttributeError, RecursionError):
                continue
            if not isinstance(body, dict):
                continue
            limit = body.get("max_completion_tokens") or body.get("max_tokens") or body.get("max_output_tokens")
            default = CHAT_DEFAULT_TOKENS if "messages" in body or "input" in body else COMPLETION_DEFAULT_TOKENS
            limits.append(limit if isinstance(limit, int) else default)
    return sum(limits) / len(limits) if limits else None


def run_batch(base_url: str, input_path: Path, output_path: Path, errors_path: Path,
              poll_s: float = 0.5, check: Callable[[], None] = lambda: None) -> int:
    """Submit, follow, download, summarise; `check` raises if the server side died meanwhile."""
    with Api(base_url) as api:
        uploaded, batch = api.submit(input_path)
        for path in (output_path, errors_path):  # a file left by an earlier run would read as this one's
            path.unlink(missing_ok=True)
        console.print(f"batch [bold]{batch['id']}[/] submitted ({input_path}, {uploaded['bytes']} bytes)")
        started = time.monotonic()
        batch = api.follow(batch, poll_s=poll_s, hint=expected_tokens(input_path), check=check)
        elapsed = time.monotonic() - started
        for key, path in (("output_file_id", output_path), ("error_file_id", errors_path)):
            if batch.get(key):
                with open(path, "wb") as out:
                    out.write(api.content(batch[key]))
    return _summary(batch, elapsed, output_path, errors_path)


def exit_code(batch: dict[str, Any]) -> int:
    """0: completed, every line succeeded; 3: completed with failed lines; 1: failed, expired or cancelled."""
    if batch["status"] != "completed":
        return EXIT_BATCH_FAILED
    return EXIT_SOME_LINES_FAILED if batch["request_counts"]["failed"] else EXIT_OK


def _summary(batch: dict[str, Any], elapsed: float, output_path: Path, errors_path: Path) -> int:
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
    return exit_code(batch)


class ServerError(RuntimeError):
    pass


def _ok(response: httpx.Response) -> dict[str, Any]:
    if response.status_code >= 400:
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text
        raise ServerError(f"{response.request.method} {response.request.url.path}: "
                          f"{response.status_code} {message}")
    body: dict[str, Any] = response.json()
    return body


def _ok_bytes(response: httpx.Response) -> bytes:
    if response.status_code >= 400:
        _ok(response)
    return response.content
