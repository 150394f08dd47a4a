"""Queue depth per model, read from the rows (every tenant's): what the status page shows as the backlog."""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from db.models import Batch, BatchStatus, Request, RequestStatus

# The statuses whose stored requests may still run; a validating batch's requests are not all stored yet.
_RUNNABLE = (BatchStatus.in_progress, BatchStatus.cancelling, BatchStatus.finalizing)


def requests_by_model(session: Session) -> dict[str, dict[str, int]]:
    """{model: {"pending": waiting requests, "running": requests a worker holds}}, models with none left out."""
    query = (select(Batch.model, Request.status, func.count())
             .join(Request, Request.batch_id == Batch.id)
             .where(Batch.status.in_(_RUNNABLE), Batch.model.is_not(None),
                    Request.status.in_((RequestStatus.pending, RequestStatus.running)))
             .group_by(Batch.model, Request.status))
    depth: dict[str, dict[str, int]] = {}
    for model, status, count in session.execute(query):
        depth.setdefault(str(model), {"pending": 0, "running": 0})[RequestStatus(status).value] = int(count)
    return depth
