"""Usage: what a tenant stores and runs, against its quotas."""

from __future__ import annotations

from fastapi import APIRouter

from mixloom.server.deps import Context, CurrentTenant
from mixloom.server.errors import ERROR_RESPONSES
from mixloom.server.schemas import UsagePublic
from mixloom.storage import tenants

router = APIRouter(tags=["usage"], responses=ERROR_RESPONSES)


@router.get("/v1/usage", response_model=UsagePublic)
async def get_usage(ctx: Context, tenant: CurrentTenant) -> UsagePublic:
    """Stored bytes by kind (files, checkpoints, adapters: all count against
    max_total_bytes) and jobs, beside the tenant's quotas."""
    settings = ctx.settings
    usage = await ctx.read(lambda s: tenants.tenant_usage(session=s, tenant_id=tenant.id))
    return UsagePublic(
        stored_bytes=usage["stored_bytes"],
        file_bytes=usage["file_bytes"],
        checkpoint_bytes=usage["checkpoint_bytes"],
        adapter_bytes=usage["adapter_bytes"],
        waiting_jobs=usage["waiting_jobs"],
        running_jobs=usage["running_jobs"],
        max_total_bytes=tenant.max_total_bytes or settings.max_tenant_bytes,
        max_file_bytes=min(
            settings.max_upload_bytes, tenant.max_file_bytes or settings.max_upload_bytes
        ),
        max_queued_jobs=tenant.max_queued_jobs or settings.max_queued_jobs,
        max_running_jobs=tenant.max_running_jobs or settings.max_running_jobs,
    )
