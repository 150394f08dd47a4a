"""The worker's Celery app (`celery -A worker.celery_app ...`): the shared client config plus tasks and beat."""

from __future__ import annotations

from common.queue import RECONCILE, make_celery
from common.settings import CONTROL_QUEUE, Settings
from worker import retention

settings = Settings()
app = make_celery(settings)
app.conf.beat_schedule = {
    "reconcile": {"task": RECONCILE, "schedule": float(settings.reconcile_every_s),
                  "options": {"queue": CONTROL_QUEUE}},
    "retention": {"task": retention.TASK, "schedule": float(settings.retention_every_s),
                  "options": {"queue": CONTROL_QUEUE}},
}

import worker.tasks  # noqa: E402,F401 - registers the tasks on this app
