"""A run fed from several chunks: the engine's batch stays full across chunk boundaries.

The engine asks for more requests when nothing waits and its batch has a free row
(GenerationEngine.stream's ``more``); a ChunkFeed answers by leasing the next best chunk of the run's
queue (repo.lease_best_chunk, so priorities hold), claiming its requests and converting them (a request
the engine refuses fails alone). It holds at most ``DIFFBATCH_FEED_AHEAD_CHUNKS`` chunks beyond the
first, so a worker that dies strands little, and it only takes chunks that never failed, nor feeds a run
whose first chunk failed before: a chunk under suspicion runs alone, so a poison request is still split
off and blamed alone (docs/architecture.md, "A poison request ends alone").
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy.orm import Session

from common.ids import now
from db import repo
from db.models import Chunk, Request, RequestStatus
from worker.heartbeat import Heartbeat
from worker.responses import error_code_and_param, to_generation_request
from worker.runtime import Runtime

if TYPE_CHECKING:  # the engine's types; importing this module loads no torch
    from worker.engine.params import GenerationRequest

    Runnable = tuple[Request, GenerationRequest]  # a claimed request and what the engine runs for it

log = logging.getLogger("diffbatch.worker")
# After a look for a further chunk found none, the next waits this long: the engine asks every round.
IDLE_LOOK_S = 1.0


@dataclass
class Lease:
    chunk_id: int  # the chunk leased: the doorbell's own, or a better one of its queue
    batch_id: str
    model: str | None
    claimed: list[Request]
    queue: str = ""
    unfailed: bool = True  # no run of the chunk failed before


def claim(rt: Runtime, session: Session, chunk: Chunk, t: int) -> Lease:
    """Claim the open requests of a chunk this worker has just leased (its batch was in progress)."""
    batch = repo.get_batch(session, batch_id=chunk.batch_id)
    assert batch is not None  # a chunk's batch is deleted with it
    repo.beat_worker(session, name=rt.name, now=t)  # the lease holds from this beat on
    claimed = repo.claim_requests(session, chunk_id=chunk.id, worker=rt.name, now=t)
    if not claimed:
        repo.end_lease(session, chunk_id=chunk.id, worker=rt.name)
    return Lease(chunk.id, batch.id, batch.model, claimed, chunk.queue, chunk.failures == 0)


def convert(rt: Runtime, claimed: list[Request]) -> tuple[list[Runnable], int]:
    """What the engine runs for each claimed request; one it refuses is written as its error line
    alone. Returns the runnable ones and how many error lines were written."""
    runnable, written = [], 0
    for request in claimed:
        try:
            runnable.append((request, to_generation_request(rt.engine, request.url, request.body,
                                                            rt.settings.diffusion_defaults)))
        except ValueError as exc:
            code, param = error_code_and_param(exc, request.url)
            written += fail(rt, request, code, f"{param}: {exc}")
    return runnable, written


def fail(rt: Runtime, request: Request, code: str, message: str) -> int:
    with rt.session() as session, session.begin():
        return repo.finish_requests(session, batch_id=request.batch_id, outcomes=[
            repo.outcome(request.id, RequestStatus.failed, now(), error_code=code, error_message=message)])


class ChunkFeed:
    """The chunks one engine run holds, and which chunk each of its rows (engine indices) belongs to.
    Called by the engine (``more``) with its free rows; returns the next chunk's requests, or []."""

    def __init__(self, rt: Runtime, first: Lease, runnable: list[Runnable], beat: Heartbeat) -> None:
        self.rt, self.beat, self.queue = rt, beat, first.queue
        self.runnable = list(runnable)
        self.chunk_of = [first.chunk_id] * len(runnable)
        self.leases = {first.chunk_id: first}  # held now
        self.running = {first.chunk_id: len(runnable)}  # rows the engine has not finished, per held chunk
        self.touched = {first.batch_id}  # every batch whose chunk this run held
        self.finalizing: set[str] = set()  # batches the run has asked to finalize already
        self.written = 0  # error lines of fed requests the engine refused
        self.ahead = rt.settings.feed_ahead_chunks if first.unfailed else 0
        self._look_after = 0.0
        self._lock = threading.Lock()  # the writer thread releases chunks while the engine's loop runs

    def __call__(self, free: int) -> list[GenerationRequest]:
        if len(self.leases) > self.ahead or time.monotonic() < self._look_after:
            return []
        lease = self._lease_next()
        if lease is None:
            self._look_after = time.monotonic() + IDLE_LOOK_S
            return []
        runnable, written = convert(self.rt, lease.claimed)
        self.written += written
        self.touched.add(lease.batch_id)
        if not runnable:  # every request of the chunk was refused: nothing of it runs
            self.release(lease.chunk_id)
            return []
        log.info("feeding chunk %s (%d rows) into the running batch", lease.chunk_id, len(runnable))
        self.runnable += runnable
        self.chunk_of += [lease.chunk_id] * len(runnable)
        with self._lock:
            self.running[lease.chunk_id] = len(runnable)
        return [g for _, g in runnable]

    def _lease_next(self) -> Lease | None:
        t = now()
        with self.rt.session() as session, session.begin():
            chunk = repo.lease_best_chunk(session, queue=self.queue, worker=self.rt.name, now=t, unfailed=True)
            lease = None if chunk is None else claim(self.rt, session, chunk, t)
        if lease is None or not lease.claimed:
            return None
        with self._lock:
            self.leases[lease.chunk_id] = lease
        self.beat.hold(lease.chunk_id)
        return lease

    def held(self) -> dict[int, Lease]:
        """The chunks held now, by id."""
        with self._lock:
            return dict(self.leases)

    def finished(self, index: int) -> bool:
        """Row ``index`` finished; True if it was its chunk's last running row."""
        chunk_id = self.chunk_of[index]
        with self._lock:
            self.running[chunk_id] -= 1
            return self.running[chunk_id] == 0

    def release(self, chunk_id: int) -> bool:
        """Stop holding a chunk: its heartbeat stops, its lease ends and its still-running requests go
        back to pending (none once its results are stored). True if this worker still held it."""
        with self._lock:
            lease = self.leases.pop(chunk_id, None)
            self.running.pop(chunk_id, None)
        if lease is None:
            return False
        self.beat.drop(chunk_id)
        with self.rt.session() as session, session.begin():
            return repo.end_lease(session, chunk_id=chunk_id, worker=self.rt.name)

    def release_all(self) -> list[Chunk]:
        """Hand back every chunk still held (a run stopped early); returns those with pending requests
        whose batch still runs, for their doorbells to be rung again (a fed chunk's own doorbell may
        already have been answered)."""
        released = [chunk_id for chunk_id in list(self.leases) if self.release(chunk_id)]
        if not released:
            return []
        with self.rt.session() as session:
            return repo.chunks_to_resume(session, chunk_ids=released)
