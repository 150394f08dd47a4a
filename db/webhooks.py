"""Webhook deliveries: one row per terminal event of a batch that names a webhook, sent until a 2xx.

A sender claims a due row by moving its next_attempt_at forward (a conditional UPDATE), so two senders
never send one attempt at once; a sender that dies mid-send leaves a row that is due again later.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Sequence

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from db.models import Batch, BatchStatus, WebhookDelivery
from db.session import rows_changed

PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"
# OpenAI's event types, one per terminal batch status.
EVENT_TYPES = {BatchStatus.completed: "batch.completed", BatchStatus.failed: "batch.failed",
               BatchStatus.cancelled: "batch.cancelled", BatchStatus.expired: "batch.expired"}


def record_event(session: Session, *, batch_id: str, status: BatchStatus, now: int) -> WebhookDelivery | None:
    """Queue the event of a batch reaching terminal ``status``, due at once; None if the batch names no
    webhook. Called in the transaction that changes the status, so an event is never lost."""
    url = session.scalar(select(Batch.webhook_url).where(Batch.id == batch_id))
    if not url:
        return None
    event_id = f"evt_{secrets.token_hex(12)}"  # also the `webhook-id` header: receivers dedupe on it
    payload = json.dumps({"id": event_id, "object": "event", "created_at": now, "type": EVENT_TYPES[status],
                          "data": {"id": batch_id}}, separators=(",", ":"))
    row = WebhookDelivery(id=event_id, batch_id=batch_id, event_type=EVENT_TYPES[status], url=url,
                          payload=payload, status=PENDING, attempts=0, next_attempt_at=now, created_at=now)
    session.add(row)
    session.flush()
    return row


def claim_due(session: Session, *, now: int, hold_until: int, limit: int) -> list[WebhookDelivery]:
    """Up to ``limit`` pending deliveries due at ``now``, each claimed by moving its next_attempt_at to
    ``hold_until`` (rows another sender claimed first are left out). Commit before sending."""
    due = list(session.scalars(select(WebhookDelivery)
                               .where(WebhookDelivery.status == PENDING, WebhookDelivery.next_attempt_at <= now)
                               .order_by(WebhookDelivery.next_attempt_at, WebhookDelivery.id).limit(limit)))
    claimed = []
    for row in due:
        if rows_changed(session, update(WebhookDelivery)
                        .where(WebhookDelivery.id == row.id, WebhookDelivery.status == PENDING,
                               WebhookDelivery.next_attempt_at == row.next_attempt_at)
                        .values(next_attempt_at=hold_until)) == 1:
            claimed.append(row)
    for row in claimed:
        session.refresh(row)
    return claimed


def record_attempt(session: Session, *, delivery_id: str, held_until: int, now: int, status: str,
                   next_attempt_at: int | None, status_code: int | None, error: str | None) -> bool:
    """Record one attempt of a delivery this sender claimed (``held_until``): its new status, when to try
    again, what the receiver said. False if the claim had lapsed and another sender took the row."""
    changed = rows_changed(session, update(WebhookDelivery)
                           .where(WebhookDelivery.id == delivery_id, WebhookDelivery.status == PENDING,
                                  WebhookDelivery.next_attempt_at == held_until)
                           .values(status=status, attempts=WebhookDelivery.attempts + 1, last_attempt_at=now,
                                   next_attempt_at=next_attempt_at, last_status_code=status_code,
                                   last_error=error, delivered_at=now if status == DELIVERED else None))
    return changed == 1


def deliveries_of(session: Session, *, batch_ids: Sequence[str]) -> dict[str, list[WebhookDelivery]]:
    """The deliveries of these batches, oldest first, by batch id (a batch with none is absent)."""
    found: dict[str, list[WebhookDelivery]] = {}
    if not batch_ids:
        return found
    for row in session.scalars(select(WebhookDelivery).where(WebhookDelivery.batch_id.in_(list(batch_ids)))
                               .order_by(WebhookDelivery.created_at, WebhookDelivery.id)):
        found.setdefault(row.batch_id, []).append(row)
    return found
