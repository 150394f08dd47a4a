"""Settings come from DIFFBATCH_* variables; the embedded defaults need none; bad combinations are refused."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from common.queue import make_celery
from common.settings import Settings


def test_embedded_defaults_need_no_variable(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    settings = Settings()
    assert settings.resolved_database_url == f"sqlite:///{tmp_path}/diffbatch-data/diffbatch.sqlite"
    assert settings.resolved_broker_url.startswith("sqla+sqlite:///")
    assert settings.served_model_name == "diffbatch-py-mini"  # the shipped trained model
    # The embedded broker is the SQLAlchemy transport with a fast poll.
    with make_celery(settings).connection_for_write() as conn:
        assert conn.transport.polling_interval == 0.1


def test_environment_variables_configure_production(monkeypatch):
    monkeypatch.setenv("DIFFBATCH_DATABASE_URL", "postgresql+psycopg://u@db/x")
    monkeypatch.setenv("DIFFBATCH_BROKER_URL", "redis://redis:6379/0")
    monkeypatch.setenv("DIFFBATCH_MODEL", "/models/llada-8b")
    settings = Settings()
    assert settings.resolved_database_url == "postgresql+psycopg://u@db/x"
    assert settings.served_model_name == "llada-8b"
    assert make_celery(settings).conf.broker_transport_options["visibility_timeout"] >= 3600


def test_chunk_smaller_than_a_forward_batch_is_refused():
    with pytest.raises(ValidationError, match="DIFFBATCH_CHUNK_SIZE \\(8\\) must be at least"):
        Settings(chunk_size=8, max_batch_size=32)


def test_the_engine_cache_is_a_setting_and_an_unknown_one_is_refused(monkeypatch):
    monkeypatch.setenv("DIFFBATCH_CACHE", "delayed")
    assert Settings().cache == "delayed"
    monkeypatch.setenv("DIFFBATCH_CACHE", "fastest")
    with pytest.raises(ValidationError, match="cache"):
        Settings()
