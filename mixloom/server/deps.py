"""Shared route dependencies: the server context and the authenticated tenant."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

import anyio
from fastapi import Depends, Header, Path, Query, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from mixloom.config import Settings
from mixloom.errors import APIKeyError
from mixloom.server.registry import ServedModel
from mixloom.storage import tenants
from mixloom.storage.bus import ProgressBus
from mixloom.storage.db import Database
from mixloom.storage.records import TenantRecord


@dataclass
class ServerContext:
    settings: Settings
    db: Database
    bus: ProgressBus
    models: list[ServedModel]
    started_at: int
    sse_limiter: anyio.CapacityLimiter = field(init=False)

    def __post_init__(self) -> None:
        self.sse_limiter = anyio.CapacityLimiter(self.settings.sse_max_streams)

    def model(self, model_id: str) -> ServedModel | None:
        return next((m for m in self.models if m.id == model_id), None)


def get_context(request: Request) -> ServerContext:
    ctx: ServerContext = request.app.state.ctx
    return ctx


Context = Annotated[ServerContext, Depends(get_context)]

_bearer = HTTPBearer(auto_error=False, description="an API key: `mixloom keys create TENANT`")


def current_tenant(
    ctx: Context,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> TenantRecord:
    if credentials is None or not credentials.credentials:
        raise APIKeyError(
            "missing API key: send `Authorization: Bearer <key>`; an admin creates keys "
            "with `mixloom keys create TENANT`",
            code="missing_api_key",
        )
    with ctx.db.transaction() as session:
        tenant = tenants.authenticate(session=session, api_key=credentials.credentials)
    if tenant is None:
        raise APIKeyError(
            "invalid API key: it is unknown or revoked; ask an admin for a new one",
            code="invalid_api_key",
        )
    return tenant


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
