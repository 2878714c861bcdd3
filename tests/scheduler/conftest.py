"""Worker fixtures: a tiny base model folder, real Postgres (a fresh database per session)
and Redis. Without the services these tests skip locally and FAIL in CI (CI=true)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from needs import need
from tiny import save_tiny_base

from mixloom.storage import migrate
from mixloom.storage.testing import (
    fresh_postgres_database,
    postgres_problem,
    redis_problem,
    redis_url,
)


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    need(postgres_problem())
    with fresh_postgres_database() as url:
        migrate.upgrade(url)
        yield url


@pytest.fixture(scope="session")
def redis() -> str:
    need(redis_problem())
    return redis_url()


@pytest.fixture
def tiny_base(tmp_path: Path) -> Path:
    """A tiny LLaMA + tokenizer as a HF folder; a path of its own per test, so workers of
    one test never claim another test's jobs (workers claim only their model's jobs)."""
    return save_tiny_base(tmp_path / "tiny-base")
