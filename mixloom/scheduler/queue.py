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
    jobs were told). Commit promptly: the rows it looked at stay locked until then.
    """
    now = now or datetime.now(UTC)
    result = ClaimResult()
    claimable = (
        m.Job.status == JobStatus.QUEUED.value,
        m.Job.requested_action.is_(None),
        m.Job.model == model,
    )
    # Every tenant's running jobs, and the tenants at their cap, whose jobs are left out of
    # the candidates: else the oldest CANDIDATES jobs, mostly heavy tenants' at their cap,
    # left a worker nothing to claim while thousands of other tenants' jobs waited (11,321
    # empty claims in a 64-worker fleet with 10,000 jobs queued).
    running: dict[str, int] = dict(
        session.execute(
            select(m.Job.tenant_id, func.count())
            .where(m.Job.status == JobStatus.RUNNING.value)
            .group_by(m.Job.tenant_id)
        ).all()
    )
    caps = dict(
        session.execute(
            select(m.Tenant.id, m.Tenant.max_running_jobs).where(m.Tenant.id.in_(running))
        ).all()
    )
    full = [
        t
        for t, n in running.items()
        if (cap := caps.get(t) or default_max_running) is not None and n >= cap
    ]
    # The candidates unlocked and without their bodies; each is locked (and loaded) only
    # when its turn comes. Locking and loading all 200 took a claim on 9,500 queued jobs
    # 51 ms (16.5 ms of the worker's CPU) against 33 ms (9.9 ms) now, and every concurrent
    # claimer locked 200 jobs out of the others' sight (bench/RESULTS.md, "Fleet simulation").
    waiting = [
        Waiting(job_id, tenant, queued_at or created_at)
        for job_id, tenant, queued_at, created_at in session.execute(
            select(m.Job.id, m.Job.tenant_id, m.Job.queued_at, m.Job.created_at)
            .where(*claimable, m.Job.tenant_id.not_in(full))
            .order_by(m.Job.queued_at, m.Job.id)
            .limit(CANDIDATES)
        )
    ]
    for turn in fair_claim_order(waiting, running):
        row = session.scalar(  # None: another worker has it, or took it since
            select(m.Job).where(m.Job.id == turn.id, *claimable).with_for_update(skip_locked=True)
        )
        if row is None:
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
