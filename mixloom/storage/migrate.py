"""Run the Alembic migrations (migrations/ at the repository top) from Python."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import text

from mixloom.errors import ConfigError
from mixloom.storage.db import is_sqlite, make_engine, normalise_url

MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations"
# Any constant shared by every mixloom process: concurrent starters upgrade one at a time.
_PG_MIGRATION_LOCK = 0x6D786C6D


def alembic_config(url: str) -> Config:
    if not (MIGRATIONS_DIR / "env.py").exists():
        raise ConfigError(
            f"migrations not found at {MIGRATIONS_DIR}; run mixloom from its source checkout "
            "(or an image that copies migrations/ beside the mixloom package)"
        )
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.attributes["url"] = normalise_url(url)
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    cfg = alembic_config(url)
    if is_sqlite(url):
        command.upgrade(cfg, revision)
        return
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": _PG_MIGRATION_LOCK})
            try:
                command.upgrade(cfg, revision)
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _PG_MIGRATION_LOCK})
    finally:
        engine.dispose()


def downgrade(url: str, revision: str = "base") -> None:
    command.downgrade(alembic_config(url), revision)
