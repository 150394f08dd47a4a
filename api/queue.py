"""Enqueue work by task name: the API never imports the worker's code (docs/architecture.md)."""

from __future__ import annotations

import logging

from celery import Celery

from common.queue import FINALIZE_BATCH, VALIDATE_BATCH, make_celery
from common.settings import CONTROL_QUEUE, Settings

log = logging.getLogger("diffbatch.api")


class Queue:
    def __init__(self, settings: Settings, celery: Celery | None = None) -> None:
        self.celery = celery or make_celery(settings)

    def _send(self, name: str, *args: str) -> bool:
        # The row is already committed: if the broker is down, the reconciler sends this again later,
        # so the request succeeds instead of failing on a doorbell.
        try:
            self.celery.send_task(name, args=args, queue=CONTROL_QUEUE, retry=True,
                                  retry_policy={"max_retries": 2, "interval_start": 0.2})
            return True
        except Exception:  # noqa: BLE001 - any broker failure is recoverable by the reconciler
            log.warning("could not enqueue %s%r; the reconciler will retry", name, args, exc_info=True)
            return False

    def validate_batch(self, batch_id: str) -> bool:
        return self._send(VALIDATE_BATCH, batch_id)

    def finalize_batch(self, batch_id: str) -> bool:
        return self._send(FINALIZE_BATCH, batch_id)

    def ping(self) -> None:
        with self.celery.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
