"""The reconciler: the database is the system of record, broker messages are only doorbells.

Run by the control process at start and every RECONCILE_EVERY_S (beat). Recovery is driven by facts
in the database, not long timers: a chunk whose holder stopped beating in `workers` is reclaimed and
re-sent at once (its run counted as failed, so a poison request ends up alone); a chunk that should
be queued, that nobody holds, whose queue is empty, lost its message and is re-sent. REQUEUE_AFTER_S
stays as the last resort. It also retries stuck validations and finalizes batches that are done,
cancelled or expired. Every action is a conditional update, so two reconcilers at once are harmless.
"""

from __future__ import annotations

import logging
from collections import defaultdict

from sqlalchemy.orm import Session

from common import metrics
from common.ids import now
from common.queue import VALIDATE_BATCH, queue_depth
from common.settings import CONTROL_QUEUE
from db import repo
from db.models import Batch, BatchStatus, Chunk
from worker.finalize import maybe_finalize
from worker.leases import send_chunks
from worker.runtime import Runtime

log = logging.getLogger("diffbatch.worker")


def reconcile(rt: Runtime) -> dict[str, int]:
    """One pass; returns how many of each thing it did, for logs and tests."""
    t, s = now(), rt.settings
    with rt.session() as session, session.begin():
        dead, after_failure = _recover_dead_holders(rt, session, t)
        orphaned = repo.reclaim_orphaned_requests(session, dead_before=t - s.worker_dead_after_s)
        requeued = repo.chunks_to_requeue(session, delay=s.requeue_after_s, now=t)
        late, retried = _retry_stuck_validations(rt, session, t)
        open_batches = repo.batches_in(session, statuses=[BatchStatus.in_progress, BatchStatus.cancelling,
                                                          BatchStatus.finalizing])
    lost = _find_lost_doorbells(rt, t)  # before this pass sends anything, so its queues read true
    send_chunks(rt, after_failure, resumed=True)
    send_chunks(rt, [*lost, *requeued])
    for batch in retried:
        rt.celery.send_task(VALIDATE_BATCH, args=(batch.id,), queue=CONTROL_QUEUE)
    finalized = sum(maybe_finalize(rt, batch.id) for batch in open_batches)
    report = {"reclaimed": dead, "orphaned": orphaned, "resent": len(lost), "requeued": len(requeued),
              "revalidated": len(retried), "expired_validating": len(late), "finalized": finalized}
    metrics.reconciler_actions(report)
    if any(report.values()):
        log.info("reconcile: %s", report)
    return report


def _recover_dead_holders(rt: Runtime, session: Session, t: int) -> tuple[int, list[Chunk]]:
    """Record the failed run of every chunk whose holder is dead; returns (how many, chunks to send)."""
    to_send: list[Chunk] = []
    dead = repo.dead_leases(session, dead_before=t - rt.settings.worker_dead_after_s)
    for chunk in dead:
        holder = chunk.worker
        assert holder is not None  # dead_leases finds held chunks only
        log.warning("chunk %s: its holder %s is dead; reclaiming it", chunk.id, holder)
        to_send += repo.chunk_failed(session, chunk_id=chunk.id, holder=holder, now=t,
                                     max_attempts=rt.settings.max_attempts)
    return len(dead), to_send


def _find_lost_doorbells(rt: Runtime, t: int) -> list[Chunk]:
    """Unheld chunks with pending requests, sent over LOST_MESSAGE_GRACE_S ago, whose queue is empty:
    their message is gone (a broker restart, a killed worker's unacked delivery). A queue still holding
    messages means workers are working through a backlog, so nothing of it is re-sent yet."""
    sent_before = t - rt.settings.lost_message_grace_s
    with rt.session() as session:
        waiting = repo.chunks_awaiting_doorbell(session, sent_before=sent_before)
    by_queue: dict[str, list[int]] = defaultdict(list)
    for chunk in waiting:
        by_queue[chunk.queue].append(chunk.id)
    lost = []
    for queue, chunk_ids in by_queue.items():
        try:
            if queue_depth(rt.celery, queue) == 0:
                lost += chunk_ids
        except Exception:  # noqa: BLE001 - the broker is down: sending would fail too; next pass
            log.warning("could not read the depth of queue %s", queue, exc_info=True)
    if not lost:
        return []
    with rt.session() as session, session.begin():
        return repo.mark_resent(session, chunk_ids=lost, sent_before=sent_before, now=t)


def _retry_stuck_validations(rt: Runtime, session: Session, t: int) -> tuple[list[Batch], list[Batch]]:
    """Validation touches its batch as it goes, so a quiet one lost its message or its worker:
    returns (expired, to retry)."""
    stuck = repo.batches_in(session, statuses=[BatchStatus.validating],
                            touched_before=t - rt.settings.stale_after_s)
    late, retried = [], []
    for batch in stuck:
        # One whose window has passed expires (it stored no request) instead of being retried
        # for good, whatever kept its validation from finishing.
        if batch.expires_at <= t and repo.transition(session, batch_id=batch.id, now=t,
                                                     from_=[BatchStatus.validating], to=BatchStatus.expired):
            late.append(batch)
        else:
            repo.touch_batch(session, batch_id=batch.id, now=t)
            retried.append(batch)
    return late, retried
