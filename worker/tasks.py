"""Celery tasks: thin wrappers that take ids, call the pipeline with this process's runtime."""

from __future__ import annotations

from celery import shared_task

from common.queue import FINALIZE_BATCH, FIRE_SCHEDULES, RECONCILE, RUN_CHUNK, VALIDATE_BATCH
from worker import finalize, pipeline, retention, schedules, validation, webhooks
from worker import reconcile as reconciler
from worker.runtime import get_runtime


@shared_task(name=VALIDATE_BATCH)
def validate_batch(batch_id: str) -> None:
    validation.validate_batch(get_runtime(), batch_id)


@shared_task(name=RUN_CHUNK)
def run_chunk(chunk_id: int) -> int:
    return pipeline.run_chunk(get_runtime(), chunk_id)


@shared_task(name=FINALIZE_BATCH)
def finalize_batch(batch_id: str) -> bool:
    return finalize.maybe_finalize(get_runtime(), batch_id)


@shared_task(name=RECONCILE)
def reconcile() -> dict[str, int]:
    return reconciler.reconcile(get_runtime())


@shared_task(name=retention.TASK)
def purge_expired() -> dict[str, int]:
    return retention.purge(get_runtime())


@shared_task(name=webhooks.TASK)
def send_webhooks() -> dict[str, int]:
    return webhooks.send_due(get_runtime())


@shared_task(name=FIRE_SCHEDULES)
def fire_schedules() -> dict[str, dict[str, str]]:
    return schedules.fire_due(get_runtime()).as_dict()
