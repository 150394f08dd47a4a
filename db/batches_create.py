"""Creating a tenant's batch: the checks on its input file and the tenant's quota, then the row.

One path for POST /v1/batches and for a schedule's runs. The caller commits, then sends the validation
task; a refusal is a Refused carrying the HTTP status, message, parameter and code the API answers with.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from db import keys, repo
from db.models import Batch, BatchStatus, File
from db.scoped import TenantScope

WINDOW_S = {"24h": 24 * 3600}


class Refused(Exception):
    """The batch cannot be created: ``status`` (404, 400, 429), ``param`` and ``code`` as the API reports them."""

    def __init__(self, status: int, message: str, *, param: str, code: str) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


@dataclass(frozen=True)
class Limits:
    """The server's limits (Settings): a tenant's own queued limits, where set, win over the last two."""

    max_batch_requests: int
    max_queued_requests: int
    max_queued_tokens: int


@dataclass(frozen=True)
class BatchSpec:
    """What a create body says, plus where the batch comes from (schedule) and how a retry finds it."""

    input_file_id: str
    endpoint: str
    completion_window: str = "24h"
    metadata: dict[str, Any] | None = None
    output_expires_after_s: int | None = None
    webhook_url: str | None = None
    schedule_id: str | None = None
    idempotency_key: str | None = None
    request_hash: str | None = None
    priority: int = 0  # higher first: a worker leases the best chunk of its queue (repo.lease_best_chunk)


def create_batch(scope: TenantScope, spec: BatchSpec, limits: Limits, *, batch_id: str, now: int) -> Batch:
    """Check the input file and the quota, then add the batch (validating) to the session, uncommitted."""
    source = input_file(scope, spec.input_file_id, limits)
    check_quota(scope, limits, new_requests=source.line_count or 0)
    return repo.add_batch(
        scope.session, id=batch_id, tenant_id=scope.tenant_id, status=BatchStatus.validating,
        endpoint=spec.endpoint, input_file_id=source.id, completion_window=spec.completion_window,
        metadata_=spec.metadata, output_expires_after_s=spec.output_expires_after_s,
        webhook_url=spec.webhook_url, schedule_id=spec.schedule_id, idempotency_key=spec.idempotency_key,
        request_hash=spec.request_hash, created_at=now, expires_at=now + WINDOW_S[spec.completion_window],
        touched_at=now, total=0, completed=0, failed=0, input_tokens=0, output_tokens=0, priority=spec.priority)


def input_file(scope: TenantScope, file_id: str, limits: Limits, *, param: str = "input_file_id") -> File:
    """The tenant's batch input file ``file_id``, or a Refused naming ``param``."""
    source = scope.get_file(file_id)
    if source is None:
        raise Refused(404, f"No such File object: {file_id}", param=param, code="file_not_found")
    if source.purpose != "batch":
        raise Refused(400, f"File {source.id} has purpose {source.purpose!r}, not 'batch'.", param=param,
                      code="invalid_file_purpose")
    if (source.line_count or 0) > limits.max_batch_requests:
        raise Refused(400, f"File {source.id} has {source.line_count:,} requests; a batch takes at most "
                      f"{limits.max_batch_requests:,} (DIFFBATCH_MAX_BATCH_REQUESTS).", param=param,
                      code="batch_too_large")
    return source


def check_quota(scope: TenantScope, limits: Limits, *, new_requests: int) -> None:
    """Refuse (429 quota_exceeded naming the limit) if ``new_requests`` more lines would exceed the tenant's
    queued-requests limit, or if its queued tokens already reach its token limit."""
    tenant = keys.get_tenant(scope.session, tenant_id=scope.tenant_id)
    max_requests = _limit(tenant.max_queued_requests if tenant else None, limits.max_queued_requests)
    max_tokens = _limit(tenant.max_queued_tokens if tenant else None, limits.max_queued_tokens)
    usage = scope.usage()
    if usage.requests + new_requests > max_requests:
        raise Refused(429, f"Queued request limit reached for tenant {scope.tenant_id!r}: {usage.requests} "
                      f"requests queued and this batch has {new_requests}; the limit is {max_requests} "
                      "(max_queued_requests). Wait for queued batches to finish.",
                      param="max_queued_requests", code="quota_exceeded")
    if usage.tokens >= max_tokens:
        raise Refused(429, f"Queued token limit reached for tenant {scope.tenant_id!r}: {usage.tokens} tokens "
                      f"queued; the limit is {max_tokens} (max_queued_tokens). Wait for queued batches "
                      "to finish.", param="max_queued_tokens", code="quota_exceeded")


def _limit(override: int | None, default: int) -> int:
    return default if override is None else override
