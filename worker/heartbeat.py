"""Heartbeats: the worker's `workers` row, which is what keeps its chunk leases (db/repo.py)."""

from __future__ import annotations

import logging
import threading
import time

from common.ids import now
from db import repo
from db.progress import report_chunk_tokens
from worker.runtime import Runtime

log = logging.getLogger("diffbatch.worker")
PROGRESS_S = 2.0  # how often a running chunk reports its tokens: the progress bar moves this often


class Heartbeat:
    """While a chunk runs: beat the worker's row and renew the chunk's lease every ``heartbeat_s``, and
    report the tokens its running rows have committed (Chunk.tokens_done) every PROGRESS_S.
    ``lost`` is set once the lease is gone (the reconciler took this worker for dead), so the run stops."""

    def __init__(self, rt: Runtime, chunk_id: int) -> None:
        self.rt, self.chunk_id = rt, chunk_id
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="diffbatch-heartbeat", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()
        try:  # the finished rows' tokens now count as their requests' own; a re-run starts from 0
            with self.rt.session() as session, session.begin():
                report_chunk_tokens(session, chunk_id=self.chunk_id, worker=self.rt.name, tokens=0)
        except Exception:  # noqa: BLE001 - only progress: a released chunk's count is not read
            log.warning("could not reset chunk %s's progress", self.chunk_id, exc_info=True)

    def _run(self) -> None:
        # Progress is written every PROGRESS_S (a cheap update), the lease renewed every heartbeat_s.
        tick = min(PROGRESS_S, self.rt.settings.heartbeat_s)
        last_beat, reported = time.monotonic(), 0
        while not self._stop.wait(tick):
            beat = time.monotonic() - last_beat >= self.rt.settings.heartbeat_s - tick / 2
            tokens, held = tokens_in_flight(self.rt), True
            if not beat and tokens == reported:
                continue
            try:
                with self.rt.session() as session, session.begin():
                    report_chunk_tokens(session, chunk_id=self.chunk_id, worker=self.rt.name, tokens=tokens)
                    if beat:
                        repo.beat_worker(session, name=self.rt.name, now=now())
                        held = repo.renew_lease(session, chunk_id=self.chunk_id, worker=self.rt.name, now=now())
            except Exception:  # noqa: BLE001 - the next beat tries again; missing three loses the lease
                log.warning("heartbeat failed", exc_info=True)
                continue
            reported = tokens
            if not beat:
                continue
            last_beat = time.monotonic()
            if not held:
                log.warning("lost the lease on chunk %s (taken for dead); stopping it", self.chunk_id)
                self.lost.set()
                return


def tokens_in_flight(rt: Runtime) -> int:
    """The engine's count of tokens its running rows have committed."""
    return rt.engine.tokens_in_flight


def beat_worker_row(rt: Runtime) -> None:
    """Run forever in a daemon thread: keeps this worker alive in the database between chunks too."""
    while True:
        time.sleep(rt.settings.heartbeat_s)
        try:
            with rt.session() as session, session.begin():
                repo.beat_worker(session, name=rt.name, now=now())
        except Exception:  # noqa: BLE001 - the next beat tries again
            log.warning("worker heartbeat failed", exc_info=True)
