"""A batch of endpoint /v1/messages as Anthropic's MessageBatch object: its status, request counts and
timestamps in Anthropic's terms."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from db.models import TERMINAL_BATCH_STATUSES, Batch, BatchStatus, RequestStatus

# Anthropic's result types for a request's end; a request not ended yet is "processing".
RESULT_TYPE = {RequestStatus.succeeded: "succeeded", RequestStatus.failed: "errored",
               RequestStatus.cancelled: "canceled", RequestStatus.expired: "expired"}
# What every request of a batch that stored none (validation had not finished) counts as.
UNSTORED_COUNT = {BatchStatus.failed: "errored", BatchStatus.cancelled: "canceled", BatchStatus.expired: "expired"}


def ended(row: Batch) -> bool:
    return row.status in TERMINAL_BATCH_STATUSES


def processing_status(row: Batch) -> str:
    if ended(row):
        return "ended"
    # A cancel moves cancelling -> finalizing while the result files are written: still canceling.
    return "canceling" if row.cancelling_at is not None else "in_progress"  # validating, finalizing too


def rfc3339(timestamp: int | None) -> str | None:
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def request_counts(row: Batch, counts: dict[RequestStatus, int], line_count: int) -> dict[str, int]:
    """``counts``: the batch's stored requests by status; ``line_count``: its input file's requests, which
    stand for them all while none is stored (validating, or ended before validation stored them)."""
    tally = dict.fromkeys(("processing", "succeeded", "errored", "canceled", "expired"), 0)
    if row.in_progress_at is None:
        tally[UNSTORED_COUNT.get(row.status, "processing")] = line_count
        return tally
    for status, count in counts.items():
        tally[RESULT_TYPE.get(status, "processing")] += count
    return tally


def message_batch_object(row: Batch, counts: dict[RequestStatus, int], line_count: int,
                         results_url: str | None) -> dict[str, Any]:
    """``results_url``: where the results route serves this batch's, given once it has ended."""
    ended_at = row.completed_at or row.cancelled_at or row.expired_at or row.failed_at
    return {"id": row.id, "type": "message_batch", "processing_status": processing_status(row),
            "request_counts": request_counts(row, counts, line_count), "created_at": rfc3339(row.created_at),
            "expires_at": rfc3339(row.expires_at), "ended_at": rfc3339(ended_at) if ended(row) else None,
            "cancel_initiated_at": rfc3339(row.cancelling_at), "archived_at": None,
            "results_url": results_url if ended(row) else None}
