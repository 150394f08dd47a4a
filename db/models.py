"""Typed SQLAlchemy 2 models. The rows, not broker messages, say what is done (docs/architecture.md)."""

from __future__ import annotations

import enum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Enum,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# A naming convention makes constraint names stable, so Alembic batch mode can alter SQLite tables.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class BatchStatus(str, enum.Enum):
    validating = "validating"
    failed = "failed"
    in_progress = "in_progress"
    finalizing = "finalizing"
    completed = "completed"
    expired = "expired"
    cancelling = "cancelling"
    cancelled = "cancelled"


class RequestStatus(str, enum.Enum):
    pending = "pending"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"
    expired = "expired"


OPEN_REQUEST_STATUSES = (RequestStatus.pending, RequestStatus.running)
TERMINAL_BATCH_STATUSES = (BatchStatus.failed, BatchStatus.completed, BatchStatus.expired,
                           BatchStatus.cancelled)
# The one tenant of a server without API keys (the loopback embedded default).
LOCAL_TENANT = "local"


def _status(enum_cls: type[enum.Enum]) -> Enum:
    # Stored as plain strings: portable across SQLite and PostgreSQL, no ALTER TYPE on new values.
    return Enum(enum_cls, native_enum=False, length=16, validate_strings=True)


class Tenant(Base):
    """Who owns files, batches and keys; quota columns left NULL take the server's settings."""

    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # the name given to `keys create --tenant`
    created_at: Mapped[int] = mapped_column(BigInteger)
    max_queued_requests: Mapped[int | None] = mapped_column(Integer)
    max_queued_tokens: Mapped[int | None] = mapped_column(BigInteger)


