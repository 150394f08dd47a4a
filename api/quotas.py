"""Per-tenant limits on queued work, checked when a batch is created (db/batches_create.py): over one,
the create is a 429."""

from __future__ import annotations

from common.settings import Settings
from db.batches_create import Limits


def batch_limits(settings: Settings) -> Limits:
    """The server's limits on one batch and on a tenant's queued work (a tenant's own limits win)."""
    return Limits(max_batch_requests=settings.max_batch_requests, max_queued_requests=settings.max_queued_requests,
                  max_queued_tokens=settings.max_queued_tokens)
