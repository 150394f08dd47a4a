"""GET /metrics: Prometheus text of the worker processes' counters plus gauges read from the database.

Open on a keyless loopback server (where every caller is the local tenant); once keys exist it needs an
admin key (`Authorization: Bearer`), since its counts span every tenant. The processes' counters come from
PROMETHEUS_MULTIPROC_DIR when it is set (the embedded stack), else from this process's own registry.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from typing import TypeVar

from fastapi import APIRouter, Request, Response
from prometheus_client import REGISTRY
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from sqlalchemy import Select, func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from api.auth import CurrentTenant
from api.errors import ApiError
from common.ids import now
from common.metrics import MULTIPROC_ENV
from common.settings import Settings
from db import webhooks
from db.models import Batch, BatchStatus, Chunk, RequestStatus, WebhookDelivery, Worker
from db.models import Request as RequestRow

log = logging.getLogger("diffbatch.api")
router = APIRouter()
K = TypeVar("K")
V = TypeVar("V")
OPEN_BATCH_STATUSES = (BatchStatus.in_progress, BatchStatus.cancelling, BatchStatus.finalizing)


@router.get("/metrics", include_in_schema=False)
def metrics(request: Request, caller: CurrentTenant) -> Response:
    if caller.key_id is not None and not caller.admin:
        raise ApiError(403, "/metrics needs an admin key (`diffbatch keys create --tenant NAME --admin`).",
                       code="admin_key_required")
    encoder, content_type = choose_encoder(request.headers.get("accept", ""))
    scrape = _Scrape([_process_metrics(), DatabaseCollector(request.app.state.session_factory,
                                                             request.app.state.settings)])
    return Response(encoder(scrape), media_type=content_type)


def _process_metrics() -> Collector:
    """Every process's samples from the multiprocess folder, or this process's own registry."""
    path = os.environ.get(MULTIPROC_ENV)
    return MultiProcessCollector(None, path=path) if path else REGISTRY  # type: ignore[no-untyped-call]


class _Scrape(Collector):
    def __init__(self, sources: list[Collector]) -> None:
        self.sources = sources

    def collect(self) -> Iterable[Metric]:
        for source in self.sources:
            yield from source.collect()


class DatabaseCollector(Collector):
    """Gauges read at scrape time from the database: a few grouped counts over indexed columns,
    in a read-only session closed before the answer is written."""

    def __init__(self, session_factory: sessionmaker[Session], settings: Settings) -> None:
        self.session_factory, self.settings = session_factory, settings

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("diffbatch_database_up", "1 if the database answered this scrape's queries.")
        try:
            with self.session_factory() as session:
                families = list(self._read(session, now()))
        except SQLAlchemyError:
            log.warning("/metrics: the database did not answer", exc_info=True)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from families

    def _read(self, session: Session, t: int) -> Iterator[Metric]:
        batches = GaugeMetricFamily("diffbatch_batches", "Batches by status.", labels=["status"])
        counts = _pairs(session, select(Batch.status, func.count()).group_by(Batch.status))
        for status in BatchStatus:
            batches.add_metric([status.value], counts.get(status, 0))
        yield batches
        yield from self._requests(session)
        yield from self._workers(session, t)
        pending = GaugeMetricFamily("diffbatch_webhook_deliveries_pending", "Webhook events not yet delivered "
                                    "(being retried with backoff).")
        pending.add_metric([], session.execute(select(func.count()).select_from(WebhookDelivery)
                                               .where(WebhookDelivery.status == webhooks.PENDING)).scalar_one())
        yield pending

    def _requests(self, session: Session) -> Iterator[Metric]:
        """Requests by status from the batches' counters (no scan of the requests table); running ones
        through the held chunks."""
        succeeded, failed = session.execute(select(func.coalesce(func.sum(Batch.completed), 0),
                                                   func.coalesce(func.sum(Batch.failed), 0))).one()
        open_by_model = _pairs(session, select(Batch.model, func.sum(Batch.total - Batch.completed - Batch.failed))
                               .where(Batch.status.in_(OPEN_BATCH_STATUSES)).group_by(Batch.model))
        running_by_model = _pairs(session, select(Batch.model, func.count()).select_from(RequestRow)
                                  .join(Chunk, RequestRow.chunk_id == Chunk.id)
                                  .join(Batch, RequestRow.batch_id == Batch.id)
                                  .where(Chunk.worker.is_not(None), RequestRow.status == RequestStatus.running)
                                  .group_by(Batch.model))
        waiting = {model or "": max(0, int(count or 0) - running_by_model.get(model, 0))
                   for model, count in open_by_model.items()}
        requests = GaugeMetricFamily("diffbatch_requests", "Requests by status (failed includes cancelled "
                                     "and expired ones).", labels=["status"])
        for status, value in (("pending", sum(waiting.values())), ("running", sum(running_by_model.values())),
                              ("succeeded", succeeded), ("failed", failed)):
            requests.add_metric([status], int(value))
        yield requests
        depth = GaugeMetricFamily("diffbatch_queue_depth", "Requests of open batches waiting for a worker, "
                                  "per model.", labels=["model"])
        for model, count in sorted(waiting.items()):
            depth.add_metric([model], count)
        yield depth

    def _workers(self, session: Session, t: int) -> Iterator[Metric]:
        age = GaugeMetricFamily("diffbatch_worker_heartbeat_age_seconds", "Seconds since each registered "
                                "worker last beat (a worker that stops cleanly is removed).",
                                labels=["worker", "model"])
        live = GaugeMetricFamily("diffbatch_workers_live", "Workers that beat within "
                                 "DIFFBATCH_WORKER_DEAD_AFTER_S, per model.", labels=["model"])
        live_by_model: dict[str, int] = {}
        for name, model, beat in session.execute(select(Worker.name, Worker.model, Worker.heartbeat_at)):
            age.add_metric([name, model], max(0, t - beat))
            fresh = t - beat <= self.settings.worker_dead_after_s
            live_by_model[model] = live_by_model.get(model, 0) + fresh
        for model, count in sorted(live_by_model.items()):
            live.add_metric([model], count)
        yield age
        yield live


def _pairs(session: Session, query: Select[K, V]) -> dict[K, V]:
    """A two-column query as a dict (dict() of a Result would take it for a mapping: it has keys())."""
    return {key: count for key, count in session.execute(query)}
