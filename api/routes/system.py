"""/v1/models (what live workers serve), /healthz (the process is up), /readyz (DB and broker reachable)."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text

from api.auth import CurrentTenant
from api.deps import QueueDep, SessionDep, SettingsDep
from api.errors import error_response, error_responses
from common.ids import now
from db import repo

log = logging.getLogger("diffbatch.api")
router = APIRouter()


@router.get("/v1/models", response_model=None, responses=error_responses(400, 401))
def list_models(session: SessionDep, settings: SettingsDep, _caller: CurrentTenant) -> dict[str, Any]:
    live = repo.known_workers(session, since=now() - settings.stale_after_s)
    models: dict[str, dict[str, Any]] = {}
    for worker in live:
        models.setdefault(worker.model, {"id": worker.model, "object": "model",
                                         "created": worker.started_at, "owned_by": "diffbatch"})
    return {"object": "list", "data": list(models.values())}


@router.get("/healthz", response_model=None, responses=error_responses(400))
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", response_model=None, responses=error_responses(400, 503))
def readyz(session: SessionDep, queue: QueueDep) -> dict[str, str] | JSONResponse:
    """Ready when the database and the broker answer; a 503 names the one that does not (details: the log)."""
    down = []
    try:
        session.execute(text("SELECT 1"))
    except Exception:  # noqa: BLE001 - report, do not crash the probe
        log.warning("readyz: the database is unreachable", exc_info=True)
        down.append("database")
    try:
        queue.ping()
    except Exception:  # noqa: BLE001
        log.warning("readyz: the broker is unreachable", exc_info=True)
        down.append("broker")
    if down:
        return error_response(503, f"not ready: {' and '.join(down)} unreachable",
                              code="dependency_unavailable")
    return {"status": "ready"}
