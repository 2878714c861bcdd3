"""GET /v1/models: the base models this deployment fine-tunes."""

from __future__ import annotations

from fastapi import APIRouter

from mixloom.server.deps import Context
from mixloom.server.errors import ERROR_RESPONSES
from mixloom.server.schemas import ModelPublic, ModelsPublic

router = APIRouter(tags=["models"], responses=ERROR_RESPONSES)


@router.get("/v1/models", response_model=ModelsPublic)
async def list_models(ctx: Context) -> ModelsPublic:
    """Public (no API key): a job's `model` must name one of these."""
    return ModelsPublic(data=[ModelPublic.of(m, ctx.started_at) for m in ctx.models])
