"""The workers known to the database, as `GET /v1/workers` and the status page show them."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.models import Worker


def worker_rows(session: Session, *, now: int, dead_after_s: int) -> list[dict[str, Any]]:
    """Every worker row, by model then name: its model and queue, the seconds since its last heartbeat,
    and ``live`` (it beat within ``dead_after_s``)."""
    rows = session.scalars(select(Worker).order_by(Worker.model, Worker.name))
    return [{"name": row.name, "model": row.model, "queue": row.queue, "started_at": row.started_at,
             "heartbeat_at": row.heartbeat_at, "heartbeat_age_s": max(0, now - row.heartbeat_at),
             "live": now - row.heartbeat_at <= dead_after_s} for row in rows]
