"""A whole diffbatch service inside the test process: the real API app and a real Celery worker.

The worker runs Celery's test worker (solo pool, in a thread) with the same app the API sends on, so
tests go through real messages, tasks, database rows and files, as a deployment does.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import time
from pathlib import Path

import pytest
from celery.contrib.testing.worker import start_worker
from fastapi.testclient import TestClient

from api.app import create_app
from api.queue import Queue
from common.ids import now
from common.queue import make_celery
from common.settings import CONTROL_QUEUE, Settings
from db import repo
from db.migrate import upgrade
from worker.runtime import Runtime, set_runtime

REDIS_URL = "redis://127.0.0.1:6379/11"
POSTGRES_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
TERMINAL = {"completed", "failed", "expired", "cancelled"}


class Service:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        upgrade(settings.resolved_database_url)
        self.celery = make_celery(settings)
        import worker.tasks  # noqa: F401 - registers the shared tasks on every app

        self.runtime = Runtime(settings, celery=self.celery)
        self.client = TestClient(create_app(settings, queue=Queue(settings, celery=self.celery)))
        self._stack = contextlib.ExitStack()

    @classmethod
    def embedded(cls, tmp_path: Path, model: Path, **overrides) -> Service:
        return cls(Settings(data_dir=tmp_path / "data", model=str(model), broker_url="memory://",
                            **overrides))

    def __enter__(self) -> Service:
        set_runtime(self.runtime)
        with self.runtime.session() as session, session.begin():
            repo.upsert_worker(session, name=self.runtime.name, model=self.runtime.model_name,
                               queue=self.runtime.model_queue, max_positions=2048, now=now())
        self._stack.enter_context(start_worker(
            self.celery, pool="solo", perform_ping_check=False, shutdown_timeout=30,
            queues=[CONTROL_QUEUE, self.runtime.model_queue]))
        return self

    def __exit__(self, *_exc) -> None:
        self._stack.close()
        set_runtime(None)

    # -- client helpers ------------------------------------------------------------------------
    def upload(self, content: bytes, filename: str = "input.jsonl") -> dict:
        response = self.client.post("/v1/files", files={"file": (filename, content)},
                                    data={"purpose": "batch"})
        assert response.status_code == 200, response.text
        return response.json()

    def submit(self, lines: list[dict] | bytes, endpoint: str = "/v1/completions") -> dict:
        content = lines if isinstance(lines, bytes) else b"".join(json.dumps(x).encode() + b"\n" for x in lines)
        uploaded = self.upload(content)
        response = self.client.post("/v1/batches", json={"input_file_id": uploaded["id"], "endpoint": endpoint,
                                                         "completion_window": "24h"})
        assert response.status_code == 200, response.text
        return response.json()

    def wait(self, batch_id: str, timeout: float = 120.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            batch = self.client.get(f"/v1/batches/{batch_id}").json()
            if batch["status"] in TERMINAL:
                return batch
            time.sleep(0.05)
        raise AssertionError(f"batch {batch_id} still {batch['status']} after {timeout} s")

    def lines_of(self, file_id: str | None) -> list[dict]:
        if file_id is None:
            return []
        response = self.client.get(f"/v1/files/{file_id}/content")
        assert response.status_code == 200, response.text
        return [json.loads(line) for line in response.content.splitlines()]


def completion_line(custom_id: str, prompt: str = "def add(a, b):\n", model: str = "tiny", **body) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/completions",
            "body": {"model": model, "prompt": prompt, "max_tokens": 8, **body}}


def chat_line(custom_id: str, content: str = "Say hi.", model: str = "tiny", **body) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 8, **body}}


def require_servers() -> None:
    """Skip without Redis/PostgreSQL on a developer machine; in CI their absence is a failure."""
    import redis
    import sqlalchemy

    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()
        sqlalchemy.create_engine(POSTGRES_ADMIN_URL).connect().close()
    except Exception as exc:  # noqa: BLE001
        if os.environ.get("CI") == "true":
            raise AssertionError(f"CI=true but Redis/PostgreSQL are unreachable: {exc}") from exc
        pytest.skip(f"Redis/PostgreSQL unreachable: {exc}")


# Parametrize a fixture with these to run its tests on SQLite and on PostgreSQL (run when CI=true).
DATABASES = ["sqlite", pytest.param("postgres", marks=pytest.mark.services)]


@contextlib.contextmanager
def service_on(database: str, tmp_path: Path, model: Path, **overrides):
    """A Service (not started) on the embedded SQLite or on a fresh PostgreSQL database."""
    if database == "sqlite":
        yield Service.embedded(tmp_path, model, **overrides)
        return
    require_servers()
    with fresh_postgres_database() as url:
        yield Service.embedded(tmp_path, model, database_url=url, **overrides)


@contextlib.contextmanager
def fresh_postgres_database():
    """A new empty PostgreSQL database for one test, dropped afterwards."""
    import sqlalchemy

    name = f"diffbatch_test_{secrets.token_hex(4)}"
    admin = sqlalchemy.create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    try:
        yield POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + "/" + name
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


@contextlib.contextmanager
def services_settings(tmp_path: Path, model: Path):
    require_servers()
    import redis

    redis.Redis.from_url(REDIS_URL).flushdb()
    with fresh_postgres_database() as database_url:
        yield Settings(data_dir=tmp_path / "data", model=str(model), database_url=database_url,
                       broker_url=REDIS_URL, chunk_size=3, max_batch_size=3)
