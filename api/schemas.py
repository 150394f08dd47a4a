"""Request bodies and the wire shapes of File and Batch objects (OpenAI compatible)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictInt, WithJsonSchema, field_validator

from common.lines import ENDPOINTS
from db.models import Batch, File, WebhookDelivery


def _storable(value: str) -> str:
    # PostgreSQL's text refuses NUL, and UTF-8 cannot encode a lone surrogate (json.loads makes one of "\ud800").
    if "\x00" in value or any("\ud800" <= c <= "\udfff" for c in value):
        raise ValueError("must not hold NUL (\\u0000) or unpaired surrogates")
    return value


# Text that reaches the database: documented as a pattern, checked by the validator.
NO_NUL = "^[^\\u0000]*$"
StorableText = Annotated[str, AfterValidator(_storable), Field(json_schema_extra={"pattern": NO_NUL})]


class ExpiresAfter(BaseModel):
    """OpenAI's expiry policy: the file expires ``seconds`` after its creation."""

    model_config = ConfigDict(extra="forbid")

    anchor: Literal["created_at"]
    seconds: int = Field(ge=3600, le=2592000)  # 1 hour to 30 days, as OpenAI


MIN_PRIORITY, MAX_PRIORITY = -100, 100


class CreateBatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input_file_id: StorableText = Field(min_length=1)
    endpoint: str = Field(json_schema_extra={"enum": list(ENDPOINTS)})
    completion_window: str = Field("24h", json_schema_extra={"enum": ["24h"]})
    metadata: dict[str, str] | None = Field(None, json_schema_extra={
        "maxProperties": 16, "propertyNames": {"maxLength": 64, "pattern": NO_NUL},
        "additionalProperties": {"type": "string", "maxLength": 512, "pattern": NO_NUL}})
    output_expires_after: ExpiresAfter | None = None  # the output and error files' expiry
    # diffbatch extension: called with a signed event on each terminal status (also read from
    # metadata.webhook_url, for clients that cannot add a field; this field wins).
    webhook_url: str | None = Field(None, max_length=2048, json_schema_extra={"format": "uri"})
    # diffbatch extension: queued chunks of a higher-priority batch run first on its model (None: 0). Strict, so
    # "5", 5.0 and true are refused rather than read as numbers.
    priority: StrictInt | None = Field(None, ge=MIN_PRIORITY, le=MAX_PRIORITY)

    @field_validator("endpoint")
    @classmethod
    def _known_endpoint(cls, value: str) -> str:
        if value not in ENDPOINTS:
            raise ValueError(f"must be one of {', '.join(ENDPOINTS)}")
        return value

    @field_validator("webhook_url")
    @classmethod
    def _webhook_url(cls, value: str | None) -> str | None:
        if value is not None and (problem := webhook_url_problem(value)):
            raise ValueError(problem)
        return value

    @field_validator("completion_window")
    @classmethod
    def _window(cls, value: str) -> str:
        if value != "24h":
            raise ValueError("only '24h' is supported")
        return value

    @field_validator("metadata")
    @classmethod
    def _metadata_limits(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        # OpenAI's limits: 16 pairs, keys up to 64 characters, values up to 512.
        if value and (len(value) > 16 or any(len(k) > 64 or len(v) > 512 for k, v in value.items())):
            raise ValueError("at most 16 pairs, keys up to 64 characters, values up to 512")
        for key, text in (value or {}).items():
            _storable(key)
            _storable(text)
        return value


# One inline request: an input file's line (diffbatch extension).
INLINE_REQUEST = {"type": "object", "required": ["custom_id", "method", "url", "body"], "properties": {
    "custom_id": {"type": "string"}, "method": {"type": "string", "enum": ["POST"]},
    "url": {"type": "string", "enum": list(ENDPOINTS)}, "body": {"type": "object"}}}


class CreateBatchBody(CreateBatch):
    """POST /v1/batches: an input_file_id, or (diffbatch extensions) the input lines inline in `requests`, or
    a `template` with its `rows` or `rows_file_id` (api/templated.py); exactly one of the three (checked by the
    route, which names the field)."""

    # Optional here only: a schedule's template (CreateBatch) always names a file.
    input_file_id: StorableText | None = Field(None, min_length=1)  # type: ignore[assignment]
    requests: list[Annotated[Any, WithJsonSchema(INLINE_REQUEST)]] | None = None
    # A request body whose string values may hold {{column}} placeholders, one request per row.
    template: dict[str, Any] | None = None
    rows: list[Annotated[Any, WithJsonSchema({"type": "object"})]] | None = None  # objects of column values
    rows_file_id: StorableText | None = Field(None, min_length=1)  # an uploaded .csv (header row) or .jsonl
    custom_id_column: StorableText | None = Field(None, min_length=1)  # None: "row-1", "row-2", ...


def webhook_url_problem(url: str) -> str | None:
    """Why ``url`` cannot be a webhook (an absolute http or https URL, at most 2048 characters), or None."""
    if len(url) > 2048:
        return "must be at most 2048 characters"
    if any(c.isspace() or ord(c) < 32 or c == "\x7f" for c in url):
        return "must not hold spaces or control characters"
    try:
        parts = urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError:
        return "is not a valid URL"
    if parts.scheme not in ("http", "https") or not host:
        return "must be an absolute http:// or https:// URL"
    return None


def webhook_object(row: Batch, deliveries: Sequence[WebhookDelivery]) -> dict[str, Any] | None:
    """diffbatch extension: the batch's webhook and each event sent to it (None: the batch names none)."""
    if not row.webhook_url:
        return None
    return {"url": row.webhook_url, "deliveries": [
        {"id": d.id, "event_type": d.event_type, "status": d.status, "attempts": d.attempts,
         "last_status_code": d.last_status_code, "last_error": d.last_error,
         "next_attempt_at": d.next_attempt_at, "delivered_at": d.delivered_at} for d in deliveries]}


def file_object(row: File) -> dict[str, Any]:
    return {"id": row.id, "object": "file", "bytes": row.bytes, "created_at": row.created_at,
            "filename": row.filename, "purpose": row.purpose, "status": "processed",
            "status_details": None, "expires_at": row.expires_at}


def batch_object(row: Batch, running_tokens: int = 0, deliveries: Sequence[WebhookDelivery] = ()) -> dict[str, Any]:
    """The OpenAI Batch object, with the `progress` extension; ``running_tokens``: the tokens of its
    requests running now (db.progress), so progress moves before any request finishes; ``deliveries``:
    its webhook deliveries (db.webhooks), shown in the `webhook` extension."""
    return {
        "id": row.id, "object": "batch", "endpoint": row.endpoint, "model": row.model,
        "errors": {"object": "list", "data": row.errors} if row.errors else None,
        "input_file_id": row.input_file_id, "completion_window": row.completion_window,
        "status": row.status.value, "output_file_id": row.output_file_id,
        "error_file_id": row.error_file_id, "created_at": row.created_at,
        "in_progress_at": row.in_progress_at, "expires_at": row.expires_at,
        "finalizing_at": row.finalizing_at, "completed_at": row.completed_at,
        "failed_at": row.failed_at, "expired_at": row.expired_at, "cancelling_at": row.cancelling_at,
        "cancelled_at": row.cancelled_at,
        "request_counts": {"total": row.total, "completed": row.completed, "failed": row.failed},
        "metadata": row.metadata_ or {},
        "usage": {"input_tokens": row.input_tokens, "output_tokens": row.output_tokens,
                  "total_tokens": row.input_tokens + row.output_tokens},
        "progress": {"requests_done": row.completed + row.failed, "requests_total": row.total,
                     "tokens_done": row.output_tokens + running_tokens},
        "webhook": webhook_object(row, deliveries),
        "schedule_id": row.schedule_id,  # diffbatch extension: the schedule whose run created it, else None
        "priority": row.priority,  # diffbatch extension: higher runs first on its model
    }


def page(items: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    return {"object": "list", "data": items, "first_id": items[0]["id"] if items else None,
            "last_id": items[-1]["id"] if items else None, "has_more": has_more}
