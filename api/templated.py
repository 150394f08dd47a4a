"""Templated batches (a diffbatch extension): one request body whose string values hold ``{{column}}``
placeholders, times a table of rows, is one request line per row.

Substitution happens in the parsed template's JSON string values only, so a value holding quotes, braces or
newlines stays inside its string, and a placeholder never stands for a number, an object or a key. A
placeholder is ``{{name}}`` (spaces inside the braces allowed) where the name starts with a letter or ``_``
and holds letters, digits, ``_``, ``-``, ``.`` and spaces; other ``{{...}}`` text, such as an infilling
hole ``{{fill:8}}``, is kept as written.

Rows come inline (a list of objects) or from an uploaded file, read as a stream: ``.csv`` (read with the
standard csv module; its first record names the columns) or ``.jsonl`` (one object a line). An error is a
400 naming the row as a person counts it (from 1, with the file's line) and its column, with ``param``
``rows[i].column`` (i from 0, as in the JSON list).
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from api.errors import ApiError
from common.storage import BlobStore, OversizedLine

# The column name is captured, "{{ lang }}" naming "lang". Spaces inside a name come only between
# words, so no run of spaces can belong to the name or to the \s* after it: with a lazy name that
# could, "{{a" and a megabyte of spaces took the regex about half an hour.
PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][\w.-]*(?: +[\w.-]+)*)\s*\}\}")
ROW_FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}


@dataclass(frozen=True)
class _Text:
    """A template string with placeholders: re.split's parts, literal text at even places, columns at odd."""

    parts: tuple[str, ...]

    def render(self, values: Mapping[str, str]) -> str:
        return "".join(part if i % 2 == 0 else values[part] for i, part in enumerate(self.parts))


class Template:
    """A request body compiled once: its strings with placeholders found, so each row only fills them in."""

    def __init__(self, body: dict[str, Any]) -> None:
        self.columns: dict[str, str] = {}  # each column used -> the first field using it, for error messages
        self._shape = self._compile(body, "body")

    def _compile(self, value: Any, path: str) -> Any:
        if isinstance(value, str):
            parts = PLACEHOLDER.split(value)
            if len(parts) == 1:
                return value
            for column in parts[1::2]:
                self.columns.setdefault(column, path)
            return _Text(tuple(parts))
        if isinstance(value, dict):
            return {key: self._compile(item, f"{path}.{key}") for key, item in value.items()}
        if isinstance(value, list):
            return [self._compile(item, f"{path}[{i}]") for i, item in enumerate(value)]
        return value

    def render(self, values: Mapping[str, str]) -> dict[str, Any]:
        body = _render(self._shape, values)
        assert isinstance(body, dict)  # compiled from a dict
        return body


def _render(shape: Any, values: Mapping[str, str]) -> Any:
    if isinstance(shape, _Text):
        return shape.render(values)
    if isinstance(shape, dict):
        return {key: _render(item, values) for key, item in shape.items()}
    if isinstance(shape, list):
        return [_render(item, values) for item in shape]
    return shape  # a scalar, shared between rows: nothing downstream mutates a line's body


@dataclass(frozen=True)
class Row:
    index: int  # from 0: rows[index]
    values: Mapping[str, Any] = field(default_factory=dict)
    line: int | None = None  # where it starts in the rows file

    @property
    def where(self) -> str:
        return f"row {self.index + 1}" + (f" (line {self.line})" if self.line is not None else "")

    def param(self, column: str | None = None) -> str:
        return f"rows[{self.index}]" + (f".{column}" if column is not None else "")

    def error(self, message: str, code: str, column: str | None = None) -> ApiError:
        return ApiError(400, f"{self.where}: {message}", param=self.param(column), code=code)


def expand(template: Template, rows: Iterable[Row], *, endpoint: str, custom_id_column: str | None,
           max_rows: int, source: str) -> Iterator[tuple[Row, dict[str, Any]]]:
    """Each row with its request line (not yet checked as a line); ``source`` is the parameter the rows
    came in, named by errors about all of them (none, too many)."""
    count = 0
    for row in rows:
        if count == max_rows:
            raise ApiError(400, f"{source}: more than {max_rows:,} rows; a batch takes at most {max_rows:,} "
                           "requests (DIFFBATCH_MAX_BATCH_REQUESTS).", param=source, code="batch_too_large")
        values = {column: _text(row, column, used_by) for column, used_by in template.columns.items()}
        yield row, {"custom_id": _custom_id(row, custom_id_column), "method": "POST", "url": endpoint,
                    "body": template.render(values)}
        count += 1
    if count == 0:
        raise ApiError(400, f"{source}: no rows; a templated batch needs at least one.", param=source,
                       code="empty_file")


def _text(row: Row, column: str, used_by: str) -> str:
    if column not in row.values:
        raise row.error(f"column {column!r} is missing (used by {used_by}).", "missing_column", column)
    value = row.values[column]
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return json.dumps(value)
    kind = "null" if value is None else f"a JSON {'object' if isinstance(value, dict) else 'array'}"
    raise row.error(f"column {column!r} is {kind} (used by {used_by}); a placeholder takes a string, number "
                    "or boolean.", "invalid_value", column)


def _custom_id(row: Row, column: str | None) -> str:
    if column is None:
        return f"row-{row.index + 1}"
    if column not in row.values:
        raise row.error(f"column {column!r} (custom_id_column) is missing.", "missing_column", column)
    value = row.values[column]
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise row.error(f"column {column!r} (custom_id_column) must be a string or an integer.", "invalid_value",
                        column)
    if value == "":
        raise row.error(f"column {column!r} (custom_id_column) is empty; each request needs a custom_id.",
                        "empty_custom_id", column)
    return str(value)


