"""run_chunk: lease a chunk -> claim its requests -> run the engine -> write each result once.

A chunk runs only on the worker holding its lease (db/repo.py, "chunk leases"). A doorbell leases the
best chunk of its queue, the one it names unless a higher-priority batch waits; one that finds its named
chunk held by a live worker takes the next best (or returns), and one that finds its holder dead records
that run as failed. A run the engine raises in is recorded the same way, so a group that keeps failing is
split until the request to blame runs alone. Finalizing is the control process's work: when the batch has
nothing open left, the worker sends FINALIZE_BATCH to the control queue instead of writing files on a GPU
host.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy.orm import Session

from common import metrics
from common.ids import now
from common.queue import FINALIZE_BATCH
from common.settings import CONTROL_QUEUE
from db import repo
from db.models import OPEN_REQUEST_STATUSES, BatchStatus, Chunk, Request, RequestStatus
from db.progress import report_chunk_tokens
from worker.heartbeat import Heartbeat
from worker.leases import record_failed_run
from worker.responses import error_code_and_param, response_body, to_generation_request
from worker.runtime import Runtime

if TYPE_CHECKING:  # the engine's types; importing this module loads no torch
    from worker.engine.params import GenerationRequest, GenerationResult

    Runnable = tuple[Request, GenerationRequest]  # a claimed request and what the engine runs for it

log = logging.getLogger("diffbatch.worker")
RETRY_PAUSE_S = 5  # before a group the engine raised in runs again: an out-of-memory may pass


@dataclass
class _Lease:
    chunk_id: int  # the chunk leased: the doorbell's own, or a better one of its queue
    batch_id: str
    model: str | None
    claimed: list[Request]


def run_chunk(rt: Runtime, chunk_id: int) -> int:
    """Answer a chunk's doorbell: process what is still open in the best chunk of its queue (the chunk
    itself unless a higher-priority batch waits); returns how many results this call wrote."""
    lease = _take_lease(rt, chunk_id)
    if lease is None or not lease.claimed:
        return 0
    try:
        with Heartbeat(rt, lease.chunk_id) as beat, metrics.ChunkMeter(lease.model, rt.name) as meter:
            written = _process(rt, lease, beat, meter)
    except Exception:
        log.exception("chunk %s failed; its group runs again, split if it failed before", lease.chunk_id)
        record_failed_run(rt, lease.chunk_id, rt.name, countdown=RETRY_PAUSE_S)
        _finalize_if_done(rt, lease.batch_id)
        raise
    except BaseException:  # the process is stopping: not the group's fault, so no failure counted
        _end_lease(rt, lease.chunk_id)
        raise
    _end_lease(rt, lease.chunk_id)
    _finalize_if_done(rt, lease.batch_id)
    return written


def _take_lease(rt: Runtime, chunk_id: int) -> _Lease | None:
    """Lease the chunk that should run next on the doorbell's queue and claim its open requests
    (repo.lease_best_chunk: the highest batch priority, among equals the named chunk). The named chunk's
    own case comes first: a dead holder's run is recorded (which re-sends it) and this doorbell ends
    with nothing claimed; a live holder keeps it, and this doorbell takes the next best chunk, since the
    holder may have leased it on another chunk's doorbell. None if nothing on the queue needs a run."""
    t = now()
    with rt.session() as session, session.begin():
        chunk = repo.get_chunk(session, chunk_id=chunk_id)
        if chunk is None:
            return None
        holder = chunk.worker
        live = holder is not None and repo.holder_is_live(session, chunk_id=chunk_id,
                                                          dead_before=t - rt.settings.worker_dead_after_s)
        if holder is None or live:
            if holder == rt.name:  # left held by this very process (a run that could not release it)
                repo.end_lease(session, chunk_id=chunk_id, worker=rt.name)
            best = repo.lease_best_chunk(session, queue=chunk.queue, worker=rt.name, now=t, prefer=chunk_id)
            return None if best is None else _claim(rt, session, best, t)
    log.warning("chunk %s: its holder %s is dead; recording the failed run", chunk_id, holder)
    record_failed_run(rt, chunk_id, holder)
    _finalize_if_done(rt, chunk.batch_id)
    return _Lease(chunk_id, chunk.batch_id, None, [])


def _claim(rt: Runtime, session: Session, chunk: Chunk, t: int) -> _Lease:
    """Claim the open requests of a chunk this worker has just leased (its batch was in progress)."""
    batch = repo.get_batch(session, batch_id=chunk.batch_id)
    assert batch is not None  # a chunk's batch is deleted with it
    repo.beat_worker(session, name=rt.name, now=t)  # the lease holds from this beat on
    claimed = repo.claim_requests(session, chunk_id=chunk.id, worker=rt.name, now=t)
    if not claimed:
        repo.end_lease(session, chunk_id=chunk.id, worker=rt.name)
    return _Lease(chunk.id, batch.id, batch.model, claimed)


