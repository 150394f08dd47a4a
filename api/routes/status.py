"""The status page at `/` (a static page, no build step) and the JSON it polls, `GET /v1/status`.

The page is public HTML and script; the data is not: /v1/status takes the same keys as the API. A
tenant's key sees its own batches, an admin key every tenant's; workers and queue depth are the
service's and shown to every caller.
"""

from __future__ import annotations

from importlib import resources
from typing import Annotated, Any

from fastapi import APIRouter, Query
from fastapi.responses import Response

from api.auth import CurrentTenant, ReaderDep
from api.deps import SessionDep, SettingsDep
from api.errors import ApiError, error_responses
from common.ids import now
from db.backlog import requests_by_model
from db.models import Batch, BatchStatus
from db.progress import running_tokens
from db.workers import worker_rows

router = APIRouter()
RECENT_S = 24 * 3600  # finished batches stay on the page this long after their creation
STATIC = resources.files("api") / "static"
PAGES = {"status.js": "text/javascript", "status.css": "text/css"}
# Only the page's own script, styles and data: no inline script, nothing from elsewhere.
HEADERS = {"Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                                      "connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; "
                                      "frame-ancestors 'none'",
           "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}


@router.get("/", include_in_schema=False)
def status_page() -> Response:
    return Response((STATIC / "status.html").read_bytes(), media_type="text/html; charset=utf-8", headers=HEADERS)


@router.get("/static/{name}", include_in_schema=False)
def static_file(name: str) -> Response:
    if name not in PAGES:  # a fixed list: no path from the request ever reaches the file system
        raise ApiError(404, f"No such file: {name}", code="not_found")
    return Response((STATIC / name).read_bytes(), media_type=f"{PAGES[name]}; charset=utf-8", headers=HEADERS)


@router.get("/v1/status", response_model=None, responses=error_responses(400, 401))
def service_status(session: SessionDep, settings: SettingsDep, caller: CurrentTenant, reader: ReaderDep,
                   limit: Annotated[int, Query(ge=1, le=500)] = 100) -> dict[str, Any]:
    """diffbatch extension: the caller's batches (an admin key: every tenant's) that are unfinished or were
    created in the last 24 h, newest first, with progress and ETA; the workers; queue depth per model."""
    t = now()
    rows = reader.recent_batches(since=t - RECENT_S, limit=limit)
    running = running_tokens(session, [r.id for r in rows])
    return {"object": "status", "now": t, "scope": "all" if caller.admin else "tenant",
            "tenant_id": caller.tenant_id,
            "batches": [batch_progress(r, running.get(r.id, 0), t) for r in rows],
            "workers": worker_rows(session, now=t, dead_after_s=settings.worker_dead_after_s),
            "queues": [{"model": model, **depth} for model, depth in sorted(requests_by_model(session).items())]}


def batch_progress(row: Batch, running: int, t: int) -> dict[str, Any]:
    """A batch as the page draws it. ``progress`` (0..1) counts the running rows' tokens as fractions of a
    request once one has finished (the mean output of a finished one); ``eta_s`` extrapolates the rate
    since the batch started running, None until something is done."""
    done = row.completed + row.failed
    per_request = row.output_tokens / row.completed if row.completed and row.output_tokens else None
    partial = min(running / per_request, max(0, row.total - done) * 0.99) if per_request else 0.0
    progress = (done + partial) / row.total if row.total else 0.0
    eta_s = None
    if row.status == BatchStatus.in_progress and row.in_progress_at is not None and 0 < progress < 1:
        eta_s = round(max(1, t - row.in_progress_at) * (1 - progress) / progress)
    ended_at = row.completed_at or row.failed_at or row.expired_at or row.cancelled_at
    return {"id": row.id, "tenant_id": row.tenant_id, "status": row.status.value, "model": row.model,
            "endpoint": row.endpoint, "created_at": row.created_at, "in_progress_at": row.in_progress_at,
            "ended_at": ended_at,
            "request_counts": {"total": row.total, "completed": row.completed, "failed": row.failed},
            "tokens_done": row.output_tokens + running, "progress": round(progress, 4), "eta_s": eta_s}
