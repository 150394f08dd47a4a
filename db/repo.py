"""Repository functions: keyword-only, one statement of intent each. Callers own the transaction.

Every state change that could race (two workers, a retry, a reconciler) is a conditional UPDATE whose
row count says who won, so a result is written once and a batch is finalized once.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, cast

from sqlalchemy import ColumnElement, Exists, Select, Table, and_, case, delete, exists, func, select, true, update
from sqlalchemy.orm import InstrumentedAttribute, Session

from db import webhooks
from db.models import OPEN_REQUEST_STATUSES, Batch, BatchStatus, Chunk, File, Request, RequestStatus, Worker
from db.session import rows_changed

# ---------------------------------------------------------------------------------------- files


def add_file(session: Session, *, file_id: str, tenant_id: str, filename: str, purpose: str, size: int,
             storage_path: str, now: int, idempotency_key: str | None = None, line_count: int | None = None,
             expires_at: int | None = None) -> File:
    row = File(id=file_id, tenant_id=tenant_id, filename=filename, purpose=purpose, bytes=size, created_at=now,
               storage_path=storage_path, idempotency_key=idempotency_key, line_count=line_count,
               expires_at=expires_at)
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
    """Move a batch between statuses only if it is still in one of `from_`; True if this call did it.
    A terminal status queues the batch's webhook event in the same transaction (db/webhooks.py)."""
    stamp = {f"{to.value}_at": now} if hasattr(Batch, f"{to.value}_at") else {}
    changed = rows_changed(session, update(Batch).where(Batch.id == batch_id, Batch.status.in_(list(from_)))
                                    .values(status=to, touched_at=now, **stamp, **fields))
    if changed == 1 and to in webhooks.EVENT_TYPES:  # a terminal status
        webhooks.record_event(session, batch_id=batch_id, status=to, now=now)
    return changed == 1


def touch_batch(session: Session, *, batch_id: str, now: int) -> None:
    session.execute(update(Batch).where(Batch.id == batch_id).values(touched_at=now))


def claim_validation(session: Session, *, batch_id: str, token: str, now: int) -> bool:
    """Make ``token`` the validating batch's one validation attempt (taking it over from any other) and
    count the attempt; False if the batch is no longer validating."""
    changed = rows_changed(session, update(Batch)
                           .where(Batch.id == batch_id, Batch.status == BatchStatus.validating)
                           .values(validation_token=token, touched_at=now,
                                   validation_attempts=Batch.validation_attempts + 1))
    return changed == 1


def holds_validation(session: Session, *, batch_id: str, token: str, now: int) -> bool:
    """Touch the batch if attempt ``token`` still owns its validation; the row stays locked until the
    transaction ends, so no other attempt takes over while this one writes."""
    changed = rows_changed(session, update(Batch)
                           .where(Batch.id == batch_id, Batch.status == BatchStatus.validating,
                                  Batch.validation_token == token).values(touched_at=now))
    return changed == 1


def batches_in(session: Session, *, statuses: Sequence[BatchStatus], touched_before: int | None = None,
               limit: int = 1000) -> list[Batch]:
    query = select(Batch).where(Batch.status.in_(list(statuses)))
    if touched_before is not None:
        query = query.where(Batch.touched_at < touched_before)
    return list(session.scalars(query.order_by(Batch.created_at).limit(limit)))


# ------------------------------------------------------------------------------------- requests


def add_requests(session: Session, *, rows: list[dict[str, Any]]) -> None:
    # A Core insert of plain rows; a declarative class's __table__ is a Table (typed as any FromClause).
    session.execute(cast(Table, Request.__table__).insert(), rows)


def add_chunk(session: Session, *, batch_id: str, queue: str, size: int, now: int) -> int:
    chunk = Chunk(batch_id=batch_id, queue=queue, size=size, enqueued_at=now)
    session.add(chunk)
    session.flush()
    return chunk.id


def get_chunk(session: Session, *, chunk_id: int) -> Chunk | None:
    return session.get(Chunk, chunk_id)


