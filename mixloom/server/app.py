"""The FastAPI application: `create_app()` wires settings, database, bus and routes."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import anyio
from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from sqlalchemy.exc import DBAPIError

import mixloom
from mixloom.config import Settings, get_settings
from mixloom.observability import RequestTimer
from mixloom.server.dashboard import install_dashboard, scope_credential
from mixloom.server.deps import ServerContext, authenticated
from mixloom.server.errors import install_error_handlers
from mixloom.server.headers import install_security_headers
from mixloom.server.limits import (
    MULTIPART_OVERHEAD_BYTES,
    BodySizeLimit,
    ConcurrencyLimit,
    JSONBodyCheck,
)
from mixloom.server.ratelimit import install_rate_limit_errors
from mixloom.server.registry import served_models
from mixloom.server.routes import files, inference, jobs, models, stream, usage
from mixloom.server.routes.admin import install_metrics
from mixloom.storage import files as files_store
from mixloom.storage import idempotency, migrate
from mixloom.storage.bus import ProgressBus, make_bus
from mixloom.storage.db import Database

log = logging.getLogger("mixloom.server")

DESCRIPTION = """Multi-tenant LoRA / MixLoRA fine-tuning.

Authenticate with `Authorization: Bearer <api key>`. Errors come as
`{"error": {"message", "type", "param", "code"}}`. Creating POSTs accept an
`Idempotency-Key` header: a retry with the same key and body returns the first response.
"""


def create_app(
    settings: Settings | None = None,
    *,
    db: Database | None = None,
    bus: ProgressBus | None = None,
    run_migrations: bool = False,
) -> FastAPI:
    """Build the API. Pass `db`/`bus` to share them (e.g. with an in-process worker);
    otherwise they are made from settings and closed on shutdown."""
    settings = settings or get_settings()
    owns_db, owns_bus = db is None, bus is None
    if db is None:
        if run_migrations:
            migrate.upgrade(settings.resolved_database_url)
        # a connection kept per request thread: fewer made each request past them open
        # and close one; as many again for SSE replays and bursts
        threads = settings.api_threads
        db = Database.connect(
            settings.resolved_database_url, pool_size=threads, max_overflow=threads
        )
    bus = bus or make_bus(settings.redis_url)
    ctx = ServerContext(
        settings=settings,
        db=db,
        bus=bus,
        models=served_models(settings),
        started_at=int(time.time()),
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        # sync routes run in anyio's threadpool (api_threads)
        anyio.to_thread.current_default_thread_limiter().total_tokens = settings.api_threads
        _prune_idempotency(ctx)
        if removed := files_store.remove_stale_parts(settings.files_dir):
            log.info("removed %d upload(s) left unfinished by a process that died", removed)
        ctx.reads.open(connections=settings.api_threads)
        yield
        await ctx.reads.close()
        if owns_bus:
            ctx.bus.close()
        if owns_db:
            ctx.db.dispose()

    app = FastAPI(
        title="mixloom",
        version=mixloom.__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
    )
    app.state.ctx = ctx
    app.state.read_ctx = ctx.reading()
    install_error_handlers(app)
    install_rate_limit_errors(app)
    for router in (
        models.router,
        files.router,
        jobs.router,
        stream.router,
        usage.router,
        inference.router,
    ):
        app.include_router(router)
    install_metrics(app, ctx)  # its route recorder: the innermost middleware
    install_dashboard(app)

    @app.get("/healthz", tags=["health"], include_in_schema=False)
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    def is_upload(method: str, path: str) -> bool:
        return method == "POST" and path == "/v1/files"

    def limit_for(method: str, path: str) -> int:
        if is_upload(method, path):
            return settings.max_upload_bytes + MULTIPART_OVERHEAD_BYTES
        return settings.max_request_bytes

    # the last added runs first: uploads over the limit are refused before any byte is read
    app.add_middleware(JSONBodyCheck, skip=is_upload)
    app.add_middleware(BodySizeLimit, limit_for=limit_for)
    app.add_middleware(
        ConcurrencyLimit,
        limited=is_upload,
        limit=settings.max_concurrent_uploads,
        per_tenant=settings.max_concurrent_uploads_per_tenant,
        tenant_of=lambda scope: _caller(ctx, scope),
        what="uploads",
    )
    install_security_headers(app)
    app.add_middleware(RequestTimer)  # the outermost: times every middleware too
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


async def _caller(ctx: ServerContext, scope: dict[str, Any]) -> str:
    """The tenant id a request's headers authenticate, before its body is read (APIKeyError
    as `deps.current_tenant` would raise it)."""
    return (await authenticated(ctx, scope_credential(scope))).id


def _prune_idempotency(ctx: ServerContext) -> None:
    try:
        with ctx.db.transaction() as session:
            idempotency.prune_idempotency(
                session=session, older_than=datetime.now(UTC) - idempotency.IDEMPOTENCY_TTL
            )
    except DBAPIError:
        log.warning(
            "cannot read the database at start; is its schema migrated (`mixloom db upgrade`)?",
            exc_info=True,
        )


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI documents a 422 on every route; mixloom answers bad input with 400."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(
        title=app.title, version=app.version, description=app.description, routes=app.routes
    )
    for path in schema.get("paths", {}).values():
        for operation in path.values():
            operation.get("responses", {}).pop("422", None)
    components = schema.get("components", {}).get("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError"):
        components.pop(unused, None)
    app.openapi_schema = schema
    return schema
