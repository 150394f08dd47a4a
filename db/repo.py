"""Repository functions: keyword-only, one statement of intent each. Callers own the transaction.

Every state change that could race (two workers, a retry, a reconciler) is a conditional UPDATE whose
row count says who won, so a result is written once and a batch is finalized once.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import and_, delete, exists, func, select, update
from sqlalchemy.orm import Session

from db.models import (OPEN_REQUEST_STATUSES, Batch, BatchStatus, Chunk, File, Request, RequestStatus,
                       Worker)

# ---------------------------------------------------------------------------------------- files


def add_file(session: Session, *, file_id: str, filename: str, purpose: str, size: int,
             storage_path: str, now: int, idempotency_key: str | None = None) -> File:
    row = File(id=file_id, filename=filename, purpose=purpose, bytes=size, created_at=now,
               storage_path=storage_path, idempotency_key=idempotency_key)
    session.add(row)
    session.flush()
    return row


def get_file(session: Session, *, file_id: str) -> File | None:
    return session.get(File, file_id)


def find_file_by_idempotency_key(session: Session, *, key: str) -> File | None:
    return session.scalar(select(File).where(File.idempotency_key == key))


def list_files(session: Session, *, purpose: str | None, after: str | None, limit: int,
               newest_first: bool = True) -> list[File]:
    query = select(File)
    if purpose:
        query = query.where(File.purpose == purpose)
    order = (File.created_at.desc(), File.id.desc()) if newest_first else (File.created_at, File.id)
    if after and (cursor := session.get(File, after)) is not None:
        key = (File.created_at, File.id)
        query = query.where(_past_cursor(key, (cursor.created_at, cursor.id), newest_first))
    return list(session.scalars(query.order_by(*order).limit(limit)))


def delete_file(session: Session, *, file_id: str) -> bool:
    row = session.get(File, file_id)
    if row is None:
        return False
    session.delete(row)
    return True


# -------------------------------------------------------------------------------------- batches


def add_batch(session: Session, **fields: Any) -> Batch:
    row = Batch(**fields)
    session.add(row)
    session.flush()
    return row


def get_batch(session: Session, *, batch_id: str, for_update: bool = False) -> Batch | None:
    query = select(Batch).where(Batch.id == batch_id)
    if for_update:
        query = query.with_for_update()
    return session.scalar(query)


def find_batch_by_idempotency_key(session: Session, *, key: str) -> Batch | None:
    return session.scalar(select(Batch).where(Batch.idempotency_key == key))


def find_recent_batch(session: Session, *, request_hash: str, since: int) -> Batch | None:
    return session.scalar(select(Batch).where(Batch.request_hash == request_hash,
                                              Batch.created_at >= since).order_by(Batch.created_at))


def list_batches(session: Session, *, after: str | None, limit: int) -> list[Batch]:
    query = select(Batch)
    if after and (cursor := session.get(Batch, after)) is not None:
        query = query.where(_past_cursor((Batch.created_at, Batch.id), (cursor.created_at, cursor.id), True))
    return list(session.scalars(query.order_by(Batch.created_at.desc(), Batch.id.desc()).limit(limit)))


def transition(session: Session, *, batch_id: str, from_: Iterable[BatchStatus], to: BatchStatus,
               now: int, **fields: Any) -> bool:
    """Move a batch between statuses only if it is still in one of `from_`; True if this call did it."""
    stamp = {f"{to.value}_at": now} if hasattr(Batch, f"{to.value}_at") else {}
    result = session.execute(update(Batch).where(Batch.id == batch_id, Batch.status.in_(list(from_)))
                             .values(status=to, touched_at=now, **stamp, **fields))
    return result.rowcount == 1


def touch_batch(session: Session, *, batch_id: str, now: int) -> None:
    session.execute(update(Batch).where(Batch.id == batch_id).values(touched_at=now))


def claim_validation(session: Session, *, batch_id: str, token: str, now: int) -> bool:
    """Make ``token`` the validating batch's one validation attempt (taking it over from any other);
    False if the batch is no longer validating."""
    result = session.execute(update(Batch).where(Batch.id == batch_id, Batch.status == BatchStatus.validating)
                             .values(validation_token=token, touched_at=now))
    return result.rowcount == 1


def holds_validation(session: Session, *, batch_id: str, token: str, now: int) -> bool:
    """Touch the batch if attempt ``token`` still owns its validation; the row stays locked until the
    transaction ends, so no other attempt takes over while this one writes."""
    result = session.execute(update(Batch).where(Batch.id == batch_id, Batch.status == BatchStatus.validating,
                                                 Batch.validation_token == token).values(touched_at=now))
    return result.rowcount == 1


def batches_in(session: Session, *, statuses: Sequence[BatchStatus], touched_before: int | None = None,
               limit: int = 1000) -> list[Batch]:
    query = select(Batch).where(Batch.status.in_(list(statuses)))
    if touched_before is not None:
        query = query.where(Batch.touched_at < touched_before)
    return list(session.scalars(query.order_by(Batch.created_at).limit(limit)))


# ------------------------------------------------------------------------------------- requests


def add_requests(session: Session, *, rows: list[dict[str, Any]]) -> None:
    session.execute(Request.__table__.insert(), rows)


def add_chunk(session: Session, *, batch_id: str, queue: str, size: int, now: int) -> int:
    chunk = Chunk(batch_id=batch_id, queue=queue, size=size, enqueued_at=now)
    session.add(chunk)
    session.flush()
    return chunk.id


def get_chunk(session: Session, *, chunk_id: int) -> Chunk | None:
    return session.get(Chunk, chunk_id)


def chunks_of(session: Session, *, batch_id: str) -> list[Chunk]:
    return list(session.scalars(select(Chunk).where(Chunk.batch_id == batch_id).order_by(Chunk.id)))


def claim_requests(session: Session, *, chunk_id: int, worker: str, now: int,
                   stale_before: int) -> list[Request]:
    """Take the chunk's pending requests (and running ones whose worker stopped beating) for `worker`."""
    claimable = and_(Request.chunk_id == chunk_id,
                     (Request.status == RequestStatus.pending)
                     | ((Request.status == RequestStatus.running) & (Request.heartbeat_at < stale_before)))
    ids = list(session.scalars(select(Request.id).where(claimable)))
    if not ids:
        return []
    session.execute(update(Request).where(Request.id.in_(ids), claimable)
                    .values(status=RequestStatus.running, worker=worker, heartbeat_at=now,
                            attempts=Request.attempts + 1))
    return list(session.scalars(select(Request).where(Request.id.in_(ids), Request.worker == worker,
                                                      Request.status == RequestStatus.running)
                                .order_by(Request.line)))