def chunks_of(session: Session, *, batch_id: str) -> list[Chunk]:
    return list(session.scalars(select(Chunk).where(Chunk.batch_id == batch_id).order_by(Chunk.id)))


def claim_requests(session: Session, *, chunk_id: int, worker: str, now: int) -> list[Request]:
    """Take every open request of a chunk for `worker`, which holds the chunk's lease (so a running
    one belongs to a run that ended). `heartbeat_at` records when it was claimed."""
    open_rows = and_(Request.chunk_id == chunk_id, Request.status.in_(OPEN_REQUEST_STATUSES))
    session.execute(update(Request).where(open_rows)
                    .values(status=RequestStatus.running, worker=worker, heartbeat_at=now))
    return list(session.scalars(select(Request).where(Request.chunk_id == chunk_id, Request.worker == worker,
                                                      Request.status == RequestStatus.running)
                                .order_by(Request.line)))


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
    changed = rows_changed(session, update(Request).where(Request.batch_id == batch_id,
                                                          Request.status.in_(statuses))
                                    .values(status=status, error_code=code, error_message=message,
                                            finished_at=now))
    session.execute(update(Batch).where(Batch.id == batch_id)
                    .values(failed=Batch.failed + changed))
    return changed


def count_requests(session: Session, *, batch_id: str, statuses: Sequence[RequestStatus]) -> int:
    return session.execute(select(func.count()).select_from(Request)
                           .where(Request.batch_id == batch_id, Request.status.in_(list(statuses)))).scalar_one()


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


def reclaim_orphaned_requests(session: Session, *, dead_before: int) -> int:
    """Running requests whose worker is dead (no `workers` row beating since ``dead_before``, or one
    restarted after the claim) go back to pending; their chunk's lease, if any, is handled apart."""
    open_batches = select(Batch.id).where(Batch.status.in_([BatchStatus.in_progress, BatchStatus.cancelling]))
    return rows_changed(session, update(Request)
                        .where(Request.batch_id.in_(open_batches),  # (batch, status) index
                               Request.status == RequestStatus.running,
                               ~_live(Request.worker, Request.heartbeat_at, dead_before))
                        .values(status=RequestStatus.pending, worker=None))


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


# --------------------------------------------------------------------------------- chunk leases
# A chunk runs only on the worker holding its lease (chunks.worker). The lease holds while that
# worker's `workers` row beats, the run renews it (leased_at), and the worker has not restarted since;
# otherwise the holder is dead, and whoever notices first (the reconciler, or a worker the chunk is
# delivered to) records the failed run with `chunk_failed`, whose conditional UPDATE lets one do it.
# A doorbell leases the best chunk of its queue (`lease_best_chunk`: batch priority first), not always the
# one it names; as every chunk that needs a run has a doorbell of its own, each still runs.


def _live(holder: InstrumentedAttribute[str | None], since: InstrumentedAttribute[int | None],
          dead_before: int) -> Exists:
    """A worker named `holder` beat at or after ``dead_before`` and (re)started no later than ``since``
    (a restarted process with the same name does not own what its predecessor held)."""
    return exists().where(Worker.name == holder, Worker.heartbeat_at >= dead_before, Worker.started_at <= since)


def _live_lease(dead_before: int) -> ColumnElement[bool]:
    # A live worker that no longer renews a lease (its run ended but could not release it) holds nothing.
    return and_(Chunk.leased_at >= dead_before, _live(Chunk.worker, Chunk.leased_at, dead_before))


def holder_is_live(session: Session, *, chunk_id: int, dead_before: int) -> bool:
    return session.scalar(select(Chunk.id).where(Chunk.id == chunk_id, _live_lease(dead_before))) is not None


def lease_chunk(session: Session, *, chunk_id: int, worker: str, now: int) -> bool:
    """Make `worker` the holder of a chunk nobody else holds; False if somebody does. (A dead holder's
    run is recorded with `chunk_failed` first, which frees the chunk.)"""
    changed = rows_changed(session, update(Chunk).where(Chunk.id == chunk_id,
                                                        Chunk.worker.is_(None) | (Chunk.worker == worker))
                                    .values(worker=worker, leased_at=now))
    return changed == 1


