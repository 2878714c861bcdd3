"""Shared route dependencies: the server context and the authenticated tenant."""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Literal, TypeVar

import anyio
from fastapi import Depends, Header, Path, Query, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from mixloom.config import Settings
from mixloom.errors import APIKeyError
from mixloom.server.ratelimit import AuthCache, RateLimiter
from mixloom.server.registry import ServedModel
from mixloom.storage import sessions, tenants
from mixloom.storage.bus import ProgressBus
from mixloom.storage.db import AsyncReads, Database
from mixloom.storage.records import TenantRecord

T = TypeVar("T")


class TenantStreams:
    """Open SSE streams (or inference requests in flight) per tenant, at most `limit` each,
    so that one tenant cannot take every one of the server's slots (sse_max_streams)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._open: dict[str, int] = {}
        self._lock = threading.Lock()

    def open(self, tenant_id: str) -> Callable[[], None] | None:
        """A slot's release function (safe to call twice), or None at the limit."""
        with self._lock:
            if self._open.get(tenant_id, 0) >= self.limit:
                return None
            self._open[tenant_id] = self._open.get(tenant_id, 0) + 1
        released = threading.Event()

        def release() -> None:
            with self._lock:
                if released.is_set():
                    return
                released.set()
                left = self._open[tenant_id] - 1
                if left:
                    self._open[tenant_id] = left
                else:
                    del self._open[tenant_id]

        return release


@dataclass
class ServerContext:
    settings: Settings
    db: Database
    bus: ProgressBus
    models: list[ServedModel]
    started_at: int
    sse_limiter: anyio.CapacityLimiter = field(init=False)
    sse_streams: TenantStreams = field(init=False)
    inference_slots: TenantStreams = field(init=False)  # inference requests in flight
    auth_cache: AuthCache = field(init=False)
    rate_limiter: RateLimiter = field(init=False)
    reads: AsyncReads = field(init=False)

    def __post_init__(self) -> None:
        self.reads = AsyncReads(self.db)
        self.sse_limiter = anyio.CapacityLimiter(self.settings.sse_max_streams)
        self.sse_streams = TenantStreams(self.settings.sse_max_streams_per_tenant)
        self.inference_slots = TenantStreams(self.settings.inference_max_requests_per_tenant)
        self.auth_cache = AuthCache(self.settings.auth_cache_seconds)
        self.rate_limiter = RateLimiter(
            self.settings.rate_limit_per_second, self.settings.rate_limit_burst
        )

    def reading(self) -> ServerContext:
        """This context (the same limits, caches and bus) with a read-only database."""
        reads = copy.copy(self)
        reads.db = self.db.reading()
        return reads

    async def read(self, fn: Callable[[Session], T]) -> T:
        """`fn(session)` in a read-only transaction, from an async route: on Postgres on the
        event loop (no threadpool hop), on SQLite in the threadpool. `fn` calls the sync
        storage functions; build the response in it where that needs the session."""
        return await self.reads.run(fn)

    def model(self, model_id: str) -> ServedModel | None:
        return next((m for m in self.models if m.id == model_id), None)


async def get_context(request: Request) -> ServerContext:
    """GET and HEAD requests get the context whose database transactions only read
    (`Database.reading()`): on SQLite they take no write lock, so reads neither queue behind
    the worker's writes nor hold them up; a write in one fails loudly."""
    reads = request.method in ("GET", "HEAD")
    ctx: ServerContext = request.app.state.read_ctx if reads else request.app.state.ctx
    return ctx


Context = Annotated[ServerContext, Depends(get_context)]

_bearer = HTTPBearer(auto_error=False, description="an API key: `mixloom keys create TENANT`")


# Set by the dashboard's SessionAuth middleware: the session token from the cookie, where
# the request may use it (reads, or writes with the CSRF header).
SESSION_TOKEN_SCOPE_KEY = "mixloom.session_token"


@dataclass(frozen=True)
class Credential:
    """What a request authenticated with, for re-checking it later (an open SSE stream)."""

    kind: Literal["api_key", "session"]
    secret: str

    def tenant(self, session: Session) -> TenantRecord | None:
        """The tenant it still stands for; None once revoked, signed out or expired."""
        if self.kind == "session":
            return sessions.authenticate_session(session=session, token=self.secret)
        return tenants.authenticate(session=session, api_key=self.secret)


async def current_tenant(
    ctx: Context,
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> TenantRecord:
    credential: Credential | None
    if credentials is not None and credentials.credentials:
        credential = Credential("api_key", credentials.credentials)
    elif token := request.scope.get(SESSION_TOKEN_SCOPE_KEY):
        credential = Credential("session", token)
    else:
        credential = None
    tenant = await authenticated(ctx, credential)
    request.state.credential = credential
    ctx.rate_limiter.take(tenant.id)
    return tenant


async def authenticated(ctx: ServerContext, credential: Credential | None) -> TenantRecord:
    """The tenant a request's credential stands for; APIKeyError (401) saying what is wrong."""
    if credential is None:
        raise APIKeyError(
            "missing API key: send `Authorization: Bearer <key>`; an admin creates keys "
            "with `mixloom keys create TENANT`",
            code="missing_api_key",
        )
    tenant = await resolve_credential(ctx, credential)
    if tenant is None:
        if credential.kind == "session":
            raise APIKeyError(
                "your dashboard session ended (signed out, expired, or its API key was "
                "revoked); sign in again",
                code="invalid_session",
            )
        raise APIKeyError(
            "invalid API key: it is unknown or revoked; ask an admin for a new one",
            code="invalid_api_key",
        )
    return tenant


async def resolve_credential(ctx: ServerContext, credential: Credential) -> TenantRecord | None:
    """The tenant a credential stands for, or None. Async, and a cache hit stays on the
    event loop: no threadpool hop, no query."""
    tenant = ctx.auth_cache.lookup(credential.kind, credential.secret)
    if tenant is None:
        tenant = await anyio.to_thread.run_sync(_authenticate, ctx.db, credential)
        if tenant is not None:
            ctx.auth_cache.store(credential.kind, credential.secret, tenant)
    return tenant


def _authenticate(db: Database, credential: Credential) -> TenantRecord | None:
    with db.read() as session:
        return credential.tenant(session)


CurrentTenant = Annotated[TenantRecord, Depends(current_tenant)]


# Ids are ASCII tokens; anything else (a NUL byte, 10 kB of text) is a 400 before it
# reaches a query, where Postgres would refuse it.
ID_PATTERN = r"^[A-Za-z0-9_.:-]{1,64}$"
FileId = Annotated[str, Path(pattern=ID_PATTERN, description="a file id (file-...)")]
JobId = Annotated[str, Path(pattern=ID_PATTERN, description="a job id (ftjob-...)")]
CheckpointId = Annotated[str, Path(pattern=ID_PATTERN, description="a checkpoint id (ftckpt-...)")]
Cursor = Annotated[
    str | None, Query(pattern=ID_PATTERN, description="the last id of the previous page")
]
IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        pattern=r"^[\x20-\x7e]{1,255}$",
        description="a retry with the same key and body returns the first response",
    ),
]