# ------------------------------------------------------------------------------------ row sources


def inline_rows(rows: list[Any]) -> Iterator[Row]:
    for index, values in enumerate(rows):
        if not isinstance(values, dict):
            raise Row(index).error("must be an object of column values.", "invalid_row")
        yield Row(index, values)


def rows_format(filename: str) -> str | None:
    """``csv`` or ``jsonl`` by the file's name; None when it says neither."""
    suffix = filename[filename.rfind("."):].lower() if "." in filename else ""
    return ROW_FORMATS.get(suffix)


def file_rows(blobs: BlobStore, file_id: str, fmt: str, max_line_bytes: int) -> Iterator[Row]:
    return csv_rows(blobs, file_id, max_line_bytes) if fmt == "csv" else jsonl_rows(blobs, file_id, max_line_bytes)


def jsonl_rows(blobs: BlobStore, file_id: str, max_line_bytes: int) -> Iterator[Row]:
    """One row a non-blank line; a line over ``max_line_bytes`` is refused unread (OversizedLine)."""
    index = 0
    for number, raw in enumerate(blobs.lines(file_id, max_line_bytes=max_line_bytes), start=1):
        row = Row(index, line=number)
        if isinstance(raw, OversizedLine):
            raise row.error(f"at least {raw.at_least:,} bytes; a line may have at most {max_line_bytes:,} "
                            "(DIFFBATCH_MAX_LINE_BYTES).", "line_too_large")
        if not raw.strip():
            continue
        try:
            values = json.loads(raw.decode("utf-8-sig"))  # a byte-order mark (Windows editors) is no error
        except UnicodeDecodeError as exc:
            raise row.error(f"not valid UTF-8 (byte {exc.start}).", "invalid_encoding") from exc
        except (ValueError, RecursionError) as exc:
            raise row.error(f"not valid JSON: {exc}.", "invalid_row") from exc
        if not isinstance(values, dict):
            raise row.error("must be a JSON object of column values.", "invalid_row")
        yield Row(index, values, number)
        index += 1


class _LongLine(Exception):
    pass


def csv_rows(blobs: BlobStore, file_id: str, max_line_bytes: int) -> Iterator[Row]:
    """The records after the header, as {column: text}, read as the blob streams; a line over
    ``max_line_bytes`` is refused before it is read whole."""
    # A field may be as long as a line (the module's default stops at 128 KiB). Process-wide, and only raised.
    csv.field_size_limit(max(csv.field_size_limit(), max_line_bytes))
    with io.BufferedReader(_ChunkReader(blobs.read_chunks(file_id))) as stream:
        reader = csv.reader(_text_lines(stream, max_line_bytes))
        header: list[str] | None = None
        index, start = 0, 1
        while True:
            row = Row(index, line=start)
            try:
                fields = next(reader, None)
            except UnicodeDecodeError as exc:
                raise _csv_error(header, row, "not valid UTF-8.", "invalid_encoding") from exc
            except _LongLine as exc:
                raise _csv_error(header, row, f"a line over {max_line_bytes:,} bytes (DIFFBATCH_MAX_LINE_BYTES).",
                                 "line_too_large") from exc
            except csv.Error as exc:
                raise _csv_error(header, row, f"not valid CSV: {exc}.", "invalid_row") from exc
            if fields is None:
                break
            start = reader.line_num + 1
            if not fields:  # a blank line
                continue
            if header is None:
                header = _header(fields)
                continue
            if len(fields) != len(header):
                raise row.error(f"{len(fields)} fields; the header has {len(header)} columns "
                                f"({', '.join(header)}).", "invalid_row")
            yield Row(index, dict(zip(header, fields, strict=True)), row.line)
            index += 1
    if header is None:
        raise ApiError(400, "rows_file_id: the CSV file has no header row (the column names).",
                       param="rows_file_id", code="empty_file")


def _text_lines(stream: io.BufferedIOBase, limit: int) -> Iterator[str]:
    """The stream's lines with their endings (the csv module reads quoted newlines itself), each decoded
    alone, so a bad byte is blamed on its own record (a UTF-8 character never holds a newline byte)."""
    first = True
    while line := stream.readline(limit + 1):
        if len(line) > limit and not line.endswith(b"\n"):
            raise _LongLine
        text = line.decode("utf-8")
        if first:
            text, first = text.removeprefix("\ufeff"), False  # a byte-order mark (Windows editors) is no error
        yield text


def _header(fields: list[str]) -> list[str]:
    seen: set[str] = set()
    for name in fields:
        if name in seen:
            raise ApiError(400, f"rows_file_id: the CSV header names column {name!r} twice.",
                           param="rows_file_id", code="duplicate_column")
        seen.add(name)
    return fields


def _csv_error(header: list[str] | None, row: Row, message: str, code: str) -> ApiError:
    if header is None:
        return ApiError(400, f"rows_file_id: the CSV header (line {row.line}): {message}", param="rows_file_id",
                        code=code)
    return row.error(message, code)


class _ChunkReader(io.RawIOBase):
    """A blob's chunks (BlobStore.read_chunks) as a binary stream, for TextIOWrapper to decode as it goes."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._rest = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._rest:
            chunk = next(self._chunks, None)
            if chunk is None:
                return 0
            self._rest = memoryview(chunk)
        size = min(len(buffer), len(self._rest))
        buffer[:size] = self._rest[:size]
        self._rest = self._rest[size:]
        return size

    def close(self) -> None:
        close = getattr(self._chunks, "close", None)
        if close is not None:
            close()  # a generator's file closes now, not when it is collected
        super().close()