def lease_best_chunk(session: Session, *, queue: str, worker: str, now: int, prefer: int | None = None,
                     unfailed: bool = False) -> Chunk | None:
    """Make `worker` the holder of the chunk of ``queue`` that should run next, and return it; None when no
    chunk needs a run. Candidates are unheld chunks with pending requests whose batch is in progress and
    within its window, past a failed run's pause; the highest batch priority goes first, among equals the
    chunk ``prefer`` (the one a doorbell names, so equal priorities keep the broker's order), then the
    oldest batch's first chunk.

    The lease is a conditional UPDATE of an unheld row: of two workers racing for one chunk one wins, and
    the other takes the next best (rows another transaction has locked are skipped, not waited for).
    ``unfailed``: only chunks with no failed run (a run fed from several chunks takes no suspect chunk)."""
    has_pending = exists().where(Request.chunk_id == Chunk.id, Request.status == RequestStatus.pending)
    preferred_first = case((Chunk.id == prefer, 0), else_=1)
    lost: list[int] = []  # chunks a racing worker leased between our read and our update
    while True:
        best = session.scalar(
            select(Chunk.id).join(Batch, Batch.id == Chunk.batch_id)  # from the running batches (indexed)
            .where(Batch.status == BatchStatus.in_progress, Batch.expires_at > now, Chunk.queue == queue,
                   Chunk.worker.is_(None), Chunk.id.not_in(lost), has_pending,
                   (Chunk.enqueued_at <= now) | (Chunk.id == prefer),  # a failed run's pause is kept
                   Chunk.failures == 0 if unfailed else true())
            .order_by(Batch.priority.desc(), preferred_first, Batch.created_at, Chunk.id)
            .limit(1).with_for_update(skip_locked=True, of=Chunk))
        if best is None:
            return None
        if rows_changed(session, update(Chunk).where(Chunk.id == best, Chunk.worker.is_(None))
                        .values(worker=worker, leased_at=now)) == 1:
            return session.scalars(select(Chunk).where(Chunk.id == best)
                                   .execution_options(populate_existing=True)).one()
        lost.append(best)


def renew_lease(session: Session, *, chunk_id: int, worker: str, now: int) -> bool:
    """Renew `worker`'s lease on a chunk it runs; False if the lease is no longer its own."""
    changed = rows_changed(session, update(Chunk).where(Chunk.id == chunk_id, Chunk.worker == worker)
                                    .values(leased_at=now))
    return changed == 1


def end_lease(session: Session, *, chunk_id: int, worker: str) -> bool:
    """Release `worker`'s lease and hand back the requests it still runs (a run that stopped early:
    cancelled, expired, shut down). Counts no failure; False if `worker` no longer held the chunk."""
    changed = rows_changed(session, update(Chunk).where(Chunk.id == chunk_id, Chunk.worker == worker)
                                    .values(worker=None, leased_at=None))
    session.execute(update(Request).where(Request.chunk_id == chunk_id, Request.worker == worker,
                                          Request.status == RequestStatus.running)
                    .values(status=RequestStatus.pending, worker=None))
    return changed == 1


def dead_leases(session: Session, *, dead_before: int) -> list[Chunk]:
    """Leased chunks whose holder is dead; rows another reconciler is recovering are skipped."""
    query = (select(Chunk).where(Chunk.worker.is_not(None), ~_live_lease(dead_before))
             .order_by(Chunk.id).with_for_update(skip_locked=True))
    return list(session.scalars(query))


