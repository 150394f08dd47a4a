"""A Message Batch create body as the input file of a normal batch of endpoint /v1/messages: one line
`{custom_id, method: "POST", url: "/v1/messages", body: params}` a request.

What Anthropic checks when the batch is created is checked here (a 400 naming the request): the request
count and size limits, unique custom_ids, and (diffbatch's own) one model for the whole batch, since a
batch runs on one model's workers. The rest of each request's params is checked when it runs.
"""

from __future__ import annotations

import json

from api.anthropic_schemas import CreateMessageBatch
from api.errors import ApiError
from api.routes.batch_extensions import NewInput
from common.ids import new_id
from common.lines import MESSAGES_URL, LineError, parse_line
from common.settings import Settings

MAX_REQUESTS = 100_000  # Anthropic's limits on one Message Batch
MAX_BYTES = 256 * 1024 * 1024


def message_batch_input(body: CreateMessageBatch, settings: Settings) -> NewInput:
    """The batch's input file, or a 400 (413 past the size limit) whose message names the request."""
    items = body.requests
    if not items:
        raise ApiError(400, "requests: at least one request is required.", param="requests")
    limit = min(MAX_REQUESTS, settings.max_batch_requests)
    if len(items) > limit:
        raise ApiError(400, f"requests: {len(items):,} requests; a Message Batch takes at most {limit:,}"
                       f"{' (DIFFBATCH_MAX_BATCH_REQUESTS)' if limit < MAX_REQUESTS else ''}.", param="requests")
    byte_limit = min(MAX_BYTES, settings.max_upload_bytes)
    lines: list[bytes] = []
    first: dict[str, int] = {}
    model, total = None, 0
    for index, item in enumerate(items):
        where = f"requests.{index}"
        if item.custom_id in first:
            raise ApiError(400, f"{where}.custom_id: {item.custom_id!r} is also the custom_id of "
                           f"requests.{first[item.custom_id]}; custom_ids must be unique within a batch.",
                           param=f"{where}.custom_id")
        first[item.custom_id] = index
        line = {"custom_id": item.custom_id, "method": "POST", "url": MESSAGES_URL, "body": item.params}
        try:  # ASCII: a lone surrogate stays an escape
            raw = json.dumps(line, separators=(",", ":"), allow_nan=False).encode()
        except ValueError:  # Starlette reads NaN and Infinity, which JSON (and PostgreSQL's json) has not
            raise ApiError(400, f"{where}.params: NaN and Infinity are not JSON numbers.",
                           param=f"{where}.params") from None
        if len(raw) > settings.max_line_bytes:
            raise ApiError(400, f"{where}: {len(raw):,} bytes as a JSON line; a request may have at most "
                           f"{settings.max_line_bytes:,} (DIFFBATCH_MAX_LINE_BYTES).", param=where)
        parsed = parse_line(raw, index + 1)  # the envelope: params is an object with a string model
        if isinstance(parsed, LineError):
            field = (parsed.param or "body").replace("body", "params", 1)
            detail = parsed.message.removeprefix(f"Line {index + 1}: {parsed.param}: ")
            raise ApiError(400, f"{where}.{field}: {detail}", param=f"{where}.{field}")
        if model is not None and parsed.model != model:
            raise ApiError(400, f"{where}.params.model: {parsed.model!r} differs from requests.0's {model!r}; "
                           "a batch here runs on one model.", param=f"{where}.params.model")
        model = parsed.model
        total += len(raw) + 1
        if total > byte_limit:
            raise ApiError(413, f"requests: more than {byte_limit:,} bytes as JSON lines (Anthropic's 256 MB, or "
                           "DIFFBATCH_MAX_UPLOAD_BYTES if lower).", param="requests")
        lines.append(raw + b"\n")
    return NewInput(file_id=new_id("file-"), filename="message_batch_requests.jsonl", lines=lines)
