"""The hot GET routes read through `ServerContext.read`: on Postgres on the event loop
(SQLAlchemy's async engine), on SQLite in the threadpool. Both answer the same, a read
cannot write, and a Postgres connection that died is replaced without an error."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from api_support import Api, make_api
from sqlalchemy import update

from mixloom.storage import jobs
from mixloom.storage import models as m
from mixloom.storage.db import normalise_url

JOBS = "/v1/fine_tuning/jobs"
_ID = re.compile(r"^[a-z]+-[A-Za-z0-9_]+$")


@pytest.fixture
def pg_api(tmp_path: Path, pg_url: str, redis: str) -> Iterator[Api]:
    yield from make_api(tmp_path, pg_url, redis)


def _scenario(api: Api) -> list[tuple[str, int, Any]]:
    """Every hot GET (and its 404) on the same data: [(path template, status, body)]."""
    headers = api.tenant()
    file_id = api.file_id(headers)
    first, second = (api.create_job(headers, file_id, seed=7).json()["id"] for _ in "12")
    api.claim(first)
    with api.ctx.db.transaction() as s:
        for step in (1, 2, 3):
            jobs.add_metrics(session=s, job_id=first, step=step, values={"train_loss": 1 / step})
        jobs.add_event(session=s, job_id=first, message="step 3")
    paths = {
        "jobs": JOBS,
        "jobs page": f"{JOBS}?limit=1",
        "job": f"{JOBS}/{first}",
        "queued job": f"{JOBS}/{second}",
        "events": f"{JOBS}/{first}/events?limit=2",
        "metrics": f"{JOBS}/{first}/metrics?after=1",
        "checkpoints": f"{JOBS}/{first}/checkpoints",
        "files": "/v1/files",
        "file": f"/v1/files/{file_id}",
        "models": "/v1/models",
        "usage": "/v1/usage",
        "missing job": f"{JOBS}/ftjob-missing",
        "missing job's events": f"{JOBS}/ftjob-missing/events",
        "missing file": "/v1/files/file-missing",
    }
    out = []
    for name, path in paths.items():
        r = api.client.get(path, headers=headers)
        out.append((name, r.status_code, r.json()))
    return out


def _normalised(value: Any, ids: dict[str, str]) -> Any:
    """Ids by order of appearance, times and the server's start time dropped."""
    if isinstance(value, dict):
        return {
            k: _normalised(v, ids)
            for k, v in value.items()
            if not (k.endswith("_at") or k in ("created", "ready_in_seconds"))
        }
    if isinstance(value, list | tuple):
        return [_normalised(v, ids) for v in value]
    if isinstance(value, str) and _ID.match(value) and "missing" not in value:
        return ids.setdefault(value, f"<id {len(ids)}>")
    return value


def _diff(a: Any, b: Any, where: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in a.keys() | b.keys() for d in _diff(a.get(k), b.get(k), f"{where}.{k}")]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [
            d
            for i, (x, y) in enumerate(zip(a, b, strict=True))
            for d in _diff(x, y, f"{where}[{i}]")
        ]
    return [] if a == b else [f"{where}: {a!r} != {b!r}"]


def test_hot_gets_answer_the_same_on_sqlite_and_postgres(sqlite_api: Api, pg_api: Api) -> None:
    assert sqlite_api.ctx.reads.engine is None
    assert pg_api.ctx.reads.engine is not None
    on_sqlite = _normalised(_scenario(sqlite_api), {})
    on_postgres = _normalised(_scenario(pg_api), {})
    assert [(n, s) for n, s, _ in on_sqlite] == [  # type: ignore[misc]
        (n, 200 if not n.startswith("missing") else 404) for n, _, _ in on_sqlite
    ]
    for sqlite_row, pg_row in zip(on_sqlite, on_postgres, strict=True):
        assert sqlite_row == pg_row, _diff(sqlite_row, pg_row)


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_a_read_cannot_write(backend: str, request: pytest.FixtureRequest) -> None:
    api: Api = request.getfixturevalue(f"{'sqlite' if backend == 'sqlite' else 'pg'}_api")
    job_id = api.job_id(h := api.tenant())

    def write(session: Any) -> None:
        session.execute(update(m.Job).where(m.Job.id == job_id).values(status="failed"))

    with pytest.raises(RuntimeError, match="read-only"):
        api.client.portal.call(api.ctx.read, write)  # type: ignore[union-attr]
    assert api.client.get(f"{JOBS}/{job_id}", headers=h).json()["status"] == "queued"


def test_gets_answer_after_postgres_ends_every_connection(pg_api: Api, pg_url: str) -> None:
    headers = pg_api.tenant()
    job_id = pg_api.job_id(headers)
    paths = [f"{JOBS}/{job_id}", JOBS, f"{JOBS}/{job_id}/events", "/v1/files", "/v1/usage"]
    for path in paths:  # pooled async connections, one or more
        assert pg_api.client.get(path, headers=headers).status_code == 200
    dsn = normalise_url(pg_url).replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(dsn, autocommit=True) as admin:
        ended = admin.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        ).fetchone()
    assert ended is not None and ended[0] >= 1
    for path in paths * 2:
        r = pg_api.client.get(path, headers=headers)
        assert r.status_code == 200, r.text
