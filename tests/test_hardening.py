"""Input PostgreSQL refuses is a 4xx with OpenAI's error body, never a 500; 405s say what is allowed;
the OpenAPI schema documents the answers; /readyz names only the dependency that is down."""

from __future__ import annotations

import json
import logging

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from common.settings import Settings
from tests.harness import Service, fresh_postgres_database, require_servers


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.services)])
def api(request, tmp_path, tiny_model):
    """The API alone, on SQLite and on a fresh PostgreSQL database (which refuses NUL in text)."""
    if request.param == "sqlite":
        yield Service.embedded(tmp_path, tiny_model)
        return
    require_servers()
    with fresh_postgres_database() as database_url:
        yield Service.embedded(tmp_path, tiny_model, database_url=database_url)


def _error(response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    return error


@pytest.mark.parametrize("method,path", [("get", "/v1/files/%00"), ("get", "/v1/files/file-%00/content"),
                                         ("delete", "/v1/files/%00"), ("get", "/v1/batches/%00"),
                                         ("post", "/v1/batches/batch_%00/cancel"),
                                         ("get", "/v1/batches/%00/results")])
def test_nul_in_a_path_id_is_a_404(api, method, path):
    assert _error(getattr(api.client, method)(path), 404)["code"] == "not_found"


@pytest.mark.parametrize("path,param", [("/v1/batches?after=%00", "after"), ("/v1/files?after=a%00b", "after"),
                                        ("/v1/files?purpose=%00", "purpose"), ("/v1/files?order=%00", "order"),
                                        ("/v1/batches/batch_x/results?after=%00", "after"),
                                        ("/v1/batches?limit=%00", "limit")])
def test_nul_in_a_query_value_is_a_400_naming_it(api, path, param):
    error = _error(api.client.get(path), 400)
    assert error["param"] == param and error["code"] == "invalid_value"


def test_nul_in_a_header_is_a_400_naming_it(api):
    file_id = api.upload(b"{}\n")["id"]
    response = api.client.post("/v1/batches", json={"input_file_id": file_id, "endpoint": "/v1/completions"},
                               headers={"Idempotency-Key": "key\x00"})
    assert _error(response, 400)["param"].lower() == "idempotency-key"
    assert api.client.get("/v1/batches").json()["data"] == []


@pytest.mark.parametrize("body,param", [
    ({"input_file_id": "\u0000", "endpoint": "/v1/completions"}, "input_file_id"),
    ({"input_file_id": "file-\ud800", "endpoint": "/v1/completions"}, "input_file_id"),
    ({"input_file_id": "file-a", "endpoint": "/v1/completions", "metadata": {"k\u0000": "v"}}, "metadata"),
    ({"input_file_id": "file-a", "endpoint": "/v1/completions", "metadata": {"k": "v\u0000"}}, "metadata"),
    ({"input_file_id": "file-a", "endpoint": "/v1/completions\u0000"}, "endpoint"),
    ({"input_file_id": "file-a", "endpoint": "/v1/completions",
      "output_expires_after": {"anchor": "created_at\u0000", "seconds": 3600}}, "output_expires_after.anchor"),
])
def test_nul_or_a_lone_surrogate_in_a_json_field_is_a_400_naming_it(api, body, param):
    raw = json.dumps(body).encode()  # escapes as the JSON text a client sends: \\u0000, \\ud800
    response = api.client.post("/v1/batches", content=raw, headers={"content-type": "application/json"})
    assert _error(response, 400)["param"] == param


def test_nul_in_an_uploaded_filename_or_field_is_a_400(api):
    raw = (b'--b\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
           b'--b\r\nContent-Disposition: form-data; name="file"; filename="a\x00.jsonl"\r\n\r\n{}\n\r\n--b--\r\n')
    named = api.client.post("/v1/files", content=raw, headers={"content-type": "multipart/form-data; boundary=b"})
    assert _error(named, 400)["code"] == "invalid_filename"
    purpose = api.client.post("/v1/files", files={"file": ("a.jsonl", b"{}\n")}, data={"purpose": "batch\x00"})
    assert _error(purpose, 400)["param"] == "purpose"
    assert api.client.get("/v1/files").json()["data"] == []


def test_a_405_carries_allow(api):
    for method, path, allowed in (("put", "/v1/batches", {"GET", "POST"}), ("patch", "/v1/files/file-x",
                                                                            {"GET", "DELETE"})):
        response = getattr(api.client, method)(path)
        assert _error(response, 405)
        assert set(response.headers["allow"].replace(" ", "").split(",")) == allowed


def test_the_openapi_schema_documents_the_answers_and_constraints(api):
    schema = api.client.get("/openapi.json").json()
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            assert "400" in operation["responses"] and "422" not in operation["responses"], (method, path)
            if "{" in path:
                assert "404" in operation["responses"], (method, path)
    upload = schema["paths"]["/v1/files"]["post"]
    assert "413" in upload["responses"]
    form = upload["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]
    assert form["purpose"]["enum"] == ["batch"] and form["expires_after[seconds]"]["maximum"] == 2592000
    listed = {p["name"]: p["schema"] for p in schema["paths"]["/v1/files"]["get"]["parameters"]}
    assert listed["order"]["enum"] == ["asc", "desc"] and listed["limit"]["maximum"] == 10000
    create = schema["components"]["schemas"]["CreateBatch"]["properties"]
    assert create["endpoint"]["enum"] == ["/v1/completions", "/v1/chat/completions", "/v1/responses"]
    assert create["completion_window"]["enum"] == ["24h"] and "pattern" in create["input_file_id"]
    assert {"409", "404"} <= set(schema["paths"]["/v1/batches"]["post"]["responses"])
    assert "503" in schema["paths"]["/readyz"]["get"]["responses"]


def _readyz(settings: Settings) -> dict:
    response = TestClient(create_app(settings)).get("/readyz")
    assert response.status_code == 503
    return response.json()["error"]


@pytest.mark.parametrize("dead", ["broker", "database", "both"])
def test_readyz_names_only_the_dependency_that_is_down(tmp_path, tiny_model, caplog, dead):
    overrides = {}
    if dead in ("broker", "both"):
        overrides["broker_url"] = "redis://secret-user:hunter2@127.0.0.1:1/0"
    if dead in ("database", "both"):
        overrides["database_url"] = "postgresql+psycopg://dbadmin:hunter2@127.0.0.1:1/diffbatch"
    caplog.set_level(logging.WARNING, logger="diffbatch.api")  # other tests' workers raise the root's level
    error = _readyz(Settings(data_dir=tmp_path, model=str(tiny_model), **overrides))
    expected = {"broker": "broker", "database": "database", "both": "database and broker"}[dead]
    assert error["message"] == f"not ready: {expected} unreachable"
    assert error["type"] == "service_unavailable" and error["code"] == "dependency_unavailable"
    assert "127.0.0.1" in caplog.text  # the details go to the log, not to the caller


def test_a_database_out_of_reach_is_a_503_not_a_server_error(tmp_path):
    from fastapi.testclient import TestClient

    from api.app import create_app
    from api.queue import Queue
    from cli.stack import free_port
    from common.settings import Settings

    settings = Settings(data_dir=tmp_path, broker_url="memory://",
                        database_url=f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/none")
    client = TestClient(create_app(settings, queue=Queue(settings)))
    response = client.get("/v1/batches")
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "database_unavailable"
    assert "127.0.0.1" not in response.text  # the driver's text stays in the log
