"""Storage fixtures: a fresh Postgres database per test session and SQLite files in tmp_path.

Postgres and Redis are real servers (scripts/services.sh starts them). Without them these
tests skip locally and FAIL in CI (CI=true).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from needs import need

from mixloom.storage import migrate
from mixloom.storage.db import Database
from mixloom.storage.testing import (
    fresh_postgres_database,
    postgres_problem,
    redis_problem,
    redis_url,
)


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A migrated database of its own for this test session."""
    need(postgres_problem())
    with fresh_postgres_database() as url:
        migrate.upgrade(url)
        yield url


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sqlite-template") / "mixloom.db"
    migrate.upgrade(f"sqlite:///{path}")
    return path


@pytest.fixture
def sqlite_url(sqlite_template: Path, tmp_path: Path) -> str:
    path = tmp_path / "mixloom.db"
    shutil.copy(sqlite_template, path)
    return f"sqlite:///{path}"


@pytest.fixture(params=["sqlite", "postgres"])
def db(request: pytest.FixtureRequest) -> Iterator[Database]:
    """A migrated database on each backend (Postgres: shared by the session's tests,
    which therefore never assume an empty table)."""
    if request.param == "sqlite":
        url = request.getfixturevalue("sqlite_url")
    else:
        url = request.getfixturevalue("pg_url")
    database = Database.connect(url)
    yield database
    database.dispose()


@pytest.fixture
def redis_test_url() -> str:
    need(redis_problem())
    return redis_url()
