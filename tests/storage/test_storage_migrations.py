"""Alembic migrations run up from empty and down again on SQLite and Postgres, and the
migrated schema matches the models."""

from __future__ import annotations

from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from needs import need
from sqlalchemy import inspect

from mixloom.storage import migrate
from mixloom.storage.db import make_engine
from mixloom.storage.models import Base
from mixloom.storage.testing import fresh_postgres_database, postgres_problem

TABLES = {
    "tenants",
    "api_keys",
    "files",
    "jobs",
    "job_events",
    "job_metrics",
    "inference_requests",
    "inference_chunks",
    "checkpoints",
    "idempotency_keys",
    "dashboard_sessions",
}


def _tables(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def _schema_diff(url: str) -> list[object]:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return list(compare_metadata(MigrationContext.configure(conn), Base.metadata))
    finally:
        engine.dispose()


def _up_down_up(url: str) -> None:
    assert _tables(url) == set()
    migrate.upgrade(url)
    assert _tables(url) == TABLES | {"alembic_version"}
    assert _schema_diff(url) == []
    migrate.downgrade(url, "base")
    assert _tables(url) == {"alembic_version"}
    migrate.upgrade(url)
    assert _tables(url) >= TABLES


def test_sqlite_up_from_empty_and_down_again(tmp_path: Path) -> None:
    _up_down_up(f"sqlite:///{tmp_path / 'fresh.db'}")


def test_postgres_up_from_empty_and_down_again() -> None:
    need(postgres_problem())
    with fresh_postgres_database() as url:
        _up_down_up(url)


def test_upgrade_twice_is_a_no_op(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'twice.db'}"
    migrate.upgrade(url)
    migrate.upgrade(url)
    assert _tables(url) >= TABLES
