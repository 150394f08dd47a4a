"""The worker's Celery app (`celery -A worker.celery_app ...`): the shared client config plus tasks and beat."""

from __future__ import annotations

from celery.signals import worker_init

from common import metrics
from common.queue import FIRE_SCHEDULES, RECONCILE, make_celery
from common.settings import CONTROL_QUEUE, Settings
from worker import retention, webhooks

settings = Settings()
app = make_celery(settings)
app.conf.beat_schedule = {
    "reconcile": {"task": RECONCILE, "schedule": float(settings.reconcile_every_s),
                  "options": {"queue": CONTROL_QUEUE}},
    "retention": {"task": retention.TASK, "schedule": float(settings.retention_every_s),
                  "options": {"queue": CONTROL_QUEUE}},
    # Expires unsent after one period: runs never pile up behind a busy control queue.
    "webhooks": {"task": webhooks.TASK, "schedule": settings.webhook_every_s,
                 "options": {"queue": CONTROL_QUEUE, "expires": settings.webhook_every_s}},
    # A due run is claimed in the database, so a second beat process fires nothing twice.
    "schedules": {"task": FIRE_SCHEDULES, "schedule": settings.schedules_every_s,
                  "options": {"queue": CONTROL_QUEUE, "expires": settings.schedules_every_s}},
}



def _serve_metrics(**_kwargs: object) -> None:
    metrics.serve_port(settings)  # DIFFBATCH_METRICS_PORT: this worker or control process's own scrape port


worker_init.connect(_serve_metrics)

import worker.tasks  # noqa: E402,F401 - registers the tasks on this app
