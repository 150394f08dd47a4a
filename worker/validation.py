"""Validate a batch's input file, store its requests in chunks, and ring one doorbell per chunk.

Two streaming passes over the file: the first collects every error (so the user sees them all at once,
as OpenAI's `errors.data[]`); the second inserts the requests a chunk at a time. The batch turns
`in_progress` only after the last chunk is stored, so a crash half-way leaves it `validating` for the
reconciler to retry from scratch; no chunk is dispatched before every request is stored.

The reconciler cannot tell a lost validation from a slow one, so two attempts may run at once. Each
claims the batch with a token when it starts (repo.claim_validation) and writes only while it still
holds it (repo.holds_validation): the later attempt takes over and starts from scratch, and the
earlier one stops at its next write, keeping nothing and discarding nothing of the other's.
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from collections.abc import Iterator

from common import metrics
from common.ids import new_id, now
from common.lines import CHECKED_WHEN_RUN, LineError, ParsedLine, output_limit, parse_line
from common.queue import RUN_CHUNK
from common.settings import queue_for_model
from common.storage import OversizedLine
from db import repo
from db.models import BatchStatus, RequestStatus
from worker.leases import FIRST_SEND_PRIORITY
from worker.responses import error_code_and_param, to_generation_request
from worker.runtime import Runtime

log = logging.getLogger("diffbatch.worker")
MAX_LISTED_ERRORS = 100


class _TakenOver(Exception):
    """This attempt no longer owns the batch's validation: another took over, or it was cancelled."""


def validate_batch(rt: Runtime, batch_id: str) -> None:
    token = new_id("val_")
    with rt.session() as session, session.begin():
        batch = repo.get_batch(session, batch_id=batch_id)
        if batch is None or not repo.claim_validation(session, batch_id=batch_id, token=token, now=now()):
            return
        session.refresh(batch)  # the claim counted this attempt
        attempts, endpoint = batch.validation_attempts, batch.endpoint
        source = repo.get_file(session, file_id=batch.input_file_id)
    started, outcome = time.monotonic(), "error"
    try:
        if refusal := _refusal(rt, source, attempts):
            _fail(rt, batch_id, token, [refusal])
            outcome = "rejected"
            return
        assert source is not None  # _refusal refuses a missing file
        errors, model, count = _check_lines(rt, batch_id, token, source.id, endpoint)
        if errors:
            _fail(rt, batch_id, token, errors)
            outcome = "rejected"
        else:
            assert model is not None  # a file without errors has a line, so a model
            _store(rt, batch_id, token, source.id, model, count)
            outcome = "accepted"
    except _TakenOver:
        outcome = "taken_over"
        _stop(rt, batch_id, token)
    finally:
        metrics.validation_done(outcome, time.monotonic() - started)


def _own(session, batch_id: str, token: str) -> None:
    """Inside a write transaction: raise _TakenOver unless this attempt still owns the validation."""
    if not repo.holds_validation(session, batch_id=batch_id, token=token, now=now()):
        raise _TakenOver


def _stop(rt: Runtime, batch_id: str, token: str) -> None:
    """What an attempt that lost the batch leaves: nothing it stored if the batch was cancelled (or
    expired) while it validated; everything if another attempt took over, which owns it now."""
    with rt.session() as session, session.begin():
        batch = repo.get_batch(session, batch_id=batch_id, for_update=True)
        if batch is not None and batch.validation_token == token and batch.status != BatchStatus.validating:
            repo.discard_requests(session, batch_id=batch_id)
    log.info("batch %s: validation attempt %s stopped (taken over or cancelled)", batch_id, token)


def _refusal(rt: Runtime, source, attempts: int) -> LineError | None:
    """Why this attempt fails the batch before reading a line, if it does."""
    limits = rt.settings
    if attempts > limits.max_validation_attempts:
        return LineError(0, "validation_failed", f"Validation gave up after {attempts - 1} attempts "
                         "(DIFFBATCH_MAX_VALIDATION_ATTEMPTS): the file may be too large, or the validator "
                         "keeps dying on it.")
    if source is None or not rt.blobs.exists(source.id):
        return LineError(0, "file_not_found", "The input file no longer exists.")
    if source.line_count is not None and source.line_count > limits.max_batch_requests:
        return _too_many(source.line_count, limits.max_batch_requests)
    return None


