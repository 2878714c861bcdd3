"""Engine and transactions for Postgres and SQLite (the embedded default)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import anyio
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.orm import Session, sessionmaker

T = TypeVar("T")

_READ_ONLY = "mixloom_read_only"  # an execution option: see make_engine's BEGIN

# Seconds a SQLite writer waits for another writer before giving up ("database is locked").
SQLITE_BUSY_TIMEOUT_S = 30
# Connections kept open per engine, and as many more under a burst: 40 in all, anyio's
# default threadpool, so no request thread waits for a connection. SQLAlchemy's 5 + 10 made
# the 16th to 40th concurrent request each open and close a connection (on Postgres, a
# backend process started per request).
POOL_SIZE = 20
POOL_OVERFLOW = 20


def is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")


def normalise_url(url: str) -> str:
    """Use psycopg 3 for `postgresql://` URLs (SQLAlchemy would pick psycopg2 otherwise)."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def make_engine(url: str, **kwargs: Any) -> Engine:
    url = normalise_url(url)
    pool = {"pool_size": POOL_SIZE, "max_overflow": POOL_OVERFLOW}
    if not is_sqlite(url):
        return create_engine(url, pool_pre_ping=True, **{**pool, **kwargs})
    path = url.split("///", 1)[-1]
    if path and path != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        kwargs = {**pool, **kwargs}  # an in-memory database has a single-connection pool
    engine = create_engine(
        url, connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_S}, **kwargs
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Let SQLAlchemy issue BEGIN itself (below) instead of pysqlite's lazy one.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")  # WAL: durable at checkpoints, never corrupt
        cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_S * 1000}")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        # A deferred transaction that reads and then writes fails at once with SQLITE_BUSY
        # when another writer got in between; IMMEDIATE takes the write lock up front
        # (and waits busy_timeout for it), so API requests and the worker serialise cleanly.
        # Database.read() asks for a plain BEGIN: under WAL a reader takes no lock a writer
        # waits for, so GETs neither queue behind the worker's writes nor hold them up.
        readonly = conn.get_execution_options().get(_READ_ONLY, False)
        conn.exec_driver_sql("BEGIN" if readonly else "BEGIN IMMEDIATE")

    return engine


@dataclass
class Database:
    """One engine plus a session factory; `transaction()` commits on success."""

    url: str
    engine: Engine
    _factory: sessionmaker[Session]
    _read_factory: sessionmaker[ReadSession]

    @classmethod
    def connect(cls, url: str, **kwargs: Any) -> Database:
        engine = make_engine(url, **kwargs)
        options: dict[str, Any] = {_READ_ONLY: True}
        if not is_sqlite(url):
            # Each read its own statement-level transaction: no BEGIN and no ROLLBACK, two
            # of a GET's four round trips (pool ping, BEGIN, SELECT, ROLLBACK). The
            # statements of one read no longer share a snapshot; no GET needs them to.
            options["isolation_level"] = "AUTOCOMMIT"
        reads = sessionmaker(engine.execution_options(**options), class_=ReadSession)
        return cls(
            url=normalise_url(url),
            engine=engine,
            _factory=sessionmaker(engine),
            _read_factory=reads,
        )

    def reading(self) -> Database:
        """This database with `transaction()` meaning `read()`: what a GET request gets."""
        return _ReadingDatabase(self.url, self.engine, self._factory, self._read_factory)

    @property
    def is_sqlite(self) -> bool:
        return is_sqlite(self.url)

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        with self._factory() as session:
            try:
                yield session
                session.commit()
            except BaseException:
                session.rollback()
                raise

    @contextmanager
    def read(self) -> Iterator[Session]:
        """A transaction for reads alone (GET routes, auth): on SQLite a deferred BEGIN, so
        it takes no write lock; it ends in a rollback, so nothing it did is kept. A write in
        it may fail with "database is locked" on SQLite: use transaction() to write."""
        with self._read_factory() as session:
            try:
                yield session
            finally:
                session.rollback()

    def dispose(self) -> None:
        self.engine.dispose()


class _ReadingDatabase(Database):
    @contextmanager
    def transaction(self) -> Iterator[Session]:
        with self.read() as session:
            yield session


class ReadSession(Session):
    """The session of Database.read() and AsyncReads: a write in it raises."""


class AsyncReads:
    """Reads on the event loop: `await reads.run(fn)` calls `fn(session)` with a read-only
    session, as `Database.read()` gives. On Postgres, SQLAlchemy's async engine on psycopg's
    async driver runs the sync storage functions in a greenlet (`AsyncSession.run_sync`),
    with no threadpool hop; on SQLite (no async driver) `fn` runs in anyio's threadpool.

    Open it on the event loop that will use it (the app's lifespan): an async connection
    belongs to the loop that made it."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self._engine: AsyncEngine | None = None
        self._sessions: async_sessionmaker[Any] | None = None
        self._slots: anyio.Semaphore | None = None

    def open(self, *, connections: int) -> None:
        if self.db.is_sqlite or self._engine is not None:
            return
        # No pool_pre_ping: its round trip was a third of a GET's; a connection that died
        # (Postgres restarted) fails its statement instead, and run() retries once.
        # No overflow: an overflow connection is opened and closed again per read under
        # load. A read past `connections` waits for a slot, first come first served (the
        # pool's own queue lets a newcomer take a connection before a woken waiter, which
        # then waits again at the back: p99 4 s at 200 clients).
        self._engine = create_async_engine(
            self.db.url,
            pool_size=connections,
            max_overflow=0,
            isolation_level="AUTOCOMMIT",  # as Database.read(): no BEGIN, no ROLLBACK
        )
        self._sessions = async_sessionmaker(self._engine, sync_session_class=ReadSession)
        self._slots = anyio.Semaphore(connections)

    @property
    def engine(self) -> AsyncEngine | None:
        """The async engine once opened on Postgres; None on SQLite (reads in threads)."""
        return self._engine

    async def close(self) -> None:
        engine, self._engine, self._sessions = self._engine, None, None
        if engine is not None:
            await engine.dispose()

    async def run(self, fn: Callable[[Session], T]) -> T:
        if self._sessions is None or self._slots is None:
            return await anyio.to_thread.run_sync(self._run_sync, fn)
        async with self._slots:
            try:
                return await self._run_async(fn)
            except DBAPIError as e:
                # A stale connection (Postgres restarted, or the backend was terminated):
                # SQLAlchemy has invalidated it and the pool's older ones; a read is safe
                # to repeat, on a new connection.
                if not e.connection_invalidated:
                    raise
                return await self._run_async(fn)

    async def _run_async(self, fn: Callable[[Session], T]) -> T:
        assert self._sessions is not None
        async with self._sessions() as session:
            return await session.run_sync(fn)

    def _run_sync(self, fn: Callable[[Session], T]) -> T:
        with self.db.read() as session:
            return fn(session)


def _refuse_write(*_: Any) -> None:
    raise RuntimeError(
        "a write in a read-only transaction (Database.read(), or a GET request's): its "
        "change would be rolled back; write in Database.transaction() from a POST/DELETE"
    )


def _refuse_write_statement(state: Any) -> None:
    if state.is_insert or state.is_update or state.is_delete:
        _refuse_write()


event.listen(ReadSession, "before_flush", _refuse_write)
event.listen(ReadSession, "do_orm_execute", _refuse_write_statement)
