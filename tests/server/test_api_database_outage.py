"""The database goes away under a running API (a restart, a failover): requests get 503
with Retry-After, the log says so once (not a traceback per request), and once the
database is back the API answers again and logs that too."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from api_support import Api, make_api
from needs import need
from sqlalchemy import create_engine, make_url, text

from mixloom.storage import migrate
from mixloom.storage.db import normalise_url
from mixloom.storage.testing import fresh_postgres_database, postgres_problem


@pytest.fixture
def own_database_api(tmp_path: Path) -> Iterator[tuple[Api, str]]:
    """An API on a database of this test alone, so it can be closed to connections."""
    need(postgres_problem())
    with fresh_postgres_database() as url:
        migrate.upgrade(url)
        yield from ((api, url) for api in make_api(tmp_path, url, None))


def _set_connections(url: str, allowed: bool) -> None:
    """Refuse (and cut) or allow connections to this one database: an outage of it alone,
    the machine's Postgres keeps serving everything else."""
    target = make_url(normalise_url(url))
    admin = create_engine(target.set(database="postgres"), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(
                text(f'ALTER DATABASE "{target.database}" WITH ALLOW_CONNECTIONS {allowed}')
            )
            if not allowed:
                conn.execute(
                    text(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE datname = :name AND pid <> pg_backend_pid()"
                    ),
                    {"name": target.database},
                )
    finally:
        admin.dispose()


def test_a_database_outage_is_503_with_retry_after_and_logged_once(
    own_database_api: tuple[Api, str], caplog: pytest.LogCaptureFixture
) -> None:
    api, url = own_database_api
    h = api.tenant()
    assert api.client.get("/v1/fine_tuning/jobs", headers=h).status_code == 200
    caplog.set_level(logging.INFO)
    _set_connections(url, allowed=False)
    try:
        answers = [api.client.get("/v1/fine_tuning/jobs", headers=h) for _ in range(30)]
        answers += [api.client.get("/v1/files", headers=h) for _ in range(30)]
    finally:
        _set_connections(url, allowed=True)
    for r in answers:
        assert r.status_code == 503, r.text
        assert int(r.headers["Retry-After"]) > 0
        error = r.json()["error"]
        assert error["code"] == "database_unavailable" and "retry in" in error["message"]
    during = [r for r in caplog.records if r.name.startswith("mixloom")]
    assert len(during) == 1, [r.getMessage() for r in during]
    assert "database is unreachable" in during[0].getMessage() and not during[0].exc_info

    assert api.client.get("/v1/fine_tuning/jobs", headers=h).status_code == 200
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("mixloom")]
    assert len(lines) == 2 and "database is back after" in lines[1], lines
