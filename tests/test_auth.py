"""API keys and tenants over real HTTP: who may call, and that a tenant never sees another's files or batches.

The isolation tests run on SQLite and on PostgreSQL; the pipeline is driven directly (validate, run the
chunks, finalize), so a batch's output file exists without timing.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from common.ids import now
from db import keys, repo
from db.models import File
from tests.harness import DATABASES, Service, completion_line, service_on
from worker import finalize, pipeline, validation

ROUTES = Path(__file__).resolve().parents[1] / "api" / "routes"


@pytest.fixture(params=DATABASES)
def svc(request, tmp_path, tiny_model):
    with service_on(request.param, tmp_path, tiny_model) as service:
        yield service


@pytest.fixture
def api(tmp_path, tiny_model):
    return Service.embedded(tmp_path, tiny_model)


def new_key(svc: Service, tenant: str) -> str:
    with svc.runtime.session() as session, session.begin():
        return keys.create_key(session, tenant_id=tenant, now=now())[1]


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def upload(svc: Service, key: str, content: bytes, **headers: str) -> dict:
    response = svc.client.post("/v1/files", files={"file": ("in.jsonl", content)}, data={"purpose": "batch"},
                               headers={**bearer(key), **headers})
    assert response.status_code == 200, response.text
    return response.json()


def create_batch(svc: Service, key: str, file_id: str, **headers: str) -> dict:
    response = svc.client.post("/v1/batches", json={"input_file_id": file_id, "endpoint": "/v1/completions"},
                               headers={**bearer(key), **headers})
    assert response.status_code == 200, response.text
    return response.json()


def lines(*custom_ids: str) -> bytes:
    return b"".join(json.dumps(completion_line(c, seed=n)).encode() + b"\n" for n, c in enumerate(custom_ids))


def run_to_completion(svc: Service, batch_id: str) -> None:
    validation.validate_batch(svc.runtime, batch_id)
    with svc.runtime.session() as session:
        chunk_ids = [c.id for c in repo.chunks_of(session, batch_id=batch_id)]
    for chunk_id in chunk_ids:
        pipeline.run_chunk(svc.runtime, chunk_id)
    finalize.maybe_finalize(svc.runtime, batch_id)  # what the control process does once nothing is open


def assert_invalid_key(response, message: str) -> None:
    assert response.status_code == 401, response.text
    assert response.json() == {"error": {"message": response.json()["error"]["message"],
                                         "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}}
    assert message in response.json()["error"]["message"]


def test_another_tenant_gets_404_for_everything_and_lists_nothing(svc):
    alice, bob = new_key(svc, "alice"), new_key(svc, "bob")
    done = create_batch(svc, alice, upload(svc, alice, lines("a", "b"))["id"])
    run_to_completion(svc, done["id"])
    done = svc.client.get(f"/v1/batches/{done['id']}", headers=bearer(alice)).json()
    assert done["status"] == "completed" and done["output_file_id"]
    waiting = create_batch(svc, alice, upload(svc, alice, lines("c"))["id"])
    alices_files = {done["input_file_id"], done["output_file_id"], waiting["input_file_id"]}

    as_bob = bearer(bob)
    for file_id in alices_files:
        for method, path in (("get", f"/v1/files/{file_id}"), ("get", f"/v1/files/{file_id}/content"),
                             ("delete", f"/v1/files/{file_id}")):
            response = svc.client.request(method, path, headers=as_bob)
            assert response.status_code == 404 and response.json()["error"]["code"] == "file_not_found", path
    for batch_id in (done["id"], waiting["id"]):
        for method, path in (("get", f"/v1/batches/{batch_id}"), ("get", f"/v1/batches/{batch_id}/results"),
                             ("post", f"/v1/batches/{batch_id}/cancel")):
            response = svc.client.request(method, path, headers=as_bob)
            assert response.status_code == 404 and response.json()["error"]["code"] == "batch_not_found", path
    stolen = svc.client.post("/v1/batches", json={"input_file_id": waiting["input_file_id"],
                                                  "endpoint": "/v1/completions"}, headers=as_bob)
    assert stolen.status_code == 404 and stolen.json()["error"]["param"] == "input_file_id"
    assert svc.client.get("/v1/files", headers=as_bob).json()["data"] == []
    assert svc.client.get("/v1/batches", headers=as_bob).json()["data"] == []
    for path in (f"/v1/files?after={done['input_file_id']}", f"/v1/batches?after={done['id']}"):
        assert svc.client.get(path, headers=as_bob).status_code == 400, path  # a cursor of Alice's is unknown

    # Bob's attempts changed nothing of Alice's: her objects are all there, the waiting batch not cancelled.
    as_alice = bearer(alice)
    assert {f["id"] for f in svc.client.get("/v1/files", headers=as_alice).json()["data"]} == alices_files
    assert {b["id"] for b in svc.client.get("/v1/batches", headers=as_alice).json()["data"]} == {
        done["id"], waiting["id"]}
    assert svc.client.get(f"/v1/batches/{waiting['id']}", headers=as_alice).json()["status"] == "validating"
    output = svc.client.get(f"/v1/files/{done['output_file_id']}/content", headers=as_alice)
    assert sorted(json.loads(line)["custom_id"] for line in output.content.splitlines()) == ["a", "b"]
    results = svc.client.get(f"/v1/batches/{done['id']}/results", headers=as_alice).json()["data"]
    assert [r["custom_id"] for r in results] == ["a", "b"]


def test_one_idempotency_key_sent_by_two_tenants_makes_two_objects(api):
    alice, bob = new_key(api, "alice"), new_key(api, "bob")
    files = [upload(api, key, b'{"a": 1}\n', **{"Idempotency-Key": "nightly"}) for key in (alice, bob)]
    assert files[0]["id"] != files[1]["id"]
    batches = [create_batch(api, key, f["id"], **{"Idempotency-Key": "nightly"}) for key, f in zip(
        (alice, bob), files, strict=True)]
    assert batches[0]["id"] != batches[1]["id"]
    retried = create_batch(api, bob, files[1]["id"], **{"Idempotency-Key": "nightly"})
    assert retried["id"] == batches[1]["id"]  # a retry still returns the tenant's own first batch
    for key, batch in zip((alice, bob), batches, strict=True):
        assert [b["id"] for b in api.client.get("/v1/batches", headers=bearer(key)).json()["data"]] == [batch["id"]]


def test_a_request_without_a_valid_key_is_a_401_once_keys_exist(api):
    key = new_key(api, "alice")
    assert_invalid_key(api.client.get("/v1/files"), "You didn't provide an API key")
    assert_invalid_key(api.client.get("/v1/files", headers={"Authorization": f"Basic {key}"}),
                       "You didn't provide an API key")
    key_id, secret = keys.split_key(key)
    wrong_secret = f"{keys.KEY_PREFIX}{key_id}.{secret[::-1]}"
    for wrong in (wrong_secret, "dbk_0123456789abcdef.not-a-key-of-this-server-at-all-00", "unused"):
        assert_invalid_key(api.client.get("/v1/files", headers=bearer(wrong)), "Incorrect API key provided")
    assert api.client.get("/v1/files", headers=bearer(key)).status_code == 200
    assert api.client.get("/v1/files", headers={"x-api-key": key}).status_code == 200  # the Anthropic SDK's header
    assert api.client.get("/healthz").status_code == 200 and api.client.get("/readyz").status_code == 200


def test_every_v1_route_needs_a_key(api):
    """A route added later cannot forget authentication: every /v1 path and method answers 401 without a key."""
    new_key(api, "alice")
    checked = 0
    for template, operations in api.client.app.openapi()["paths"].items():
        path = template.replace("{file_id}", "file-x").replace("{batch_id}", "batch_x")
        for method in operations:
            if template.startswith("/v1/messages"):  # Anthropic's routes answer with Anthropic's error body
                response = api.client.request(method, path.replace("{message_batch_id}", "batch_x"))
                assert response.status_code == 401 and response.json()["error"]["type"] == "authentication_error"
                checked += 1
            elif template.startswith("/v1"):
                assert_invalid_key(api.client.request(method, path), "You didn't provide an API key")
                checked += 1
    assert checked >= 10


def test_a_revoked_key_is_refused_on_its_next_request(api):
    alice, alice_again = new_key(api, "alice"), new_key(api, "alice")
    file_id = upload(api, alice, b'{"a": 1}\n')["id"]
    assert api.client.get(f"/v1/files/{file_id}", headers=bearer(alice)).status_code == 200  # verified, cached
    with api.runtime.session() as session, session.begin():
        assert keys.revoke_key(session, key_id=keys.split_key(alice)[0], now=now())
    assert_invalid_key(api.client.get(f"/v1/files/{file_id}", headers=bearer(alice)), "revoked")
    # The tenant's other key still works and still sees the file.
    assert api.client.get(f"/v1/files/{file_id}", headers=bearer(alice_again)).status_code == 200


def test_authentication_ends_its_transaction(api):
    """On SQLite an open transaction holds the write lock: an upload streaming after authentication must not."""
    from types import SimpleNamespace

    from api.auth import authenticate

    key = new_key(api, "alice")
    request = SimpleNamespace(app=api.client.app, headers={"authorization": f"Bearer {key}"})
    with api.client.app.state.session_factory() as session:
        assert authenticate(request, session).tenant_id == "alice"
        assert not session.in_transaction()


def test_use_is_recorded_in_last_used_at(api):
    key = new_key(api, "alice")
    assert api.client.get("/v1/files", headers=bearer(key)).status_code == 200
    with api.runtime.session() as session:
        row = keys.get_key(session, key_id=keys.split_key(key)[0])
    assert row.last_used_at is not None and row.last_used_at >= row.created_at


def test_without_keys_a_loopback_api_serves_the_local_tenant(api):
    created = api.client.post("/v1/files", files={"file": ("a.jsonl", b'{"a": 1}\n')}, data={"purpose": "batch"},
                              headers=bearer("unused"))  # the SDKs need some api_key; without keys it is ignored
    assert created.status_code == 200, created.text
    with api.runtime.session() as session:
        assert session.get(File, created.json()["id"]).tenant_id == "local"
    # A key for the tenant "local" adopts what was made before keys existed; other tenants do not see it.
    local, other = new_key(api, "local"), new_key(api, "other")
    assert [f["id"] for f in api.client.get("/v1/files", headers=bearer(local)).json()["data"]] == [
        created.json()["id"]]
    assert api.client.get("/v1/files", headers=bearer(other)).json()["data"] == []
    assert_invalid_key(api.client.get("/v1/files"), "You didn't provide an API key")


def test_without_keys_an_api_bound_elsewhere_refuses_every_request(tmp_path, tiny_model):
    exposed = Service.embedded(tmp_path, tiny_model, api_host="0.0.0.0")
    assert_invalid_key(exposed.client.get("/v1/models"), "diffbatch keys create --tenant NAME")
    assert exposed.client.get("/healthz").status_code == 200
    key = new_key(exposed, "alice")
    assert exposed.client.get("/v1/models", headers=bearer(key)).status_code == 200


@pytest.mark.parametrize("host,loopback", [("127.0.0.1", True), ("127.8.0.1", True), ("localhost", True),
                                           ("::1", True), ("[::1]", True), ("0.0.0.0", False), ("::", False),
                                           ("10.0.0.5", False), ("example.com", False)])
def test_which_hosts_are_loopback(host, loopback):
    from api.auth import is_loopback_host

    assert is_loopback_host(host) is loopback


UNSCOPED = {"get_file", "get_batch", "list_files", "list_batches", "find_file_by_idempotency_key",
            "find_batch_by_idempotency_key", "find_recent_batch", "get_request", "delete_file", "batches_in"}


def test_routes_read_files_and_batches_only_through_the_tenant_scope():
    """api/routes may not call db.repo's unscoped lookups: a new route cannot forget the tenant."""
    offenders = []
    for module in sorted(ROUTES.glob("*.py")):
        for node in ast.walk(ast.parse(module.read_text())):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "repo"
                    and node.attr in UNSCOPED):
                offenders.append(f"{module.name}:{node.lineno} repo.{node.attr}")
            if isinstance(node, ast.ImportFrom) and node.module == "db.repo":
                offenders.append(f"{module.name}:{node.lineno} from db.repo import ...")
    assert offenders == []


def test_the_openai_sdk_works_with_a_key(api, tmp_path):
    import openai

    key = new_key(api, "alice")
    client = openai.OpenAI(base_url="http://testserver/v1", api_key=key, http_client=api.client, max_retries=0)
    source = tmp_path / "in.jsonl"
    source.write_bytes(lines("q1", "q2", "q3"))
    uploaded = client.files.create(file=source.open("rb"), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/completions", completion_window="24h")
    run_to_completion(api, batch.id)
    batch = client.batches.retrieve(batch.id)
    assert batch.status == "completed" and batch.request_counts.completed == 3
    output = client.files.content(batch.output_file_id).text
    assert sorted(json.loads(line)["custom_id"] for line in output.splitlines()) == ["q1", "q2", "q3"]
    assert [b.id for b in client.batches.list()] == [batch.id]

    stranger = openai.OpenAI(base_url="http://testserver/v1", api_key="dbk_0123456789abcdef." + "x" * 43,
                             http_client=api.client, max_retries=0)
    with pytest.raises(openai.AuthenticationError) as refused:
        stranger.batches.retrieve(batch.id)
    assert refused.value.status_code == 401 and refused.value.code == "invalid_api_key"