class ApiKey(Base):
    """A key is `<prefix><id>.<secret>`; only a salted hash of the secret is stored."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    salt: Mapped[str] = mapped_column(String(64))
    secret_hash: Mapped[str] = mapped_column(String(128))
    admin: Mapped[bool] = mapped_column(Boolean, default=False)  # sees every tenant's batches (status page)
    created_at: Mapped[int] = mapped_column(BigInteger)
    last_used_at: Mapped[int | None] = mapped_column(BigInteger)
    revoked_at: Mapped[int | None] = mapped_column(BigInteger)


class File(Base):
    __tablename__ = "files"
    __table_args__ = (UniqueConstraint("tenant_id", "idempotency_key"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(64), index=True, default=LOCAL_TENANT,
                                           server_default=LOCAL_TENANT)
    filename: Mapped[str] = mapped_column(String(512))
    purpose: Mapped[str] = mapped_column(String(32))
    bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[int] = mapped_column(BigInteger)
    storage_path: Mapped[str] = mapped_column(String(1024))
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    # Non-blank lines of an uploaded batch file, counted while it streams (quotas, the request limit).
    line_count: Mapped[int | None] = mapped_column(Integer)
    expires_at: Mapped[int | None] = mapped_column(BigInteger, index=True)  # retention deletes it then


class Batch(Base):
    __tablename__ = "batches"
    __table_args__ = (UniqueConstraint("tenant_id", "idempotency_key"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(64), index=True, default=LOCAL_TENANT,
                                           server_default=LOCAL_TENANT)
    status: Mapped[BatchStatus] = mapped_column(_status(BatchStatus), index=True)
    endpoint: Mapped[str] = mapped_column(String(64))
    model: Mapped[str | None] = mapped_column(String(255))
    input_file_id: Mapped[str] = mapped_column(String(64))
    completion_window: Mapped[str] = mapped_column(String(16))
    metadata_: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSON)
    errors: Mapped[list[Any] | None] = mapped_column(JSON)
    output_file_id: Mapped[str | None] = mapped_column(String(64))
    error_file_id: Mapped[str | None] = mapped_column(String(64))
    priority: Mapped[int] = mapped_column(Integer, default=0)
    total: Mapped[int] = mapped_column(Integer, default=0)
    completed: Mapped[int] = mapped_column(Integer, default=0)
    failed: Mapped[int] = mapped_column(Integer, default=0)
    input_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    output_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    request_hash: Mapped[str | None] = mapped_column(String(64), index=True)
    created_at: Mapped[int] = mapped_column(BigInteger, index=True)
    expires_at: Mapped[int] = mapped_column(BigInteger)
    in_progress_at: Mapped[int | None] = mapped_column(BigInteger)
    finalizing_at: Mapped[int | None] = mapped_column(BigInteger)
    completed_at: Mapped[int | None] = mapped_column(BigInteger)
    failed_at: Mapped[int | None] = mapped_column(BigInteger)
    expired_at: Mapped[int | None] = mapped_column(BigInteger)
    cancelling_at: Mapped[int | None] = mapped_column(BigInteger)
    cancelled_at: Mapped[int | None] = mapped_column(BigInteger)
    # When validation or finalization was last handed to the queue; the reconciler retries stale ones.
    touched_at: Mapped[int] = mapped_column(BigInteger)
    # The validation attempt that owns the batch: a retried one takes over, and the one it replaced
    # stops at its next write instead of storing requests beside it (worker/validation.py).
    validation_token: Mapped[str | None] = mapped_column(String(32))
    # Validation attempts started; past Settings.max_validation_attempts the batch fails.
    validation_attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # OpenAI's output_expires_after, in seconds: the output and error files expire that long after
    # they are written (None: the server's retention).
    output_expires_after_s: Mapped[int | None] = mapped_column(Integer)
    # Called with a signed event on each terminal status (worker/webhooks.py); None: no webhook.
    webhook_url: Mapped[str | None] = mapped_column(String(2048))
    # The schedule that created this batch (None: created over HTTP or by the CLI).
    schedule_id: Mapped[str | None] = mapped_column(String(64), index=True)


class Request(Base):
    __tablename__ = "requests"
    __table_args__ = (
        UniqueConstraint("batch_id", "custom_id"),
        Index("ix_requests_batch_status", "batch_id", "status"),
        Index("ix_requests_chunk_status", "chunk_id", "status"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    public_id: Mapped[str] = mapped_column(String(64), unique=True)
    batch_id: Mapped[str] = mapped_column(ForeignKey("batches.id", ondelete="CASCADE"))
    chunk_id: Mapped[int | None] = mapped_column(ForeignKey("chunks.id"))
    custom_id: Mapped[str] = mapped_column(String(512))
    line: Mapped[int] = mapped_column(Integer)
    url: Mapped[str] = mapped_column(String(64))
    body: Mapped[dict[str, Any]] = mapped_column(JSON)
    status: Mapped[RequestStatus] = mapped_column(_status(RequestStatus))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    worker: Mapped[str | None] = mapped_column(String(255))
    heartbeat_at: Mapped[int | None] = mapped_column(BigInteger)
    response: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    prompt_tokens: Mapped[int] = mapped_column(Integer, default=0)
    completion_tokens: Mapped[int] = mapped_column(Integer, default=0)
    forward_passes: Mapped[int] = mapped_column(Integer, default=0)
    finished_at: Mapped[int | None] = mapped_column(BigInteger)
    # Prompt plus max_tokens, set at validation: what the request may cost (the tenant's token quota).
    budget_tokens: Mapped[int] = mapped_column(Integer, default=0, server_default="0")


class Chunk(Base):
    __tablename__ = "chunks"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    batch_id: Mapped[str] = mapped_column(ForeignKey("batches.id", ondelete="CASCADE"), index=True)
    queue: Mapped[str] = mapped_column(String(255))
    size: Mapped[int] = mapped_column(Integer)
    enqueued_at: Mapped[int] = mapped_column(BigInteger)
    # Seconds after enqueued_at before the reconciler sends the chunk again (None: REQUEUE_AFTER_S);
    # doubled at each re-send, so a long backlog is not re-sent every period.
    requeue_delay: Mapped[int | None] = mapped_column(Integer)
    # The lease: the worker running the chunk (None: nobody). It holds while that worker's row in
    # `workers` beats; a dead holder's chunk is reclaimed and re-sent at once.
    worker: Mapped[str | None] = mapped_column(String(255), index=True)
    leased_at: Mapped[int | None] = mapped_column(BigInteger)
    # Runs of this group that ended without finishing it (its worker died, the engine raised); a
    # group that keeps failing is split so a poison request ends up alone.
    failures: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # Tokens its running rows have generated so far, reported with each heartbeat: progress moves
    # within seconds of the first pass, not only when requests finish.
    tokens_done: Mapped[int] = mapped_column(Integer, default=0, server_default="0")


class Worker(Base):
    __tablename__ = "workers"

    name: Mapped[str] = mapped_column(String(255), primary_key=True)
    model: Mapped[str] = mapped_column(String(255), index=True)
    queue: Mapped[str] = mapped_column(String(255))
    max_positions: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[int] = mapped_column(BigInteger)
    heartbeat_at: Mapped[int] = mapped_column(BigInteger)


class WebhookDelivery(Base):
    """One event for one batch's webhook: sent until a 2xx, retried with backoff for up to a day."""

    __tablename__ = "webhook_deliveries"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # the `webhook-id` header, stable across retries
    batch_id: Mapped[str] = mapped_column(ForeignKey("batches.id", ondelete="CASCADE"), index=True)
    event_type: Mapped[str] = mapped_column(String(32))  # batch.completed / failed / cancelled / expired
    url: Mapped[str] = mapped_column(String(2048))
    payload: Mapped[str] = mapped_column(Text)  # the exact body signed and sent
    status: Mapped[str] = mapped_column(String(16), index=True)  # pending / delivered / failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[int | None] = mapped_column(BigInteger, index=True)
    last_attempt_at: Mapped[int | None] = mapped_column(BigInteger)
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[int] = mapped_column(BigInteger)
    delivered_at: Mapped[int | None] = mapped_column(BigInteger)


class Schedule(Base):
    """A cron expression in a time zone and a batch template; each due run becomes a normal batch."""

    __tablename__ = "schedules"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(64), index=True)
    cron: Mapped[str] = mapped_column(String(128))
    timezone: Mapped[str] = mapped_column(String(64))
    # input_file_id, endpoint, completion_window, metadata (and webhook_url): a batch create body.
    template: Mapped[dict[str, Any]] = mapped_column(JSON)
    paused: Mapped[bool] = mapped_column(Boolean, default=False)
    # The next due time (epoch seconds); firing moves it forward with a conditional update, so two
    # beat processes fire a due run once, and runs missed while nothing ran become one run.
    next_run_at: Mapped[int] = mapped_column(BigInteger, index=True)
    last_run_at: Mapped[int | None] = mapped_column(BigInteger)
    last_batch_id: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[int] = mapped_column(BigInteger)