def _too_many(count: int, limit: int) -> LineError:
    return LineError(0, "batch_too_large", f"The input file has {count:,} requests; a batch takes at most "
                     f"{limit:,} (DIFFBATCH_MAX_BATCH_REQUESTS).")


def _lines(rt: Runtime, file_id: str) -> Iterator[ParsedLine | LineError]:
    limit = rt.settings.max_line_bytes
    for number, raw in enumerate(rt.blobs.lines(file_id, max_line_bytes=limit), start=1):
        if isinstance(raw, OversizedLine):  # refused before parsing: a 50 MB line costs no memory
            yield LineError(number, "line_too_large", f"Line {number}: at least {raw.at_least:,} bytes; a line "
                            f"may have at most {limit:,} (DIFFBATCH_MAX_LINE_BYTES).")
        elif raw.strip():  # blank lines (a trailing newline, say) carry no request
            yield parse_line(raw, number)


def _count_requests(rt: Runtime, file_id: str, pulse: _Pulse) -> int:
    """The file's non-blank lines, read without parsing them."""
    count = 0
    for raw in rt.blobs.lines(file_id, max_line_bytes=rt.settings.max_line_bytes):
        count += isinstance(raw, OversizedLine) or bool(raw.strip())
        pulse.beat()
    return count


class _Pulse:
    """Touches the batch every few seconds of work, so the reconciler sees the validation alive."""

    def __init__(self, rt: Runtime, batch_id: str, token: str) -> None:
        self.rt, self.batch_id, self.token = rt, batch_id, token
        self.last = time.monotonic()

    def beat(self) -> None:
        if time.monotonic() - self.last < self.rt.settings.validation_touch_s:
            return
        with self.rt.session() as session, session.begin():
            _own(session, self.batch_id, self.token)
        self.last = time.monotonic()


def _check_lines(rt: Runtime, batch_id: str, token: str, file_id: str,
                 endpoint: str) -> tuple[list[LineError], str | None, int]:
    errors: list[LineError] = []
    seen: set[str] = set()
    model, model_line, count = None, 0, 0
    pulse, limit = _Pulse(rt, batch_id, token), rt.settings.max_batch_requests
    for item in _lines(rt, file_id):
        count += 1
        pulse.beat()
        if count > limit:
            return [_too_many(_count_requests(rt, file_id, pulse), limit)], None, count
        if isinstance(item, LineError):
            errors.append(item)
        elif item.url != endpoint:
            errors.append(LineError(item.line, "mismatched_endpoint",
                                    f"Line {item.line}: url {item.url!r} differs from the batch's endpoint "
                                    f"{endpoint!r}.", "url"))
        elif item.custom_id in seen:
            errors.append(LineError(item.line, "duplicate_custom_id",
                                    f"Line {item.line}: custom_id {item.custom_id!r} appears more than once.",
                                    "custom_id"))
        elif model is not None and item.model != model:
            errors.append(LineError(item.line, "mismatched_model",
                                    f"Line {item.line}: body.model {item.model!r} differs from {model!r}; "
                                    "a batch uses one model.", "body.model"))
        elif item.model == rt.model_name and item.url not in CHECKED_WHEN_RUN and (error := _fits_model(rt, item)):
            errors.append(error)  # (a CHECKED_WHEN_RUN request the model cannot run fails alone when it runs)
        else:
            model, model_line = item.model, model_line or item.line
        if isinstance(item, ParsedLine):
            seen.add(item.custom_id)
    if count == 0:
        errors.append(LineError(0, "empty_file", "The input file has no requests."))
    elif model is not None and not errors and model not in (served := _served_models(rt)):
        errors.append(LineError(model_line, "model_not_found",
                                f"Line {model_line}: body.model {model!r} is not served by any worker "
                                f"(served: {', '.join(sorted(served)) or 'none'}).", "body.model"))
    return errors, model, count


def _served_models(rt: Runtime) -> set[str]:
    with rt.session() as session:
        live = repo.known_workers(session, since=now() - rt.settings.stale_after_s)
    return {w.model for w in live} | {rt.model_name}


