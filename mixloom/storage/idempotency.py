"""Stored responses of creating POSTs, keyed by (tenant, Idempotency-Key)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import delete
from sqlalchemy.orm import Session

from mixloom.storage import models as m
from mixloom.storage.records import Record

# A key is remembered this long; a retry after that creates the object again.
IDEMPOTENCY_TTL = timedelta(hours=24)


@dataclass(frozen=True)
class IdempotencyRecordView(Record):
    tenant_id: str
    key: str
    request_method: str
    request_path: str
    request_hash: str
    response_status: int
    response_body: dict[str, Any]
    created_at: datetime


def get_idempotency(*, session: Session, tenant_id: str, key: str) -> IdempotencyRecordView | None:
    row = session.get(m.IdempotencyRecord, (tenant_id, key))
    return IdempotencyRecordView.from_row(row) if row is not None else None


def save_idempotency(
    *,
    session: Session,
    tenant_id: str,
    key: str,
    request_method: str,
    request_path: str,
    request_hash: str,
    response_status: int,
    response_body: dict[str, Any],
    now: datetime | None = None,
) -> None:
    """Stored in the same transaction as the object it created: both commit or neither.

    A concurrent request with the same key fails its commit on the primary key.
    """
    session.add(
        m.IdempotencyRecord(
            tenant_id=tenant_id,
            key=key,
            request_method=request_method,
            request_path=request_path,
            request_hash=request_hash,
            response_status=response_status,
            response_body=response_body,
            created_at=now or datetime.now(UTC),
        )
    )
    session.flush()


def prune_idempotency(*, session: Session, older_than: datetime) -> int:
    result = session.execute(
        delete(m.IdempotencyRecord).where(m.IdempotencyRecord.created_at < older_than)
    )
    return int(getattr(result, "rowcount", 0) or 0)
