"""Firing schedules, run by beat every few seconds: each due run becomes a normal batch.

Safe with two beat processes: a run is claimed by a conditional update of the schedule's next_run_at
(db/schedules.py), in the transaction that creates its batch, so it fires once or not at all. The next
time is computed from now, not from the missed due time: runs missed while nothing ran become one run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from common.cron import CronError, next_run
from common.ids import new_id
from common.ids import now as clock
from common.queue import VALIDATE_BATCH
from common.settings import CONTROL_QUEUE, Settings
from db import schedules
from db.batches_create import BatchSpec, Limits, Refused, create_batch
from db.models import Schedule
from db.scoped import TenantScope
from worker.runtime import Runtime

log = logging.getLogger("diffbatch.worker")
PAGE = 100


@dataclass
class FireReport:
    """What one firing pass did: batches created, and the schedules whose due run was skipped, with why."""

    fired: dict[str, str] = field(default_factory=dict)  # schedule id -> batch id
    skipped: dict[str, str] = field(default_factory=dict)  # schedule id -> error message

    def as_dict(self) -> dict[str, Any]:
        return {"fired": self.fired, "skipped": self.skipped}


def fire_due(rt: Runtime, *, now: int | None = None) -> FireReport:
    """Create the batch of every schedule due at ``now`` (default: the clock) and send its validation."""
    t = clock() if now is None else now
    report = FireReport()
    with rt.session() as session:
        due = [row.id for row in schedules.due_schedules(session, now=t, limit=PAGE)]
    for schedule_id in due:
        _fire(rt, schedule_id, t, report)
    for batch_id in report.fired.values():
        _send_validation(rt, batch_id)
    if report.fired or report.skipped:
        log.info("schedules: fired %s, skipped %s", report.fired, report.skipped)
    return report


def _fire(rt: Runtime, schedule_id: str, t: int, report: FireReport) -> None:
    with rt.session() as session, session.begin():
        row = session.get(Schedule, schedule_id)
        if row is None or row.paused or row.next_run_at > t:  # deleted, paused or fired meanwhile
            return
        try:
            following = next_run(row.cron, row.timezone, after=t)
        except CronError as exc:  # checked at create; only a time zone gone from this host's tz database
            report.skipped[row.id] = str(exc)
            return
        if not schedules.claim_run(session, schedule_id=row.id, due=row.next_run_at, next_run_at=following):
            return  # another process fired this run
        try:
            batch = create_batch(TenantScope(session, row.tenant_id), _spec(row), _limits(rt.settings),
                                 batch_id=new_id("batch_"), now=t)
        except Refused as exc:
            # The claim commits: a run that cannot be created (input file deleted, quota reached) is
            # skipped, not retried at every beat.
            log.warning("schedule %s: run due at %s skipped: %s", row.id, row.next_run_at, exc.message)
            report.skipped[row.id] = exc.message
            return
        schedules.record_run(session, schedule_id=row.id, run_at=t, batch_id=batch.id)
        report.fired[row.id] = batch.id


def _spec(row: Schedule) -> BatchSpec:
    """The template (a POST /v1/batches body) as the batch to create."""
    template = row.template
    expiry = template.get("output_expires_after") or {}
    return BatchSpec(input_file_id=template["input_file_id"], endpoint=template["endpoint"],
                     completion_window=template.get("completion_window", "24h"), metadata=template.get("metadata"),
                     output_expires_after_s=expiry.get("seconds"), webhook_url=template.get("webhook_url"),
                     schedule_id=row.id, priority=template.get("priority") or 0)


def _limits(settings: Settings) -> Limits:
    return Limits(max_batch_requests=settings.max_batch_requests, max_queued_requests=settings.max_queued_requests,
                  max_queued_tokens=settings.max_queued_tokens)


def _send_validation(rt: Runtime, batch_id: str) -> None:
    try:
        rt.celery.send_task(VALIDATE_BATCH, args=(batch_id,), queue=CONTROL_QUEUE)
    except Exception:  # noqa: BLE001 - the batch is committed; the reconciler sends a stale validation again
        log.warning("could not enqueue the validation of %s; the reconciler will retry", batch_id, exc_info=True)
