"""Per-tenant quotas on queued work: a create past the queued-requests or queued-tokens limit is a 429
quota_exceeded naming the limit; a tenant's own limit wins over the server's; tenants do not share one.
On SQLite and on PostgreSQL."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import select

from common.ids import now
from db import keys, repo
from db.models import Request
from tests.harness import DATABASES, Service, completion_line, service_on
from worker import finalize, validation


@pytest.fixture(params=DATABASES)
def api(request, tmp_path, tiny_model):
    with service_on(request.param, tmp_path, tiny_model, max_queued_requests=3) as service:
        yield service


def new_key(svc: Service, tenant: str) -> dict[str, str]:
    with svc.runtime.session() as session, session.begin():
        return {"Authorization": f"Bearer {keys.create_key(session, tenant_id=tenant, now=now())[1]}"}


def set_quotas(svc: Service, tenant: str, **limits: int | None) -> None:
    with svc.runtime.session() as session, session.begin():
        keys.set_quotas(session, tenant_id=tenant, now=now(), **limits)


def create(svc: Service, auth: dict[str, str], n: int, model: str = "tiny"):
    """Upload an n-line batch file and create its batch; the create's response."""
    content = b"".join(json.dumps(completion_line(f"r{i}", model=model)).encode() + b"\n" for i in range(n))
    uploaded = svc.client.post("/v1/files", files={"file": ("in.jsonl", content)}, data={"purpose": "batch"},
                               headers=auth)
    assert uploaded.status_code == 200, uploaded.text
    return svc.client.post("/v1/batches", json={"input_file_id": uploaded.json()["id"],
                                                "endpoint": "/v1/completions"}, headers=auth)


def assert_quota_exceeded(response, limit: str, *numbers: int) -> None:
    assert response.status_code == 429, response.text
    error = response.json()["error"]
    assert error["code"] == "quota_exceeded" and error["param"] == limit
    assert f"({limit})" in error["message"]
    for number in numbers:
        assert str(number) in error["message"]


def test_a_create_past_the_queued_request_limit_is_a_429_until_work_finishes(api):
    alice = new_key(api, "alice")
    first = create(api, alice, 2)
    assert first.status_code == 200, first.text
    assert_quota_exceeded(create(api, alice, 2), "max_queued_requests", 2, 3)  # 2 validating + 2 > 3
    assert create(api, alice, 1).status_code == 200  # exactly at the limit is allowed
    assert_quota_exceeded(create(api, alice, 1), "max_queued_requests", 3)
    # Validated requests still count; cancelled ones no longer do.
    validation.validate_batch(api.runtime, first.json()["id"])
    assert_quota_exceeded(create(api, alice, 1), "max_queued_requests", 3)
    assert api.client.post(f"/v1/batches/{first.json()['id']}/cancel", headers=alice).status_code == 200
    finalize.maybe_finalize(api.runtime, first.json()["id"])  # what the cancel's message does
    assert api.client.get(f"/v1/batches/{first.json()['id']}", headers=alice).json()["status"] == "cancelled"
    assert create(api, alice, 2).status_code == 200


def test_tenants_have_separate_quotas_and_their_own_limits_win(api):
    alice, bob, carol = new_key(api, "alice"), new_key(api, "bob"), new_key(api, "carol")
    assert create(api, alice, 3).status_code == 200
    assert_quota_exceeded(create(api, alice, 1), "max_queued_requests", 3)
    assert create(api, bob, 3).status_code == 200  # Alice's queue is not Bob's
    set_quotas(api, "alice", max_queued_requests=10)
    assert create(api, alice, 7).status_code == 200
    assert_quota_exceeded(create(api, alice, 1), "max_queued_requests", 10)
    set_quotas(api, "carol", max_queued_requests=1)
    assert_quota_exceeded(create(api, carol, 2), "max_queued_requests", 1)
    set_quotas(api, "alice", max_queued_requests=None)  # back to the server's limit
    assert_quota_exceeded(create(api, alice, 1), "max_queued_requests", 3)


def test_queued_tokens_count_prompt_and_max_tokens_and_are_limited(api):
    alice = new_key(api, "alice")
    batch_id = create(api, alice, 2).json()["id"]
    validation.validate_batch(api.runtime, batch_id)
    with api.runtime.session() as session:
        budgets = list(session.scalars(select(Request.budget_tokens).where(Request.batch_id == batch_id)))
    assert len(budgets) == 2 and all(budget > 8 for budget in budgets)  # the prompt's tokens + max_tokens 8
    set_quotas(api, "alice", max_queued_tokens=sum(budgets) + 1, max_queued_requests=100)
    assert create(api, alice, 1).status_code == 200  # validating: its tokens are not known yet
    set_quotas(api, "alice", max_queued_tokens=sum(budgets))
    assert_quota_exceeded(create(api, alice, 1), "max_queued_tokens", sum(budgets))


def test_the_budget_of_a_model_this_process_cannot_tokenize_is_estimated(api):
    with api.runtime.session() as session, session.begin():  # another worker serves "other"
        repo.upsert_worker(session, name="elsewhere", model="other", queue="diffbatch.other", max_positions=2048,
                           now=now())
    batch = create(api, new_key(api, "alice"), 2, model="other").json()
    validation.validate_batch(api.runtime, batch["id"])
    with api.runtime.session() as session:
        rows = list(session.scalars(select(Request).where(Request.batch_id == batch["id"]).order_by(Request.line)))
    assert len(rows) == 2
    assert [r.budget_tokens for r in rows] == [len(json.dumps(r.body).encode()) // 4 + 8 for r in rows]
