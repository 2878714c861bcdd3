"""Throwaway databases for tests: a fresh Postgres database per test session, so parallel
runs never share state. Used by tests/storage and tests/server (pytest-free on purpose)."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from mixloom.config import get_settings
from mixloom.storage.db import normalise_url


def postgres_url() -> str:
    return get_settings().test_postgres_url


def redis_url() -> str:
    return get_settings().test_redis_url


def postgres_problem(url: str | None = None) -> str | None:
    """None if Postgres answers at `url`, else why not."""
    url = url or postgres_url()
    try:
        engine = create_engine(normalise_url(url), connect_args={"connect_timeout": 3})
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        engine.dispose()
    except Exception as exc:
        return (
            f"PostgreSQL is not reachable at {url} ({type(exc).__name__}); run scripts/services.sh"
        )
    return None


def redis_problem(url: str | None = None) -> str | None:
    import redis

    url = url or redis_url()
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=3)
        client.ping()
        client.close()
    except Exception as exc:
        return f"Redis is not reachable at {url} ({type(exc).__name__}); run scripts/services.sh"
    return None


@contextmanager
def fresh_postgres_database(url: str | None = None) -> Iterator[str]:
    """CREATE DATABASE mixloom_test_<random> beside `url`'s database; dropped afterwards."""
    admin_url = make_url(normalise_url(url or postgres_url()))
    name = f"mixloom_test_{secrets.token_hex(6)}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield admin_url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