def _process(rt: Runtime, lease: _Lease, beat: Heartbeat, meter: metrics.ChunkMeter) -> int:
    runnable, written = [], 0
    for request in lease.claimed:
        try:
            runnable.append((request, to_generation_request(rt.engine, request.url, request.body,
                                                            rt.settings.diffusion_defaults)))
        except ValueError as exc:
            code, param = error_code_and_param(exc, request.url)
            written += _fail(rt, request, code, f"{param}: {exc}")
    return written + _generate_and_store(rt, lease, runnable, beat, meter)


def _generate_and_store(rt: Runtime, lease: _Lease, runnable: list[Runnable], beat: Heartbeat,
                        meter: metrics.ChunkMeter) -> int:
    """Stream the engine's results (rows finish at different times under continuous batching) and
    hand them to the writer thread a batch-size group at a time, so storing overlaps generation."""
    size, stores, finished, pending = rt.settings.max_batch_size, [], set(), []
    if not runnable:
        return 0
    model = lease.model
    assert model is not None  # set with in_progress, the only status whose requests are claimed
    try:
        results = rt.engine.stream([g for _, g in runnable])
        for index, result in results:
            pending.append((runnable[index], result))
            finished.add(index)
            meter.add(result.completion_tokens, result.prompt_tokens, result.forward_passes)
            if len(pending) == size or len(finished) == len(runnable):
                stores.append(rt.writer.submit(_store, rt, model, beat.chunk_id, pending))
                pending = []
                if len(finished) < len(runnable) and not _still_ours(rt, lease.batch_id, beat):
                    results.close()  # cancelled, expired, or taken for dead: the rest is handed back
                    break
    finally:
        if pending:  # the engine raised: keep the results it finished before
            stores.append(rt.writer.submit(_store, rt, model, beat.chunk_id, pending))
        written = sum(store.result() for store in stores)
    return written


def _still_ours(rt: Runtime, batch_id: str, beat: Heartbeat) -> bool:
    return not beat.lost.is_set() and _batch_status(rt, batch_id) == BatchStatus.in_progress


def _store(rt: Runtime, model: str, chunk_id: int, finished: list[tuple[Runnable, GenerationResult]]) -> int:
    outcomes = [repo.outcome(request.id, RequestStatus.succeeded, now(),
                             response=response_body(request.url, model, result),
                             prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens,
                             forward_passes=result.forward_passes)
                for (request, _), result in finished]
    with rt.session() as session, session.begin():
        # The stored rows' tokens now count as their requests' output: the chunk's running count, which
        # the engine lowered before it handed them out, is written in the same transaction so a progress
        # reader never counts them twice.
        report_chunk_tokens(session, chunk_id=chunk_id, worker=rt.name, tokens=rt.engine.tokens_in_flight)
        return repo.finish_requests(session, batch_id=finished[0][0][0].batch_id, outcomes=outcomes)


def _fail(rt: Runtime, request: Request, code: str, message: str) -> int:
    with rt.session() as session, session.begin():
        return repo.finish_requests(session, batch_id=request.batch_id, outcomes=[
            repo.outcome(request.id, RequestStatus.failed, now(), error_code=code, error_message=message)])


def _end_lease(rt: Runtime, chunk_id: int) -> None:
    with rt.session() as session, session.begin():
        repo.end_lease(session, chunk_id=chunk_id, worker=rt.name)


def _finalize_if_done(rt: Runtime, batch_id: str) -> None:
    """Ask the control process to finalize once the batch has nothing open, or is cancelled or expired
    (finalize closes the rest); the reconciler's pass catches a message that does not arrive."""
    with rt.session() as session:
        batch = repo.get_batch(session, batch_id=batch_id)
        open_requests = batch and repo.count_requests(session, batch_id=batch_id, statuses=OPEN_REQUEST_STATUSES)
    if batch is None or batch.status not in (BatchStatus.in_progress, BatchStatus.cancelling):
        return
    if open_requests == 0 or batch.status == BatchStatus.cancelling or now() >= batch.expires_at:
        try:
            rt.celery.send_task(FINALIZE_BATCH, args=(batch_id,), queue=CONTROL_QUEUE)
        except Exception:  # noqa: BLE001 - the reconciler finalizes a batch whose message is lost
            log.warning("could not ask to finalize batch %s", batch_id, exc_info=True)


def _batch_status(rt: Runtime, batch_id: str) -> BatchStatus | None:
    with rt.session() as session:
        batch = repo.get_batch(session, batch_id=batch_id)
        expired = batch is not None and now() >= batch.expires_at
        return BatchStatus.expired if expired else (batch.status if batch else None)
