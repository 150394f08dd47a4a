"""Limits: upload size (streamed, 413, nothing kept), requests per batch, line size, validation attempts."""

from __future__ import annotations

import asyncio
import json
import tracemalloc

import httpx
import pytest

from common.settings import Settings
from db import repo
from db.models import Batch, File
from tests.harness import Service, completion_line
from tests.live_server import live_server
from worker import validation

BOUNDARY = "diffbatch-test-boundary"
MiB = 1024 * 1024


def _multipart(file_chunks, purpose: str = "batch"):
    """A multipart body streamed from ``file_chunks``: never held whole in memory."""
    yield (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\n{purpose}\r\n'
           f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="big.jsonl"\r\n'
           "Content-Type: application/jsonl\r\n\r\n").encode()
    yield from file_chunks
    yield f"\r\n--{BOUNDARY}--\r\n".encode()


def _lines_of(total_bytes: int):
    line = json.dumps(completion_line("x" * 40)).encode() + b"\n"
    chunk = line * (MiB // len(line))
    for _ in range(total_bytes // len(chunk) + 1):
        yield chunk


def _nothing_kept(svc: Service) -> None:
    assert svc.client.get("/v1/files").json()["data"] == []
    blobs = svc.settings.files_dir
    assert not blobs.exists() or list(blobs.iterdir()) == []  # no blob, no *.partial


@pytest.fixture
def api(tmp_path, tiny_model):
    return Service.embedded(tmp_path, tiny_model)


def _post(url: str, body, **headers) -> httpx.Response:
    return httpx.post(f"{url}/v1/files", content=body, timeout=120,
                      headers={"content-type": f"multipart/form-data; boundary={BOUNDARY}", **headers})


def test_a_300_mb_upload_is_a_413_naming_the_limit_and_nothing_is_kept(api):
    with live_server(api.client.app) as url:
        response = _post(url, _multipart(_lines_of(300 * MiB)))  # chunked: counted while it streams
    assert response.status_code == 413, response.text
    error = response.json()["error"]
    assert error["code"] == "file_too_large" and error["param"] == "file"
    assert "209,715,200 bytes" in error["message"] and "DIFFBATCH_MAX_UPLOAD_BYTES" in error["message"]
    _nothing_kept(api)


def test_a_declared_size_over_the_limit_is_refused_before_the_body_is_read(tmp_path, tiny_model):
    svc = Service.embedded(tmp_path, tiny_model, max_upload_bytes=1000)
    pulled, sent = [], []

    async def receive():
        pulled.append(1)
        return {"type": "http.request", "body": b"x" * MiB, "more_body": True}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/files", "raw_path": b"/v1/files", "query_string": b"", "root_path": "",
             "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000),
             "headers": [(b"content-type", f"multipart/form-data; boundary={BOUNDARY}".encode()),
                         (b"content-length", str(300 * MiB).encode())]}
    asyncio.run(svc.client.app(scope, receive, send))
    assert sent[0]["status"] == 413 and pulled == []
    assert b"1,000 bytes" in sent[1]["body"]
    _nothing_kept(svc)


def test_a_json_body_past_the_upload_limit_is_a_413_declared_or_counted(tmp_path, tiny_model):
    # Inline requests make large JSON bodies normal: they are bounded like uploads (plus 1 MiB of slack).
    with Service.embedded(tmp_path, tiny_model, max_upload_bytes=1000) as svc:
        items = [completion_line(f"r{i}", prompt="x" * 4000) for i in range(300)]  # ~1.3 MB
        body = json.dumps({"requests": items, "endpoint": "/v1/completions", "completion_window": "24h"})
        declared = svc.client.post("/v1/batches", content=body, headers={"content-type": "application/json"})
        assert declared.status_code == 413 and declared.json()["error"]["code"] == "body_too_large"

        def chunked():
            for start in range(0, len(body), 65536):
                yield body[start:start + 65536].encode()
        counted = svc.client.post("/v1/batches", content=chunked(), headers={"content-type": "application/json"})
        assert counted.status_code == 413 and counted.json()["error"]["param"] == "body"
        small = svc.client.post("/v1/batches", json={"requests": [completion_line("r")], "endpoint": "/v1/completions",
                                                     "completion_window": "24h"})
        assert small.status_code == 200, small.text
        assert svc.client.get("/v1/batches").json()["data"][0]["id"] == small.json()["id"]


def test_a_small_configured_limit_counts_the_file_bytes_exactly(tmp_path, tiny_model):
    svc = Service.embedded(tmp_path, tiny_model, max_upload_bytes=1000)
    exact = svc.client.post("/v1/files", files={"file": ("a.jsonl", b"x" * 1000)}, data={"purpose": "batch"})
    assert exact.status_code == 200 and exact.json()["bytes"] == 1000
    over = svc.client.post("/v1/files", files={"file": ("a.jsonl", b"x" * 1001)}, data={"purpose": "batch"})
    assert over.status_code == 413 and over.json()["error"]["code"] == "file_too_large"
    assert [f["id"] for f in svc.client.get("/v1/files").json()["data"]] == [exact.json()["id"]]
    assert [p.name for p in svc.settings.files_dir.iterdir()] == [exact.json()["id"]]


def test_the_openai_sdk_uploads_through_the_streaming_parser(api):
    from openai import OpenAI

    client = OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=api.client)
    created = client.files.create(file=("in.jsonl", b'{"a": 1}\n\n{"b": 2}\n'), purpose="batch")
    assert created.bytes == 19 and created.filename == "in.jsonl" and created.purpose == "batch"
    assert api.client.get(f"/v1/files/{created.id}/content").content == b'{"a": 1}\n\n{"b": 2}\n'
    with api.runtime.session() as session:
        assert repo.get_file(session, file_id=created.id).line_count == 2  # blank lines carry no request


