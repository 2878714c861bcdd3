"""Alembic migrations run up from empty and down again on SQLite and Postgres, and the
migrated schema matches the models."""

from __future__ import annotations

from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from needs import need
from sqlalchemy import inspect, text

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
    "workers",
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


def test_0003_renames_fine_tuned_models_without_the_base_path(tmp_path: Path) -> None:
    """Jobs named before 0003 held MIXLOOM_BASE_MODEL as given (a server path) in their
    fine-tuned model's id; 0003 renames them ft:BASE:TENANT:SUFFIX:JOB, and back on downgrade."""
    url = f"sqlite:///{tmp_path / 'named.db'}"
    migrate.upgrade(url, "0002")
    rows = [
        ("ftjob-a", "/srv/models/tiny-llama", "demo", "ft:/srv/models/tiny-llama:demo:ftjob-a"),
        ("ftjob-b", "smollm2-135m", None, "ft:smollm2-135m:mixloom:ftjob-b"),
        ("ftjob-c", "/srv/models/tiny-llama", None, None),  # not succeeded
    ]
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            now = "2026-12-01 00:00:00"
            conn.execute(
                text("INSERT INTO tenants (id, name, created_at) VALUES ('tenant-1', 'acme', :t)"),
                {"t": now},
            )
            conn.execute(
                text(
                    "INSERT INTO files (id, tenant_id, filename, purpose, bytes, rows, sha256, "
                    "path, status, created_at) VALUES ('file-1', 'tenant-1', 't.jsonl', "
                    "'fine-tune', 1, 1, 'x', 'p', 'processed', :t)"
                ),
                {"t": now},
            )
            for job_id, model, suffix, name in rows:
                conn.execute(
                    text(
                        "INSERT INTO jobs (id, tenant_id, model, training_file_id, method, seed, "
                        "suffix, status, fine_tuned_model, created_at, updated_at, attempts, "
                        "crashes, last_seq) VALUES (:id, 'tenant-1', :model, 'file-1', '{}', 1, "
                        ":suffix, 'succeeded', :name, :t, :t, 0, 0, 0)"
                    ),
                    {"id": job_id, "model": model, "suffix": suffix, "name": name, "t": now},
                )

        def names() -> list[str | None]:
            with engine.connect() as conn:
                query = text("SELECT fine_tuned_model FROM jobs ORDER BY id")
                return list(conn.execute(query).scalars())

        migrate.upgrade(url, "0003")
        assert names() == [
            "ft:tiny-llama:tenant-1:demo:ftjob-a",
            "ft:smollm2-135m:tenant-1::ftjob-b",
            None,
        ]
        migrate.downgrade(url, "0002")
        assert names() == [name for *_, name in rows]
    finally:
        engine.dispose()
