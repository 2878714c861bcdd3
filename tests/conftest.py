"""Shared fixtures: tiny random LLaMA models that run in well under a second, and the
services (a fresh Postgres database per test session, Redis, a migrated SQLite template).

Postgres and Redis are real servers (scripts/services.sh starts them). Without them the tests
that ask for them skip locally and FAIL in CI (CI=true).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from needs import need
from tiny import tiny_llama

from mixloom import kernels
from mixloom.storage import migrate
from mixloom.storage.testing import (
    fresh_postgres_database,
    postgres_problem,
    redis_problem,
    redis_url,
)


@pytest.fixture
def tiny_model():  # type: ignore[no-untyped-def]
    return tiny_llama()


@pytest.fixture(autouse=True)
def _kernel_settings_read_afresh() -> None:
    """The kernels read their settings once (kernels.settings); a test may set a MIXLOOM_
    variable (monkeypatch.setenv) before its first kernel call."""
    kernels.settings.cache_clear()


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A migrated database of its own for this test session, shared by its tests (which
    therefore never assume an empty table)."""
    need(postgres_problem())
    with fresh_postgres_database() as url:
        migrate.upgrade(url)
        yield url


@pytest.fixture(scope="session")
def redis() -> str:
    need(redis_problem())
    return redis_url()


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated SQLite file; tests copy it instead of migrating their own."""
    path = tmp_path_factory.mktemp("sqlite-template") / "mixloom.db"
    migrate.upgrade(f"sqlite:///{path}")
    return path
