"""/v1/models (what live workers serve), /healthz (the process is up), /readyz (DB and broker reachable)."""

from __future__ import annotations

from fastapi import APIRouter
from sqlalchemy import text

from api.deps import QueueDep, SessionDep, SettingsDep
from api.errors import error_response
from common.ids import now
from db import repo

router = APIRouter()


@router.get("/v1/models")
def list_models(session: SessionDep, settings: SettingsDep):
    live = repo.known_workers(session, since=now() - settings.stale_after_s)
    models = {}
    for worker in live:
        models.setdefault(worker.model, {"id": worker.model, "object": "model",
                                         "created": worker.started_at, "owned_by": "diffbatch"})
    return {"object": "list", "data": list(models.values())}


@router.get("/healthz")
def healthz():
    return {"status": "ok"}


@router.get("/readyz")
def readyz(session: SessionDep, queue: QueueDep):
    problems = {}
    try:
        session.execute(text("SELECT 1"))
    except Exception as exc:  # noqa: BLE001 - report, do not crash the probe
        problems["database"] = str(exc)
    try:
        queue.ping()
    except Exception as exc:  # noqa: BLE001
        problems["broker"] = str(exc)
    if problems:
        return error_response(503, "not ready: " + "; ".join(f"{k}: {v}" for k, v in problems.items()))
    return {"status": "ready"}
