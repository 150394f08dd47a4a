"""Heartbeats: claimed requests' while the engine works on them, and the worker row's while it lives."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence

from common.ids import now
from db import repo

log = logging.getLogger("diffbatch.worker")


class Heartbeat:
    def __init__(self, rt, request_ids: Sequence[int]) -> None:
        self.rt, self.request_ids = rt, list(request_ids)
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
                    repo.heartbeat(session, request_ids=self.request_ids, worker=self.rt.name, now=now())
            except Exception:  # noqa: BLE001 - a missed beat only risks a harmless reclaim
                log.warning("heartbeat failed", exc_info=True)


def beat_worker_row(rt) -> None:
    """Run forever in a daemon thread: keeps this worker listed in /v1/models and validation."""
    while True:
        time.sleep(rt.settings.heartbeat_s)
        try:
            with rt.session() as session, session.begin():
                repo.beat_worker(session, name=rt.name, now=now())
        except Exception:  # noqa: BLE001 - the next beat tries again
            log.warning("worker heartbeat failed", exc_info=True)
