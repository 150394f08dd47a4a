"""run_chunk: lease a chunk -> claim its requests -> run the engine -> write each result once.

A chunk runs only on the worker holding its lease (db/repo.py, "chunk leases"). A doorbell leases the
best chunk of its queue, the one it names unless a higher-priority batch waits; one that finds its named
chunk held by a live worker takes the next best (or returns), and one that finds its holder dead records
that run as failed. While the run goes on, the engine's batch is fed from the queue's next chunks
(worker/feed.py), so it stays full across chunk boundaries; each chunk is released once its results are
stored. A run the engine raises in is recorded as failed for every chunk it still holds, so a group that
keeps failing is split until the request to blame runs alone. Finalizing is the control process's work:
when a batch has nothing open left, the worker sends FINALIZE_BATCH to the control queue instead of
writing files on a GPU host.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from concurrent.futures import Future
from typing import TYPE_CHECKING

from common import metrics
from common.ids import now
from common.queue import FINALIZE_BATCH
from common.settings import CONTROL_QUEUE
from db import repo
from db.models import OPEN_REQUEST_STATUSES, BatchStatus, RequestStatus
from db.progress import report_chunk_tokens
from worker.feed import ChunkFeed, Lease, claim, convert
from worker.heartbeat import Heartbeat
from worker.leases import record_failed_run, send_chunks
from worker.responses import response_body
from worker.runtime import Runtime

if TYPE_CHECKING:  # the engine's types; importing this module loads no torch
    from worker.engine.params import GenerationResult
    from worker.feed import Runnable

log = logging.getLogger("diffbatch.worker")
RETRY_PAUSE_S = 5  # before a group the engine raised in runs again: an out-of-memory may pass


def run_chunk(rt: Runtime, chunk_id: int) -> int:
    """Answer a chunk's doorbell: process what is still open in the best chunk of its queue (the chunk
    itself unless a higher-priority batch waits), and the chunks fed into its run; returns how many
    results this call wrote."""
    lease = _take_lease(rt, chunk_id)
    if lease is None or not lease.claimed:
        return 0
    feed: ChunkFeed | None = None
    try:
        with Heartbeat(rt, lease.chunk_id) as beat, metrics.ChunkMeter(lease.model, rt.name) as meter:
            runnable, written = convert(rt, lease.claimed)
            feed = ChunkFeed(rt, lease, runnable, beat)
            written += _generate_and_store(rt, feed, beat, meter)
    except Exception:
        held = list(feed.held()) if feed else [lease.chunk_id]
        log.exception("chunks %s failed; their groups run again, split if they failed before", held)
        for held_id in held:
            record_failed_run(rt, held_id, rt.name, countdown=RETRY_PAUSE_S)
        _finalize_touched(rt, feed.touched if feed else {lease.batch_id})
        raise
    except BaseException:  # the process is stopping: not the groups' fault, so no failure counted
        if feed is None:
            _end_lease(rt, lease.chunk_id)
        _hand_back(rt, feed)
        raise
    _hand_back(rt, feed)  # chunks a run that stopped early (cancelled, expired, lost) still held
    _finalize_rest(rt, feed)
    return written + feed.written


def _hand_back(rt: Runtime, feed: ChunkFeed | None) -> None:
    if feed is not None:
        send_chunks(rt, feed.release_all(), resumed=True)


def _end_lease(rt: Runtime, chunk_id: int) -> None:
    with rt.session() as session, session.begin():
        repo.end_lease(session, chunk_id=chunk_id, worker=rt.name)


def _take_lease(rt: Runtime, chunk_id: int) -> Lease | None:
    """Lease the chunk that should run next on the doorbell's queue and claim its open requests
    (repo.lease_best_chunk: the highest batch priority, among equals the named chunk). The named chunk's
    own case comes first: a dead holder's run is recorded (which re-sends it) and this doorbell ends
    with nothing claimed; a live holder keeps it, and this doorbell takes the next best chunk, since the
    holder may have leased it on another chunk's doorbell (or fed it into its run). None if nothing on
    the queue needs a run."""
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
            return None if best is None else claim(rt, session, best, t)
    log.warning("chunk %s: its holder %s is dead; recording the failed run", chunk_id, holder)
    record_failed_run(rt, chunk_id, holder)
    _finalize_if_done(rt, chunk.batch_id)
    return Lease(chunk_id, chunk.batch_id, None, [])


def _generate_and_store(rt: Runtime, feed: ChunkFeed, beat: Heartbeat, meter: metrics.ChunkMeter) -> int:
    """Stream the engine's results (rows finish at different times under continuous batching) and
    hand them to the writer thread a batch-size group of one chunk at a time, so storing overlaps
    generation. A chunk whose rows are all stored is released at once (the writer thread runs its
    tasks in order, so after its stores)."""
    size, stores = rt.settings.max_batch_size, []
    pending: dict[int, list[tuple[Runnable, GenerationResult]]] = defaultdict(list)
    if not feed.runnable:
        feed.release_all()
        return 0
    try:
        results = rt.engine.stream([g for _, g in feed.runnable], more=feed if feed.ahead else None)
        for index, result in results:
            chunk_id = feed.chunk_of[index]
            pending[chunk_id].append((feed.runnable[index], result))
            meter.add(result.completion_tokens, result.prompt_tokens, result.forward_passes)
            last = feed.finished(index)
            if len(pending[chunk_id]) < size and not last:
                continue
            stores.append(_submit_store(rt, feed, chunk_id, pending.pop(chunk_id)))
            if last:  # the lease is renewed until _release, after the stores: a slow database cannot expire it
                stores.append(rt.writer.submit(_release, rt, feed, chunk_id))
            if feed.held() and not _still_ours(rt, feed, beat):
                results.close()  # cancelled, expired, or taken for dead: the rest is handed back
                break
    finally:
        for chunk_id, finished in pending.items():  # the engine raised: keep the results it finished before
            if finished:
                stores.append(_submit_store(rt, feed, chunk_id, finished))
        written = sum(store.result() for store in stores)
    return written


def _submit_store(rt: Runtime, feed: ChunkFeed, chunk_id: int,
                  finished: list[tuple[Runnable, GenerationResult]]) -> Future[int]:
    model = feed.held()[chunk_id].model
    assert model is not None  # set with in_progress, the only status whose requests are claimed
    return rt.writer.submit(_store, rt, model, feed, finished)


def _release(rt: Runtime, feed: ChunkFeed, chunk_id: int) -> int:
    """A chunk's rows are all stored: end its lease and ask to finalize its batch if it is done."""
    lease = feed.held().get(chunk_id)
    feed.release(chunk_id)
    if lease is not None and _finalize_if_done(rt, lease.batch_id):
        feed.finalizing.add(lease.batch_id)
    return 0


