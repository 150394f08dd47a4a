"""/v1/batches: create, read, list and cancel batches. Validation itself runs on a worker."""

from __future__ import annotations

import hashlib
import json
from typing import Annotated

from fastapi import APIRouter, Depends, Query
from sqlalchemy.exc import IntegrityError

from api.auth import ScopeDep, authenticate
from api.deps import IdempotencyKey, QueueDep, SessionDep, SettingsDep
from api.errors import ApiError, error_responses
from api.quotas import check_quota
from api.schemas import CreateBatch, batch_object, page
from common.ids import new_id, now
from common.results import output_line
from db import repo
from db.models import OPEN_REQUEST_STATUSES, TERMINAL_BATCH_STATUSES, BatchStatus, RequestStatus

router = APIRouter(prefix="/v1/batches", dependencies=[Depends(authenticate)])
WINDOW_S = {"24h": 24 * 3600}
FINISHED = [status for status in RequestStatus if status not in OPEN_REQUEST_STATUSES]


def _request_hash(body: CreateBatch) -> str:
    return hashlib.sha256(json.dumps(body.model_dump(), sort_keys=True).encode()).hexdigest()


@router.post("", responses=error_responses(400, 401, 404, 409, 429))
def create_batch(session: SessionDep, scope: ScopeDep, settings: SettingsDep, queue: QueueDep, body: CreateBatch,
                 idempotency_key: IdempotencyKey = None):
    # The OpenAI SDK retries POSTs: a key, or an identical body moments ago, returns the first batch.
    request_hash = _request_hash(body)
    existing = (scope.find_batch_by_idempotency_key(idempotency_key) if idempotency_key
                else scope.find_recent_batch(request_hash=request_hash, since=now() - settings.dedupe_window_s))
    if existing and existing.request_hash != request_hash:  # a key reused for another batch: not a retry
        raise ApiError(409, f"Idempotency-Key {idempotency_key!r} was sent with another batch ({existing.id}), "
                       "of other parameters; use a new key for a new batch.", param="Idempotency-Key",
                       code="idempotency_key_reused")
    if existing:
        return batch_object(existing)
    source = scope.get_file(body.input_file_id)
    if source is None:
        raise ApiError(404, f"No such File object: {body.input_file_id}", param="input_file_id",
                       code="file_not_found")
    if source.purpose != "batch":
        raise ApiError(400, f"File {source.id} has purpose {source.purpose!r}, not 'batch'.",
                       param="input_file_id", code="invalid_file_purpose")
    if (source.line_count or 0) > settings.max_batch_requests:
        raise ApiError(400, f"File {source.id} has {source.line_count:,} requests; a batch takes at most "
                       f"{settings.max_batch_requests:,} (DIFFBATCH_MAX_BATCH_REQUESTS).", param="input_file_id",
                       code="batch_too_large")
    check_quota(scope, settings, new_requests=source.line_count or 0)
    created = now()
    try:
        row = repo.add_batch(
            session, id=new_id("batch_"), tenant_id=scope.tenant_id, status=BatchStatus.validating,
            endpoint=body.endpoint, input_file_id=source.id, completion_window=body.completion_window,
            metadata_=body.metadata,
            output_expires_after_s=body.output_expires_after and body.output_expires_after.seconds,
            idempotency_key=idempotency_key, request_hash=request_hash, created_at=created,
            expires_at=created + WINDOW_S[body.completion_window], touched_at=created,
            total=0, completed=0, failed=0, input_tokens=0, output_tokens=0, priority=0)
        session.commit()
    except IntegrityError:  # a concurrent retry with the same key won the insert
        session.rollback()
        return batch_object(scope.find_batch_by_idempotency_key(idempotency_key))
    queue.validate_batch(row.id)
    return batch_object(row)


@router.get("", responses=error_responses(400, 401))
def list_batches(scope: ScopeDep, after: str | None = None,
                 limit: Annotated[int, Query(ge=1, le=100)] = 20):
    if after and scope.get_batch(after) is None:  # else the listing would start over
        raise ApiError(400, f"after: no batch {after!r}; list again without it", param="after")
    rows = scope.list_batches(after=after, limit=limit + 1)
    return page([batch_object(r) for r in rows[:limit]], has_more=len(rows) > limit)


def _get(scope, batch_id: str):
    row = scope.get_batch(batch_id)
    if row is None:
        raise ApiError(404, f"No such Batch object: {batch_id}", param="batch_id", code="batch_not_found")
    return row


@router.get("/{batch_id}", responses=error_responses(400, 401, 404))
def get_batch(scope: ScopeDep, batch_id: str):
    return batch_object(_get(scope, batch_id))


@router.get("/{batch_id}/results", responses=error_responses(400, 401, 404))
def partial_results(scope: ScopeDep, batch_id: str, after: str | None = None,
                    limit: Annotated[int, Query(ge=1, le=1000)] = 100):
    """diffbatch extension: finished result lines so far, in input order, while the batch runs."""
    _get(scope, batch_id)
    after_line = -1
    if after:
        cursor = scope.get_request(after)
        if cursor is None or cursor.batch_id != batch_id:
            raise ApiError(400, f"after: {after!r} is not a request of batch {batch_id}", param="after")
        after_line = cursor.line
    rows = repo.requests_of(scope.session, batch_id=batch_id, statuses=FINISHED, after_line=after_line,
                            limit=limit + 1)
    return page([output_line(r) for r in rows[:limit]], has_more=len(rows) > limit)


@router.post("/{batch_id}/cancel", responses=error_responses(400, 401, 404, 409))
def cancel_batch(session: SessionDep, scope: ScopeDep, queue: QueueDep, batch_id: str):
    row = _get(scope, batch_id)
    if row.status in (BatchStatus.cancelling, BatchStatus.cancelled):
        return batch_object(row)
    if row.status in TERMINAL_BATCH_STATUSES or row.status == BatchStatus.finalizing:
        raise ApiError(409, f"Cannot cancel a batch with status {row.status.value!r}.",
                       param="batch_id", code="batch_not_cancellable")
    if not repo.transition(session, batch_id=batch_id, from_=[BatchStatus.validating, BatchStatus.in_progress],
                           to=BatchStatus.cancelling, now=now()):
        session.rollback()
        return batch_object(_get(scope, batch_id))
    session.commit()
    queue.finalize_batch(batch_id)  # closes the pending requests; running ones finish first
    session.refresh(row)
    return batch_object(row)
