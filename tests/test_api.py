"""The OpenAI-compatible HTTP surface: files, batches, pagination, idempotency, health."""

from __future__ import annotations

import pytest

from tests.harness import Service, completion_line


@pytest.fixture
def api(tmp_path, tiny_model):
    """The API alone: messages go to the in-memory broker and no worker consumes them."""
    return Service.embedded(tmp_path, tiny_model)


def test_file_lifecycle(api):
    created = api.upload(b'{"a": 1}\n', filename="in.jsonl")
    assert created["object"] == "file" and created["bytes"] == 9 and created["purpose"] == "batch"
    assert created["filename"] == "in.jsonl" and created["id"].startswith("file-")
    assert api.client.get(f"/v1/files/{created['id']}").json() == created
    assert api.client.get(f"/v1/files/{created['id']}/content").content == b'{"a": 1}\n'
    listed = api.client.get("/v1/files").json()
    assert listed["object"] == "list" and [f["id"] for f in listed["data"]] == [created["id"]]
    assert api.client.delete(f"/v1/files/{created['id']}").json() == {
        "id": created["id"], "object": "file", "deleted": True}
    missing = api.client.get(f"/v1/files/{created['id']}")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "file_not_found"


def test_upload_needs_purpose_batch(api):
    response = api.client.post("/v1/files", files={"file": ("a.jsonl", b"{}\n")}, data={"purpose": "fine-tune"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "purpose"


def test_batch_object_has_the_openai_shape(api):
    batch = api.submit([completion_line("a")])
    assert batch["status"] == "validating" and batch["endpoint"] == "/v1/completions"
    assert batch["expires_at"] - batch["created_at"] == 24 * 3600
    assert batch["request_counts"] == {"total": 0, "completed": 0, "failed": 0}
    for key in ("errors", "output_file_id", "error_file_id", "in_progress_at", "finalizing_at", "completed_at",
                "failed_at", "expired_at", "cancelling_at", "cancelled_at", "metadata", "usage", "model"):
        assert key in batch
    assert api.client.get(f"/v1/batches/{batch['id']}").json() == batch


def test_batch_list_pages_newest_first(api):
    ids = [api.client.post("/v1/batches", json={
        "input_file_id": api.upload(b"{}\n")["id"], "endpoint": "/v1/completions",
        "metadata": {"n": str(i)}}).json()["id"] for i in range(5)]
    first = api.client.get("/v1/batches?limit=2").json()
    assert first["has_more"] is True and len(first["data"]) == 2
    second = api.client.get(f"/v1/batches?limit=10&after={first['last_id']}").json()
    assert second["has_more"] is False
    assert {b["id"] for b in first["data"] + second["data"]} == set(ids)
    assert len(first["data"]) + len(second["data"]) == 5


def test_an_unknown_cursor_is_a_400_not_the_first_page_again(api):
    first = api.upload(b"{}\n")["id"]
    api.upload(b"{}\n")
    api.client.delete(f"/v1/files/{first}")
    for path in (f"/v1/files?after={first}", "/v1/batches?after=batch_gone"):
        response = api.client.get(path)
        assert response.status_code == 400 and response.json()["error"]["param"] == "after", path


def test_retried_create_returns_the_same_batch(api):
    file_id = api.upload(b"{}\n")["id"]
    body = {"input_file_id": file_id, "endpoint": "/v1/completions", "completion_window": "24h"}
    keyed = [api.client.post("/v1/batches", json=body, headers={"Idempotency-Key": "k1"}).json()["id"]
             for _ in range(2)]
    assert keyed[0] == keyed[1]
    assert api.client.post("/v1/batches", json=body, headers={"Idempotency-Key": "k2"}).json()["id"] != keyed[0]
    # Without a key, an identical create moments later is the SDK retrying, not a new batch.
    body["metadata"] = {"run": "nightly"}
    again = api.client.post("/v1/batches", json=body).json()["id"]
    assert again == api.client.post("/v1/batches", json=body).json()["id"]
    assert len(api.client.get("/v1/batches").json()["data"]) == 3


def test_a_key_sent_with_another_batch_is_a_409_not_the_first_batch(api):
    first, second = api.upload(b"{}\n")["id"], api.upload(b"{}\n")["id"]
    created = api.client.post("/v1/batches", json={"input_file_id": first, "endpoint": "/v1/completions"},
                              headers={"Idempotency-Key": "nightly"})
    reused = api.client.post("/v1/batches", json={"input_file_id": second, "endpoint": "/v1/chat/completions"},
                             headers={"Idempotency-Key": "nightly"})
    assert reused.status_code == 409, reused.text
    error = reused.json()["error"]
    assert error["code"] == "idempotency_key_reused" and error["param"] == "Idempotency-Key"
    assert created.json()["id"] in error["message"]
    assert len(api.client.get("/v1/batches").json()["data"]) == 1


def test_overlong_key_or_filename_is_a_400_naming_it(api):
    body = {"input_file_id": api.upload(b"{}\n")["id"], "endpoint": "/v1/completions"}
    long_key = api.client.post("/v1/batches", json=body, headers={"Idempotency-Key": "k" * 256})
    assert long_key.status_code == 400 and long_key.json()["error"]["param"] == "Idempotency-Key"
    upload = api.client.post("/v1/files", files={"file": ("a.jsonl", b"{}\n")}, data={"purpose": "batch"},
                             headers={"Idempotency-Key": "k" * 256})
    assert upload.status_code == 400 and upload.json()["error"]["param"] == "Idempotency-Key"
    named = api.client.post("/v1/files", files={"file": ("n" * 513 + ".jsonl", b"{}\n")}, data={"purpose": "batch"})
    assert named.status_code == 400 and named.json()["error"]["code"] == "invalid_filename"
    assert api.client.get("/v1/files").json()["data"] == [api.client.get(f"/v1/files/{body['input_file_id']}").json()]


def test_a_raced_upload_with_the_same_key_answers_with_the_stored_file(api, monkeypatch):
    """Two uploads with one key both miss the lookup; the second insert fails on the unique key and
    must answer with the first file (not a 500) and keep no orphan blob."""
    from db.scoped import TenantScope

    first = api.client.post("/v1/files", files={"file": ("a.jsonl", b"{}\n")}, data={"purpose": "batch"},
                            headers={"Idempotency-Key": "upload-1"}).json()
    real_lookup, lookups = TenantScope.find_file_by_idempotency_key, []

    def lookup_that_loses_the_race(scope, key):
        lookups.append(key)
        return None if len(lookups) == 1 else real_lookup(scope, key)

    monkeypatch.setattr(TenantScope, "find_file_by_idempotency_key", lookup_that_loses_the_race)
    blobs_dir = api.client.app.state.blobs.root
    blobs = sorted(p.name for p in blobs_dir.iterdir())
    second = api.client.post("/v1/files", files={"file": ("a.jsonl", b"{}\n")}, data={"purpose": "batch"},
                             headers={"Idempotency-Key": "upload-1"})
    assert second.status_code == 200, second.text
    assert second.json()["id"] == first["id"] and len(lookups) == 2
    assert sorted(p.name for p in blobs_dir.iterdir()) == blobs


def test_a_body_that_is_not_json_is_a_400_naming_the_body(api):
    response = api.client.post("/v1/batches", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "body" and "not valid JSON" in response.json()["error"]["message"]
    empty = api.client.post("/v1/batches")
    assert empty.status_code == 400 and empty.json()["error"]["param"] == "body"
    wrong_method = api.client.put("/v1/batches")
    assert wrong_method.status_code == 405 and wrong_method.json()["error"]["type"] == "invalid_request_error"


def test_unknown_batch_is_a_404(api):
    for method, path in (("get", "/v1/batches/batch_nope"), ("post", "/v1/batches/batch_nope/cancel")):
        response = getattr(api.client, method)(path)
        assert response.status_code == 404 and response.json()["error"]["code"] == "batch_not_found"


def test_health_ready_and_models(api):
    assert api.client.get("/healthz").json() == {"status": "ok"}
    assert api.client.get("/readyz").json() == {"status": "ready"}
    assert api.client.get("/v1/models").json() == {"object": "list", "data": []}  # no worker has started
    with api:
        models = api.client.get("/v1/models").json()["data"]
    assert [m["id"] for m in models] == ["tiny"] and models[0]["object"] == "model"


def test_readyz_reports_an_unreachable_broker(tmp_path, tiny_model):
    from fastapi.testclient import TestClient

    from api.app import create_app
    from common.settings import Settings

    settings = Settings(data_dir=tmp_path, model=str(tiny_model), broker_url="redis://127.0.0.1:1/0")
    response = TestClient(create_app(settings)).get("/readyz")
    assert response.status_code == 503 and "broker" in response.json()["error"]["message"]