def chunk_failed(session: Session, *, chunk_id: int, holder: str, now: int, max_attempts: int,
                 retry_after: int = 0) -> list[Chunk]:
    """Record that `holder`'s run of a chunk ended unfinished (died, or the engine raised); returns what to
    send next: the chunk, its two halves (a group failing again), or nothing (its lone request failed
    ``max_attempts`` times and ends as max_attempts_exceeded, or another caller recorded this run).
    ``retry_after``: seconds before another run of it may be leased (enqueued_at is set that far ahead)."""
    changed = rows_changed(session, update(Chunk).where(Chunk.id == chunk_id, Chunk.worker == holder)
                           .values(worker=None, leased_at=None, failures=Chunk.failures + 1,
                                   enqueued_at=now + retry_after))
    if changed != 1:
        return []
    session.execute(update(Request).where(Request.chunk_id == chunk_id, Request.status == RequestStatus.running)
                    .values(status=RequestStatus.pending, worker=None))
    chunk = session.scalars(select(Chunk).where(Chunk.id == chunk_id)
                            .execution_options(populate_existing=True)).one()
    open_ids = list(session.scalars(select(Request.id).where(Request.chunk_id == chunk_id,
                                                             Request.status == RequestStatus.pending)
                                    .order_by(Request.line)))
    if len(open_ids) == 1:
        return _blame_lone_request(session, chunk, open_ids[0], now=now, max_attempts=max_attempts)
    if len(open_ids) > 1 and chunk.failures >= 2:
        half = (len(open_ids) + 1) // 2
        return [_split_off(session, chunk, part, now=now + retry_after)
                for part in (open_ids[:half], open_ids[half:])]
    return [chunk] if open_ids else []


def _blame_lone_request(session: Session, chunk: Chunk, request_id: int, *, now: int,
                        max_attempts: int) -> list[Chunk]:
    # Alone in its run, the request is the one to blame: only such runs count as its attempts, so a
    # batch-mate of a poison request never ends as max_attempts_exceeded.
    session.execute(update(Request).where(Request.id == request_id).values(attempts=Request.attempts + 1))
    attempts = session.execute(select(Request.attempts).where(Request.id == request_id)).scalar_one()
    if attempts < max_attempts:
        return [chunk]
    finish_requests(session, batch_id=chunk.batch_id, outcomes=[outcome(
        request_id, RequestStatus.failed, now, error_code="max_attempts_exceeded",
        error_message=f"Gave up after {attempts} failed attempts: each time this request ran on its own, "
                      "its worker died or the engine raised.")])
    return []


def _split_off(session: Session, chunk: Chunk, request_ids: list[int], *, now: int) -> Chunk:
    # failures=1: the half's next failed run splits it again, so a poison request is alone after log2(n).
    part = Chunk(batch_id=chunk.batch_id, queue=chunk.queue, size=len(request_ids), enqueued_at=now, failures=1)
    session.add(part)
    session.flush()
    session.execute(update(Request).where(Request.id.in_(request_ids)).values(chunk_id=part.id))
    return part


def _awaiting_doorbell(sent_before: int) -> Select[Chunk]:
    """Chunks of running batches (found from the batches, not by scanning every chunk ever stored)
    with pending requests, no holder, last sent before ``sent_before``."""
    has_pending = exists().where(Request.chunk_id == Chunk.id, Request.status == RequestStatus.pending)
    return (select(Chunk).join(Batch, Batch.id == Chunk.batch_id)
            .where(Batch.status == BatchStatus.in_progress, Chunk.worker.is_(None),
                   Chunk.enqueued_at < sent_before, has_pending))


def chunks_awaiting_doorbell(session: Session, *, sent_before: int, limit: int = 10_000) -> list[Chunk]:
    """Unheld chunks with pending requests, sent before ``sent_before``: if their queue is empty, their
    message was lost."""
    return list(session.scalars(_awaiting_doorbell(sent_before).order_by(Chunk.id).limit(limit)))


def chunks_to_resume(session: Session, *, chunk_ids: Sequence[int]) -> list[Chunk]:
    """Those of ``chunk_ids`` that await a run: unheld, with pending requests, their batch in progress."""
    return list(session.scalars(_awaiting_doorbell(sent_before=2**62).where(Chunk.id.in_(list(chunk_ids)))
                                .order_by(Chunk.id)))


