"""Finalize a batch once no request is open: write the output and error files, set the final status.

Called after every chunk, after a cancel, and by the reconciler. Whoever moves the batch to
`finalizing` (a conditional update) writes the files; the files have ids derived from the batch, so a
finalizer that died half-way is simply repeated by the reconciler.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence

from common.ids import now
from common.results import output_line
from db import repo
from db.models import OPEN_REQUEST_STATUSES, BatchStatus, RequestStatus
from worker.runtime import Runtime

log = logging.getLogger("diffbatch.worker")
PAGE = 1000
ERROR_STATUSES = (RequestStatus.failed, RequestStatus.cancelled, RequestStatus.expired)


def maybe_finalize(rt: Runtime, batch_id: str) -> bool:
    """Finalize if the batch has nothing left to run; True if this call finalized it."""
    if not _enter_finalizing(rt, batch_id):
        return False
    output_id = _write_file(rt, batch_id, "output", (RequestStatus.succeeded,))
    error_id = _write_file(rt, batch_id, "error", ERROR_STATUSES)
    with rt.session() as session, session.begin():
        batch = repo.get_batch(session, batch_id=batch_id)
        assert batch is not None  # only an ended batch is ever deleted, and this one is finalizing
        expired = repo.count_requests(session, batch_id=batch_id, statuses=[RequestStatus.expired])
        final = (BatchStatus.cancelled if batch.cancelling_at else
                 BatchStatus.expired if expired else BatchStatus.completed)
        repo.transition(session, batch_id=batch_id, from_=[BatchStatus.finalizing], to=final, now=now(),
                        output_file_id=output_id, error_file_id=error_id)
    log.info("batch %s %s", batch_id, final.value)
    return True


def _enter_finalizing(rt: Runtime, batch_id: str) -> bool:
    t = now()
    with rt.session() as session, session.begin():
        batch = repo.get_batch(session, batch_id=batch_id, for_update=True)
        if batch is None:
            return False
        if batch.status == BatchStatus.cancelling and batch.in_progress_at is None:
            # Cancelled while validating: nothing was accepted, so there are no files to write.
            repo.transition(session, batch_id=batch_id, from_=[BatchStatus.cancelling],
                            to=BatchStatus.cancelled, now=t)
            return False
        if batch.status == BatchStatus.in_progress and t >= batch.expires_at:
            repo.close_open_requests(session, batch_id=batch_id, status=RequestStatus.expired,
                                     code="batch_expired", message="The batch expired before this "
                                     "request ran.", now=t, include_running=False)
        elif batch.status == BatchStatus.cancelling:
            repo.close_open_requests(session, batch_id=batch_id, status=RequestStatus.cancelled,
                                     code="batch_cancelled", message="The batch was cancelled before "
                                     "this request ran.", now=t, include_running=False)
        stale_finalizer = (batch.status == BatchStatus.finalizing
                           and batch.touched_at < t - rt.settings.stale_after_s)
        if batch.status not in (BatchStatus.in_progress, BatchStatus.cancelling) and not stale_finalizer:
            return False
        if repo.count_requests(session, batch_id=batch_id, statuses=OPEN_REQUEST_STATUSES):
            return False  # whoever finishes the last open request calls again
        return repo.transition(session, batch_id=batch_id, to=BatchStatus.finalizing, now=t,
                               from_=[BatchStatus.in_progress, BatchStatus.cancelling,
                                      BatchStatus.finalizing])


def _write_file(rt: Runtime, batch_id: str, kind: str, statuses: Sequence[RequestStatus]) -> str | None:
    file_id = f"file-{batch_id.removeprefix('batch_')}-{kind}"
    lines = _result_lines(rt, batch_id, statuses)
    size = rt.blobs.write(file_id, lines)
    with rt.session() as session, session.begin():
        batch = repo.get_batch(session, batch_id=batch_id)
        assert batch is not None  # only an ended batch is ever deleted, and this one is finalizing
        tenant_id = batch.tenant_id  # the batch's owner owns its results
        written = now()
        keep_s = batch.output_expires_after_s or rt.settings.retention_days * 86400  # 0: kept for good
        existing = repo.get_file(session, file_id=file_id)
        if existing is not None:
            repo.delete_file(session, file_id=file_id)
            session.flush()
        if size == 0:
            rt.blobs.delete(file_id)
            return None
        repo.add_file(session, file_id=file_id, tenant_id=tenant_id, filename=f"{batch_id}_{kind}.jsonl",
                      purpose="batch_output", size=size, storage_path=rt.blobs.location(file_id), now=written,
                      expires_at=written + keep_s if keep_s else None)
    return file_id


def _result_lines(rt: Runtime, batch_id: str, statuses: Sequence[RequestStatus]) -> Iterator[bytes]:
    """Result lines in input order, read a page at a time so a million lines never sit in memory.
    Each page touches the batch: a finalizer writing a large file shows it is alive, so the
    reconciler does not take it for a dead one and start a second."""
    after = -1
    while True:
        with rt.session() as session, session.begin():
            repo.touch_batch(session, batch_id=batch_id, now=now())
            page = repo.requests_of(session, batch_id=batch_id, statuses=statuses, after_line=after,
                                    limit=PAGE)
        if not page:
            return
        yield b"".join(json.dumps(output_line(r)).encode() + b"\n" for r in page)
        after = page[-1].line
