"""Storage fixtures: each test on SQLite (a file in tmp_path) and on Postgres (the session's
database, tests/conftest.py)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from mixloom.storage.db import Database


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
