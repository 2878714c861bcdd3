"""The worker's side of the job table beyond the storage lease protocol: a fair claim that
asks the worker whether each candidate fits before taking it.

A worker with memory admission looks at candidates in fair-share order and skips those that
do not fit now, so the claim lives here, the only one, locking so: Postgres `SELECT ... FOR UPDATE SKIP LOCKED` (workers
never take the same job and never wait on each other), SQLite a `BEGIN IMMEDIATE`
transaction (see storage.db) that holds the write lock from select to update.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from pydantic import ValidationError as PydanticValidationError
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from mixloom.jobspec import LoraHyperparameters, Method
from mixloom.scheduler.memory import Admission
from mixloom.scheduler.policy import Waiting, fair_claim_order
from mixloom.storage import jobs
from mixloom.storage import models as m
from mixloom.storage.records import JobRecord, JobStatus

CANDIDATES = 200  # queued jobs looked at per claim (oldest first, then fair-share ordered)


@dataclass
class ClaimResult:
    claimed: JobRecord | None = None
    # (job id, its last_seq before this transaction): jobs whose events changed, to publish
    touched: list[tuple[str, int]] = field(default_factory=list)


def hyperparameters(record: JobRecord) -> LoraHyperparameters:
    """The job's hyperparameters (the API stored the method with every field filled in)."""
    return Method.model_validate(record.method).hyperparameters


def claim_next(
    *,
    session: Session,
    worker_id: str,
    lease_seconds: float,
    model: str,
    fits: Callable[[JobRecord, LoraHyperparameters], Admission],
    default_max_running: int | None,
    notified: set[str],
    now: datetime | None = None,
) -> ClaimResult:
    """Claim the first queued job, in fair-share order, that `fits` this worker.

    A job that can never fit (`Admission.never`) fails at once with the reason; one that
    does not fit now stays queued and gets one event saying why (`notified` remembers which
    jobs were told). Commit promptly: candidate rows stay locked until then.
    """
    now = now or datetime.now(UTC)
    result = ClaimResult()
    rows = session.scalars(
        select(m.Job)
        .where(
            m.Job.status == JobStatus.QUEUED.value,
            m.Job.requested_action.is_(None),
            m.Job.model == model,
        )
        .order_by(m.Job.queued_at, m.Job.id)
        .limit(CANDIDATES)
        .with_for_update(skip_locked=True)
    ).all()
    if not rows:
        return result
    running = dict(
        session.execute(
            select(m.Job.tenant_id, func.count())
            .where(m.Job.status == JobStatus.RUNNING.value)
            .group_by(m.Job.tenant_id)
        ).all()
    )
    caps = dict(
        session.execute(
            select(m.Tenant.id, m.Tenant.max_running_jobs).where(
                m.Tenant.id.in_({r.tenant_id for r in rows})
            )
        ).all()
    )
    by_id = {r.id: r for r in rows}
    order = fair_claim_order(
        [Waiting(r.id, r.tenant_id, r.queued_at or r.created_at) for r in rows], running
    )
    for waiting in order:
        row = by_id[waiting.id]
        cap = caps.get(row.tenant_id) or default_max_running
        if cap is not None and running.get(row.tenant_id, 0) >= cap:
            continue
        record = JobRecord.from_row(row)
        try:
            hp = hyperparameters(record)
        except PydanticValidationError as exc:
            result.touched.append((row.id, row.last_seq))
            _fail(session, row.id, f"its stored method is not valid: {exc}", "invalid_method")
            continue
        admission = fits(record, hp)
        if admission.never:
            result.touched.append((row.id, row.last_seq))
            _fail(
                session, row.id, f"job too large for this deployment's workers: {admission.reason}"
            )
            continue
        if not admission.ok:
            if row.id not in notified:
                notified.add(row.id)
                result.touched.append((row.id, row.last_seq))
                jobs.add_event(
                    session=session,
                    job_id=row.id,
                    message=f"A worker is full: {admission.reason}",
                    data={"reason": "memory"},
                    now=now,
                )
            continue
        result.touched.append((row.id, row.last_seq))
        result.claimed = _claim(session, row, worker_id, lease_seconds, now)
        return result
    return result


def _claim(
    session: Session, row: m.Job, worker_id: str, lease_seconds: float, now: datetime
) -> JobRecord:
    row.status = JobStatus.RUNNING.value
    row.worker_id = worker_id
    row.lease_expires_at = now + timedelta(seconds=lease_seconds)
    row.heartbeat_at = now
    row.started_at = row.started_at or now
    row.updated_at = now
    row.attempts += 1
    session.flush()
    jobs.add_event(
        session=session,
        job_id=row.id,
        message=f"Job started by a worker (attempt {row.attempts})",
        type="status",
        data={"status": JobStatus.RUNNING.value},
        now=now,
    )
    return JobRecord.from_row(row)


def _fail(session: Session, job_id: str, message: str, code: str = "job_too_large") -> None:
    jobs.set_job_status(
        session=session,
        job_id=job_id,
        status=JobStatus.FAILED,
        message=f"Job failed: {message}",
        error={"message": message, "code": code, "param": None},
    )
