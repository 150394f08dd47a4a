"""The reconciler: the database is the system of record, broker messages are only doorbells.

Run at worker start and periodically by beat. It reclaims requests of workers that stopped beating,
rings again for chunks whose message may be lost, retries stuck validations, and finalizes batches
that are done, cancelled or expired. Every action is idempotent, so running it twice is harmless.
"""

from __future__ import annotations

import logging

from common.ids import now
from common.queue import RUN_CHUNK, VALIDATE_BATCH
from common.settings import CONTROL_QUEUE
from db import repo
from db.models import BatchStatus
from worker.finalize import maybe_finalize
from worker.runtime import Runtime

log = logging.getLogger("diffbatch.worker")


def reconcile(rt: Runtime) -> dict[str, int]:
    t, s = now(), rt.settings
    with rt.session() as session, session.begin():
        reclaimed = repo.reclaim_stale(session, stale_before=t - s.stale_after_s)
        chunks = repo.chunks_to_requeue(session, delay=s.requeue_after_s, now=t)
        # Validation touches its batch as it goes, so a quiet one lost its message or its worker.
        stuck = repo.batches_in(session, statuses=[BatchStatus.validating],
                                touched_before=t - s.stale_after_s)
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
        open_batches = repo.batches_in(session, statuses=[BatchStatus.in_progress, BatchStatus.cancelling,
                                                          BatchStatus.finalizing])
    for chunk in chunks:
        rt.celery.send_task(RUN_CHUNK, args=(chunk.id,), queue=chunk.queue)
    for batch in retried:
        rt.celery.send_task(VALIDATE_BATCH, args=(batch.id,), queue=CONTROL_QUEUE)
    finalized = sum(maybe_finalize(rt, batch.id) for batch in open_batches)
    report = {"reclaimed": reclaimed, "requeued": len(chunks), "revalidated": len(retried),
              "expired_validating": len(late), "finalized": finalized}
    if any(report.values()):
        log.info("reconcile: %s", report)
    return report
