"""Per-tenant limits on queued work, checked when a batch is created: over one, the create is a 429."""

from __future__ import annotations

from api.errors import ApiError
from common.settings import Settings
from db import keys
from db.scoped import TenantScope


def check_quota(scope: TenantScope, settings: Settings, *, new_requests: int) -> None:
    """Raise a 429 quota_exceeded naming the limit if ``new_requests`` more lines would exceed the tenant's
    queued-requests limit, or if its queued tokens already reach its token limit."""
    tenant = keys.get_tenant(scope.session, tenant_id=scope.tenant_id)
    max_requests = _limit(tenant and tenant.max_queued_requests, settings.max_queued_requests)
    max_tokens = _limit(tenant and tenant.max_queued_tokens, settings.max_queued_tokens)
    usage = scope.usage()
    if usage.requests + new_requests > max_requests:
        raise ApiError(429, f"Queued request limit reached for tenant {scope.tenant_id!r}: {usage.requests} "
                       f"requests queued and this batch has {new_requests}; the limit is {max_requests} "
                       "(max_queued_requests). Wait for queued batches to finish.",
                       param="max_queued_requests", code="quota_exceeded")
    if usage.tokens >= max_tokens:
        raise ApiError(429, f"Queued token limit reached for tenant {scope.tenant_id!r}: {usage.tokens} tokens "
                       f"queued; the limit is {max_tokens} (max_queued_tokens). Wait for queued batches "
                       "to finish.", param="max_queued_tokens", code="quota_exceeded")


def _limit(override: int | None, default: int) -> int:
    return default if override is None else override