def _store(rt: Runtime, batch_id: str, token: str, file_id: str, model: str, count: int) -> None:
    """Insert the requests one chunk per transaction (short write locks), then open the batch.

    Leftovers of an interrupted earlier attempt are discarded first, so a retry starts clean.
    """
    queue, size = queue_for_model(model), rt.settings.chunk_size
    with rt.session() as session, session.begin():
        _own(session, batch_id, token)
        repo.discard_requests(session, batch_id=batch_id)
    chunk_ids: list[int] = []
    lines = (item for item in _lines(rt, file_id) if isinstance(item, ParsedLine))  # the first pass found all ok
    while group := list(itertools.islice(lines, size)):
        with rt.session() as session, session.begin():
            _own(session, batch_id, token)
            chunk_id = repo.add_chunk(session, batch_id=batch_id, queue=queue, size=len(group), now=now())
            repo.add_requests(session, rows=[_request_row(rt, batch_id, chunk_id, item) for item in group])
        chunk_ids.append(chunk_id)
    with rt.session() as session, session.begin():
        _own(session, batch_id, token)
        repo.transition(session, batch_id=batch_id, from_=[BatchStatus.validating], to=BatchStatus.in_progress,
                        now=now(), model=model, total=count)
    for chunk_id in chunk_ids:
        rt.celery.send_task(RUN_CHUNK, args=(chunk_id,), queue=queue, priority=FIRST_SEND_PRIORITY)
    log.info("batch %s: %d requests in %d chunks on %s", batch_id, count, len(chunk_ids), queue)


def _request_row(rt: Runtime, batch_id: str, chunk_id: int, item: ParsedLine) -> dict:
    return {"public_id": new_id("batch_req_"), "batch_id": batch_id, "chunk_id": chunk_id,
            "custom_id": item.custom_id, "line": item.line, "url": item.url, "body": item.body,
            "status": RequestStatus.pending, "attempts": 0, "budget_tokens": _budget_tokens(rt, item)}


def _budget_tokens(rt: Runtime, item: ParsedLine) -> int:
    """What the request may cost, for its tenant's token quota: prompt tokens plus max_tokens. For a model
    this process cannot tokenize for, the prompt is estimated at four bytes of the body a token."""
    if item.model == rt.model_name:
        try:
            request = to_generation_request(rt.engine, item.url, item.body, rt.settings.diffusion_defaults)
            return len(request.prompt_ids) + request.params.max_tokens
        except ValueError:
            if item.url not in CHECKED_WHEN_RUN:  # else: unchecked so far, it fails alone when it runs
                log.warning("batch line %d: token budget estimated", item.line, exc_info=True)
        except Exception:  # the line was checked already; an estimate beats a failed validation
            log.warning("batch line %d: token budget estimated", item.line, exc_info=True)
    return len(json.dumps(item.body).encode()) // 4 + output_limit(item.url, item.body)


def _fits_model(rt: Runtime, item: ParsedLine) -> LineError | None:
    try:
        to_generation_request(rt.engine, item.url, item.body, rt.settings.diffusion_defaults)
    except ValueError as exc:
        code, param = error_code_and_param(exc, item.url)
        return LineError(item.line, code, f"Line {item.line}: {param}: {exc}", param)
    except Exception as exc:  # the line's own doing (nothing here touches the database): say so, once,
        # rather than crash the validation, which the reconciler would retry forever
        log.exception("batch line %d could not be prepared for the model", item.line)
        return LineError(item.line, "invalid_request", f"Line {item.line}: body: could not be prepared for "
                         f"the model ({type(exc).__name__}: {exc}).", "body")
    return None


def _fail(rt: Runtime, batch_id: str, token: str, errors: list[LineError]) -> None:
    listed = [e.as_dict() for e in errors[:MAX_LISTED_ERRORS]]
    if len(errors) > MAX_LISTED_ERRORS:
        listed.append({"code": "too_many_errors", "line": None, "param": None,
                       "message": f"{len(errors) - MAX_LISTED_ERRORS} more errors not listed."})
    with rt.session() as session, session.begin():
        _own(session, batch_id, token)
        repo.transition(session, batch_id=batch_id, from_=[BatchStatus.validating], to=BatchStatus.failed,
                        now=now(), errors=listed)
    log.info("batch %s failed validation: %s", batch_id, listed[0]["message"])
