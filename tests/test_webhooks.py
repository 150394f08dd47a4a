"""Webhooks: a batch naming a URL gets a signed Standard Webhooks event on its terminal status, retried
with backoff until a 2xx or a day; tested against a receiver on loopback with a controllable clock."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from itertools import pairwise

import pytest

from common.ids import now
from db import repo, webhooks
from db.models import BatchStatus
from tests.harness import Service, completion_line
from worker.webhooks import send_due

SECRET = "whsec_" + base64.b64encode(b"diffbatch-webhook-test-secret-32").decode()


def verify(secret: str, headers: dict[str, str], body: bytes) -> bool:
    """A receiver's check, written from the Standard Webhooks spec: any `v1,` signature in the header
    that matches HMAC-SHA256 over "{id}.{timestamp}.{body}" with the base64-decoded secret."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    return any(version == "v1" and hmac.compare_digest(sig, expected)
               for version, _, sig in (entry.partition(",") for entry in headers["webhook-signature"].split()))


class Receiver:
    """An HTTP server on loopback that records each call and answers the scripted statuses (then 200)."""

    def __init__(self, statuses: list[int]) -> None:
        self.statuses = list(statuses)
        self.calls: list[tuple[dict[str, str], bytes]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["content-length"]))
                receiver.calls.append(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(receiver.statuses.pop(0) if receiver.statuses else 200)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *_args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/diffbatch"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hooked(tmp_path, tiny_model) -> Iterator[Service]:
    with Service.embedded(tmp_path, tiny_model, webhook_secret=SECRET) as svc:
        yield svc


@pytest.fixture
def api(tmp_path, tiny_model) -> Service:
    """The API alone, signing webhooks: no worker consumes its messages."""
    return Service.embedded(tmp_path, tiny_model, webhook_secret=SECRET)


def _create(svc: Service, **fields: object):
    file_id = svc.upload(json.dumps(completion_line("a")).encode() + b"\n")["id"]
    return svc.client.post("/v1/batches", json={"input_file_id": file_id, "endpoint": "/v1/completions",
                                                "completion_window": "24h", **fields})


def _closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/hook"  # nothing listens there now: connections are refused


def test_signed_event_is_retried_until_a_2xx_then_never_again(hooked):
    with Receiver([500, 500, 200]) as receiver:
        created = _create(hooked, webhook_url=receiver.url)
        assert created.status_code == 200, created.text
        batch = hooked.wait(created.json()["id"])
        assert batch["status"] == "completed"
        [queued] = batch["webhook"]["deliveries"]
        assert batch["webhook"]["url"] == receiver.url
        assert queued["status"] == "pending" and queued["attempts"] == 0 and queued["event_type"] == "batch.completed"
        t0 = queued["next_attempt_at"]
        rt = hooked.runtime
        assert send_due(rt, now=t0) == {"delivered": 0, "retrying": 1, "failed": 0}  # 500
        assert send_due(rt, now=t0 + 4) == {"delivered": 0, "retrying": 0, "failed": 0}  # not due yet
        assert send_due(rt, now=t0 + 5)["retrying"] == 1  # 500 again; the next wait doubles
        assert send_due(rt, now=t0 + 14)["retrying"] == 0
        assert send_due(rt, now=t0 + 15)["delivered"] == 1
        assert send_due(rt, now=t0 + 86_400)["delivered"] == 0
        calls = list(receiver.calls)

    assert len(calls) == 3
    assert {headers["webhook-id"] for headers, _ in calls} == {queued["id"]}  # stable across retries
    assert [int(headers["webhook-timestamp"]) for headers, _ in calls] == [t0, t0 + 5, t0 + 15]
    for headers, body in calls:
        assert verify(SECRET, headers, body)
        assert not verify("whsec_" + base64.b64encode(b"x" * 32).decode(), headers, body)
    event = json.loads(calls[0][1])
    assert event == {"id": queued["id"], "object": "event", "created_at": t0,
                     "type": "batch.completed", "data": {"id": batch["id"]}}
    [shown] = hooked.client.get(f"/v1/batches/{batch['id']}").json()["webhook"]["deliveries"]
    assert shown == {**queued, "status": "delivered", "attempts": 3, "last_status_code": 200, "last_error": None,
                     "next_attempt_at": None, "delivered_at": t0 + 15}


def _expected_waits(created_at: int) -> list[int]:
    """5 s doubling, capped at 1 h per wait, the last attempt at the deadline a day after the event."""
    waits, at, wait = [], created_at, 5
    while at < created_at + 86_400:
        step = min(wait, 3600, created_at + 86_400 - at)
        waits.append(step)
        at, wait = at + step, wait * 2
    return waits


def test_a_dead_receiver_does_not_hold_up_the_batch_and_is_retried_for_a_day(hooked):
    # metadata.webhook_url, for clients that cannot add a field
    created = _create(hooked, metadata={"webhook_url": _closed_port_url()})
    assert created.status_code == 200, created.text
    batch = hooked.wait(created.json()["id"])
    assert batch["status"] == "completed" and batch["output_file_id"]
    [queued] = batch["webhook"]["deliveries"]
    t, attempts_at = queued["next_attempt_at"], []
    while True:
        report = send_due(hooked.runtime, now=t)
        assert sum(report.values()) == 1, report
        attempts_at.append(t)
        [delivery] = hooked.client.get(f"/v1/batches/{batch['id']}").json()["webhook"]["deliveries"]
        if delivery["status"] != "pending":
            break
        assert delivery["last_status_code"] is None and "ConnectError" in delivery["last_error"]
        assert delivery["attempts"] == len(attempts_at) and delivery["delivered_at"] is None
        t = delivery["next_attempt_at"]
    created_at = attempts_at[0]  # the event was due as soon as it was queued
    assert [b - a for a, b in pairwise(attempts_at)] == _expected_waits(created_at)
    assert attempts_at[-1] == created_at + 86_400
    assert delivery["status"] == "failed" and delivery["next_attempt_at"] is None


@pytest.mark.parametrize("where", ["hooked", "production_service"])  # SQLite, and PostgreSQL's row locks
def test_each_terminal_status_queues_one_event_and_one_sender_claims_it(request, where):
    hooked = request.getfixturevalue(where)
    t = now()
    with hooked.runtime.session() as session, session.begin():
        for name, url in (("batch_hooked", "http://127.0.0.1:9/hook"), ("batch_plain", None)):
            repo.add_batch(session, id=name, tenant_id="local", status=BatchStatus.validating,
                           endpoint="/v1/completions", input_file_id="file-x", completion_window="24h",
                           created_at=t, expires_at=t + 86_400, touched_at=t, webhook_url=url)
        assert repo.transition(session, batch_id="batch_hooked", from_=[BatchStatus.validating],
                               to=BatchStatus.in_progress, now=t)
        assert repo.transition(session, batch_id="batch_plain", from_=[BatchStatus.validating],
                               to=BatchStatus.failed, now=t)
        assert repo.transition(session, batch_id="batch_hooked", from_=[BatchStatus.in_progress],
                               to=BatchStatus.cancelled, now=t)
        assert not repo.transition(session, batch_id="batch_hooked", from_=[BatchStatus.in_progress],
                                   to=BatchStatus.expired, now=t)  # lost the race: no second event
    with hooked.runtime.session() as session:
        found = webhooks.deliveries_of(session, batch_ids=["batch_hooked", "batch_plain"])
    assert list(found) == ["batch_hooked"]
    assert [d.event_type for d in found["batch_hooked"]] == ["batch.cancelled"]
    # Two senders at the same moment: the first claim moves next_attempt_at, so the second finds nothing.
    with hooked.runtime.session() as first, first.begin():
        assert len(webhooks.claim_due(first, now=t, hold_until=t + 120, limit=10)) == 1
    with hooked.runtime.session() as second, second.begin():
        assert webhooks.claim_due(second, now=t, hold_until=t + 120, limit=10) == []


@pytest.mark.parametrize("fields, param", [
    ({"webhook_url": "ftp://example.com/hook"}, "webhook_url"),
    ({"webhook_url": "http:///no-host"}, "webhook_url"),
    ({"webhook_url": "https://example.com/" + "a" * 2048}, "webhook_url"),
    ({"metadata": {"webhook_url": "not a url"}}, "metadata.webhook_url"),
])
def test_a_bad_webhook_url_is_a_400_naming_it(api, fields, param):
    response = _create(api, **fields)
    assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text


def test_the_field_wins_over_metadata(api):
    response = _create(api, webhook_url="https://example.com/a", metadata={"webhook_url": "https://example.com/b"})
    assert response.status_code == 200 and response.json()["webhook"] == {"url": "https://example.com/a",
                                                                            "deliveries": []}
    assert _create(api, metadata={"n": "1"}).json()["webhook"] is None


def test_a_webhook_needs_the_signing_secret(tmp_path, tiny_model):
    api = Service.embedded(tmp_path, tiny_model)  # no DIFFBATCH_WEBHOOK_SECRET; no worker needed
    response = _create(api, webhook_url="https://example.com/hook")
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "webhook_secret_missing"
    assert response.json()["error"]["param"] == "webhook_url"
