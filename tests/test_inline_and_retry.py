"""Inline `requests` on POST /v1/batches and POST /v1/batches/{id}/retry (diffbatch extensions)."""

from __future__ import annotations

import pytest

from db import repo
from tests.harness import Service, chat_line, completion_line
from worker import finalize, pipeline, validation


def _texts(svc: Service, batch: dict) -> list[tuple[str, str]]:
    return [(line["custom_id"], line["response"]["body"]["choices"][0]["text"])
            for line in svc.lines_of(batch["output_file_id"])]


def test_an_inline_batch_gives_the_file_paths_output(service):
    lines = [completion_line(f"r{i}", seed=i) for i in range(3)]
    inline = service.client.post("/v1/batches", json={"requests": lines, "endpoint": "/v1/completions"})
    assert inline.status_code == 200, inline.text
    inline_done = service.wait(inline.json()["id"])
    file_done = service.wait(service.submit(lines)["id"])
    assert inline_done["status"] == file_done["status"] == "completed"
    assert _texts(service, inline_done) == _texts(service, file_done)
    source = service.client.get(f"/v1/files/{inline_done['input_file_id']}").json()
    assert source["purpose"] == "batch"


@pytest.fixture
def svc(tmp_path, tiny_model):
    """The API with no worker thread: the tests drive validation, chunks and finalizing themselves."""
    return Service.embedded(tmp_path, tiny_model, chunk_size=2, max_batch_size=2)


def _post(svc: Service, body: dict) -> dict:
    response = svc.client.post("/v1/batches", json={"endpoint": "/v1/completions", **body})
    assert response.status_code == 400, response.text
    return response.json()["error"]


@pytest.mark.parametrize(("items", "param"), [
    ([completion_line("a"), {**completion_line("b"), "body": {"prompt": "x"}}], "requests[1].body.model"),
    ([chat_line("a")], "requests[0].url"),
    ([completion_line("a"), completion_line("a")], "requests[1].custom_id"),
    ([completion_line("a"), "not an object"], "requests[1]"),
    ([{**completion_line("a"), "method": "GET"}], "requests[0].method"),
    ([], "requests"),
])
def test_bad_inline_requests_are_400s_naming_the_item(svc, items, param):
    error = _post(svc, {"requests": items})
    assert error["param"] == param and error["message"].startswith(param.split(".")[0])


def test_inline_requests_are_limited_like_files(svc):
    svc.settings.max_line_bytes = 1024
    assert _post(svc, {"requests": [completion_line("a", prompt="x" * 2000)]})["code"] == "line_too_large"
    svc.settings.max_batch_requests = 2
    assert _post(svc, {"requests": [completion_line(f"r{i}") for i in range(3)]})["code"] == "batch_too_large"
    svc.settings.max_upload_bytes = 200  # one line is about 120 bytes
    assert _post(svc, {"requests": [completion_line(f"r{i}") for i in range(2)]})["code"] == "file_too_large"


def test_exactly_one_of_input_file_id_and_requests(svc):
    assert _post(svc, {})["param"] == "input_file_id"
    file_id = svc.upload(b"{}\n")["id"]
    assert _post(svc, {"input_file_id": file_id, "requests": [completion_line("a")]})["param"] == "requests"


def _run(svc: Service, batch_id: str) -> None:
    validation.validate_batch(svc.runtime, batch_id)
    with svc.runtime.session() as session:
        chunks = [c.id for c in repo.chunks_of(session, batch_id=batch_id)]
    for chunk in chunks:
        pipeline.run_chunk(svc.runtime, chunk)
    finalize.maybe_finalize(svc.runtime, batch_id)


def test_a_cancelled_batch_is_retried_with_its_unfinished_lines(svc):
    svc.runtime.settings.feed_ahead_chunks = 0  # one chunk a run: the batch is left part done
    first = svc.client.post("/v1/batches", json={
        "requests": [completion_line(f"r{i}", seed=i) for i in range(5)], "endpoint": "/v1/completions",
        "metadata": {"team": "a"}}).json()
    validation.validate_batch(svc.runtime, first["id"])
    with svc.runtime.session() as session:
        chunks = [c.id for c in repo.chunks_of(session, batch_id=first["id"])]
    pipeline.run_chunk(svc.runtime, chunks[0])
    running = svc.client.post(f"/v1/batches/{first['id']}/retry")
    assert running.status_code == 409 and running.json()["error"]["code"] == "batch_not_finished"
    svc.client.post(f"/v1/batches/{first['id']}/cancel")
    finalize.maybe_finalize(svc.runtime, first["id"])

    retry = svc.client.post(f"/v1/batches/{first['id']}/retry", headers={"Idempotency-Key": "k1"})
    assert retry.status_code == 200, retry.text
    again = svc.client.post(f"/v1/batches/{first['id']}/retry", headers={"Idempotency-Key": "k1"})
    assert again.json()["id"] == retry.json()["id"]  # the SDK's retry of the POST
    batch = retry.json()
    assert batch["metadata"] == {"team": "a", "retry_of": first["id"]}
    assert (batch["endpoint"], batch["completion_window"]) == ("/v1/completions", "24h")
    assert [line["custom_id"] for line in svc.lines_of(batch["input_file_id"])] == ["r2", "r3", "r4"]
    _run(svc, batch["id"])
    done = svc.client.get(f"/v1/batches/{batch['id']}").json()
    assert done["status"] == "completed" and done["request_counts"] == {"total": 3, "completed": 3, "failed": 0}
    assert [line["custom_id"] for line in svc.lines_of(done["output_file_id"])] == ["r2", "r3", "r4"]

    nothing = svc.client.post(f"/v1/batches/{batch['id']}/retry")
    assert nothing.status_code == 409 and nothing.json()["error"]["code"] == "nothing_to_retry"
    assert svc.client.post("/v1/batches/batch_nope/retry").status_code == 404
