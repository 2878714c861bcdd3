"""Shared route dependencies: the server context and the authenticated tenant."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

import anyio
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from mixloom.config import Settings
from mixloom.errors import AuthenticationError
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
        raise AuthenticationError(
            "missing API key: send `Authorization: Bearer <key>`; an admin creates keys "
            "with `mixloom keys create TENANT`",
            code="missing_api_key",
        )
    with ctx.db.transaction() as session:
        tenant = tenants.authenticate(session=session, api_key=credentials.credentials)
    if tenant is None:
        raise AuthenticationError(
            "invalid API key: it is unknown or revoked; ask an admin for a new one",
            code="invalid_api_key",
        )
    return tenant


CurrentTenant = Annotated[TenantRecord, Depends(current_tenant)]
