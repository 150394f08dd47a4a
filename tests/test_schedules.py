"""Scheduled batches: /v1/schedules over HTTP, firing with a controllable clock, and the CLI.

A due run becomes one normal batch: once per due minute, once with two firing passes racing, once after
ten missed minutes; never while paused; a resume counts from now; the cron runs on the zone's wall clock.
"""

from __future__ import annotations

import json
import threading
from datetime import datetime, timezone

import pytest
from sqlalchemy import func, select

import api.routes.schedules as schedule_routes
from common.cron import next_run
from common.ids import now
from common.queue import FIRE_SCHEDULES
from common.settings import CONTROL_QUEUE
from db import keys
from db.models import Batch, Schedule
from tests.harness import DATABASES, Service, completion_line, service_on
from worker.schedules import fire_due


@pytest.fixture
def api(tmp_path, tiny_model):
    """The API and a runtime on SQLite, no worker: fired batches stay validating."""
    return Service.embedded(tmp_path, tiny_model)


def upload(svc: Service, headers: dict[str, str] | None = None) -> str:
    content = b"".join(json.dumps(completion_line(f"r{i}")).encode() + b"\n" for i in range(2))
    response = svc.client.post("/v1/files", files={"file": ("in.jsonl", content)}, data={"purpose": "batch"},
                               headers=headers or {})
    assert response.status_code == 200, response.text
    return str(response.json()["id"])


def create(svc: Service, cron: str = "* * * * *", headers: dict[str, str] | None = None, **fields) -> dict:
    template = {"input_file_id": upload(svc, headers), "endpoint": "/v1/completions",
                "metadata": {"job": "nightly"}}
    response = svc.client.post("/v1/schedules", json={"cron": cron, "template": template, **fields},
                               headers=headers or {})
    assert response.status_code == 200, response.text
    return response.json()


def batches_of(svc: Service, schedule_id: str) -> list[Batch]:
    with svc.runtime.session() as session:
        return list(session.scalars(select(Batch).where(Batch.schedule_id == schedule_id).order_by(Batch.created_at)))


def schedule(svc: Service, schedule_id: str) -> dict:
    response = svc.client.get(f"/v1/schedules/{schedule_id}")
    assert response.status_code == 200, response.text
    return response.json()


def utc(text: str) -> int:
    return int(datetime.fromisoformat(text).replace(tzinfo=timezone.utc).timestamp())


def test_a_schedule_fires_once_per_due_minute_as_a_normal_batch(api):
    created = create(api)
    t0 = created["next_run_at"]
    assert created["object"] == "schedule" and not created["paused"] and t0 % 60 == 0 and t0 > now() - 60
    assert created["template"]["completion_window"] == "24h" and created["last_batch_id"] is None
    assert fire_due(api.runtime, now=t0 - 1).fired == {}
    first = fire_due(api.runtime, now=t0).fired
    assert fire_due(api.runtime, now=t0 + 30).fired == {}
    second = fire_due(api.runtime, now=t0 + 60).fired
    rows = batches_of(api, created["id"])
    assert [r.id for r in rows] == [first[created["id"]], second[created["id"]]]
    batch = api.client.get(f"/v1/batches/{rows[1].id}").json()
    assert batch["status"] == "validating" and batch["schedule_id"] == created["id"]
    assert batch["metadata"] == {"job": "nightly"} and batch["input_file_id"] == created["template"]["input_file_id"]
    api.submit([completion_line("other")])  # not the schedule's
    listed = api.client.get("/v1/batches", params={"schedule_id": created["id"]}).json()["data"]
    assert [b["id"] for b in listed] == [rows[1].id, rows[0].id]
    after = schedule(api, created["id"])
    assert (after["last_run_at"], after["last_batch_id"], after["next_run_at"]) == (t0 + 60, rows[1].id, t0 + 120)


@pytest.fixture(params=DATABASES)
def either(request, tmp_path, tiny_model):
    with service_on(request.param, tmp_path, tiny_model) as service:
        yield service


