"""Shared fixtures: a tiny random checkpoint, and a whole in-process service (API + real Celery worker)."""

from __future__ import annotations

import os

import pytest

from tests.harness import Service, services_settings

os.environ.setdefault("HF_HOME", "/tmp/diffbatch-test-hf-home")  # never touch the user's hub cache
os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    from worker.engine.builtin.create import create_tiny_random_model

    return create_tiny_random_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture
def service(tmp_path, tiny_model):
    """API (TestClient) + one real Celery worker thread on the in-memory broker and SQLite."""
    with Service.embedded(tmp_path, tiny_model) as svc:
        yield svc


@pytest.fixture
def production_service(tmp_path, tiny_model):
    """The same on the real Redis and PostgreSQL servers (never skipped when CI=true)."""
    with services_settings(tmp_path, tiny_model) as settings, Service(settings) as svc:
        yield svc
