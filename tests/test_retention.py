"""Retention: files carry expires_at (OpenAI's expires_after, output_expires_after, else the server's
retention), and the periodic task deletes expired files and leftover partial blobs."""

from __future__ import annotations

import json
import os
import time

import pytest
from openai import OpenAI

from db.models import Batch, BatchStatus, File
from tests.harness import Service, completion_line
from worker import retention

DAY = 86400


@pytest.fixture
def api(tmp_path, tiny_model):
    return Service.embedded(tmp_path, tiny_model)


def _sdk(svc: Service) -> OpenAI:
    return OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=svc.client)


def test_upload_honours_openais_expires_after(api):
    created = _sdk(api).files.create(file=("in.jsonl", b"{}\n"), purpose="batch",
                                     expires_after={"anchor": "created_at", "seconds": 7200})
    assert created.expires_at == created.created_at + 7200
    assert api.client.get(f"/v1/files/{created.id}").json()["expires_at"] == created.expires_at


def test_without_expires_after_a_file_keeps_the_servers_retention(api, tmp_path, tiny_model):
    uploaded = api.upload(b"{}\n")
    assert uploaded["expires_at"] == uploaded["created_at"] + 30 * DAY
    forever = Service.embedded(tmp_path / "forever", tiny_model, retention_days=0).upload(b"{}\n")
    assert forever["expires_at"] is None


@pytest.mark.parametrize("fields,param", [
    ({"expires_after[anchor]": "last_active_at", "expires_after[seconds]": "3600"}, "expires_after[anchor]"),
    ({"expires_after[anchor]": "created_at", "expires_after[seconds]": "3599"}, "expires_after[seconds]"),
    ({"expires_after[anchor]": "created_at", "expires_after[seconds]": "2592001"}, "expires_after[seconds]"),
    ({"expires_after[anchor]": "created_at", "expires_after[seconds]": "soon"}, "expires_after[seconds]"),
    ({"expires_after[anchor]": "created_at"}, "expires_after[seconds]"),
    ({"expires_after[seconds]": "3600"}, "expires_after[anchor]"),
])
def test_a_bad_expires_after_is_a_400_naming_the_field_and_keeps_nothing(api, fields, param):
    response = api.client.post("/v1/files", files={"file": ("a.jsonl", b"{}\n")}, data={"purpose": "batch", **fields})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
    assert api.client.get("/v1/files").json()["data"] == []
    assert list(api.settings.files_dir.iterdir()) == []


def test_batch_output_files_honour_output_expires_after(service):
    client = _sdk(service)
    source = client.files.create(file=("in.jsonl", json.dumps(completion_line("a")).encode() + b"\n"),
                                 purpose="batch")
    batch = client.batches.create(input_file_id=source.id, endpoint="/v1/completions", completion_window="24h",
                                  output_expires_after={"anchor": "created_at", "seconds": 3600})
    done = service.wait(batch.id)
    assert done["status"] == "completed", done
    output = client.files.retrieve(done["output_file_id"])
    assert output.expires_at == output.created_at + 3600


def test_a_bad_output_expires_after_is_a_400_naming_the_field(api):
    file_id = api.upload(b"{}\n")["id"]
    response = api.client.post("/v1/batches", json={"input_file_id": file_id, "endpoint": "/v1/completions",
                                                    "output_expires_after": {"anchor": "created_at", "seconds": 60}})
    assert response.status_code == 400 and response.json()["error"]["param"] == "output_expires_after.seconds"


def _expire(svc: Service, file_id: str) -> None:
    with svc.runtime.session() as session, session.begin():
        session.get(File, file_id).expires_at = 1


def _set_status(svc: Service, batch_id: str, status: BatchStatus) -> None:
    with svc.runtime.session() as session, session.begin():
        session.get(Batch, batch_id).status = status


def test_retention_deletes_expired_files_and_old_partials_but_not_a_running_batchs_input(api):
    expired, kept, running_input = (api.upload(b"{}\n")["id"] for _ in range(3))
    batch_id = api.client.post("/v1/batches", json={"input_file_id": running_input,
                                                    "endpoint": "/v1/completions"}).json()["id"]
    _set_status(api, batch_id, BatchStatus.in_progress)
    for file_id in (expired, running_input):
        _expire(api, file_id)
    blobs = api.settings.files_dir
    old_partial, fresh_partial = blobs / "file-killed.1a2b.partial", blobs / "file-writing.3c4d.partial"
    old_partial.write_bytes(b"half an upload")
    fresh_partial.write_bytes(b"still being written")
    two_hours_ago = time.time() - 7200
    os.utime(old_partial, (two_hours_ago, two_hours_ago))

    assert retention.purge(api.runtime) == {"files": 1, "partials": 1}
    assert api.client.get(f"/v1/files/{expired}").status_code == 404
    assert not (blobs / expired).exists() and not old_partial.exists()
    for file_id in (kept, running_input):
        assert api.client.get(f"/v1/files/{file_id}/content").content == b"{}\n"
    assert fresh_partial.exists()
    assert retention.purge(api.runtime) == {"files": 0, "partials": 0}  # idempotent

    _set_status(api, batch_id, BatchStatus.completed)  # the batch ended: its input goes at the next run
    assert retention.purge(api.runtime) == {"files": 1, "partials": 0}
    assert api.client.get(f"/v1/files/{running_input}").status_code == 404 and not (blobs / running_input).exists()
    assert [f["id"] for f in api.client.get("/v1/files").json()["data"]] == [kept]


def test_retention_is_scheduled_on_the_control_queue():
    from common.settings import CONTROL_QUEUE
    from worker.celery_app import app, settings

    entry = app.conf.beat_schedule["retention"]
    assert entry["task"] == retention.TASK and entry["options"]["queue"] == CONTROL_QUEUE
    assert entry["schedule"] == settings.retention_every_s
    assert retention.TASK in app.tasks