def test_two_firing_passes_racing_create_each_run_once(either):
    """Two beat processes: each due run is claimed by one of them."""
    created = [create(either) for _ in range(4)]
    due = max(c["next_run_at"] for c in created)
    start, reports = threading.Barrier(2), []

    def fire() -> None:
        start.wait(timeout=30)
        reports.append(fire_due(either.runtime, now=due))

    threads = [threading.Thread(target=fire) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert len(reports) == 2
    fired = [schedule_id for report in reports for schedule_id in report.fired]
    assert sorted(fired) == sorted(c["id"] for c in created)
    for c in created:
        assert len(batches_of(either, c["id"])) == 1


def test_runs_missed_while_down_fire_once_and_the_next_is_counted_from_now(api):
    created = create(api)
    t0 = created["next_run_at"]
    late = t0 + 10 * 60 + 5  # ten due minutes passed while nothing ran
    assert list(fire_due(api.runtime, now=late).fired) == [created["id"]]
    assert fire_due(api.runtime, now=late).fired == {}
    assert len(batches_of(api, created["id"])) == 1
    assert schedule(api, created["id"])["next_run_at"] == t0 + 11 * 60


def test_paused_never_fires_and_resume_counts_from_now(api):
    created = create(api)
    paused = api.client.post(f"/v1/schedules/{created['id']}/pause").json()
    assert paused["paused"] is True
    assert fire_due(api.runtime, now=created["next_run_at"] + 3600).fired == {}
    assert batches_of(api, created["id"]) == []
    before = now()
    resumed = api.client.post(f"/v1/schedules/{created['id']}/resume").json()
    assert resumed["paused"] is False and before < resumed["next_run_at"] <= now() + 60
    assert list(fire_due(api.runtime, now=resumed["next_run_at"]).fired) == [created["id"]]


def test_the_cron_runs_on_the_time_zones_wall_clock(api, monkeypatch):
    monkeypatch.setattr(schedule_routes, "now", lambda: utc("2025-01-15T00:00:00"))
    created = create(api, cron="0 9 * * *", timezone="Europe/Berlin")
    assert created["next_run_at"] == utc("2025-01-15T08:00:00")  # 09:00 CET
    assert fire_due(api.runtime, now=utc("2025-01-15T07:59:59")).fired == {}
    assert list(fire_due(api.runtime, now=utc("2025-01-15T08:00:00")).fired) == [created["id"]]
    assert schedule(api, created["id"])["next_run_at"] == utc("2025-01-16T08:00:00")
    assert next_run("0 9 * * *", "Europe/Berlin", after=utc("2025-07-15T00:00:00")) == utc("2025-07-15T07:00:00")


def test_a_run_whose_input_file_was_deleted_is_skipped_with_the_reason(api):
    created = create(api)
    assert api.client.delete(f"/v1/files/{created['template']['input_file_id']}").status_code == 200
    report = fire_due(api.runtime, now=created["next_run_at"])
    assert report.fired == {} and "No such File object" in report.skipped[created["id"]]
    assert batches_of(api, created["id"]) == []
    assert schedule(api, created["id"])["next_run_at"] == created["next_run_at"] + 60  # not retried every beat


@pytest.mark.parametrize(("change", "param"), [
    ({"cron": "* * *"}, "cron"), ({"cron": "61 * * * *"}, "cron"), ({"cron": "0 0 30 2 *"}, "cron"),
    ({"timezone": "Mars/Olympus"}, "timezone"), ({"timezone": "../etc/passwd"}, "timezone"),
    ({"template": {"input_file_id": "file-nope", "endpoint": "/v1/completions"}}, "template.input_file_id"),
    ({"template": {"input_file_id": "file-x", "endpoint": "/v1/nope"}}, "template.endpoint"),
])
def test_bad_input_is_a_4xx_naming_the_field(api, change, param):
    body = {"cron": "0 * * * *", "template": {"input_file_id": upload(api), "endpoint": "/v1/completions"},
            **change}
    response = api.client.post("/v1/schedules", json=body)
    assert response.status_code in (400, 404), response.text
    assert response.json()["error"]["param"] == param


def test_schedules_are_tenant_scoped(api):
    def bearer(tenant: str) -> dict[str, str]:
        with api.runtime.session() as session, session.begin():
            return {"Authorization": f"Bearer {keys.create_key(session, tenant_id=tenant, now=now())[1]}"}

    alice, bob = bearer("alice"), bearer("bob")
    created = create(api, headers=alice)
    sid = created["id"]
    for method, path in (("GET", ""), ("POST", "/pause"), ("POST", "/resume"), ("DELETE", "")):
        assert api.client.request(method, f"/v1/schedules/{sid}{path}", headers=bob).status_code == 404
    assert api.client.get("/v1/schedules", headers=bob).json()["data"] == []
    stolen = {"cron": "* * * * *", "template": {"input_file_id": created["template"]["input_file_id"],
                                                 "endpoint": "/v1/completions"}}
    assert api.client.post("/v1/schedules", json=stolen, headers=bob).status_code == 404  # not bob's file
    second = create(api, headers=alice)
    # Newest first; two made in one second are ordered by id, as the listing's order says.
    newer, older = sorted([created, second], key=lambda s: (s["created_at"], s["id"]), reverse=True)
    listed = api.client.get("/v1/schedules", params={"limit": 1}, headers=alice).json()
    assert [s["id"] for s in listed["data"]] == [newer["id"]] and listed["has_more"]
    rest = api.client.get("/v1/schedules", params={"after": newer["id"]}, headers=alice).json()
    assert [s["id"] for s in rest["data"]] == [older["id"]] and not rest["has_more"]
    fired = fire_due(api.runtime, now=created["next_run_at"]).fired
    with api.runtime.session() as session:
        assert session.get(Batch, fired[sid]).tenant_id == "alice"
    deleted = api.client.delete(f"/v1/schedules/{sid}", headers=alice).json()
    assert deleted == {"id": sid, "object": "schedule.deleted", "deleted": True}
    assert api.client.get(f"/v1/schedules/{sid}", headers=alice).status_code == 404
    assert api.client.get(f"/v1/batches/{fired[sid]}", headers=alice).status_code == 200  # its batches stay


def test_beat_fires_schedules_on_the_control_queue():
    from worker.celery_app import app

    entry = app.conf.beat_schedule["schedules"]
    assert entry["task"] == FIRE_SCHEDULES and entry["options"]["queue"] == CONTROL_QUEUE
    assert FIRE_SCHEDULES in app.tasks


def test_a_fired_run_completes_like_any_batch(service):
    created = create(service)
    batch_id = fire_due(service.runtime, now=created["next_run_at"]).fired[created["id"]]
    done = service.wait(batch_id)
    assert done["status"] == "completed" and done["request_counts"] == {"total": 2, "completed": 2, "failed": 0}


def test_the_cli_round_trip(api, tmp_path, capsys, monkeypatch):
    from cli.main import main
    from tests.live_server import live_server

    for name in ("DIFFBATCH_API_KEY", "DIFFBATCH_URL"):
        monkeypatch.delenv(name, raising=False)
    source = tmp_path / "nightly.jsonl"
    source.write_text(json.dumps(completion_line("a")) + "\n")

    def cli(*args: str) -> tuple[int, str]:
        capsys.readouterr()
        code = main([*args, "--url", url + "/v1", "--data-dir", str(tmp_path / "cli")])
        return code, capsys.readouterr().out

    with live_server(api.client.app) as url:
        code, out = cli("schedules", "create", "--cron", "0 9 * * 1-5", "--timezone", "Europe/Berlin",
                        "--file", str(source), "--metadata", "team=data")
        assert code == 0, out
        sid = out.splitlines()[-1]
        stored = schedule(api, sid)
        assert stored["template"]["endpoint"] == "/v1/completions" and stored["template"]["metadata"] == {
            "team": "data"}
        code, out = cli("schedules", "list")
        assert code == 0 and sid in out and "Europe/Berlin" in out
        assert cli("schedules", "pause", sid)[0] == 0 and schedule(api, sid)["paused"]
        code, out = cli("schedules", "list", "--json")
        assert [(s["id"], s["paused"]) for s in json.loads(out)] == [(sid, True)]
        assert cli("schedules", "resume", sid)[0] == 0 and not schedule(api, sid)["paused"]
        assert cli("schedules", "delete", sid)[0] == 0
        assert cli("schedules", "pause", sid)[0] == 1  # gone: the server's 404, exit 1
        assert cli("schedules", "create", "--cron", "* * *", "--file", str(source))[0] == 1
    with api.runtime.session() as session:
        assert session.scalar(select(func.count()).select_from(Schedule)) == 0
