"""Streamed multipart uploads: the file part goes straight into the blob store, counted as it arrives.

FastAPI's UploadFile spools the whole body before the handler runs, so a size limit checked there
comes after the disk is full. Here the body is parsed as it streams (python-multipart): past the
limit the upload stops at once with a 413, and nothing of it is kept.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, Request
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool

from api.deps import get_blobs, get_settings
from api.errors import ApiError
from common.ids import new_id
from common.storage import BlobWriter

if TYPE_CHECKING:  # declared for type checkers only
    from python_multipart.multipart import MultipartCallbacks

FIELD_BYTES = 64 * 1024  # a form field other than the file (purpose, expires_after[...]) is short
MAX_PARTS = 16
FORM_SLACK = MAX_PARTS * (FIELD_BYTES + 1024)  # the other fields and the parts' headers
FLUSH_BYTES = 1 << 20
# OpenAI's multipart fields for POST /v1/files, documented in the OpenAPI schema (the handler reads the stream).
UPLOAD_OPENAPI = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file", "purpose"],
    "properties": {
        "file": {"type": "string", "format": "binary", "description": "JSONL, one request a line"},
        "purpose": {"type": "string", "enum": ["batch"]},
        "expires_after[anchor]": {"type": "string", "enum": ["created_at"]},
        "expires_after[seconds]": {"type": "integer", "minimum": 3600, "maximum": 2592000},
    }}}}}}


class LineCounter:
    """Counts non-blank lines of a stream fed in pieces, holding no more than one piece."""

    def __init__(self) -> None:
        self.count = 0
        self._open_line_has_text = False

    def feed(self, data: bytes) -> None:
        *complete, rest = data.split(b"\n")
        if complete:
            first, *others = complete
            self.count += bool(self._open_line_has_text or first.strip())
            self.count += sum(1 for line in others if line and line.strip())
            self._open_line_has_text = False
        self._open_line_has_text = self._open_line_has_text or bool(rest.strip())

    def total(self) -> int:
        return self.count + self._open_line_has_text


@dataclass
class ReceivedUpload:
    """The parsed form: the file, written but not yet committed, and the other fields as text."""

    file_id: str
    blob: BlobWriter
    filename: str
    fields: dict[str, str]
    line_count: int
    size: int

    def commit(self) -> None:
        self.blob.commit()

    def purpose(self) -> str:
        purpose = self.fields.get("purpose")
        if purpose is None:
            raise ApiError(400, "purpose: a purpose is required ('batch').", param="purpose",
                           code="missing_required_parameter")
        if purpose != "batch":
            raise ApiError(400, f"purpose must be 'batch', got {purpose!r}", param="purpose")
        return purpose

    def expires_at(self, created: int, retention_days: int) -> int | None:
        """OpenAI's expires_after (anchor created_at, 1 hour to 30 days), else the server's retention."""
        anchor, seconds = self.fields.get("expires_after[anchor]"), self.fields.get("expires_after[seconds]")
        if anchor is None and seconds is None:
            return created + retention_days * 86400 if retention_days else None
        if anchor != "created_at":
            raise ApiError(400, f"expires_after[anchor] must be 'created_at', got {anchor!r}",
                           param="expires_after[anchor]", code="invalid_value")
        if seconds is None or not seconds.strip().isdigit() or not 3600 <= int(seconds) <= 2592000:
            raise ApiError(400, f"expires_after[seconds] must be a whole number from 3600 (1 hour) to 2592000 "
                           f"(30 days), got {seconds!r}", param="expires_after[seconds]", code="invalid_value")
        return created + int(seconds)


class _Form:
    """The parser's callbacks: fields kept as bytes (short), file data queued for the blob, counted."""

    def __init__(self, blob: BlobWriter, limit: int) -> None:
        self.blob, self.limit = blob, limit
        self.fields: dict[str, str] = {}
        self.filename: str | None = None
        self.lines = LineCounter()
        self.pending: list[bytes] = []
        self.received = 0  # bytes of the file part
        self.has_file = self.ended = False
        self._parts, self._name, self._in_file = 0, "", False
        self._header, self._disposition, self._value = (b"", b""), b"", bytearray()

    # python-multipart callbacks ------------------------------------------------------------
    def on_part_begin(self) -> None:
        self._parts += 1
        if self._parts > MAX_PARTS:
            raise ApiError(400, f"The form has more than {MAX_PARTS} parts.", code="invalid_multipart")
        self._disposition, self._value, self._in_file = b"", bytearray(), False

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header = (self._header[0] + data[start:end], self._header[1])

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header = (self._header[0], self._header[1] + data[start:end])

    def on_header_end(self) -> None:
        if self._header[0].lower() == b"content-disposition":
            self._disposition = self._header[1]
        self._header = (b"", b"")

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        self._name = options.get(b"name", b"").decode("utf-8", "replace")
        if b"filename" not in options:
            return
        if self._name != "file" or self.has_file:
            raise ApiError(400, "The form takes one file, in the field 'file'.", param="file",
                           code="invalid_multipart")
        self.filename = options[b"filename"].decode("utf-8", "replace")
        self.has_file = self._in_file = True

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        piece = data[start:end]
        if self._in_file:
            self.received += len(piece)
            if self.received > self.limit:
                raise _TooLarge
            self.lines.feed(piece)
            self.pending.append(piece)
        elif len(self._value) + len(piece) > FIELD_BYTES:
            raise ApiError(400, f"{self._name}: longer than {FIELD_BYTES} bytes.", param=self._name or None,
                           code="invalid_multipart")
        else:
            self._value += piece

    def on_part_end(self) -> None:
        if self._in_file:
            return
        try:
            self.fields[self._name] = self._value.decode("utf-8")
        except UnicodeDecodeError:
            raise ApiError(400, f"{self._name}: not valid UTF-8.", param=self._name or None,
                           code="invalid_multipart") from None

    def on_end(self) -> None:
        self.ended = True

    def callbacks(self) -> MultipartCallbacks:
        return {"on_part_begin": self.on_part_begin, "on_header_field": self.on_header_field,
                "on_header_value": self.on_header_value, "on_header_end": self.on_header_end,
                "on_headers_finished": self.on_headers_finished, "on_part_data": self.on_part_data,
                "on_part_end": self.on_part_end, "on_end": self.on_end}

    async def flush(self) -> None:
        if self.pending:
            data, self.pending = b"".join(self.pending), []
            await run_in_threadpool(self.blob.write, data)


