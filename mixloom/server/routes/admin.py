"""The operator's routes: `/v1/admin/workers` and `/v1/admin/queue` (what the dashboard's
operator view reads), and Prometheus's `/metrics`.

The operator authenticates with the admin key (MIXLOOM_ADMIN_KEY) as a bearer token,
compared in constant time; a tenant's key is a 403, and without an admin key configured
the admin routes are a 404. /metrics is open when no admin key is set (it holds no tenant
data: counts, route templates, base ids) and takes the admin key when one is (Prometheus's
`authorization: {credentials: ...}` scrape setting).
"""

from __future__ import annotations

import hmac
from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel
from sqlalchemy.orm import Session

from mixloom.config import Settings
from mixloom.errors import APIKeyError, ObjectNotFoundError, OperatorOnlyError
from mixloom.observability import (
    FleetCollector,
    FleetState,
    RouteRecorder,
    scrape_registry,
)
from mixloom.server.deps import Context, ServerContext
from mixloom.server.errors import ERROR_RESPONSES
from mixloom.server.registry import base_id_of
from mixloom.storage import operator, workers

router = APIRouter(tags=["operator"], responses=ERROR_RESPONSES)
_bearer = HTTPBearer(auto_error=False, description="the admin key (MIXLOOM_ADMIN_KEY)")
Bearer = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


def admin_key(settings: Settings) -> str | None:
    """The admin key, or None when unset or empty (an empty MIXLOOM_ADMIN_KEY= is unset)."""
    key = settings.admin_key
    return key.get_secret_value() if key is not None and key.get_secret_value() else None


def _check_admin_key(settings: Settings, credentials: HTTPAuthorizationCredentials | None) -> None:
    admin = admin_key(settings)
    assert admin is not None
    if credentials is None or not credentials.credentials:
        raise APIKeyError(
            "missing admin key: send `Authorization: Bearer <MIXLOOM_ADMIN_KEY>`",
            code="missing_api_key",
        )
    given = credentials.credentials.encode("utf-8", "surrogateescape")
    if not hmac.compare_digest(given, admin.encode()):
        raise OperatorOnlyError(
            "this route is the operator's: it takes the admin key (MIXLOOM_ADMIN_KEY), not "
            "a tenant's API key",
            code="operator_only",
        )


async def require_operator(ctx: Context, credentials: Bearer) -> None:
    if admin_key(ctx.settings) is None:
        raise ObjectNotFoundError(
            "no operator routes here: the deployment sets no admin key (MIXLOOM_ADMIN_KEY)",
            code="not_found",
        )
    _check_admin_key(ctx.settings, credentials)


Operator = Depends(require_operator)


class QueueOldest(BaseModel):
    job_id: str
    tenant_id: str
    queued_at: int  # unix seconds
    waited_seconds: float


class QueueBase(BaseModel):
    base: str  # the base's public id
    queued: int
    oldest: QueueOldest


class QueuePublic(BaseModel):
    object: str = "list"
    data: list[QueueBase]
    jobs_by_state: dict[str, int]  # live states only


@router.get("/v1/admin/queue", response_model=QueuePublic, dependencies=[Operator])
async def admin_queue(ctx: Context) -> QueuePublic:
    """The queued jobs per base (with the one waiting longest: its id and tenant's id) and
    the jobs in each live state."""

    def read(session: Session) -> QueuePublic:
        now = datetime.now(UTC)
        return QueuePublic(
            data=[
                QueueBase(
                    base=base_id_of(ctx.models, q.source),
                    queued=q.queued,
                    oldest=QueueOldest(
                        job_id=q.oldest_job_id,
                        tenant_id=q.oldest_tenant_id,
                        queued_at=int(q.oldest_queued_at.timestamp()),
                        waited_seconds=round(q.waited_seconds(now), 3),
                    ),
                )
                for q in operator.queue_by_base(session=session)
            ],
            jobs_by_state=operator.live_job_counts(session=session),
        )

    return await ctx.read(read)


class HeldJob(BaseModel):
    id: str
    tenant_id: str


class WorkerPublic(BaseModel):
    id: str
    host: str
    pid: int
    base: str  # the base's public id
    role: str  # all | training | inference
    devices: str
    started_at: int  # unix seconds
    heartbeat_at: int
    heartbeat_age_seconds: float
    alive: bool
    jobs: list[HeldJob]  # the running jobs it trains
    inference_requests: int  # the inference requests it decodes now


class WorkersPublic(BaseModel):
    object: str = "list"
    data: list[WorkerPublic]


@router.get("/v1/admin/workers", response_model=WorkersPublic, dependencies=[Operator])
async def admin_workers(ctx: Context) -> WorkersPublic:
    """Every registered worker, live or dead (a dead one's row stays an hour), with the
    jobs it trains (by id and their tenant's id) and the inference requests it decodes."""

    def read(session: Session) -> WorkersPublic:
        now = datetime.now(UTC)
        found = workers.list_workers(session=session, now=now)
        tenant_of = operator.tenants_of(
            session=session, job_ids=[j for w in found for j in w.job_ids]
        )
        return WorkersPublic(
            data=[
                WorkerPublic(
                    id=w.id,
                    host=w.host,
                    pid=w.pid,
                    base=w.base,
                    role=w.role,
                    devices=w.devices,
                    started_at=int(w.started_at.timestamp()),
                    heartbeat_at=int(w.heartbeat_at.timestamp()),
                    heartbeat_age_seconds=round((now - w.heartbeat_at).total_seconds(), 3),
                    alive=w.alive,
                    jobs=[HeldJob(id=j, tenant_id=tenant_of.get(j, "")) for j in w.job_ids],
                    inference_requests=w.inference_requests,
                )
                for w in found
            ]
        )

    return await ctx.read(read)


def _fleet_state(ctx: ServerContext) -> FleetState:
    now = datetime.now(UTC)
    with ctx.db.read() as session:
        queued = {
            base_id_of(ctx.models, q.source): (q.queued, q.waited_seconds(now))
            for q in operator.queue_by_base(session=session)
        }
        alive: dict[tuple[str, str], int] = {}
        for w in workers.list_workers(session=session, include_dead=False, now=now):
            alive[w.base, w.role] = alive.get((w.base, w.role), 0) + 1
        return FleetState(
            queued=queued, by_state=operator.live_job_counts(session=session), workers=alive
        )


@router.get("/metrics", include_in_schema=False)
def metrics(request: Request, credentials: Bearer) -> Response:
    ctx: ServerContext = request.app.state.ctx
    if admin_key(ctx.settings) is not None:
        _check_admin_key(ctx.settings, credentials)
    collector: FleetCollector = request.app.state.fleet_collector
    return Response(generate_latest(scrape_registry(collector)), media_type=CONTENT_TYPE_LATEST)


def install_metrics(app: FastAPI, ctx: ServerContext) -> None:
    """/metrics, the operator's routes and the request timer. Call it before any other
    middleware is added (RouteRecorder must be the innermost) and add `RequestTimer` last:
    `app.add_middleware(RequestTimer)`, so that it times what every middleware does."""
    app.state.fleet_collector = FleetCollector(lambda: _fleet_state(ctx))
    app.include_router(router)
    app.add_middleware(RouteRecorder)
