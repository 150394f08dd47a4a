"""What POST /v1/batches/{id}/retry resubmits: the lines of a finished batch that did not succeed."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.models import Batch, Request, RequestStatus

RETRYABLE = (RequestStatus.failed, RequestStatus.expired, RequestStatus.cancelled)
MAX_METADATA_PAIRS = 16  # OpenAI's limit, as the create body checks it


def retry_lines(session: Session, *, batch_id: str) -> Iterator[bytes]:
    """The batch's failed, expired and cancelled requests as input lines (custom_id, method, url, body),
    in input order, each ending in a newline."""
    rows = session.execute(select(Request.custom_id, Request.url, Request.body)
                           .where(Request.batch_id == batch_id, Request.status.in_(RETRYABLE))
                           .order_by(Request.line).execution_options(yield_per=1000))
    for custom_id, url, body in rows:
        line = {"custom_id": custom_id, "method": "POST", "url": url, "body": body}
        yield json.dumps(line, separators=(",", ":")).encode() + b"\n"


def retry_metadata(batch: Batch) -> dict[str, Any]:
    """The first batch's metadata with ``retry_of`` set to its id (a retry of a retry names its parent)."""
    return {**(batch.metadata_ or {}), "retry_of": batch.id}
