"""/v1/workers (diffbatch extension): the workers, their models and queues, and how long since each beat."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from api.auth import CurrentTenant
from api.deps import SessionDep, SettingsDep
from api.errors import error_responses
from common.ids import now
from db.workers import worker_rows

router = APIRouter()


@router.get("/v1/workers", response_model=None, responses=error_responses(400, 401))
def list_workers(session: SessionDep, settings: SettingsDep, _caller: CurrentTenant) -> dict[str, Any]:
    """Every worker that has registered; ``live``: it beat within DIFFBATCH_WORKER_DEAD_AFTER_S."""
    rows = worker_rows(session, now=now(), dead_after_s=settings.worker_dead_after_s)
    return {"object": "list", "data": [{"object": "worker", **row} for row in rows]}
