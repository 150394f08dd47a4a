"""/v1/batches: create, read, list and cancel batches. Validation itself runs on a worker."""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from sqlalchemy.exc import IntegrityError

from api.auth import ScopeDep, authenticate
from api.deps import BlobsDep, IdempotencyKey, QueueDep, SessionDep, SettingsDep
from api.errors import ApiError, error_responses
from api.queue import Queue
from api.quotas import batch_limits
from api.routes.batch_extensions import NewInput, input_of, retry_input, retry_spec
from api.schemas import CreateBatch, CreateBatchBody, batch_object, page, webhook_url_problem
from common.ids import new_id, now
from common.results import output_line
from common.settings import Settings
from common.storage import BlobStore
from db import repo, webhooks
from db.batches_create import BatchSpec, Refused, input_file
from db.batches_create import create_batch as add_checked_batch
from db.models import OPEN_REQUEST_STATUSES, TERMINAL_BATCH_STATUSES, Batch, BatchStatus, RequestStatus, WebhookDelivery
from db.progress import running_tokens
from db.scoped import TenantScope

router = APIRouter(prefix="/v1/batches", dependencies=[Depends(authenticate)])
FINISHED = [status for status in RequestStatus if status not in OPEN_REQUEST_STATUSES]


def _request_hash(body: CreateBatch) -> str:
    return hashlib.sha256(json.dumps(body.model_dump(), sort_keys=True).encode()).hexdigest()


def webhook_url_of(body: CreateBatch, settings: Settings) -> str | None:
    """The batch's webhook: the `webhook_url` field, else metadata.webhook_url (checked here). A webhook
    is signed, so it needs DIFFBATCH_WEBHOOK_SECRET."""
    url, param = body.webhook_url, "webhook_url"
    if url is None and body.metadata and "webhook_url" in body.metadata:
        url, param = body.metadata["webhook_url"], "metadata.webhook_url"
        if problem := webhook_url_problem(url):
            raise ApiError(400, f"{param}: {problem}", param=param, code="invalid_request")
    if url is not None and settings.webhook_secret is None:
        raise ApiError(400, f"{param}: this server signs webhooks and has no secret to sign them with; its "
                       "operator sets DIFFBATCH_WEBHOOK_SECRET (see the README: Webhooks).", param=param,
                       code="webhook_secret_missing")
    return url


@router.post("", response_model=None, responses=error_responses(400, 401, 404, 409, 429))
def create_batch(scope: ScopeDep, settings: SettingsDep, queue: QueueDep, blobs: BlobsDep, body: CreateBatchBody,
                 idempotency_key: IdempotencyKey = None) -> dict[str, Any]:
    # The OpenAI SDK retries POSTs: a key, or an identical body moments ago, returns the first batch.
    request_hash = _request_hash(body)
    if existing := earlier_batch(scope, settings, idempotency_key, request_hash):
        return batch_object(existing)
    limits = batch_limits(settings)
    file_id, new_input = input_of(body, settings, scope, blobs)  # inline requests and templates (extensions)
    try:
        if new_input is None:
            input_file(scope, file_id, limits)  # its errors come before the webhook's
        expires_after_s = body.output_expires_after.seconds if body.output_expires_after else None
        spec = BatchSpec(input_file_id=file_id, endpoint=body.endpoint,
                         completion_window=body.completion_window, metadata=body.metadata,
                         output_expires_after_s=expires_after_s,
                         webhook_url=webhook_url_of(body, settings), idempotency_key=idempotency_key,
                         request_hash=request_hash, priority=body.priority or 0)
    except Refused as exc:
        raise ApiError(exc.status, exc.message, param=exc.param, code=exc.code) from exc
    return batch_object(add_batch(scope, settings, queue, blobs, spec, new_input))


def earlier_batch(scope: TenantScope, settings: Settings, idempotency_key: str | None,
                  request_hash: str) -> Batch | None:
    """The batch an earlier try of this POST made: by its Idempotency-Key, else by an identical request
    moments ago. A key sent before with another request is a 409."""
    existing = (scope.find_batch_by_idempotency_key(idempotency_key) if idempotency_key
                else scope.find_recent_batch(request_hash=request_hash, since=now() - settings.dedupe_window_s))
    if existing and existing.request_hash != request_hash:  # a key reused for another batch: not a retry
        raise ApiError(409, f"Idempotency-Key {idempotency_key!r} was sent with another batch ({existing.id}), "
                       "of other parameters; use a new key for a new batch.", param="Idempotency-Key",
                       code="idempotency_key_reused")
    return existing


