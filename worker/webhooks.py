"""The webhook sender, run by beat on the control queue: signs and POSTs due deliveries (Standard Webhooks).

A 2xx marks a delivery delivered; anything else (another status, a refused connection, a timeout)
schedules the next attempt with exponential backoff, until a day after the event; then it has failed.
Sending never runs on a GPU worker, so a slow or dead receiver cannot hold up generation.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
from concurrent.futures import ThreadPoolExecutor

import httpx

from common import metrics
from common.ids import now as clock
from db import webhooks
from db.models import WebhookDelivery
from worker.runtime import Runtime

log = logging.getLogger("diffbatch.worker")
TASK = "diffbatch.webhooks"
TIMEOUT_S = 10.0
FIRST_WAIT_S = 5  # after the first failed attempt; doubled after each further one
MAX_WAIT_S = 3600
GIVE_UP_AFTER_S = 24 * 3600  # counted from the event
HOLD_S = 120  # a claimed delivery is due again this long after, should its sender die mid-send
PER_RUN = 32  # deliveries claimed by one run, sent in parallel: one run lasts about one timeout at most
PARALLEL = 8


def sign(key: bytes, delivery_id: str, timestamp: int, body: str) -> str:
    """The `webhook-signature` header: "v1," + base64(HMAC-SHA256(key, "{id}.{timestamp}.{body}"))."""
    digest = hmac.new(key, f"{delivery_id}.{timestamp}.{body}".encode(), hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def next_attempt_at(*, attempts: int, created_at: int, now: int) -> int | None:
    """When to try again after ``attempts`` failed attempts: 5 s, then doubling, at most 1 h apart, the
    last one at the deadline (a day after the event); None once the deadline has passed."""
    deadline = created_at + GIVE_UP_AFTER_S
    if now >= deadline:
        return None
    wait = min(FIRST_WAIT_S * (1 << min(attempts - 1, 20)), MAX_WAIT_S)
    return min(now + wait, deadline)


def send_due(rt: Runtime, *, now: int | None = None) -> dict[str, int]:
    """Send the deliveries due at ``now`` (default: the clock), at most PER_RUN; returns how many were
    delivered, will be retried, and have failed for good."""
    t = clock() if now is None else now
    with rt.session() as session, session.begin():
        due = webhooks.claim_due(session, now=t, hold_until=t + HOLD_S, limit=PER_RUN)
    report = {"delivered": 0, "retrying": 0, "failed": 0}
    if not due:
        return report
    key = rt.settings.webhook_key
    with httpx.Client(timeout=TIMEOUT_S, follow_redirects=False) as client, \
            ThreadPoolExecutor(max_workers=min(PARALLEL, len(due))) as pool:
        answers = list(pool.map(lambda delivery: _post(client, key, delivery, t), due))
    for delivery, (code, error) in zip(due, answers, strict=True):
        outcome = _record(rt, delivery, code, error, t=t)
        report[outcome] += 1
    return report


def _post(client: httpx.Client, key: bytes | None, delivery: WebhookDelivery, t: int) -> tuple[int | None, str | None]:
    """One attempt: (the receiver's status code or None, an error message or None on a 2xx)."""
    if key is None:
        return None, "DIFFBATCH_WEBHOOK_SECRET is not set on the worker: nothing is sent unsigned."
    headers = {"content-type": "application/json", "webhook-id": delivery.id, "webhook-timestamp": str(t),
               "webhook-signature": sign(key, delivery.id, t, delivery.payload)}
    try:
        # Streamed and closed unread: a receiver's answer body is never loaded.
        with client.stream("POST", delivery.url, content=delivery.payload.encode(), headers=headers) as response:
            code = response.status_code
    except Exception as exc:  # refused, timed out, a URL httpx cannot send to: each is this attempt's error
        return None, f"{type(exc).__name__}: {exc}"[:1000]
    return code, None if 200 <= code < 300 else f"the receiver answered HTTP {code}"


def _record(rt: Runtime, delivery: WebhookDelivery, code: int | None, error: str | None, *, t: int) -> str:
    if error is None:
        status, retry_at = webhooks.DELIVERED, None
    else:
        retry_at = next_attempt_at(attempts=delivery.attempts + 1, created_at=delivery.created_at, now=t)
        status = webhooks.PENDING if retry_at is not None else webhooks.FAILED
    with rt.session() as session, session.begin():
        webhooks.record_attempt(session, delivery_id=delivery.id, held_until=t + HOLD_S, now=t, status=status,
                                next_attempt_at=retry_at, status_code=code, error=error)
    if status == webhooks.FAILED:
        log.warning("webhook %s of batch %s failed for good after %d attempts: %s", delivery.id,
                    delivery.batch_id, delivery.attempts + 1, error)
    elif error is not None:
        log.info("webhook %s of batch %s: %s; next attempt at %s", delivery.id, delivery.batch_id, error, retry_at)
    outcome = {webhooks.DELIVERED: "delivered", webhooks.PENDING: "retrying"}.get(status, "failed")
    metrics.webhook_delivery(outcome)
    return outcome
