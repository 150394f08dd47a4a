"""Wire shapes of Anthropic's Message Batches API (as the `anthropic` SDK's types read them:
anthropic/types/messages/message_batch*.py): the create body, the MessageBatch object, pages, the
deleted marker and Anthropic's error body, for the routes and their OpenAPI schema."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from api.errors import WHEN

CUSTOM_ID_PATTERN = r"^[a-zA-Z0-9_-]{1,64}$"  # Anthropic's rule for custom_id
Timestamp = Annotated[str, Field(json_schema_extra={"format": "date-time"})]  # RFC 3339, as Anthropic's


class MessageBatchRequest(BaseModel):
    """One request: its `params` (a Messages API body) are checked when it runs, as Anthropic does, so a
    bad one errors that request alone."""

    model_config = ConfigDict(extra="forbid")

    custom_id: str = Field(pattern=CUSTOM_ID_PATTERN)
    params: dict[str, Any]


class CreateMessageBatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    requests: list[MessageBatchRequest] = Field(json_schema_extra={"minItems": 1, "maxItems": 100_000})


class MessageBatchRequestCounts(BaseModel):
    processing: int
    succeeded: int
    errored: int
    canceled: int
    expired: int


class MessageBatchObject(BaseModel):
    id: str
    type: Literal["message_batch"]
    processing_status: Literal["in_progress", "canceling", "ended"]
    request_counts: MessageBatchRequestCounts
    created_at: Timestamp
    expires_at: Timestamp
    ended_at: Timestamp | None
    cancel_initiated_at: Timestamp | None
    archived_at: Timestamp | None
    results_url: str | None


class MessageBatchPage(BaseModel):
    data: list[MessageBatchObject]
    has_more: bool
    first_id: str | None
    last_id: str | None


class DeletedMessageBatch(BaseModel):
    id: str
    type: Literal["message_batch_deleted"]


class AnthropicErrorDetail(BaseModel):
    type: str
    message: str


class AnthropicErrorBody(BaseModel):
    """Anthropic's error body, the answer of every status other than 2xx on these routes."""

    type: Literal["error"]
    error: AnthropicErrorDetail


def anthropic_error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI `responses` of a route for these error statuses, each with Anthropic's error body."""
    return {status: {"model": AnthropicErrorBody, "description": WHEN[status]} for status in statuses}
