"""Input files the server writes itself (diffbatch extensions): a create body's inline `requests`, a
template times its rows (api/templated.py), and the lines a retry resubmits. Each becomes a tenant file of
purpose "batch", so validation, results and retention treat it as an upload."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from api.errors import ApiError
from api.schemas import CreateBatchBody
from api.templated import Template, expand, file_rows, inline_rows, rows_format
from common.ids import new_id, now
from common.lines import LineError, parse_line
from common.settings import Settings
from common.storage import BlobStore
from db import repo
from db.batches_create import BatchSpec
from db.models import TERMINAL_BATCH_STATUSES, Batch, File
from db.retry import MAX_METADATA_PAIRS, retry_lines, retry_metadata
from db.scoped import TenantScope


@dataclass
class NewInput:
    """A batch input file to add with its batch: ``lines`` end in a newline. A one-shot iterator (a
    templated batch's rows file) is checked as it is written, so a bad row stops the write."""

    file_id: str
    filename: str
    lines: Iterable[bytes]

    def add(self, scope: TenantScope, blobs: BlobStore, settings: Settings) -> None:
        """Write the blob and add the file's row (uncommitted); ``discard`` undoes the blob."""
        count = 0

        def counted() -> Iterator[bytes]:
            nonlocal count
            for line in self.lines:
                count += 1
                yield line

        size = blobs.write(self.file_id, counted())
        created = now()
        repo.add_file(scope.session, file_id=self.file_id, tenant_id=scope.tenant_id, filename=self.filename,
                      purpose="batch", size=size, storage_path=blobs.location(self.file_id), now=created,
                      line_count=count,
                      expires_at=created + settings.retention_days * 86400 if settings.retention_days else None)

    def discard(self, blobs: BlobStore) -> None:
        blobs.delete(self.file_id)


@dataclass(frozen=True)
class Place:
    """Where a line came from, as its errors name it: ``where`` opens the message, ``prefix`` is the
    parameter of the whole line. Lines the server made name what they were made from instead: the
    parameter a custom_id came from (``custom_id``), the object body fields came from (``body``)."""

    where: str
    prefix: str
    custom_id: str | None = None
    body: str | None = None

    def param(self, field: str | None) -> str:
        if field is None:
            return self.prefix
        if field == "custom_id" and self.custom_id is not None:
            return self.custom_id
        if self.body is not None and (field == "body" or field.startswith("body.")):
            return self.body + field.removeprefix("body")
        return f"{self.prefix}.{field}"


# The extensions that give the input lines instead of input_file_id, each named by its first field.
INPUT_KINDS = ("input_file_id", "requests", "template")
TEMPLATE_ONLY = ("rows", "rows_file_id", "custom_id_column")


def input_of(body: CreateBatchBody, settings: Settings, scope: TenantScope,
             blobs: BlobStore) -> tuple[str, NewInput | None]:
    """The batch's input file id, and the file to add when the body has inline `requests` (checked against
    the file limits and as uploaded lines are: 400 naming ``requests[i]...``) or a `template` and its rows
    (api/templated.py: checked as the file is written, 400 naming ``rows[i].column``)."""
    given = [kind for kind in INPUT_KINDS if getattr(body, kind) is not None]
    if len(given) > 1:
        raise ApiError(400, f"Give one of input_file_id, requests (inline) or template (with rows), not "
                       f"{' and '.join(given)}; the last two are diffbatch extensions.", param=given[1],
                       code="invalid_request")
    for name in TEMPLATE_ONLY:
        if getattr(body, name) is not None and body.template is None:
            raise ApiError(400, f"{name}: goes with a template (a diffbatch extension), which is missing.",
                           param=name, code="invalid_request")
    if body.template is not None:
        return templated_input(body, settings, scope, blobs)
    if body.requests is None:
        if body.input_file_id is None:
            raise ApiError(400, "input_file_id: an input file is required (or inline requests, or a template "
                           "and its rows: diffbatch extensions).", param="input_file_id",
                           code="missing_required_parameter")
        return body.input_file_id, None
    items = body.requests
    if not items:
        raise ApiError(400, "requests: at least one request is required.", param="requests", code="empty_file")
    if len(items) > settings.max_batch_requests:
        raise ApiError(400, f"requests: {len(items):,} requests; a batch takes at most "
                       f"{settings.max_batch_requests:,} (DIFFBATCH_MAX_BATCH_REQUESTS).", param="requests",
                       code="batch_too_large")
    places = (Place(f"requests[{index}]", f"requests[{index}]") for index in range(len(items)))
    lines = list(checked_lines(zip(places, items, strict=False), body.endpoint, settings, source="requests"))
    new_input = NewInput(file_id=new_id("file-"), filename="inline_requests.jsonl", lines=lines)
    return new_input.file_id, new_input


def templated_input(body: CreateBatchBody, settings: Settings, scope: TenantScope,
                    blobs: BlobStore) -> tuple[str, NewInput]:
    """The lines of a template times its rows, made and checked as the file is written: nothing of a
    large rows file is held but the custom_ids seen."""
    assert body.template is not None
    if (body.rows is None) == (body.rows_file_id is None):
        raise ApiError(400, "rows: a template takes its rows inline in `rows` or from an uploaded .csv or .jsonl "
                       "file in `rows_file_id`, one of the two.", param="rows", code="invalid_request")
    template = Template(body.template)
    column = body.custom_id_column
    if body.rows is not None:
        rows, source, filename = inline_rows(body.rows), "rows", "template_rows.jsonl"
    else:
        rows_file = _rows_file(scope, blobs, body.rows_file_id or "")
        fmt = rows_format(rows_file.filename)
        assert fmt is not None  # _rows_file refuses other files
        rows = file_rows(blobs, rows_file.id, fmt, settings.max_line_bytes)
        source, filename = "rows_file_id", f"{rows_file.id}_expanded.jsonl"
    expanded = expand(template, rows, endpoint=body.endpoint, custom_id_column=column,
                      max_rows=settings.max_batch_requests, source=source)
    places = ((Place(row.where, row.param(), custom_id=row.param(column), body="template"), line)
              for row, line in expanded)
    new_input = NewInput(file_id=new_id("file-"), filename=filename,
                         lines=checked_lines(places, body.endpoint, settings, source=source))
    return new_input.file_id, new_input


def _rows_file(scope: TenantScope, blobs: BlobStore, file_id: str) -> File:
    source = scope.get_file(file_id)
    if source is None or not blobs.exists(source.id):
        raise ApiError(404, f"No such File object: {file_id}", param="rows_file_id", code="file_not_found")
    if source.purpose != "batch":
        raise ApiError(400, f"rows_file_id: file {source.id} has purpose {source.purpose!r}, not 'batch'.",
                       param="rows_file_id", code="invalid_file_purpose")
    if rows_format(source.filename) is None:
        raise ApiError(400, f"rows_file_id: file {source.id} is named {source.filename!r}; a rows file is read by "
                       "its name, .csv (with a header row) or .jsonl, so upload it under such a name.",
                       param="rows_file_id", code="invalid_rows_file")
    return source


def checked_lines(items: Iterable[tuple[Place, Any]], endpoint: str, settings: Settings, *,
                  source: str) -> Iterator[bytes]:
    """Each item as its checked JSON line; ``source`` (the parameter they came in) is named when together
    they pass the upload limit."""
    seen: set[str] = set()
    total = 0
    for place, item in items:
        line = checked_line(place, item, endpoint, settings, seen)
        total += len(line)
        if total > settings.max_upload_bytes:
            raise ApiError(400, f"{source}: more than the upload limit of {settings.max_upload_bytes:,} bytes as "
                           "JSON lines (DIFFBATCH_MAX_UPLOAD_BYTES).", param=source, code="file_too_large")
        yield line


def checked_line(place: Place, item: Any, endpoint: str, settings: Settings, seen: set[str]) -> bytes:
    """One request as its JSON line, checked as an uploaded line is, or a 400 naming where it came from."""
    raw = json.dumps(item, separators=(",", ":")).encode()  # ASCII: a lone surrogate stays an escape
    if len(raw) > settings.max_line_bytes:
        raise ApiError(400, f"{place.where}: {len(raw):,} bytes as a JSON line; a line takes at most "
                       f"{settings.max_line_bytes:,} (DIFFBATCH_MAX_LINE_BYTES).", param=place.param(None),
                       code="line_too_large")
    parsed = parse_line(raw, 0)  # the envelope and body checks an uploaded line gets; `place` says where
    if isinstance(parsed, LineError):
        detail = parsed.message.removeprefix("Line 0: ")
        raise ApiError(400, f"{place.where}: {detail}", param=place.param(parsed.param), code=parsed.code)
    if parsed.url != endpoint:
        raise ApiError(400, f"{place.where}: url {parsed.url!r} differs from the batch's endpoint {endpoint!r}.",
                       param=place.param("url"), code="mismatched_endpoint")
    if parsed.custom_id in seen:
        raise ApiError(400, f"{place.where}: custom_id {parsed.custom_id!r} appears more than once.",
                       param=place.param("custom_id"), code="duplicate_custom_id")
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
    """The retry batch: the first one's endpoint, window, output expiry, webhook, priority and metadata, plus
    ``retry_of``; a 409 when that metadata would pass OpenAI's 16 pairs."""
    metadata = retry_metadata(first)
    if len(metadata) > MAX_METADATA_PAIRS:
        raise ApiError(409, f"Batch {first.id} has {MAX_METADATA_PAIRS} metadata pairs, so a retry has no room "
                       "for retry_of.", param="metadata", code="metadata_full")
    return BatchSpec(input_file_id=new_input.file_id, endpoint=first.endpoint,
                     completion_window=first.completion_window, metadata=metadata,
                     output_expires_after_s=first.output_expires_after_s, webhook_url=first.webhook_url,
                     idempotency_key=idempotency_key, request_hash=request_hash, priority=first.priority)