def add_batch(scope: TenantScope, settings: Settings, queue: Queue, blobs: BlobStore, spec: BatchSpec,
              new_input: NewInput | None) -> Batch:
    """Add the batch (and the input file written for it, if any), commit, and send its validation."""
    committed = False
    try:
        if new_input is not None:
            new_input.add(scope, blobs, settings)
        row = add_checked_batch(scope, spec, batch_limits(settings), batch_id=new_id("batch_"), now=now())
        scope.session.commit()
        committed = True
    except Refused as exc:
        raise ApiError(exc.status, exc.message, param=exc.param, code=exc.code) from exc
    except IntegrityError:  # a concurrent retry with the same key won the insert
        scope.session.rollback()
        key = spec.idempotency_key
        winner = None if key is None else scope.find_batch_by_idempotency_key(key)
        if winner is None:
            raise
        return winner
    finally:
        if new_input is not None and not committed:
            new_input.discard(blobs)
    queue.validate_batch(row.id)
    return row


@router.post("/{batch_id}/retry", response_model=None, responses=error_responses(400, 401, 404, 409, 429))
def retry_batch(scope: ScopeDep, settings: SettingsDep, queue: QueueDep, blobs: BlobsDep, batch_id: str,
                idempotency_key: IdempotencyKey = None) -> dict[str, Any]:
    """diffbatch extension: a new batch of a finished batch's failed, expired and cancelled lines, in input
    order, with metadata.retry_of naming it. Idempotent as create is."""
    first = _get(scope, batch_id)
    request_hash = hashlib.sha256(f"retry of {batch_id}".encode()).hexdigest()
    if existing := earlier_batch(scope, settings, idempotency_key, request_hash):
        return batch_object(existing)
    new_input = retry_input(scope, first)
    spec = retry_spec(first, new_input, idempotency_key=idempotency_key, request_hash=request_hash)
    return batch_object(add_batch(scope, settings, queue, blobs, spec, new_input))


@router.get("", response_model=None, responses=error_responses(400, 401))
def list_batches(scope: ScopeDep, after: str | None = None, limit: Annotated[int, Query(ge=1, le=100)] = 20,
                 schedule_id: str | None = None) -> dict[str, Any]:
    """``schedule_id`` (diffbatch extension): only the batches that schedule's runs created."""
    if after and scope.get_batch(after) is None:  # else the listing would start over
        raise ApiError(400, f"after: no batch {after!r}; list again without it", param="after")
    rows = scope.list_batches(after=after, limit=limit + 1, schedule_id=schedule_id)
    running = running_tokens(scope.session, [r.id for r in rows[:limit]])
    hooks = _deliveries(scope, rows[:limit])
    return page([batch_object(r, running.get(r.id, 0), hooks.get(r.id, [])) for r in rows[:limit]],
                has_more=len(rows) > limit)


def _deliveries(scope: TenantScope, rows: list[Batch]) -> dict[str, list[WebhookDelivery]]:
    """The webhook deliveries of these (tenant's own) batches; no query when none names a webhook."""
    return webhooks.deliveries_of(scope.session, batch_ids=[r.id for r in rows if r.webhook_url])


def _get(scope: TenantScope, batch_id: str) -> Batch:
    row = scope.get_batch(batch_id)
    if row is None:
        raise ApiError(404, f"No such Batch object: {batch_id}", param="batch_id", code="batch_not_found")
    return row


@router.get("/{batch_id}", response_model=None, responses=error_responses(400, 401, 404))
def get_batch(scope: ScopeDep, batch_id: str) -> dict[str, Any]:
    row = _get(scope, batch_id)
    return batch_object(row, running_tokens(scope.session, [row.id]).get(row.id, 0),
                        _deliveries(scope, [row]).get(row.id, []))


@router.get("/{batch_id}/results", response_model=None, responses=error_responses(400, 401, 404))
def partial_results(scope: ScopeDep, batch_id: str, after: str | None = None,
                    limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> dict[str, Any]:
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


@router.post("/{batch_id}/cancel", response_model=None, responses=error_responses(400, 401, 404, 409))
def cancel_batch(session: SessionDep, scope: ScopeDep, queue: QueueDep, batch_id: str) -> dict[str, Any]:
    row = _get(scope, batch_id)
    if row.status in (BatchStatus.cancelling, BatchStatus.cancelled):
        return batch_object(row, deliveries=_deliveries(scope, [row]).get(row.id, []))
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
