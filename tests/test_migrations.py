"""Alembic upgrades an empty SQLite and an empty PostgreSQL database to head, and the models match."""

from __future__ import annotations

import pytest
from sqlalchemy import inspect

from db.migrate import check, upgrade
from db.models import Base
from db.session import make_engine
from tests.harness import fresh_postgres_database, require_servers


def _upgrade_and_compare(url: str) -> None:
    upgrade(url)
    check(url)  # raises if autogenerate would emit any operation
    engine = make_engine(url)
    assert set(inspect(engine).get_table_names()) >= set(Base.metadata.tables)
    engine.dispose()


def test_sqlite_upgrade_matches_models(tmp_path):
    _upgrade_and_compare(f"sqlite:///{tmp_path}/fresh/db.sqlite")


@pytest.mark.services
def test_postgres_upgrade_matches_models():
    require_servers()
    with fresh_postgres_database() as url:
        _upgrade_and_compare(url)


def test_upgrade_twice_is_harmless(tmp_path):
    url = f"sqlite:///{tmp_path}/db.sqlite"
    upgrade(url)
    upgrade(url)
    check(url)