def test_a_file_over_the_request_limit_is_refused_at_create(tmp_path, tiny_model):
    svc = Service.embedded(tmp_path, tiny_model, max_batch_requests=2)
    lines = b"".join(json.dumps(completion_line(str(i))).encode() + b"\n" for i in range(3))
    response = svc.client.post("/v1/batches", json={"input_file_id": svc.upload(lines)["id"],
                                                    "endpoint": "/v1/completions"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "batch_too_large" and error["param"] == "input_file_id"
    assert "has 3 requests" in error["message"] and "at most 2 " in error["message"]


def _created_batch(svc: Service, content: bytes) -> str:
    response = svc.client.post("/v1/batches", json={"input_file_id": svc.upload(content)["id"],
                                                    "endpoint": "/v1/completions"})
    assert response.status_code == 200, response.text
    return response.json()["id"]


def _errors(svc: Service, batch_id: str) -> tuple[str, list[dict]]:
    batch = svc.client.get(f"/v1/batches/{batch_id}").json()
    return batch["status"], (batch["errors"] or {}).get("data", [])


@pytest.mark.parametrize("uploaded_count_known", [True, False])
def test_validation_fails_a_batch_over_the_request_limit_naming_limit_and_count(api, uploaded_count_known):
    lines = b"".join(json.dumps(completion_line(str(i))).encode() + b"\n" for i in range(5))
    batch_id = _created_batch(api, lines)
    api.settings.max_batch_requests = 3  # lowered after the create (a restarted worker, say)
    if not uploaded_count_known:
        with api.runtime.session() as session, session.begin():
            session.get(File, session.get(Batch, batch_id).input_file_id).line_count = None
    validation.validate_batch(api.runtime, batch_id)
    status, errors = _errors(api, batch_id)
    assert status == "failed" and [e["code"] for e in errors] == ["batch_too_large"]
    assert "has 5 requests" in errors[0]["message"] and "at most 3 " in errors[0]["message"]


def test_a_50_mb_line_fails_its_batch_without_being_held_in_memory(api):
    line_limit = Settings().max_line_bytes
    # A model no worker serves: the engine is never loaded, so the peak is the reader's alone.
    first, last = (json.dumps(completion_line(name, model="elsewhere")).encode() + b"\n" for name in "ab")
    batch_id = _created_batch(api, first + b'{"custom_id": "' + b"y" * (50 * MiB) + b'"}\n' + last)
    tracemalloc.start()
    try:
        validation.validate_batch(api.runtime, batch_id)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    status, errors = _errors(api, batch_id)
    assert status == "failed" and [(e["code"], e["line"]) for e in errors] == [("line_too_large", 2)]
    assert f"at most {line_limit:,}" in errors[0]["message"] and "DIFFBATCH_MAX_LINE_BYTES" in errors[0]["message"]
    # A bounded read holds up to the limit (twice, as readline joins its pieces); never the 50 MB line.
    assert peak < 2 * line_limit + 4 * MiB < 50 * MiB, f"validation held {peak:,} bytes at once"


def test_validation_gives_up_after_the_configured_attempts(api, monkeypatch):
    batch_id = _created_batch(api, json.dumps(completion_line("a")).encode() + b"\n")

    def dies(*_args, **_kwargs):
        raise MemoryError("the validator was killed")

    monkeypatch.setattr(validation, "_check_lines", dies)
    for _ in range(api.settings.max_validation_attempts):  # each attempt claims the batch, then dies
        with pytest.raises(MemoryError):
            validation.validate_batch(api.runtime, batch_id)
        assert _errors(api, batch_id)[0] == "validating"
    validation.validate_batch(api.runtime, batch_id)
    status, errors = _errors(api, batch_id)
    assert status == "failed" and [e["code"] for e in errors] == ["validation_failed"]
    assert "gave up after 3 attempts" in errors[0]["message"]


def test_a_long_validation_shows_it_is_alive_while_it_works_not_per_10000_lines(api, monkeypatch):
    """Touching the batch between lines is also where an attempt learns it was taken over: with a
    touch interval of ~0 it stops at the next line, not at the end of the file."""
    api.settings.validation_touch_s = 1e-9
    batch_id = _created_batch(api, b"".join(json.dumps(completion_line(str(i))).encode() + b"\n"
                                            for i in range(200)))
    parsed, real_parse = [], validation.parse_line

    def parse_then_lose_the_batch(raw, line):
        parsed.append(line)
        if line == 5:
            with api.runtime.session() as session, session.begin():
                repo.claim_validation(session, batch_id=batch_id, token="val_other", now=0)
        return real_parse(raw, line)

    monkeypatch.setattr(validation, "parse_line", parse_then_lose_the_batch)
    validation.validate_batch(api.runtime, batch_id)
    assert parsed == [1, 2, 3, 4, 5]
    assert _errors(api, batch_id)[0] == "validating"  # left to the attempt that took over
