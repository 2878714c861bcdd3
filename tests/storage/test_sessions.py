"""Dashboard sessions on SQLite and Postgres: a random token stored hashed, which expiry,
sign-out and the revocation of its API key each end."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import select

from mixloom.storage import models as m
from mixloom.storage import sessions, tenants
from mixloom.storage.db import Database
from mixloom.storage.ids import new_id

DAY = timedelta(days=1)


def _key(db: Database) -> tuple[str, str]:
    with db.transaction() as s:
        tenant = tenants.create_tenant(session=s, name=new_id("t"))
        _, key = tenants.create_api_key(session=s, tenant_id=tenant.id)
    return tenant.id, key


def _tenant_of(db: Database, token: str, now: datetime | None = None) -> str | None:
    with db.transaction() as s:
        tenant = sessions.authenticate_session(session=s, token=token, now=now)
    return tenant.id if tenant is not None else None


def test_a_session_is_a_hashed_random_token_for_the_keys_tenant(db: Database) -> None:
    tenant_id, key = _key(db)
    with db.transaction() as s:
        signed_in = sessions.create_session(session=s, api_key=key, lifetime=DAY)
        assert sessions.create_session(session=s, api_key="mxl-unknown", lifetime=DAY) is None
    assert signed_in is not None and signed_in.tenant.id == tenant_id
    assert key not in signed_in.token and signed_in.token.startswith("mxs-")
    assert _tenant_of(db, signed_in.token) == tenant_id
    assert _tenant_of(db, key) is None  # the key itself is no session token
    with db.transaction() as s:
        stored = s.scalar(
            select(m.DashboardSession.token_hash).where(
                m.DashboardSession.token_hash == sessions.hash_token(signed_in.token)
            )
        )
    assert stored is not None and stored != signed_in.token


def test_sign_out_and_expiry_end_a_session(db: Database) -> None:
    tenant_id, key = _key(db)
    start = datetime.now(UTC)
    with db.transaction() as s:
        first = sessions.create_session(session=s, api_key=key, lifetime=DAY, now=start)
        second = sessions.create_session(session=s, api_key=key, lifetime=DAY, now=start)
    assert first is not None and second is not None and first.token != second.token
    assert _tenant_of(db, first.token, now=start + DAY - timedelta(seconds=1)) == tenant_id
    assert _tenant_of(db, first.token, now=start + DAY) is None
    with db.transaction() as s:
        assert sessions.revoke_session(session=s, token=first.token)
        assert not sessions.revoke_session(session=s, token=first.token)
    assert _tenant_of(db, first.token) is None
    assert _tenant_of(db, second.token) == tenant_id  # the other browser stays signed in


def test_revoking_the_key_ends_its_sessions(db: Database) -> None:
    _, key = _key(db)
    _, other_key = _key(db)
    with db.transaction() as s:
        mine = sessions.create_session(session=s, api_key=key, lifetime=DAY)
        theirs = sessions.create_session(session=s, api_key=other_key, lifetime=DAY)
    assert mine is not None and theirs is not None
    with db.transaction() as s:
        record = tenants.revoke_api_key(session=s, key=key)
        revoked = s.scalars(
            select(m.DashboardSession.revoked_at).where(m.DashboardSession.api_key_id == record.id)
        ).all()
    assert revoked and all(at is not None for at in revoked)
    assert _tenant_of(db, mine.token) is None
    assert _tenant_of(db, theirs.token) is not None
    with db.transaction() as s:
        assert sessions.create_session(session=s, api_key=key, lifetime=DAY) is None