def _still_ours(rt: Runtime, feed: ChunkFeed, beat: Heartbeat) -> bool:
    """Every held chunk's lease is ours and its batch still runs."""
    if beat.lost.is_set():
        return False
    batch_ids = {lease.batch_id for lease in feed.held().values()}
    return all(_batch_status(rt, batch_id) == BatchStatus.in_progress for batch_id in batch_ids)


def _store(rt: Runtime, model: str, feed: ChunkFeed, finished: list[tuple[Runnable, GenerationResult]]) -> int:
    outcomes = [repo.outcome(request.id, RequestStatus.succeeded, now(),
                             response=response_body(request.url, model, result),
                             prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens,
                             forward_passes=result.forward_passes)
                for (request, _), result in finished]
    with rt.session() as session, session.begin():
        # The stored rows' tokens now count as their requests' output: the running count (reported on
        # the run's first held chunk), which the engine lowered before it handed them out, is written in
        # the same transaction so a progress reader never counts them twice.
        report_chunk_tokens(session, chunk_id=feed.beat.chunk_id, worker=rt.name, tokens=rt.engine.tokens_in_flight)
        return repo.finish_requests(session, batch_id=finished[0][0][0].batch_id, outcomes=outcomes)


def _finalize_touched(rt: Runtime, batch_ids: set[str]) -> None:
    for batch_id in sorted(batch_ids):
        _finalize_if_done(rt, batch_id)


def _finalize_rest(rt: Runtime, feed: ChunkFeed) -> None:
    """Ask to finalize the run's batches that a released chunk has not asked for already."""
    _finalize_touched(rt, feed.touched - feed.finalizing)


def _finalize_if_done(rt: Runtime, batch_id: str) -> bool:
    """Ask the control process to finalize once the batch has nothing open, or is cancelled or expired
    (finalize closes the rest); the reconciler's pass catches a message that does not arrive. True if asked."""
    with rt.session() as session:
        batch = repo.get_batch(session, batch_id=batch_id)
        open_requests = batch and repo.count_requests(session, batch_id=batch_id, statuses=OPEN_REQUEST_STATUSES)
    if batch is None or batch.status not in (BatchStatus.in_progress, BatchStatus.cancelling):
        return False
    if open_requests == 0 or batch.status == BatchStatus.cancelling or now() >= batch.expires_at:
        try:
            rt.celery.send_task(FINALIZE_BATCH, args=(batch_id,), queue=CONTROL_QUEUE)
            return True
        except Exception:  # noqa: BLE001 - the reconciler finalizes a batch whose message is lost
            log.warning("could not ask to finalize batch %s", batch_id, exc_info=True)
    return False


def _batch_status(rt: Runtime, batch_id: str) -> BatchStatus | None:
    with rt.session() as session:
        batch = repo.get_batch(session, batch_id=batch_id)
        expired = batch is not None and now() >= batch.expires_at
        return BatchStatus.expired if expired else (batch.status if batch else None)
