"""One tenant's view of files, batches and requests: the API reads them only through here.

Every query filters by the tenant, so a route cannot forget it: another tenant's object is simply not
found (a 404), and never listed. The worker, which runs for every tenant, uses db/repo.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import ColumnElement, Select, case, delete, func, select
from sqlalchemy.orm import InstrumentedAttribute, Session

from db.models import OPEN_REQUEST_STATUSES, Batch, BatchStatus, File, Request, RequestStatus, Schedule
from db.session import rows_changed


@dataclass(frozen=True)
class Usage:
    """What a tenant has queued: open requests (with the lines of batches still validating) and their tokens."""

    requests: int
    tokens: int


class TenantScope:
    def __init__(self, session: Session, tenant_id: str) -> None:
        self.session, self.tenant_id = session, tenant_id

    # ------------------------------------------------------------------------------------ files

    def get_file(self, file_id: str) -> File | None:
        return self.session.scalar(self._files().where(File.id == file_id))

    def find_file_by_idempotency_key(self, key: str) -> File | None:
        return self.session.scalar(self._files().where(File.idempotency_key == key))

    def list_files(self, *, purpose: str | None, after: str | None, limit: int,
                   newest_first: bool = True) -> list[File]:
        query = self._files()
        if purpose:
            query = query.where(File.purpose == purpose)
        if after and (cursor := self.get_file(after)) is not None:
            query = query.where(_past((File.created_at, File.id), (cursor.created_at, cursor.id), newest_first))
        order = (File.created_at.desc(), File.id.desc()) if newest_first else (File.created_at, File.id)
        return list(self.session.scalars(query.order_by(*order).limit(limit)))

    def delete_file(self, file_id: str) -> bool:
        return rows_changed(self.session, delete(File).where(File.id == file_id,
                                                             File.tenant_id == self.tenant_id)) == 1

    # ---------------------------------------------------------------------------------- batches

    def get_batch(self, batch_id: str) -> Batch | None:
        return self.session.scalar(self._batches().where(Batch.id == batch_id))

    def find_batch_by_idempotency_key(self, key: str) -> Batch | None:
        return self.session.scalar(self._batches().where(Batch.idempotency_key == key))

    def find_recent_batch(self, *, request_hash: str, since: int) -> Batch | None:
        return self.session.scalar(self._batches().where(Batch.request_hash == request_hash,
                                                         Batch.created_at >= since).order_by(Batch.created_at))

    def list_batches(self, *, after: str | None, limit: int, schedule_id: str | None = None,
                     endpoint: str | None = None, before: str | None = None) -> list[Batch]:
        """Newest first: the ``limit`` batches after the cursor ``after``, or (``before``) the ``limit`` just
        before the cursor ``before``, the farthest from it first."""
        query = self._batches()
        if schedule_id is not None:
            query = query.where(Batch.schedule_id == schedule_id)
        if endpoint is not None:
            query = query.where(Batch.endpoint == endpoint)
        if before and (cursor := self.get_batch(before)) is not None:
            query = query.where(_past((Batch.created_at, Batch.id), (cursor.created_at, cursor.id), False))
            return list(self.session.scalars(query.order_by(Batch.created_at, Batch.id).limit(limit)))[::-1]
        if after and (cursor := self.get_batch(after)) is not None:
            query = query.where(_past((Batch.created_at, Batch.id), (cursor.created_at, cursor.id), True))
        return list(self.session.scalars(query.order_by(Batch.created_at.desc(), Batch.id.desc()).limit(limit)))

    def request_counts(self, batch_ids: list[str]) -> dict[str, dict[RequestStatus, int]]:
        """How many stored requests of each of these batches have each status."""
        if not batch_ids:
            return {}
        query = (select(Request.batch_id, Request.status, func.count()).join(Batch, Batch.id == Request.batch_id)
                 .where(Batch.tenant_id == self.tenant_id, Request.batch_id.in_(batch_ids))
                 .group_by(Request.batch_id, Request.status))
        counts: dict[str, dict[RequestStatus, int]] = {}
        for batch_id, status, count in self.session.execute(query):
            counts.setdefault(batch_id, {})[status] = count
        return counts

    def delete_batch(self, batch_id: str) -> bool:
        """Delete the batch with its requests and chunks (the database cascades); its files stay."""
        return rows_changed(self.session, delete(Batch).where(Batch.id == batch_id,
                                                              Batch.tenant_id == self.tenant_id)) == 1

    def recent_batches(self, *, since: int, limit: int) -> list[Batch]:
        """The status page's batches: every unfinished one, and those created at or after ``since``."""
        return _recent(self.session, self._batches(), since=since, limit=limit)

    def get_request(self, public_id: str) -> Request | None:
        return self.session.scalar(select(Request).join(Batch, Batch.id == Request.batch_id)
                                   .where(Request.public_id == public_id, Batch.tenant_id == self.tenant_id))

    # -------------------------------------------------------------------------------- schedules

    def get_schedule(self, schedule_id: str) -> Schedule | None:
        return self.session.scalar(self._schedules().where(Schedule.id == schedule_id))

    def list_schedules(self, *, after: str | None, limit: int) -> list[Schedule]:
        query = self._schedules()
        if after and (cursor := self.get_schedule(after)) is not None:
            query = query.where(_past((Schedule.created_at, Schedule.id), (cursor.created_at, cursor.id), True))
        return list(self.session.scalars(query.order_by(Schedule.created_at.desc(), Schedule.id.desc())
                                         .limit(limit)))

    def delete_schedule(self, schedule_id: str) -> bool:
        """Delete the schedule; the batches it created stay."""
        return rows_changed(self.session, delete(Schedule).where(Schedule.id == schedule_id,
                                                                 Schedule.tenant_id == self.tenant_id)) == 1

    # ----------------------------------------------------------------------------------- quotas

    def usage(self) -> Usage:
        """Queued work: requests of the tenant's batches still pending or running, plus the lines of the
        input files of its batches still validating (their requests are not stored yet)."""
        # A batch still validating may hold some of its requests already: its line count stands for them all.
        stored = case((Batch.status == BatchStatus.validating, 0), else_=1)
        open_requests = (select(func.coalesce(func.sum(stored), 0), func.coalesce(func.sum(Request.budget_tokens), 0))
                         .join(Batch, Batch.id == Request.batch_id)
                         .where(Batch.tenant_id == self.tenant_id, Request.status.in_(OPEN_REQUEST_STATUSES)))
        count, tokens = self.session.execute(open_requests).one()
        validating = (select(func.coalesce(func.sum(File.line_count), 0))
                      .join(Batch, Batch.input_file_id == File.id)
                      .where(Batch.tenant_id == self.tenant_id, Batch.status == BatchStatus.validating))
        return Usage(requests=int(count) + int(self.session.scalar(validating)), tokens=int(tokens))

    # ---------------------------------------------------------------------------------- helpers

    def _files(self) -> Select[File]:
        return select(File).where(File.tenant_id == self.tenant_id)

    def _batches(self) -> Select[Batch]:
        return select(Batch).where(Batch.tenant_id == self.tenant_id)

    def _schedules(self) -> Select[Schedule]:
        return select(Schedule).where(Schedule.tenant_id == self.tenant_id)