def mark_resent(session: Session, *, chunk_ids: Sequence[int], sent_before: int, now: int) -> list[Chunk]:
    """Those of ``chunk_ids`` still awaiting a doorbell, stamped as sent now; rows another reconciler
    holds are skipped and a stamped row no longer matches, so each chunk is re-sent once."""
    query = (_awaiting_doorbell(sent_before).where(Chunk.id.in_(list(chunk_ids)))
             .order_by(Chunk.id).with_for_update(skip_locked=True, of=Chunk))
    chunks = list(session.scalars(query))
    if chunks:
        session.execute(update(Chunk).where(Chunk.id.in_([c.id for c in chunks])).values(enqueued_at=now))
    return chunks


def retire_worker(session: Session, *, name: str) -> list[Chunk]:
    """Hand back every lease and running request of worker `name` (no failure counted) and drop its
    row; returns the chunks released, to be sent again."""
    chunks = list(session.scalars(select(Chunk).where(Chunk.worker == name).order_by(Chunk.id).with_for_update()))
    session.execute(update(Chunk).where(Chunk.worker == name).values(worker=None, leased_at=None))
    session.execute(update(Request).where(Request.worker == name, Request.status == RequestStatus.running)
                    .values(status=RequestStatus.pending, worker=None))
    session.execute(delete(Worker).where(Worker.name == name))
    return chunks


def open_work(session: Session) -> tuple[int, int]:
    """(batches not finished yet, requests not run yet): what a restarted server resumes."""
    unfinished = [BatchStatus.validating, BatchStatus.in_progress, BatchStatus.cancelling, BatchStatus.finalizing]
    batches = session.execute(select(func.count()).select_from(Batch)
                              .where(Batch.status.in_(unfinished))).scalar_one()
    requests = session.execute(select(func.count()).select_from(Request)
                               .where(Request.status.in_(list(OPEN_REQUEST_STATUSES)))).scalar_one()
    return batches, requests


# -------------------------------------------------------------------------------------- workers


def upsert_worker(session: Session, *, name: str, model: str, queue: str, max_positions: int,
                  now: int) -> None:
    row = session.get(Worker, name)
    if row is None:
        session.add(Worker(name=name, model=model, queue=queue, max_positions=max_positions,
                           started_at=now, heartbeat_at=now))
    else:  # a restart: started_at tells its predecessor's leases (held by the same name) from its own
        row.model, row.queue, row.max_positions, row.heartbeat_at = model, queue, max_positions, now
        row.started_at = now


def beat_worker(session: Session, *, name: str, now: int) -> None:
    session.execute(update(Worker).where(Worker.name == name).values(heartbeat_at=now))


def known_workers(session: Session, *, since: int | None = None) -> list[Worker]:
    query = select(Worker)
    if since is not None:
        query = query.where(Worker.heartbeat_at >= since)
    return list(session.scalars(query.order_by(Worker.model)))


def _past_cursor(columns: tuple[InstrumentedAttribute[int], InstrumentedAttribute[str]], values: tuple[int, str],
                 descending: bool) -> ColumnElement[bool]:
    (c1, c2), (v1, v2) = columns, values
    if descending:
        return (c1 < v1) | ((c1 == v1) & (c2 < v2))
    return (c1 > v1) | ((c1 == v1) & (c2 > v2))


# ------------------------------------------------------------------------------------ retention

# A batch in one of these still reads its input file.
_READING_INPUT = (BatchStatus.validating, BatchStatus.in_progress, BatchStatus.finalizing, BatchStatus.cancelling)


def expired_file_ids(session: Session, *, now: int, limit: int = 1000) -> list[str]:
    """Files whose expires_at has passed, except the input of a batch that still reads it."""
    in_use = exists().where(Batch.input_file_id == File.id, Batch.status.in_(_READING_INPUT))
    return list(session.scalars(select(File.id).where(File.expires_at <= now, ~in_use)
                                .order_by(File.expires_at, File.id).limit(limit)))


def delete_expired_file(session: Session, *, file_id: str, now: int) -> bool:
    """Delete the file's row if it is still expired and unused; True if this call deleted it."""
    in_use = exists().where(Batch.input_file_id == file_id, Batch.status.in_(_READING_INPUT))
    changed = rows_changed(session, delete(File).where(File.id == file_id, File.expires_at <= now, ~in_use))
    return changed == 1
