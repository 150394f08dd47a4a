"""Input files the server writes itself (diffbatch extensions): a create body's inline `requests`, and
the lines a retry resubmits. Each becomes a tenant file of purpose "batch", so validation, results and
retention treat it as an upload."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from api.errors import ApiError
from api.schemas import CreateBatchBody
from common.ids import new_id, now
from common.lines import LineError, parse_line
from common.settings import Settings
from common.storage import BlobStore
from db import repo
from db.batches_create import BatchSpec
from db.models import TERMINAL_BATCH_STATUSES, Batch
from db.retry import MAX_METADATA_PAIRS, retry_lines, retry_metadata
from db.scoped import TenantScope


@dataclass
class NewInput:
    """A batch input file to add with its batch: ``lines`` end in a newline."""

    file_id: str
    filename: str
    lines: list[bytes]

    def add(self, scope: TenantScope, blobs: BlobStore, settings: Settings) -> None:
        """Write the blob and add the file's row (uncommitted); ``discard`` undoes the blob."""
        size = blobs.write(self.file_id, self.lines)
        created = now()
        repo.add_file(scope.session, file_id=self.file_id, tenant_id=scope.tenant_id, filename=self.filename,
                      purpose="batch", size=size, storage_path=blobs.location(self.file_id), now=created,
                      line_count=len(self.lines),
                      expires_at=created + settings.retention_days * 86400 if settings.retention_days else None)

    def discard(self, blobs: BlobStore) -> None:
        blobs.delete(self.file_id)


def input_of(body: CreateBatchBody, settings: Settings) -> tuple[str, NewInput | None]:
    """The batch's input file id, and the file to add when the body has inline `requests` (checked against
    the file limits and as uploaded lines are: 400 naming ``requests[i]...``)."""
    if body.input_file_id is not None and body.requests is not None:
        raise ApiError(400, "Give either input_file_id or requests (inline, a diffbatch extension), not both.",
                       param="requests", code="invalid_request")
    if body.requests is None:
        if body.input_file_id is None:
            raise ApiError(400, "input_file_id: an input file is required (or inline requests, a diffbatch "
                           "extension).", param="input_file_id", code="missing_required_parameter")
        return body.input_file_id, None
    items = body.requests
    if not items:
        raise ApiError(400, "requests: at least one request is required.", param="requests", code="empty_file")
    if len(items) > settings.max_batch_requests:
        raise ApiError(400, f"requests: {len(items):,} requests; a batch takes at most "
                       f"{settings.max_batch_requests:,} (DIFFBATCH_MAX_BATCH_REQUESTS).", param="requests",
                       code="batch_too_large")
    lines: list[bytes] = []
    seen: set[str] = set()
    total = 0
    for index, item in enumerate(items):
        line = _checked_line(index, item, body.endpoint, settings, seen)
        total += len(line)
        if total > settings.max_upload_bytes:
            raise ApiError(400, f"requests: more than the upload limit of {settings.max_upload_bytes:,} bytes as "
                           "JSON lines (DIFFBATCH_MAX_UPLOAD_BYTES).", param="requests", code="file_too_large")
        lines.append(line)
    new_input = NewInput(file_id=new_id("file-"), filename="inline_requests.jsonl", lines=lines)
    return new_input.file_id, new_input


def _checked_line(index: int, item: Any, endpoint: str, settings: Settings, seen: set[str]) -> bytes:
    """One inline request as its JSON line, or a 400 naming requests[index] and the field."""
    where = f"requests[{index}]"
    raw = json.dumps(item, separators=(",", ":")).encode()  # ASCII: a lone surrogate stays an escape
    if len(raw) > settings.max_line_bytes:
        raise ApiError(400, f"{where}: {len(raw):,} bytes as a JSON line; a line takes at most "
                       f"{settings.max_line_bytes:,} (DIFFBATCH_MAX_LINE_BYTES).", param=where, code="line_too_large")
    parsed = parse_line(raw, index + 1)  # the envelope and body checks an uploaded line gets
    if isinstance(parsed, LineError):
        param = f"{where}.{parsed.param}" if parsed.param else where
        detail = parsed.message.removeprefix(f"Line {index + 1}: ")
        raise ApiError(400, f"{where}: {detail}", param=param, code=parsed.code)
    if parsed.url != endpoint:
        raise ApiError(400, f"{where}.url: {parsed.url!r} differs from the batch's endpoint {endpoint!r}.",
                       param=f"{where}.url", code="mismatched_endpoint")
    if parsed.custom_id in seen:
        raise ApiError(400, f"{where}.custom_id: {parsed.custom_id!r} appears more than once.",
                       param=f"{where}.custom_id", code="duplicate_custom_id")
    seen.add(parsed.custom_id)
    return raw + b"\n"


def retry_input(scope: TenantScope, batch: Batch) -> NewInput:
    """The failed, expired and cancelled lines of a finished batch, in input order; 409 when the batch
    still runs or has none."""
    if batch.status not in TERMINAL_BATCH_STATUSES:
        raise ApiError(409, f"Cannot retry a batch with status {batch.status.value!r}; retry it once it has "
                       "finished (completed, failed, expired or cancelled).", param="batch_id",
                       code="batch_not_finished")
    lines = list(retry_lines(scope.session, batch_id=batch.id))
    if not lines:
        raise ApiError(409, f"Batch {batch.id} has no failed, expired or cancelled requests to retry.",
                       param="batch_id", code="nothing_to_retry")
    return NewInput(file_id=new_id("file-"), filename=f"{batch.id}_retry.jsonl", lines=lines)


def retry_spec(first: Batch, new_input: NewInput, *, idempotency_key: str | None, request_hash: str) -> BatchSpec:
    """The retry batch: the first one's endpoint, window, output expiry, webhook and metadata, plus
    ``retry_of``; a 409 when that metadata would pass OpenAI's 16 pairs."""
    metadata = retry_metadata(first)
    if len(metadata) > MAX_METADATA_PAIRS:
        raise ApiError(409, f"Batch {first.id} has {MAX_METADATA_PAIRS} metadata pairs, so a retry has no room "
                       "for retry_of.", param="metadata", code="metadata_full")
    return BatchSpec(input_file_id=new_input.file_id, endpoint=first.endpoint,
                     completion_window=first.completion_window, metadata=metadata,
                     output_expires_after_s=first.output_expires_after_s, webhook_url=first.webhook_url,
                     idempotency_key=idempotency_key, request_hash=request_hash)