class EveryTenant:
    """An admin key's read-only view of every tenant's batches (the status page). It has no lookups by
    id and no writes: those stay with TenantScope, so an admin key still acts as its own tenant there."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def recent_batches(self, *, since: int, limit: int) -> list[Batch]:
        """As TenantScope.recent_batches, across every tenant."""
        return _recent(self.session, select(Batch), since=since, limit=limit)


UNFINISHED_BATCH_STATUSES = (BatchStatus.validating, BatchStatus.in_progress, BatchStatus.finalizing,
                             BatchStatus.cancelling)


def _recent(session: Session, query: Select[Batch], *, since: int, limit: int) -> list[Batch]:
    query = query.where(Batch.status.in_(UNFINISHED_BATCH_STATUSES) | (Batch.created_at >= since))
    return list(session.scalars(query.order_by(Batch.created_at.desc(), Batch.id.desc()).limit(limit)))


def _past(columns: tuple[InstrumentedAttribute[int], InstrumentedAttribute[str]], values: tuple[int, str],
          descending: bool) -> ColumnElement[bool]:
    """Keyset pagination: the rows strictly after the cursor in the listing's order."""
    (c1, c2), (v1, v2) = columns, values
    if descending:
        return (c1 < v1) | ((c1 == v1) & (c2 < v2))
    return (c1 > v1) | ((c1 == v1) & (c2 > v2))
