"""Models, OpenAI's routes: the base models this deployment serves and the caller's
fine-tuned ones (GET /v1/models, GET and DELETE /v1/models/{id}).

Ids are resolved by `registry.resolve_model`, scoped to the caller: another tenant's model
is answered exactly as a missing one is. Without an API key only base models are visible.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Request
from fastapi.security import HTTPAuthorizationCredentials

from mixloom.errors import RequestError
from mixloom.server.deps import (
    SESSION_TOKEN_SCOPE_KEY,
    Context,
    CurrentTenant,
    ServerContext,
    _bearer,
    authenticated,
    current_tenant,
)
from mixloom.server.errors import ERROR_RESPONSES
from mixloom.server.registry import ResolvedModel, find_base, fine_tuned, resolve_model
from mixloom.server.routes.jobs import delete_adapter_of, delete_checkpoints_of
from mixloom.server.schemas import ModelDeleted, ModelPublic, ModelsPublic
from mixloom.storage import jobs
from mixloom.storage.records import TenantRecord

router = APIRouter(tags=["models"], responses=ERROR_RESPONSES)

# A model id is one URL path segment or more: ids from before migration 0003 held the
# server's path of the base model.
ModelId = Annotated[
    str,
    Path(
        pattern=r"^[\x21-\x7e]{1,300}$",
        description="a base model's id, or one of your fine-tuned models' "
        "(ft:BASE:ORG:SUFFIX:JOB) or checkpoints' (...:ckpt-step-N)",
    ),
]


async def optional_tenant(
    ctx: Context,
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> TenantRecord | None:
    """The caller's tenant when the request carries a key (or a dashboard session); None
    when it carries none. A key that is wrong is a 401, as on every other route."""
    has_key = credentials is not None and bool(credentials.credentials)
    if not has_key and not request.scope.get(SESSION_TOKEN_SCOPE_KEY):
        return None
    return await current_tenant(ctx, request, credentials)


OptionalTenant = Annotated[TenantRecord | None, Depends(optional_tenant)]


@router.get("/v1/models", response_model=ModelsPublic)
async def list_models(ctx: Context, tenant: OptionalTenant) -> ModelsPublic:
    """The base models (a job's `model` names one), then the caller's fine-tuned models,
    newest first: its succeeded jobs whose adapter is not deleted. Without an API key: the
    base models alone."""
    bases = [ModelPublic.of(m, ctx.started_at) for m in ctx.models]
    if tenant is None:
        return ModelsPublic(data=bases)

    owned = await ctx.read(
        lambda session: jobs.list_fine_tuned(session=session, tenant_id=tenant.id)
    )
    tuned = [ModelPublic.resolved(fine_tuned(ctx.models, j), ctx.started_at) for j in owned]
    return ModelsPublic(data=bases + tuned)


@router.get("/v1/models/{model_id:path}", response_model=ModelPublic)
async def get_model(ctx: Context, tenant: OptionalTenant, model_id: ModelId) -> ModelPublic:
    """A base model (no API key needed), or one of the caller's fine-tuned models or
    checkpoints (401 without a key); 404 for anything else, another tenant's model
    included."""
    if tenant is None:
        served = find_base(ctx.models, model_id)
        if served is None:
            await authenticated(ctx, None)  # raises: any other model is someone's
        assert served is not None
        return ModelPublic.of(served, ctx.started_at)
    found = await ctx.read(
        lambda session: resolve_model(
            session=session, models=ctx.models, model_id=model_id, tenant_id=tenant.id
        )
    )
    return ModelPublic.resolved(found, ctx.started_at)


@router.delete("/v1/models/{model_id:path}", response_model=ModelDeleted)
def delete_model(ctx: Context, tenant: CurrentTenant, model_id: ModelId) -> ModelDeleted:
    """Delete one of the caller's fine-tuned models: its adapter's weights (the job stays,
    with `adapter_deleted_at` set, as DELETE .../adapter does), or a checkpoint model's
    checkpoint. Idempotent: asked again, the same answer. A base model cannot be deleted
    (400)."""
    with ctx.db.read() as session:
        found = resolve_model(
            session=session,
            models=ctx.models,
            model_id=model_id,
            tenant_id=tenant.id,
            include_deleted=True,
        )
    _delete(ctx, tenant, found)
    return ModelDeleted(id=model_id)


def _delete(ctx: ServerContext, tenant: TenantRecord, found: ResolvedModel) -> None:
    if found.job is None:
        raise RequestError(
            f"{found.id} is a base model this deployment serves; it cannot be deleted. "
            "DELETE takes one of your fine-tuned models (ft:...) or checkpoints "
            "(...:ckpt-step-N)",
            param="model",
            code="model_not_deletable",
        )
    if found.deleted:
        return
    if found.checkpoint is not None:
        delete_checkpoints_of(ctx, tenant, found.job.id, found.checkpoint.id)
    else:
        delete_adapter_of(ctx, tenant, found.job.id)
