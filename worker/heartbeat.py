"""Heartbeats: the worker's `workers` row, which is what keeps its chunk leases (db/repo.py)."""

from __future__ import annotations

import logging
import threading
import time

from common.ids import now
from db import repo

log = logging.getLogger("diffbatch.worker")


class Heartbeat:
    """While a chunk runs: beat the worker's row and renew the chunk's lease every ``heartbeat_s``.
    ``lost`` is set once the lease is gone (the reconciler took this worker for dead), so the run stops."""

    def __init__(self, rt, chunk_id: int) -> None:
        self.rt, self.chunk_id = rt, chunk_id
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="diffbatch-heartbeat", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *_exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.rt.settings.heartbeat_s):
            try:
                with self.rt.session() as session, session.begin():
                    repo.beat_worker(session, name=self.rt.name, now=now())
                    held = repo.renew_lease(session, chunk_id=self.chunk_id, worker=self.rt.name, now=now())
            except Exception:  # noqa: BLE001 - the next beat tries again; missing three loses the lease
                log.warning("heartbeat failed", exc_info=True)
                continue
            if not held:
                log.warning("lost the lease on chunk %s (taken for dead); stopping it", self.chunk_id)
                self.lost.set()
                return


def beat_worker_row(rt) -> None:
    """Run forever in a daemon thread: keeps this worker alive in the database between chunks too."""
    while True:
        time.sleep(rt.settings.heartbeat_s)
        try:
            with rt.session() as session, session.begin():
                repo.beat_worker(session, name=rt.name, now=now())
        except Exception:  # noqa: BLE001 - the next beat tries again
            log.warning("worker heartbeat failed", exc_info=True)
