"""Tenants and their API keys. Keys are shown once at creation and stored only as sha256."""

from __future__ import annotations

import hashlib
import re
import secrets
from datetime import UTC, datetime

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from mixloom.errors import (
    ObjectNotFoundError,
    QuotaExceededError,
    StateConflictError,
    ValidationError,
)
from mixloom.storage import models as m
from mixloom.storage.ids import new_id
from mixloom.storage.records import (
    WAITING_STATUSES,
    ApiKeyRecord,
    JobStatus,
    TenantRecord,
)

API_KEY_PREFIX = "mxl-"
_KEY_RANDOM_BYTES = 32  # 256 bits: a fast hash is enough, nothing to brute-force
_DISPLAY_PREFIX_LEN = 10
_TENANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


def hash_api_key(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()


def _now(now: datetime | None) -> datetime:
    return now or datetime.now(UTC)


def create_tenant(
    *,
    session: Session,
    name: str,
    max_queued_jobs: int | None = None,
    max_running_jobs: int | None = None,
    max_file_bytes: int | None = None,
    max_total_bytes: int | None = None,
    now: datetime | None = None,
) -> TenantRecord:
    if not _TENANT_NAME.match(name):
        raise ValidationError(
            f"tenant name {name!r} is invalid; use 1-100 letters, digits, '_', '.' or '-'",
            where="name",
        )
    if session.scalar(select(m.Tenant.id).where(m.Tenant.name == name)):
        raise StateConflictError(f"a tenant named {name!r} already exists; pick another name")
    row = m.Tenant(
        id=new_id("tenant"),
        name=name,
        created_at=_now(now),
        max_queued_jobs=max_queued_jobs,
        max_running_jobs=max_running_jobs,
        max_file_bytes=max_file_bytes,
        max_total_bytes=max_total_bytes,
    )
    session.add(row)
    session.flush()
    return TenantRecord.from_row(row)


def get_tenant(*, session: Session, tenant: str) -> TenantRecord:
    """Look a tenant up by id or by name."""
    row = session.scalar(
        select(m.Tenant).where((m.Tenant.id == tenant) | (m.Tenant.name == tenant))
    )
    if row is None:
        raise ObjectNotFoundError(f"no tenant {tenant!r}; list them with `mixloom tenants list`")
    return TenantRecord.from_row(row)


QUOTA_FIELDS = ("max_queued_jobs", "max_running_jobs", "max_file_bytes", "max_total_bytes")


def set_tenant_quotas(*, session: Session, tenant: str, **quotas: int | None) -> TenantRecord:
    """Change some quotas of a tenant (by id or name); None = the deployment default."""
    unknown = set(quotas) - set(QUOTA_FIELDS)
    if unknown:
        raise ValidationError(f"unknown quota(s) {sorted(unknown)}; use {list(QUOTA_FIELDS)}")
    bad = [k for k, v in quotas.items() if v is not None and v < 1]
    if bad:
        raise ValidationError(f"quota(s) {bad} must be at least 1 (or unset for the default)")
    row = session.scalar(
        select(m.Tenant).where((m.Tenant.id == tenant) | (m.Tenant.name == tenant))
    )
    if row is None:
        raise ObjectNotFoundError(f"no tenant {tenant!r}; list them with `mixloom tenants list`")
    for key, value in quotas.items():
        setattr(row, key, value)
    session.flush()
    return TenantRecord.from_row(row)


def list_tenants(*, session: Session) -> list[TenantRecord]:
    rows = session.scalars(select(m.Tenant).order_by(m.Tenant.id))
    return [TenantRecord.from_row(r) for r in rows]


def lock_tenant(*, session: Session, tenant_id: str) -> None:
    """Serialise quota checks of one tenant (row lock on Postgres; SQLite writes are serial)."""
    session.execute(select(m.Tenant.id).where(m.Tenant.id == tenant_id).with_for_update())


def create_api_key(
    *, session: Session, tenant_id: str, now: datetime | None = None
) -> tuple[ApiKeyRecord, str]:
    """Returns the record and the key itself, which is never stored and cannot be shown again."""
    if session.get(m.Tenant, tenant_id) is None:
        raise ObjectNotFoundError(f"no tenant with id {tenant_id!r}")
    api_key = API_KEY_PREFIX + secrets.token_urlsafe(_KEY_RANDOM_BYTES)
    row = m.ApiKey(
        id=new_id("key"),
        tenant_id=tenant_id,
        key_hash=hash_api_key(api_key),
        prefix=api_key[:_DISPLAY_PREFIX_LEN],
        created_at=_now(now),
        revoked_at=None,
    )
    session.add(row)
    session.flush()
    return ApiKeyRecord.from_row(row), api_key


def list_api_keys(*, session: Session, tenant_id: str) -> list[ApiKeyRecord]:
    rows = session.scalars(
        select(m.ApiKey).where(m.ApiKey.tenant_id == tenant_id).order_by(m.ApiKey.id)
    )
    return [ApiKeyRecord.from_row(r) for r in rows]


def revoke_api_key(*, session: Session, key: str, now: datetime | None = None) -> ApiKeyRecord:
    """Revoke by key id (`key-...`) or by the key itself (`mxl-...`)."""
    if key.startswith(API_KEY_PREFIX):
        where = m.ApiKey.key_hash == hash_api_key(key)
    else:
        where = m.ApiKey.id == key
    row = session.scalar(select(m.ApiKey).where(where))
    if row is None:
        raise ObjectNotFoundError(
            "no such API key; give its id (key-...) or the key itself (mxl-...)"
        )
    if row.revoked_at is None:
        row.revoked_at = _now(now)
        # its dashboard sessions (storage/sessions.py) end with it
        session.execute(
            update(m.DashboardSession)
            .where(m.DashboardSession.api_key_id == row.id, m.DashboardSession.revoked_at.is_(None))
            .values(revoked_at=row.revoked_at)
        )
        session.flush()
    return ApiKeyRecord.from_row(row)


def authenticate(*, session: Session, api_key: str) -> TenantRecord | None:
    """The tenant owning this (unrevoked) key, or None."""
    row = session.scalar(
        select(m.Tenant)
        .join(m.ApiKey, m.ApiKey.tenant_id == m.Tenant.id)
        .where(m.ApiKey.key_hash == hash_api_key(api_key), m.ApiKey.revoked_at.is_(None))
    )
    return TenantRecord.from_row(row) if row is not None else None


def tenant_usage(*, session: Session, tenant_id: str) -> dict[str, int]:
    """What counts against the quotas: stored bytes (files, checkpoints, adapters), waiting
    jobs, running jobs."""
    files_bytes = session.scalar(
        select(func.coalesce(func.sum(m.File.bytes), 0)).where(
            m.File.tenant_id == tenant_id, m.File.deleted_at.is_(None)
        )
    )
    checkpoint_bytes = session.scalar(
        select(func.coalesce(func.sum(m.Checkpoint.bytes), 0))
        .join(m.Job, m.Job.id == m.Checkpoint.job_id)
        .where(m.Job.tenant_id == tenant_id)
    )
    adapter_bytes = session.scalar(
        select(func.coalesce(func.sum(m.Job.adapter_bytes), 0)).where(
            m.Job.tenant_id == tenant_id, m.Job.adapter_deleted_at.is_(None)
        )
    )
    counts = dict(
        session.execute(
            select(m.Job.status, func.count())
            .where(m.Job.tenant_id == tenant_id)
            .group_by(m.Job.status)
        ).all()
    )
    return {
        "stored_bytes": int(files_bytes or 0)
        + int(checkpoint_bytes or 0)
        + int(adapter_bytes or 0),
        "file_bytes": int(files_bytes or 0),
        "checkpoint_bytes": int(checkpoint_bytes or 0),
        "adapter_bytes": int(adapter_bytes or 0),
        "waiting_jobs": sum(int(counts.get(s.value, 0)) for s in WAITING_STATUSES),
        "running_jobs": int(counts.get(JobStatus.RUNNING.value, 0)),
    }


def check_storage(
    *, session: Session, tenant_id: str, default_max_bytes: int, adding: int, what: str
) -> None:
    """Raise QuotaExceededError when storing `adding` more bytes for the tenant would pass
    its storage quota (max_total_bytes, or the deployment's default). The message names the
    quota, what is stored now and what was to be added."""
    tenant = session.get(m.Tenant, tenant_id)
    quota = (tenant.max_total_bytes if tenant is not None else None) or default_max_bytes
    usage = tenant_usage(session=session, tenant_id=tenant_id)
    used = usage["stored_bytes"]
    if used + adding > quota:
        raise QuotaExceededError(
            f"storage quota max_total_bytes is {quota:,} bytes; {used:,} are stored "
            f"(files {usage['file_bytes']:,}, checkpoints {usage['checkpoint_bytes']:,}, "
            f"adapters {usage['adapter_bytes']:,}) and {what} needs {adding:,} more; delete "
            "files, checkpoints or adapters, or ask an admin for a larger quota",
            code="storage_quota_exceeded",
        )
