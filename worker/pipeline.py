"""run_chunk: claim a chunk's requests -> run the engine -> write each result once -> maybe finalize."""

from __future__ import annotations

import logging

from common.ids import now
from common.queue import RUN_CHUNK
from db import repo
from db.models import BatchStatus, Request, RequestStatus
from worker.finalize import maybe_finalize
from worker.heartbeat import Heartbeat
from worker.responses import error_code_and_param, response_body, to_generation_request
from worker.runtime import Runtime

log = logging.getLogger("diffbatch.worker")


def run_chunk(rt: Runtime, chunk_id: int) -> int:
    """Process what is still open in a chunk; returns how many results this call wrote."""
    with rt.session() as session, session.begin():
        chunk = repo.get_chunk(session, chunk_id=chunk_id)
        batch = chunk and repo.get_batch(session, batch_id=chunk.batch_id)
        if batch is None or batch.status != BatchStatus.in_progress:
            claimed = []
        else:
            claimed = repo.claim_requests(session, chunk_id=chunk_id, worker=rt.name, now=now(),
                                          stale_before=now() - rt.settings.stale_after_s)
    if chunk is None:
        return 0
    written = 0
    if claimed:
        with Heartbeat(rt, [r.id for r in claimed]):
            written = _process(rt, chunk_id, batch.model, claimed)
    maybe_finalize(rt, chunk.batch_id)
    return written


def _process(rt: Runtime, chunk_id: int, model: str, claimed: list[Request]) -> int:
    runnable, written = [], 0
    for request in claimed:
        if request.attempts > rt.settings.max_attempts:  # a poison request ends as an error line
            written += _fail(rt, request, "max_attempts_exceeded",
                             f"Gave up after {rt.settings.max_attempts} attempts (the worker kept failing).")
            continue
        try:
            runnable.append((request, to_generation_request(rt.engine, request.url, request.body,
                                                            rt.settings.diffusion_defaults)))
        except ValueError as exc:
            code, param = error_code_and_param(exc, request.url)
            written += _fail(rt, request, code, f"{param}: {exc}")
    return written + _generate_and_store(rt, chunk_id, model, runnable)


def _generate_and_store(rt: Runtime, chunk_id: int, model: str, runnable: list) -> int:
    """Stream the engine's results (rows finish at different times under continuous batching) and
    hand them to the writer thread a batch-size group at a time, so storing overlaps generation."""
    size, stores, finished, pending = rt.settings.max_batch_size, [], set(), []
    if not runnable:
        return 0
    try:
        results = rt.engine.stream([g for _, g in runnable])
        for index, result in results:
            pending.append((runnable[index], result))
            finished.add(index)
            if len(pending) == size or len(finished) == len(runnable):
                group, group_results = [g for g, _ in pending], [r for _, r in pending]
                stores.append(rt.writer.submit(_store, rt, model, group, group_results))
                pending = []
                still_running = _batch_status(rt, runnable[0][0].batch_id) == BatchStatus.in_progress
                if len(finished) < len(runnable) and not still_running:
                    results.close()  # cancelled or expired: finalize closes what is left
                    _release(rt, [r for i, (r, _) in enumerate(runnable) if i not in finished])
                    break
    except Exception:
        # Unexpected engine failure (out of memory, a bad kernel): hand back what is not finished
        # and retry soon; the attempt count in the database bounds the retries.
        unstored = [r for i, (r, _) in enumerate(runnable) if i not in finished]
        unstored += [g[0] for g, _ in pending]
        _release(rt, unstored)
        rt.celery.send_task(RUN_CHUNK, args=(chunk_id,), queue=rt.model_queue, countdown=5)
        raise
    finally:
        written = sum(store.result() for store in stores)
    return written


def _store(rt: Runtime, model: str, group, results) -> int:
    outcomes = [repo.outcome(request.id, RequestStatus.succeeded, now(),
                             response=response_body(request.url, model, result),
                             prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens,
                             forward_passes=result.forward_passes)
                for (request, _), result in zip(group, results)]
    with rt.session() as session, session.begin():
        return repo.finish_requests(session, batch_id=group[0][0].batch_id, outcomes=outcomes)


def _fail(rt: Runtime, request: Request, code: str, message: str) -> int:
    with rt.session() as session, session.begin():
        return repo.finish_requests(session, batch_id=request.batch_id, outcomes=[
            repo.outcome(request.id, RequestStatus.failed, now(), error_code=code, error_message=message)])


def _release(rt: Runtime, requests: list[Request]) -> None:
    with rt.session() as session, session.begin():
        repo.release_requests(session, request_ids=[r.id for r in requests], worker=rt.name)


def _batch_status(rt: Runtime, batch_id: str) -> BatchStatus | None:
    with rt.session() as session:
        batch = repo.get_batch(session, batch_id=batch_id)
        expired = batch is not None and now() >= batch.expires_at
        return BatchStatus.expired if expired else (batch.status if batch else None)
