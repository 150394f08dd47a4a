"""/v1/messages/batches: Anthropic's Message Batches API over diffbatch's batches.

A Message Batch is a batch of endpoint /v1/messages whose input file the create route writes (one line a
request), so validation, chunks, quotas, metrics, webhooks, retention and the status page treat it as any
other; only batches of that endpoint are visible here. Errors use Anthropic's body (api/errors.py).
"""

from __future__ import annotations

import hashlib
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse
from sqlalchemy.orm import Session, sessionmaker

from api.anthropic_input import message_batch_input
from api.anthropic_objects import ended, message_batch_object
from api.anthropic_results import result_lines
from api.anthropic_schemas import (
    CreateMessageBatch,
    DeletedMessageBatch,
    MessageBatchObject,
    MessageBatchPage,
    anthropic_error_responses,
)
from api.auth import ScopeDep, authenticate
from api.deps import BlobsDep, IdempotencyKey, QueueDep, SessionDep, SettingsDep
from api.errors import ApiError
from api.routes.batches import add_batch, cancel_batch, earlier_batch
from common.lines import MESSAGES_URL
from db.batches_create import BatchSpec
from db.models import Batch, BatchStatus
from db.scoped import TenantScope

router = APIRouter(prefix="/v1/messages/batches", dependencies=[Depends(authenticate)])
RESULTS_ROUTE = "message_batch_results"


def _get(scope: TenantScope, batch_id: str) -> Batch:
    row = scope.get_batch(batch_id)
    if row is None or row.endpoint != MESSAGES_URL:
        raise ApiError(404, f"No Message Batch {batch_id!r}.", param="message_batch_id")
    return row


def _objects(request: Request, scope: TenantScope, rows: list[Batch]) -> list[dict[str, Any]]:
    counts = scope.request_counts([r.id for r in rows if r.in_progress_at is not None])
    objects = []
    for row in rows:
        source = scope.get_file(row.input_file_id) if row.in_progress_at is None else None
        url = str(request.url_for(RESULTS_ROUTE, message_batch_id=row.id))
        line_count = (source.line_count or 0) if source else 0
        objects.append(message_batch_object(row, counts.get(row.id, {}), line_count, url))
    return objects


def _object(request: Request, scope: TenantScope, row: Batch) -> dict[str, Any]:
    return _objects(request, scope, [row])[0]


@router.post("", response_model=MessageBatchObject,
             responses=anthropic_error_responses(400, 401, 409, 413, 429, 503))
def create_message_batch(request: Request, scope: ScopeDep, settings: SettingsDep, queue: QueueDep,
                         blobs: BlobsDep, body: CreateMessageBatch,
                         idempotency_key: IdempotencyKey = None) -> dict[str, Any]:
    new_input = message_batch_input(body, settings)
    # As POST /v1/batches: a key, or an identical body moments ago (a client's retry), returns the first batch.
    digest = hashlib.sha256(MESSAGES_URL.encode())
    for line in new_input.lines:
        digest.update(line)
    if existing := earlier_batch(scope, settings, idempotency_key, digest.hexdigest()):
        return _object(request, scope, existing)
    spec = BatchSpec(input_file_id=new_input.file_id, endpoint=MESSAGES_URL, idempotency_key=idempotency_key,
                     request_hash=digest.hexdigest())
    return _object(request, scope, add_batch(scope, settings, queue, blobs, spec, new_input))


