"""Idempotency records: one per (tenant, key), pruned after IDEMPOTENCY_TTL."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from sqlalchemy.exc import IntegrityError

from mixloom.storage import idempotency, tenants
from mixloom.storage.db import Database
from mixloom.storage.ids import new_id


def _save(db: Database, tenant_id: str, key: str, now: datetime | None = None) -> None:
    with db.transaction() as s:
        idempotency.save_idempotency(
            session=s,
            tenant_id=tenant_id,
            key=key,
            request_method="POST",
            request_path="/v1/fine_tuning/jobs",
            request_hash="0" * 64,
            response_status=200,
            response_body={"id": "ftjob-x"},
            now=now,
        )


def test_one_record_per_key_and_pruning(db: Database) -> None:
    with db.transaction() as s:
        tenant = tenants.create_tenant(session=s, name=new_id("t")).id
    old = datetime.now(UTC) - idempotency.IDEMPOTENCY_TTL * 2
    _save(db, tenant, "old", now=old)
    _save(db, tenant, "new")
    with pytest.raises(IntegrityError):
        _save(db, tenant, "new")
    with db.transaction() as s:
        cutoff = datetime.now(UTC) - idempotency.IDEMPOTENCY_TTL
        assert idempotency.prune_idempotency(session=s, older_than=cutoff) >= 1
        assert idempotency.get_idempotency(session=s, tenant_id=tenant, key="old") is None
        kept = idempotency.get_idempotency(session=s, tenant_id=tenant, key="new")
        assert kept is not None and kept.response_body == {"id": "ftjob-x"}
