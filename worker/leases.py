"""Chunk leases from the worker's side: ring chunks' doorbells, record a failed run, retire a worker.

The lease itself lives in the database (db/repo.py, "chunk leases"); these wrap its transactions and
send the messages after they commit, so a worker never receives a chunk the database does not show yet.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable

from common.ids import now
from common.queue import RUN_CHUNK
from db import repo
from db.models import Chunk
from worker.runtime import Runtime

log = logging.getLogger("diffbatch.worker")


# Redis serves a queue's lower priority numbers first (the SQLite and memory brokers ignore them). A chunk
# whose run was cut short goes ahead of the fresh ones, so a killed worker's requests resume in seconds
# instead of waiting behind the whole backlog.
FIRST_SEND_PRIORITY, RESUME_PRIORITY = 5, 0


def send_chunks(rt: Runtime, chunks: Iterable[Chunk], *, countdown: float | None = None,
                resumed: bool = False) -> int:
    """Ring each chunk's doorbell; returns how many were sent. A send the broker refuses is logged, not
    raised: the chunk stays in the database unheld, and the reconciler re-sends it."""
    sent, priority = 0, RESUME_PRIORITY if resumed else FIRST_SEND_PRIORITY
    for chunk in chunks:
        try:
            rt.celery.send_task(RUN_CHUNK, args=(chunk.id,), queue=chunk.queue, countdown=countdown,
                                priority=priority)
            sent += 1
        except Exception:  # noqa: BLE001 - a lost doorbell is found again from the database
            log.warning("could not send chunk %s; the reconciler will", chunk.id, exc_info=True)
    return sent


def record_failed_run(rt: Runtime, chunk_id: int, holder: str, *, countdown: float | None = None) -> list[Chunk]:
    """`holder`'s run of the chunk ended unfinished: count it, send what runs next (the chunk, or its
    halves); returns those chunks ([] if another process recorded this run first)."""
    with rt.session() as session, session.begin():
        chunks = repo.chunk_failed(session, chunk_id=chunk_id, holder=holder, now=now(),
                                   max_attempts=rt.settings.max_attempts, retry_after=math.ceil(countdown or 0))
    send_chunks(rt, chunks, countdown=countdown, resumed=True)
    return chunks


def retire_worker(rt: Runtime) -> int:
    """Graceful shutdown: hand back this worker's leases and running requests (no failure counted),
    drop its `workers` row and re-send the chunks at once; returns how many chunks it held."""
    with rt.session() as session, session.begin():
        chunks = repo.retire_worker(session, name=rt.name)
    send_chunks(rt, chunks, resumed=True)
    if chunks:
        log.info("retired %s: handed back %d chunks", rt.name, len(chunks))
    return len(chunks)
