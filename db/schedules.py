"""Schedules across tenants, for the firing task: which are due, claiming a run, recording it.

The claim is one conditional UPDATE that moves next_run_at on from the value the caller read: of two
processes firing the same due run, exactly one sees its update hit a row, and only that one creates it.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from db.models import Schedule
from db.session import rows_changed


def add_schedule(session: Session, **fields: Any) -> Schedule:
    row = Schedule(**fields)
    session.add(row)
    session.flush()
    return row


def due_schedules(session: Session, *, now: int, limit: int) -> list[Schedule]:
    """Schedules not paused whose next run is due at ``now``, the longest overdue first."""
    return list(session.scalars(select(Schedule).where(Schedule.paused.is_(False), Schedule.next_run_at <= now)
                                .order_by(Schedule.next_run_at, Schedule.id).limit(limit)))


def claim_run(session: Session, *, schedule_id: str, due: int, next_run_at: int) -> bool:
    """Move a due run's schedule on to ``next_run_at`` if it still waits for the run due at ``due`` and is
    not paused; True for the one caller that did (it alone creates the run's batch)."""
    return rows_changed(session, update(Schedule)
                        .where(Schedule.id == schedule_id, Schedule.next_run_at == due, Schedule.paused.is_(False))
                        .values(next_run_at=next_run_at)) == 1


def record_run(session: Session, *, schedule_id: str, run_at: int, batch_id: str) -> None:
    session.execute(update(Schedule).where(Schedule.id == schedule_id)
                    .values(last_run_at=run_at, last_batch_id=batch_id))
