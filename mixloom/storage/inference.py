"""Inference requests on their way from the API to a worker, and their answers on the way back.

The API process loads no model: it stores a validated request (`submit`), a worker holding
the request's base claims it (`claim`, oldest first, `FOR UPDATE SKIP LOCKED` on Postgres so
two workers never take the same one), appends what each decoding step added (`append`, one
chunk per request per step, which also renews the worker's lease on it) and stores the
answer (`finish`). The API reads the chunks back (`chunks_since`) to stream them; the bus
(storage/bus.py, keyed by request id) only wakes it sooner, as for job progress.

A request whose worker stops renewing its lease fails (`expire`): part of its answer may have
been streamed already, so it is not run again behind the caller's back. Finished requests
are removed after `inference_keep_seconds` (`prune`): prompts and answers are the tenant's,
and nothing needs them once the caller has its answer.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any, ClassVar

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from mixloom.errors import ObjectNotFoundError
from mixloom.storage import models as m
from mixloom.storage.records import Record


class InferenceStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (
            InferenceStatus.SUCCEEDED,
            InferenceStatus.FAILED,
            InferenceStatus.CANCELLED,
        )


@dataclass(frozen=True)
class InferenceRecord(Record):
    _enums: ClassVar[dict[str, type[StrEnum]]] = {"status": InferenceStatus}

    id: str
    tenant_id: str
    model: str
    base: str
    job_id: str | None
    checkpoint_step: int | None
    kind: str
    body: dict[str, Any]
    status: InferenceStatus
    cancel_requested: bool
    worker_id: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    result: dict[str, Any] | None
    last_seq: int


def new_request_id(kind: str) -> str:
    """OpenAI's prefixes: `chatcmpl-` for chat, `cmpl-` for completions."""
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + secrets.token_hex(12)


def submit(
    *,
    session: Session,
    request_id: str,
    tenant_id: str,
    model: str,
    base: str,
    job_id: str | None,
    checkpoint_step: int | None,
    kind: str,
    body: dict[str, Any],
) -> InferenceRecord:
    row = m.InferenceRequest(
        id=request_id,
        tenant_id=tenant_id,
        model=model,
        base=base,
        job_id=job_id,
        checkpoint_step=checkpoint_step,
        kind=kind,
        body=body,
        status=InferenceStatus.QUEUED.value,
        cancel_requested=False,
        created_at=datetime.now(UTC),
        last_seq=0,
    )
    session.add(row)
    session.flush()
    return InferenceRecord.from_row(row)


def get(*, session: Session, request_id: str, tenant_id: str | None = None) -> InferenceRecord:
    query = select(m.InferenceRequest).where(m.InferenceRequest.id == request_id)
    if tenant_id is not None:
        query = query.where(m.InferenceRequest.tenant_id == tenant_id)
    row = session.scalar(query)
    if row is None:
        raise ObjectNotFoundError(
            f"no inference request with id {request_id!r}", param="id", code="request_not_found"
        )
    return InferenceRecord.from_row(row)