class _TooLarge(Exception):
    pass


def too_large(limit: int) -> ApiError:
    return ApiError(413, f"The file is larger than the upload limit of {limit:,} bytes ({limit / 2**20:g} MiB, "
                    "DIFFBATCH_MAX_UPLOAD_BYTES).", param="file", code="file_too_large")


def _boundary(request: Request, limit: int) -> bytes:
    kind, options = parse_options_header(request.headers.get("content-type"))
    if kind != b"multipart/form-data" or not options.get(b"boundary"):
        raise ApiError(400, "The upload must be multipart/form-data with the fields 'file' and 'purpose'.",
                       param="file", code="invalid_multipart")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit + FORM_SLACK:
        raise too_large(limit)  # refused before a byte of the body is read
    return options[b"boundary"]


async def _parse(request: Request, form: _Form, boundary: bytes) -> None:
    parser = MultipartParser(boundary, form.callbacks())
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > form.limit + FORM_SLACK:
            raise _TooLarge
        parser.write(chunk)
        if sum(map(len, form.pending)) >= FLUSH_BYTES:
            await form.flush()
    parser.finalize()
    await form.flush()


async def receive_upload(request: Request) -> AsyncIterator[ReceivedUpload]:
    """Parse the multipart body into a blob being written; the blob is discarded unless committed."""
    settings, blobs = get_settings(request), get_blobs(request)
    limit, file_id = settings.max_upload_bytes, new_id("file-")
    boundary = _boundary(request, limit)
    form = _Form(blobs.writer(file_id), limit)
    try:
        await _parse(request, form, boundary)
        if not form.has_file:
            raise ApiError(400, "file: a file is required.", param="file", code="missing_required_parameter")
        if not form.ended:
            raise ApiError(400, "The multipart body ends before its closing boundary.", code="invalid_multipart")
    except BaseException as exc:
        await run_in_threadpool(form.blob.discard)
        if isinstance(exc, _TooLarge):
            raise too_large(limit) from None
        if isinstance(exc, FormParserError):
            raise ApiError(400, f"The multipart body is malformed: {exc}.", code="invalid_multipart") from None
        raise
    upload = ReceivedUpload(file_id=file_id, blob=form.blob, filename=form.filename or "", fields=form.fields,
                            line_count=form.lines.total(), size=form.received)
    try:
        yield upload
    finally:
        upload.blob.discard()  # a no-op once committed


UploadDep = Annotated[ReceivedUpload, Depends(receive_upload)]