def heartbeat(session: Session, *, request_ids: Sequence[int], worker: str, now: int) -> None:
    session.execute(update(Request).where(Request.id.in_(list(request_ids)), Request.worker == worker,
                                          Request.status == RequestStatus.running)
                    .values(heartbeat_at=now))


def outcome(request_id: int, status: RequestStatus, now: int, *, response: dict[str, Any] | None = None,
            error_code: str | None = None, error_message: str | None = None, prompt_tokens: int = 0,
            completion_tokens: int = 0, forward_passes: int = 0) -> dict[str, Any]:
    """The terminal result of one request, as `finish_requests` writes it."""
    return {"id": request_id, "status": status, "finished_at": now, "response": response,
            "error_code": error_code, "error_message": error_message, "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens, "forward_passes": forward_passes}


def finish_requests(session: Session, *, batch_id: str, outcomes: Sequence[dict[str, Any]]) -> int:
    """Write terminal results once: requests already terminal are skipped. Returns how many were written.

    Three statements for a whole engine batch: lock the still-open rows, update them by primary key,
    add their counts and tokens to the batch.
    """
    ids = [o["id"] for o in outcomes]
    still_open = set(session.scalars(select(Request.id).where(
        Request.id.in_(ids), Request.status.in_(OPEN_REQUEST_STATUSES)).with_for_update()))
    fresh = [o for o in outcomes if o["id"] in still_open]
    if not fresh:
        return 0
    session.execute(update(Request), fresh)
    succeeded = sum(o["status"] == RequestStatus.succeeded for o in fresh)
    session.execute(update(Batch).where(Batch.id == batch_id).values(
        completed=Batch.completed + succeeded, failed=Batch.failed + len(fresh) - succeeded,
        input_tokens=Batch.input_tokens + sum(o["prompt_tokens"] for o in fresh),
        output_tokens=Batch.output_tokens + sum(o["completion_tokens"] for o in fresh)))
    return len(fresh)


def close_open_requests(session: Session, *, batch_id: str, status: RequestStatus, code: str,
                        message: str, now: int, include_running: bool) -> int:
    """End every open request of a batch as an error line (cancelled, expired)."""
    statuses = list(OPEN_REQUEST_STATUSES) if include_running else [RequestStatus.pending]
    result = session.execute(update(Request).where(Request.batch_id == batch_id,
                                                   Request.status.in_(statuses))
                             .values(status=status, error_code=code, error_message=message,
                                     finished_at=now))
    session.execute(update(Batch).where(Batch.id == batch_id)
                    .values(failed=Batch.failed + result.rowcount))
    return result.rowcount


def count_requests(session: Session, *, batch_id: str, statuses: Sequence[RequestStatus]) -> int:
    return session.scalar(select(func.count()).select_from(Request)
                          .where(Request.batch_id == batch_id, Request.status.in_(list(statuses))))


def requests_of(session: Session, *, batch_id: str, statuses: Sequence[RequestStatus],
                after_line: int = -1, limit: int = 1000) -> list[Request]:
    return list(session.scalars(select(Request).where(Request.batch_id == batch_id,
                                                      Request.status.in_(list(statuses)),
                                                      Request.line > after_line)
                                .order_by(Request.line).limit(limit)))


def release_requests(session: Session, *, request_ids: Sequence[int], worker: str) -> None:
    """Hand claimed requests back to pending (their attempt stays counted)."""
    session.execute(update(Request).where(Request.id.in_(list(request_ids)), Request.worker == worker,
                                          Request.status == RequestStatus.running)
                    .values(status=RequestStatus.pending, worker=None))


def discard_requests(session: Session, *, batch_id: str) -> None:
    """Remove a batch's requests and chunks (a validation that did not finish)."""
    session.execute(delete(Request).where(Request.batch_id == batch_id))
    session.execute(delete(Chunk).where(Chunk.batch_id == batch_id))


def get_request(session: Session, *, public_id: str) -> Request | None:
    return session.scalar(select(Request).where(Request.public_id == public_id))


def reclaim_stale(session: Session, *, stale_before: int) -> int:
    """Running requests whose worker stopped beating go back to pending."""
    result = session.execute(update(Request).where(Request.status == RequestStatus.running,
                                                   Request.heartbeat_at < stale_before)
                             .values(status=RequestStatus.pending, worker=None))
    return result.rowcount


def chunks_to_requeue(session: Session, *, delay: int, now: int) -> list[Chunk]:
    """Chunks of running batches that still hold pending requests and were enqueued more than their
    requeue delay ago (``delay`` until first re-sent, then twice the last: a chunk that merely waits
    behind a long backlog is not re-sent every period). Rows another reconciler is re-sending are
    skipped, so a chunk is not re-sent twice at once."""
    has_pending = exists().where(Request.chunk_id == Chunk.id, Request.status == RequestStatus.pending)
    waited = func.coalesce(Chunk.requeue_delay, delay)
    query = (select(Chunk).join(Batch, Batch.id == Chunk.batch_id)
             .where(Batch.status == BatchStatus.in_progress, Chunk.enqueued_at + waited < now, has_pending)
             .with_for_update(skip_locked=True, of=Chunk))
    chunks = list(session.scalars(query))
    if chunks:
        session.execute(update(Chunk).where(Chunk.id.in_([c.id for c in chunks]))
                        .values(enqueued_at=now, requeue_delay=waited * 2))
    return chunks


# -------------------------------------------------------------------------------------- workers


def upsert_worker(session: Session, *, name: str, model: str, queue: str, max_positions: int,
                  now: int) -> None:
    row = session.get(Worker, name)
    if row is None:
        session.add(Worker(name=name, model=model, queue=queue, max_positions=max_positions,
                           started_at=now, heartbeat_at=now))
    else:
        row.model, row.queue, row.max_positions, row.heartbeat_at = model, queue, max_positions, now


def beat_worker(session: Session, *, name: str, now: int) -> None:
    session.execute(update(Worker).where(Worker.name == name).values(heartbeat_at=now))


def known_workers(session: Session, *, since: int | None = None) -> list[Worker]:
    query = select(Worker)
    if since is not None:
        query = query.where(Worker.heartbeat_at >= since)
    return list(session.scalars(query.order_by(Worker.model)))


def _past_cursor(columns, values, descending: bool):
    (c1, c2), (v1, v2) = columns, values
    if descending:
        return (c1 < v1) | ((c1 == v1) & (c2 < v2))
    return (c1 > v1) | ((c1 == v1) & (c2 > v2))