def claim(
    *, session: Session, worker_id: str, base: str, limit: int, lease_seconds: float
) -> list[InferenceRecord]:
    """Up to `limit` queued requests for `base`, oldest first, now this worker's."""
    if limit <= 0:
        return []
    now = datetime.now(UTC)
    rows = session.scalars(
        select(m.InferenceRequest)
        .where(
            m.InferenceRequest.status == InferenceStatus.QUEUED.value,
            m.InferenceRequest.base == base,
        )
        .order_by(m.InferenceRequest.created_at, m.InferenceRequest.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
    ).all()
    for row in rows:
        row.status = InferenceStatus.RUNNING.value
        row.worker_id = worker_id
        row.started_at = now
        row.lease_expires_at = now + timedelta(seconds=lease_seconds)
    session.flush()
    return [InferenceRecord.from_row(r) for r in rows]


def append(
    *,
    session: Session,
    worker_id: str,
    chunks: dict[str, dict[str, Any]],
    lease_seconds: float,
) -> dict[str, int]:
    """One chunk per request (request id -> data), each under the next sequence number, and
    the worker's lease on them renewed. Returns request id -> the chunk's seq, for the
    requests still this worker's and not cancelled; the others are left alone (the caller
    stops decoding them)."""
    if not chunks:
        return {}
    now = datetime.now(UTC)
    rows = session.scalars(
        select(m.InferenceRequest).where(m.InferenceRequest.id.in_(list(chunks))).with_for_update()
    ).all()
    out: dict[str, int] = {}
    for row in rows:
        if (
            row.worker_id != worker_id
            or row.status != InferenceStatus.RUNNING.value
            or row.cancel_requested
        ):
            continue
        row.last_seq += 1
        row.lease_expires_at = now + timedelta(seconds=lease_seconds)
        session.add(m.InferenceChunk(request_id=row.id, seq=row.last_seq, data=chunks[row.id]))
        out[row.id] = row.last_seq
    session.flush()
    return out


def renew(
    *, session: Session, worker_id: str, request_ids: list[str], lease_seconds: float
) -> set[str]:
    """Renew the worker's lease on these running requests; returns those it should stop:
    cancelled by their caller, or no longer its own (their lease expired)."""
    if not request_ids:
        return set()
    until = datetime.now(UTC) + timedelta(seconds=lease_seconds)
    session.execute(
        update(m.InferenceRequest)
        .where(
            m.InferenceRequest.id.in_(request_ids),
            m.InferenceRequest.worker_id == worker_id,
            m.InferenceRequest.status == InferenceStatus.RUNNING.value,
        )
        .values(lease_expires_at=until)
    )
    rows = session.execute(
        select(
            m.InferenceRequest.id,
            m.InferenceRequest.worker_id,
            m.InferenceRequest.status,
            m.InferenceRequest.cancel_requested,
        ).where(m.InferenceRequest.id.in_(request_ids))
    ).all()
    keep = {
        rid
        for rid, owner, status, cancel in rows
        if owner == worker_id and status == InferenceStatus.RUNNING.value and not cancel
    }
    return set(request_ids) - keep


def finish(
    *,
    session: Session,
    request_id: str,
    worker_id: str | None,
    status: InferenceStatus,
    result: dict[str, Any],
) -> bool:
    """Store the answer (or the error); False if the request was no longer this worker's
    (worker_id None: any owner, as the API cancelling a request nobody took)."""
    query = update(m.InferenceRequest).where(
        m.InferenceRequest.id == request_id,
        m.InferenceRequest.status.in_(
            [InferenceStatus.QUEUED.value, InferenceStatus.RUNNING.value]
        ),
    )
    if worker_id is not None:
        query = query.where(m.InferenceRequest.worker_id == worker_id)
    done = session.execute(
        query.values(status=status.value, result=result, finished_at=datetime.now(UTC))
    )
    return bool(done.rowcount)  # type: ignore[attr-defined]


def request_cancel(*, session: Session, request_id: str) -> None:
    """The caller went away: a queued request is cancelled now, a running one by its worker
    at its next step."""
    row = session.get(m.InferenceRequest, request_id, with_for_update=True)
    if row is None or InferenceStatus(row.status).terminal:
        return
    if row.status == InferenceStatus.QUEUED.value:
        row.status = InferenceStatus.CANCELLED.value
        row.finished_at = datetime.now(UTC)
        row.result = {"message": "the caller went away", "code": "cancelled"}
    else:
        row.cancel_requested = True
    session.flush()


def chunks_since(
    *, session: Session, request_id: str, after: int
) -> tuple[list[tuple[int, dict[str, Any]]], InferenceRecord]:
    """The chunks past `after`, and the request as it is now (read in one transaction, so a
    terminal status means every chunk is in the list)."""
    record = get(session=session, request_id=request_id)
    rows = session.execute(
        select(m.InferenceChunk.seq, m.InferenceChunk.data)
        .where(m.InferenceChunk.request_id == request_id, m.InferenceChunk.seq > after)
        .order_by(m.InferenceChunk.seq)
    ).all()
    return [(seq, dict(data)) for seq, data in rows], record


def expire(*, session: Session) -> list[str]:
    """Running requests whose worker stopped renewing its lease: failed (part of the answer
    may have gone out already, so they are not run again)."""
    now = datetime.now(UTC)
    rows = session.scalars(
        select(m.InferenceRequest)
        .where(
            m.InferenceRequest.status == InferenceStatus.RUNNING.value,
            m.InferenceRequest.lease_expires_at < now,
        )
        .with_for_update(skip_locked=True)
    ).all()
    for row in rows:
        row.status = InferenceStatus.FAILED.value
        row.finished_at = now
        row.result = {
            "message": "the worker serving this request stopped; send it again",
            "code": "worker_lost",
            "status": 503,
        }
    session.flush()
    return [r.id for r in rows]


def prune(*, session: Session, older_than: datetime) -> int:
    """Remove requests finished before `older_than`, with their chunks."""
    ids = list(
        session.scalars(
            select(m.InferenceRequest.id).where(
                m.InferenceRequest.finished_at.is_not(None),
                m.InferenceRequest.finished_at < older_than,
            )
        )
    )
    if not ids:
        return 0
    session.execute(delete(m.InferenceChunk).where(m.InferenceChunk.request_id.in_(ids)))
    session.execute(delete(m.InferenceRequest).where(m.InferenceRequest.id.in_(ids)))
    return len(ids)


def adapter_archive(*, session: Session, job_id: str, step: int | None) -> str | None:
    """Where a fine-tuned model's weights are stored: the job's adapter (step None) or its
    checkpoint's at `step`, each a folder (a zip, stored before one copy); None once
    deleted."""
    if step is None:
        row = session.get(m.Job, job_id)
        if row is None or row.adapter_deleted_at is not None:
            return None
        return row.adapter_path
    return session.scalar(
        select(m.Checkpoint.path).where(m.Checkpoint.job_id == job_id, m.Checkpoint.step == step)
    )
