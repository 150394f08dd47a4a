"""The results of an ended Message Batch as Anthropic's JSONL: one `{custom_id, result}` a line
(anthropic.types.messages.MessageBatchIndividualResponse), every custom_id exactly once, in input order.

Read a page of the requests table at a time, each page in its own short session, so a 100,000-request
batch is never held in memory (nor a database transaction held open while the client reads). A batch that
ended before validation stored its requests (validation failed, or it was cancelled or expired first)
has none: its input file's lines give the custom_ids, every one with the batch's outcome.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from api.anthropic_objects import RESULT_TYPE, UNSTORED_COUNT
from common.storage import BlobStore, OversizedLine
from db import repo
from db.models import OPEN_REQUEST_STATUSES, Batch, Request, RequestStatus

PAGE = 1000
ENDED = [status for status in RequestStatus if status not in OPEN_REQUEST_STATUSES]
# Failures that are the service's, not the request's: Anthropic's api_error; the rest are the request's.
SERVICE_FAULTS = {"max_attempts_exceeded", "validation_failed", "file_not_found"}


def errored(code: str | None, message: str) -> dict[str, Any]:
    kind = "api_error" if code in SERVICE_FAULTS else "invalid_request_error"
    return {"type": "errored", "error": {"type": "error", "error": {"type": kind, "message": message}}}


def result_of(request: Request) -> dict[str, Any]:
    kind = RESULT_TYPE[request.status]
    if kind == "succeeded":
        return {"type": "succeeded", "message": request.response}
    if kind == "errored":
        return errored(request.error_code, request.error_message or "The request failed.")
    return {"type": kind}


def result_lines(sessions: sessionmaker[Session], blobs: BlobStore, batch: Batch,
                 max_line_bytes: int) -> Iterator[bytes]:
    if batch.in_progress_at is None:
        yield from _unstored(blobs, batch, max_line_bytes)
        return
    after = -1
    while True:
        with sessions() as session:
            page = repo.requests_of(session, batch_id=batch.id, statuses=ENDED, after_line=after, limit=PAGE)
        if not page:
            return
        yield b"".join(_line(r.custom_id, result_of(r)) for r in page)
        after = page[-1].line


def _unstored(blobs: BlobStore, batch: Batch, max_line_bytes: int) -> Iterator[bytes]:
    """Every request of the input file with the batch's own outcome (for a failed validation: the error
    naming its line, else the batch's first error)."""
    kind = UNSTORED_COUNT.get(batch.status, "errored")
    by_line = {e.get("line"): e for e in batch.errors or []}
    first = (batch.errors or [{"code": "validation_failed", "message": "The batch failed validation."}])[0]
    for number, raw in enumerate(blobs.lines(batch.input_file_id, max_line_bytes=max_line_bytes), start=1):
        if isinstance(raw, OversizedLine) or not raw.strip():  # never written by the create route
            continue
        custom_id = json.loads(raw)["custom_id"]
        if kind == "errored" and number in by_line:
            error = by_line[number]
            yield _line(custom_id, errored(error.get("code"), error.get("message") or "The batch failed."))
        elif kind == "errored":  # a line fine in itself, or past the errors listed: the batch's reason
            yield _line(custom_id, errored("validation_failed", "This request did not run: its batch failed "
                                           f"validation ({first.get('message') or first.get('code')})."))
        else:
            yield _line(custom_id, {"type": kind})


def _line(custom_id: str, result: dict[str, Any]) -> bytes:
    return json.dumps({"custom_id": custom_id, "result": result}).encode() + b"\n"
