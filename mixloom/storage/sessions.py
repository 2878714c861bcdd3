"""Dashboard sessions: a signed-in browser holds a random token in its cookie, never the API
key. The token is stored only as sha256 (like API keys), expires, and stops working when
the session is signed out or the API key it was opened with is revoked."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from mixloom.storage import models as m
from mixloom.storage.ids import new_id
from mixloom.storage.records import TenantRecord
from mixloom.storage.tenants import hash_api_key

SESSION_TOKEN_PREFIX = "mxs-"  # tells a session token from an API key (mxl-) in a leak report
_TOKEN_RANDOM_BYTES = 32  # 256 bits: a fast hash is enough, nothing to brute-force


@dataclass(frozen=True)
class SignedIn:
    token: str  # the cookie's value; shown once, stored only hashed
    tenant: TenantRecord
    expires_at: datetime


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_session(
    *, session: Session, api_key: str, lifetime: timedelta, now: datetime | None = None
) -> SignedIn | None:
    """A new session for the tenant owning this (unrevoked) key, or None for a bad key.
    The key's expired sessions are deleted on the way."""
    now = now or datetime.now(UTC)
    row = session.execute(
        select(m.ApiKey, m.Tenant)
        .join(m.Tenant, m.Tenant.id == m.ApiKey.tenant_id)
        .where(m.ApiKey.key_hash == hash_api_key(api_key), m.ApiKey.revoked_at.is_(None))
    ).first()
    if row is None:
        return None
    key, tenant = row
    session.execute(
        delete(m.DashboardSession).where(
            m.DashboardSession.api_key_id == key.id, m.DashboardSession.expires_at <= now
        )
    )
    token = SESSION_TOKEN_PREFIX + secrets.token_urlsafe(_TOKEN_RANDOM_BYTES)
    expires_at = now + lifetime
    session.add(
        m.DashboardSession(
            id=new_id("dsess"),
            token_hash=hash_token(token),
            tenant_id=tenant.id,
            api_key_id=key.id,
            created_at=now,
            expires_at=expires_at,
            revoked_at=None,
        )
    )
    session.flush()
    return SignedIn(token=token, tenant=TenantRecord.from_row(tenant), expires_at=expires_at)


def authenticate_session(
    *, session: Session, token: str, now: datetime | None = None
) -> TenantRecord | None:
    """The tenant of a live session: not signed out, not expired, its API key not revoked."""
    now = now or datetime.now(UTC)
    row = session.scalar(
        select(m.Tenant)
        .join(m.DashboardSession, m.DashboardSession.tenant_id == m.Tenant.id)
        .join(m.ApiKey, m.ApiKey.id == m.DashboardSession.api_key_id)
        .where(
            m.DashboardSession.token_hash == hash_token(token),
            m.DashboardSession.revoked_at.is_(None),
            m.DashboardSession.expires_at > now,
            m.ApiKey.revoked_at.is_(None),
        )
    )
    return TenantRecord.from_row(row) if row is not None else None


def revoke_session(*, session: Session, token: str, now: datetime | None = None) -> bool:
    """Sign a session out; False if there was no live session with this token."""
    result = session.execute(
        update(m.DashboardSession)
        .where(
            m.DashboardSession.token_hash == hash_token(token),
            m.DashboardSession.revoked_at.is_(None),
        )
        .values(revoked_at=now or datetime.now(UTC))
    )
    return bool(getattr(result, "rowcount", 0))
