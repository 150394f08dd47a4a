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
    """While a run goes on: beat the worker's row and renew the lease of every chunk it holds every
    ``heartbeat_s``, and report the tokens its running rows have committed (Chunk.tokens_done) every
    PROGRESS_S, on the first chunk it holds (a run fed from several chunks counts its rows there: the
    engine counts them together). ``lost`` is set once a held lease is gone (the reconciler took this
    worker for dead), so the run stops. ``hold``/``drop``: a run fed from further chunks (worker/feed.py)."""

    def __init__(self, rt: Runtime, chunk_id: int) -> None:
        self.rt = rt
        self.lost = threading.Event()
        self._held = [chunk_id]
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="diffbatch-heartbeat", daemon=True)

    @property
    def chunk_id(self) -> int:
        """The chunk the run started with (the one whose lease the run began under)."""
        return self.held[0] if self.held else -1

    @property
    def held(self) -> list[int]:
        with self._lock:
            return list(self._held)

    def hold(self, chunk_id: int) -> None:
        with self._lock:
            self._held.append(chunk_id)

    def drop(self, chunk_id: int) -> None:
        """Stop renewing a chunk (before its lease is ended) and zero its progress."""
        with self._lock:
            if chunk_id not in self._held:
                return
            self._held.remove(chunk_id)
        self._reset(chunk_id)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()
        for chunk_id in self.held:
            self._reset(chunk_id)

    def _reset(self, chunk_id: int) -> None:
        try:  # the finished rows' tokens now count as their requests' own; a re-run starts from 0
            with self.rt.session() as session, session.begin():
                report_chunk_tokens(session, chunk_id=chunk_id, worker=self.rt.name, tokens=0)
        except Exception:  # noqa: BLE001 - only progress: a released chunk's count is not read
            log.warning("could not reset chunk %s's progress", chunk_id, exc_info=True)

    def _run(self) -> None:
        # Progress is written every PROGRESS_S (a cheap update), the leases renewed every heartbeat_s.
        tick = min(PROGRESS_S, self.rt.settings.heartbeat_s)
        last_beat, reported = time.monotonic(), 0
        while not self._stop.wait(tick):
            beat = time.monotonic() - last_beat >= self.rt.settings.heartbeat_s - tick / 2
            tokens, held = tokens_in_flight(self.rt), self.held
            if not held or (not beat and tokens == reported):
                continue
            lost: list[int] = []
            try:
                with self.rt.session() as session, session.begin():
                    report_chunk_tokens(session, chunk_id=held[0], worker=self.rt.name, tokens=tokens)
                    if beat:
                        repo.beat_worker(session, name=self.rt.name, now=now())
                        lost = [c for c in held
                                if not repo.renew_lease(session, chunk_id=c, worker=self.rt.name, now=now())]
            except Exception:  # noqa: BLE001 - the next beat tries again; missing three loses the lease
                log.warning("heartbeat failed", exc_info=True)
                continue
            reported = tokens
            if not beat:
                continue
            last_beat = time.monotonic()
            lost = [c for c in lost if c in self.held]  # a chunk the run released meanwhile is not lost
            if lost:
                log.warning("lost the lease on chunks %s (taken for dead); stopping the run", lost)
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