@router.get("", response_model=MessageBatchPage, responses=anthropic_error_responses(400, 401))
def list_message_batches(request: Request, scope: ScopeDep, before_id: str | None = None,
                         after_id: str | None = None,
                         limit: Annotated[int, Query(ge=1, le=1000)] = 20) -> dict[str, Any]:
    """Newest first; ``after_id`` pages on to older batches, ``before_id`` back to newer ones."""
    if before_id and after_id:
        raise ApiError(400, "Give before_id or after_id, not both.", param="before_id")
    for name, cursor in (("before_id", before_id), ("after_id", after_id)):
        if cursor:
            row = scope.get_batch(cursor)
            if row is None or row.endpoint != MESSAGES_URL:  # else the listing would start over
                raise ApiError(400, f"{name}: no Message Batch {cursor!r}; list again without it.", param=name)
    rows = scope.list_batches(after=after_id, before=before_id, limit=limit + 1, endpoint=MESSAGES_URL)
    page = rows[-limit:] if before_id else rows[:limit]  # the extra row is the one farthest from the cursor
    data = _objects(request, scope, page)
    return {"data": data, "has_more": len(rows) > limit, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None}


@router.get("/{message_batch_id}", response_model=MessageBatchObject,
            responses=anthropic_error_responses(400, 401, 404))
def get_message_batch(request: Request, scope: ScopeDep, message_batch_id: str) -> dict[str, Any]:
    return _object(request, scope, _get(scope, message_batch_id))


@router.post("/{message_batch_id}/cancel", response_model=MessageBatchObject,
             responses=anthropic_error_responses(400, 401, 404))
def cancel_message_batch(request: Request, session: SessionDep, scope: ScopeDep, queue: QueueDep,
                         message_batch_id: str) -> dict[str, Any]:
    """Requests already finished keep their results; the rest end `canceled` (a running one finishes first)."""
    row = _get(scope, message_batch_id)
    if ended(row) and row.status != BatchStatus.cancelled:
        raise ApiError(400, f"Message Batch {row.id} has already ended; there is nothing to cancel.",
                       param="message_batch_id")
    if row.status in (BatchStatus.validating, BatchStatus.in_progress):
        cancel_batch(session, scope, queue, row.id)  # the OpenAI route's conditional transition and doorbell
    return _object(request, scope, _get(scope, message_batch_id))


@router.delete("/{message_batch_id}", response_model=DeletedMessageBatch,
               responses=anthropic_error_responses(400, 401, 404))
def delete_message_batch(scope: ScopeDep, blobs: BlobsDep, message_batch_id: str) -> dict[str, Any]:
    """Only an ended batch (cancel one first); its input, output and error files go with it."""
    row = _get(scope, message_batch_id)
    if not ended(row):
        raise ApiError(400, f"Message Batch {row.id} is still processing; cancel it and delete it once it has "
                       "ended.", param="message_batch_id")
    files = [f for f in (row.input_file_id, row.output_file_id, row.error_file_id) if f]
    for file_id in files:  # the blob first: a failure leaves a row naming a missing blob, never a stray blob
        blobs.delete(file_id)
    for file_id in files:
        scope.delete_file(file_id)
    scope.delete_batch(row.id)
    scope.session.commit()
    return {"id": row.id, "type": "message_batch_deleted"}


@router.get("/{message_batch_id}/results", name=RESULTS_ROUTE, response_class=StreamingResponse, responses={
    200: {"content": {"application/x-jsonl": {"schema": {"type": "string"}}},
          "description": "One {custom_id, result} JSON object a line"},
    **anthropic_error_responses(400, 401, 404)})
def message_batch_results(request: Request, scope: ScopeDep, blobs: BlobsDep, settings: SettingsDep,
                          message_batch_id: str) -> StreamingResponse:
    row = _get(scope, message_batch_id)
    if not ended(row):
        raise ApiError(400, f"Message Batch {row.id} is still processing; its results are available once its "
                       "processing_status is 'ended'.", param="message_batch_id")
    if row.in_progress_at is None and not blobs.exists(row.input_file_id):
        raise ApiError(404, f"The results of Message Batch {row.id} are no longer available: its input file was "
                       "deleted.", param="message_batch_id")
    scope.session.commit()  # end this request's transaction: on SQLite it holds the lock the pages' reads need
    sessions: sessionmaker[Session] = request.app.state.session_factory
    return StreamingResponse(result_lines(sessions, blobs, row, settings.max_line_bytes),
                             media_type="application/x-jsonl")
