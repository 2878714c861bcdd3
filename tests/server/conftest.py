"""API fixtures: the app on SQLite with the in-process bus, and on a fresh Postgres
database with Redis. Postgres/Redis missing: skip locally, FAIL in CI (CI=true)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from api_support import Api, make_api


@pytest.fixture(params=["sqlite+inprocess", "postgres+redis"])
def api(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Api]:
    if request.param == "sqlite+inprocess":
        path = tmp_path / "mixloom.db"
        shutil.copy(request.getfixturevalue("sqlite_template"), path)
        yield from make_api(tmp_path, f"sqlite:///{path}", None)
    else:
        url = request.getfixturevalue("pg_url")
        yield from make_api(tmp_path, url, request.getfixturevalue("redis"))


@pytest.fixture
def sqlite_api(tmp_path: Path, sqlite_template: Path) -> Iterator[Api]:
    path = tmp_path / "mixloom.db"
    shutil.copy(sqlite_template, path)
    yield from make_api(tmp_path, f"sqlite:///{path}", None)


@pytest.fixture
def small_api(tmp_path: Path, sqlite_template: Path) -> Iterator[Api]:
    """Tight limits, to hit each of them."""
    path = tmp_path / "mixloom.db"
    shutil.copy(sqlite_template, path)
    yield from make_api(
        tmp_path,
        f"sqlite:///{path}",
        None,
        max_upload_bytes=2048,
        max_request_bytes=4096,
        max_tenant_bytes=3000,
        max_queued_jobs=2,
        max_file_lines=5,
    )
