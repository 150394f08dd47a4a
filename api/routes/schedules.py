"""/v1/schedules (diffbatch extension): a cron expression in a time zone and a batch template.

Beat fires due schedules from the database (worker/schedules.py), so a schedule created here runs without
a restart; each run is a normal batch with `schedule_id` set (`GET /v1/batches?schedule_id=`).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel, ConfigDict, Field

from api.auth import ScopeDep, authenticate
from api.deps import SettingsDep
from api.errors import ApiError, error_responses
from api.quotas import batch_limits
from api.routes import batches
from api.schemas import CreateBatch, StorableText, page
from common.cron import CronError, check_cron, next_run, zone
from common.ids import new_id, now
from db.batches_create import Refused, input_file
from db.models import Schedule
from db.schedules import add_schedule
from db.scoped import TenantScope

router = APIRouter(prefix="/v1/schedules", dependencies=[Depends(authenticate)])


class CreateSchedule(BaseModel):
    model_config = ConfigDict(extra="forbid")

    cron: StorableText = Field(min_length=1, max_length=128, examples=["0 9 * * *"])
    timezone: StorableText = Field("UTC", min_length=1, max_length=64, examples=["Europe/Berlin"])
    template: CreateBatch  # the body of each run's POST /v1/batches


def schedule_object(row: Schedule) -> dict[str, Any]:
    return {"id": row.id, "object": "schedule", "cron": row.cron, "timezone": row.timezone,
            "template": row.template, "paused": row.paused, "next_run_at": row.next_run_at,
            "last_run_at": row.last_run_at, "last_batch_id": row.last_batch_id, "created_at": row.created_at}


@router.post("", response_model=None, responses=error_responses(400, 401, 404))
def create_schedule(scope: ScopeDep, settings: SettingsDep, body: CreateSchedule) -> dict[str, Any]:
    try:
        check_cron(body.cron)
    except CronError as exc:
        raise ApiError(400, f"cron: {exc}", param="cron", code="invalid_cron") from exc
    try:
        zone(body.timezone)
    except CronError as exc:
        raise ApiError(400, f"timezone: {exc}", param="timezone", code="invalid_timezone") from exc
    try:
        input_file(scope, body.template.input_file_id, batch_limits(settings), param="template.input_file_id")
    except Refused as exc:
        raise ApiError(exc.status, exc.message, param=exc.param, code=exc.code) from exc
    template = body.template.model_dump(exclude_none=True)
    try:  # stored resolved: each run's batch takes the template's webhook_url as it is
        if webhook_url := batches.webhook_url_of(body.template, settings):
            template["webhook_url"] = webhook_url
    except ApiError as exc:
        raise ApiError(exc.status, f"template.{exc.message}", param=f"template.{exc.param}", code=exc.code) from exc
    created = now()
    row = add_schedule(scope.session, id=new_id("sched_"), tenant_id=scope.tenant_id, cron=body.cron,
                       timezone=body.timezone, template=template, paused=False,
                       next_run_at=next_run(body.cron, body.timezone, after=created), created_at=created)
    scope.session.commit()
    return schedule_object(row)


@router.get("", response_model=None, responses=error_responses(400, 401))
def list_schedules(scope: ScopeDep, after: str | None = None,
                   limit: Annotated[int, Query(ge=1, le=100)] = 20) -> dict[str, Any]:
    if after and scope.get_schedule(after) is None:  # else the listing would start over
        raise ApiError(400, f"after: no schedule {after!r}; list again without it", param="after")
    rows = scope.list_schedules(after=after, limit=limit + 1)
    return page([schedule_object(r) for r in rows[:limit]], has_more=len(rows) > limit)


def _get(scope: TenantScope, schedule_id: str) -> Schedule:
    row = scope.get_schedule(schedule_id)
    if row is None:
        raise ApiError(404, f"No such Schedule object: {schedule_id}", param="schedule_id",
                       code="schedule_not_found")
    return row


@router.get("/{schedule_id}", response_model=None, responses=error_responses(400, 401, 404))
def get_schedule(scope: ScopeDep, schedule_id: str) -> dict[str, Any]:
    return schedule_object(_get(scope, schedule_id))


@router.post("/{schedule_id}/pause", response_model=None, responses=error_responses(400, 401, 404))
def pause_schedule(scope: ScopeDep, schedule_id: str) -> dict[str, Any]:
    row = _get(scope, schedule_id)
    row.paused = True
    scope.session.commit()
    return schedule_object(row)


@router.post("/{schedule_id}/resume", response_model=None, responses=error_responses(400, 401, 404))
def resume_schedule(scope: ScopeDep, schedule_id: str) -> dict[str, Any]:
    """Runs due while paused are skipped: the next one is the first due after now."""
    row = _get(scope, schedule_id)
    if row.paused:
        row.paused, row.next_run_at = False, next_run(row.cron, row.timezone, after=now())
        scope.session.commit()
    return schedule_object(row)


@router.delete("/{schedule_id}", response_model=None, responses=error_responses(400, 401, 404))
def delete_schedule(scope: ScopeDep, schedule_id: str) -> dict[str, Any]:
    """The schedule's batches stay."""
    _get(scope, schedule_id)
    scope.delete_schedule(schedule_id)
    scope.session.commit()
    return {"id": schedule_id, "object": "schedule.deleted", "deleted": True}
