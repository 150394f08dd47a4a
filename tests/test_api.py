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
    from api.app import create_app
    from common.settings import Settings
    from fastapi.testclient import TestClient

    settings = Settings(data_dir=tmp_path, model=str(tiny_model), broker_url="redis://127.0.0.1:1/0")
    response = TestClient(create_app(settings)).get("/readyz")
    assert response.status_code == 503 and "broker" in response.json()["error"]["message"]
