"""Fine-tuning jobs: creation and API-side state changes, the worker's lease protocol,
and the job's events, metrics and checkpoints.

State machine (the API asks, the worker holding the lease carries out):

    queued --claim (scheduler.queue)--> running --release--> succeeded | failed | cancelled |
        paused | queued
    queued | paused --cancel--> cancelled (at once)
    queued --pause--> paused (at once);  paused --resume--> queued (back of the queue)
    running --cancel|pause--> running with requested_action set; the worker sees it on its
        next `renew_lease` and releases the job as cancelled | paused (after a checkpoint)
    running, lease expired --expire_leases--> queued (keeps its place), or cancelled |
        paused when that was requested, or failed (`job_poisoned`) once its leases expired
        `max_crashes` times with no checkpoint past its resume point in between

Every status change adds a `status` event. Events and metrics share one per-job sequence
number (`seq`), the id of the SSE stream. Functions flush but never commit: run them inside
`Database.transaction()`.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import and_, delete, func, or_, select
from sqlalchemy.orm import Session

from mixloom.errors import ObjectNotFoundError, StateConflictError
from mixloom.storage import models as m
from mixloom.storage import objects
from mixloom.storage.ids import new_id
from mixloom.storage.objects import ObjectStore
from mixloom.storage.records import (
    CheckpointRecord,
    EventRecord,
    JobRecord,
    JobStatus,
    MetricRecord,
    RequestedAction,
)

log = logging.getLogger("mixloom.storage")

# A checkpoint folder holds the adapter's files and these (trainer/checkpoint.py). A job's
# final adapter is its last checkpoint's folder: the adapter owns the adapter files and
# counts their bytes (adapter_bytes), that checkpoint only these (its `bytes`), so every
# byte stored counts once. Deleting one of the two removes only what it owns.
CHECKPOINT_STATE_FILES = ("trainer_state.pt", "progress.json", "manifest.json")


class LeaseLostError(StateConflictError):
    """The worker no longer holds this job's lease (it expired and the job moved on)."""


def _now(now: datetime | None) -> datetime:
    return now or datetime.now(UTC)


# --- creation and reads -------------------------------------------------------------------


def create_job(
    *,
    session: Session,
    tenant_id: str,
    model: str,
    training_file_id: str,
    validation_file_id: str | None,
    method: dict[str, Any],
    seed: int,
    suffix: str | None = None,
    metadata: dict[str, Any] | None = None,
    model_name: str | None = None,
    evaluation: dict[str, Any] | None = None,
    now: datetime | None = None,
) -> JobRecord:
    """A new job, queued at once: its files were validated line by line when uploaded.
    `evaluation`: what to evaluate once it has trained ({"request", "status": "pending"}).
    `model` is the base as workers know it (MIXLOOM_BASE_MODEL, which may be a path);
    `model_name` its public id, for the job's first event (default: `model`)."""
    now = _now(now)
    row = m.Job(
        id=new_id("ftjob"),
        tenant_id=tenant_id,
        model=model,
        training_file_id=training_file_id,
        validation_file_id=validation_file_id,
        method=method,
        seed=seed,
        suffix=suffix,
        meta=metadata,
        evaluation=evaluation,
        status=JobStatus.QUEUED.value,
        created_at=now,
        updated_at=now,
        queued_at=now,
        attempts=0,
        crashes=0,
        last_seq=0,
    )
    session.add(row)
    session.flush()
    _event(
        session,
        row,
        f"Job created; queued for {model_name or model}",
        type="status",
        data={"status": JobStatus.QUEUED.value},
        now=now,
    )
    return JobRecord.from_row(row)


def _job_row(
    session: Session, job_id: str, tenant_id: str | None = None, *, lock: bool = False
) -> m.Job:
    query = select(m.Job).where(m.Job.id == job_id)
    if tenant_id is not None:
        query = query.where(m.Job.tenant_id == tenant_id)
    if lock:
        query = query.with_for_update()
    row = session.scalar(query)
    if row is None:
        raise ObjectNotFoundError(
            f"no job with id {job_id!r}", param="job_id", code="job_not_found"
        )
    return row


def get_job(*, session: Session, job_id: str, tenant_id: str | None = None) -> JobRecord:
    """ObjectNotFoundError if missing or (with tenant_id) another tenant's."""
    return JobRecord.from_row(_job_row(session, job_id, tenant_id))


def list_jobs(
    *,
    session: Session,
    tenant_id: str,
    after: str | None = None,
    limit: int = 20,
    status: JobStatus | None = None,
) -> tuple[list[JobRecord], bool]:
    """Newest first; `after` is the last id of the previous page. Returns (page, has_more)."""
    query = select(m.Job).where(m.Job.tenant_id == tenant_id)
    if status is not None:
        query = query.where(m.Job.status == status.value)
    if after is not None:
        query = query.where(m.Job.id < after)
    rows = list(session.scalars(query.order_by(m.Job.id.desc()).limit(limit + 1)))
    return [JobRecord.from_row(r) for r in rows[:limit]], len(rows) > limit


def list_fine_tuned(*, session: Session, tenant_id: str) -> list[JobRecord]:
    """The tenant's fine-tuned models: its succeeded jobs whose adapter is not deleted,
    newest first (GET /v1/models)."""
    rows = session.scalars(
        select(m.Job)
        .where(
            m.Job.tenant_id == tenant_id,
            m.Job.status == JobStatus.SUCCEEDED.value,
            m.Job.fine_tuned_model.is_not(None),
            m.Job.adapter_path.is_not(None),
        )
        .order_by(m.Job.id.desc())
    )
    return [JobRecord.from_row(r) for r in rows]


def queue_position(*, session: Session, job: JobRecord) -> int | None:
    """The queued job's fair-share round: 1 + the jobs of its own tenant ahead of it (running,
    or queued earlier). Workers claim every tenant's round-1 jobs before any round-2 job
    (scheduler/policy.fair_claim_order), so it counts only the tenant's own jobs and tells
    nothing of other tenants' traffic. None unless the job is queued."""
    if job.status != JobStatus.QUEUED or job.queued_at is None:
        return None
    ahead = session.scalar(
        select(func.count()).where(
            m.Job.tenant_id == job.tenant_id,
            or_(
                m.Job.status == JobStatus.RUNNING.value,
                and_(
                    m.Job.status == JobStatus.QUEUED.value,
                    or_(
                        m.Job.queued_at < job.queued_at,
                        and_(m.Job.queued_at == job.queued_at, m.Job.id < job.id),
                    ),
                ),
            ),
        )
    )
    return int(ahead or 0) + 1


# --- API-side state changes ---------------------------------------------------------------


def _set_status(
    session: Session,
    row: m.Job,
    status: JobStatus,
    message: str,
    *,
    now: datetime,
    level: str = "info",
    error: dict[str, Any] | None = None,
) -> None:
    row.status = status.value
    row.updated_at = now
    if status.terminal:
        row.finished_at = now
        row.requested_action = None
    if status != JobStatus.RUNNING:
        row.worker_id = None
        row.lease_expires_at = None
    if status == JobStatus.PAUSED:
        row.requested_action = None
    if error is not None:
        row.error = error
    _event(
        session, row, message, level=level, type="status", data={"status": status.value}, now=now
    )


def _refuse_finished(row: m.Job, action: str) -> None:
    if JobStatus(row.status).terminal:
        raise StateConflictError(
            f"job {row.id} already {row.status}; a finished job cannot be {action}",
            param="job_id",
            code="job_finished",
        )


def cancel_job(
    *, session: Session, job_id: str, tenant_id: str, now: datetime | None = None
) -> JobRecord:
    """Cancel at once unless running; a running job gets requested_action=cancel."""
    now = _now(now)
    row = _job_row(session, job_id, tenant_id, lock=True)
    status = JobStatus(row.status)
    if status == JobStatus.CANCELLED:
        return JobRecord.from_row(row)
    _refuse_finished(row, "cancelled")
    if status == JobStatus.RUNNING:
        if row.requested_action != RequestedAction.CANCEL.value:
            row.requested_action = RequestedAction.CANCEL.value
            row.updated_at = now
            _event(session, row, "Cancellation requested; the worker will stop the job", now=now)
    else:
        _set_status(session, row, JobStatus.CANCELLED, "Job cancelled", now=now)
    session.flush()
    return JobRecord.from_row(row)


def pause_job(
    *, session: Session, job_id: str, tenant_id: str, now: datetime | None = None
) -> JobRecord:
    """Pause at once if waiting; a running job gets requested_action=pause."""
    now = _now(now)
    row = _job_row(session, job_id, tenant_id, lock=True)
    status = JobStatus(row.status)
    _refuse_finished(row, "paused")
    if status == JobStatus.RUNNING:
        if row.requested_action == RequestedAction.CANCEL.value:
            raise StateConflictError(
                f"job {row.id} is being cancelled; it cannot be paused",
                param="job_id",
                code="cancel_requested",
            )
        if row.requested_action != RequestedAction.PAUSE.value:
            row.requested_action = RequestedAction.PAUSE.value
            row.updated_at = now
            _event(session, row, "Pause requested; the worker will checkpoint and stop", now=now)
    elif status in (JobStatus.QUEUED, JobStatus.VALIDATING_FILES):
        _set_status(session, row, JobStatus.PAUSED, "Job paused", now=now)
    session.flush()
    return JobRecord.from_row(row)


def resume_job(
    *, session: Session, job_id: str, tenant_id: str, now: datetime | None = None
) -> JobRecord:
    """Paused -> queued (it resumes from its last checkpoint); withdraws a pending pause."""
    now = _now(now)
    row = _job_row(session, job_id, tenant_id, lock=True)
    status = JobStatus(row.status)
    _refuse_finished(row, "resumed")
    if status == JobStatus.PAUSED:
        row.queued_at = now
        _set_status(session, row, JobStatus.QUEUED, "Job resumed; queued", now=now)
    elif status == JobStatus.RUNNING:
        if row.requested_action == RequestedAction.CANCEL.value:
            raise StateConflictError(
                f"job {row.id} is being cancelled; it cannot be resumed",
                param="job_id",
                code="cancel_requested",
            )
        if row.requested_action == RequestedAction.PAUSE.value:
            row.requested_action = None
            row.updated_at = now
            _event(session, row, "Pause request withdrawn; the job keeps running", now=now)
    session.flush()
    return JobRecord.from_row(row)


# --- the worker's side --------------------------------------------------------------------


def _leased_row(session: Session, job_id: str, worker_id: str) -> m.Job:
    row = _job_row(session, job_id, lock=True)
    if row.status != JobStatus.RUNNING.value or row.worker_id != worker_id:
        raise LeaseLostError(
            f"worker {worker_id} no longer holds job {job_id} (status {row.status}, "
            f"held by {row.worker_id}); stop training it",
            code="lease_lost",
        )
    return row


def renew_lease(
    *,
    session: Session,
    job_id: str,
    worker_id: str,
    lease_seconds: float,
    now: datetime | None = None,
) -> JobRecord:
    """Heartbeat. The returned record's `requested_action` tells the worker to cancel or pause.

    Raises LeaseLostError when the lease was lost; the worker must drop the job.
    """
    now = _now(now)
    row = _leased_row(session, job_id, worker_id)
    row.heartbeat_at = now
    row.lease_expires_at = now + timedelta(seconds=lease_seconds)
    session.flush()
    return JobRecord.from_row(row)


def renew_leases(
    *,
    session: Session,
    job_ids: list[str],
    worker_id: str,
    lease_seconds: float,
    now: datetime | None = None,
) -> dict[str, JobRecord | None]:
    """`renew_lease` for every job a worker holds, in one transaction: one round trip a
    heartbeat however many jobs the worker trains (one transaction per job made heartbeats
    of busy fleets arrive after the lease: bench/RESULTS.md "Fleet simulation").

    Returns each job's record, or None for a job whose lease was lost (drop it). Rows are
    locked in id order, so two callers never deadlock.
    """
    now = _now(now)
    rows = session.scalars(
        select(m.Job)
        .where(
            m.Job.id.in_(job_ids),
            m.Job.status == JobStatus.RUNNING.value,
            m.Job.worker_id == worker_id,
        )
        .order_by(m.Job.id)
        .with_for_update()
    ).all()
    renewed: dict[str, JobRecord | None] = dict.fromkeys(job_ids)
    for row in rows:
        row.heartbeat_at = now
        row.lease_expires_at = now + timedelta(seconds=lease_seconds)
    session.flush()
    for row in rows:
        renewed[row.id] = JobRecord.from_row(row)
    return renewed


def release_job(
    *,
    session: Session,
    job_id: str,
    worker_id: str,
    status: JobStatus,
    message: str | None = None,
    error: dict[str, Any] | None = None,
    level: str | None = None,
    now: datetime | None = None,
) -> JobRecord:
    """End the worker's lease, leaving the job `status`.

    succeeded | failed | cancelled: finished. paused: the API's resume re-queues it.
    queued: back in the queue at its old place (e.g. the worker shuts down).
    `error` is {"message", "code", "param"} for failed jobs. `level`: the event's (default:
    error for a failed job, else info).
    """
    if status in (JobStatus.RUNNING, JobStatus.VALIDATING_FILES):
        raise ValueError(f"release_job cannot leave a job {status}")
    now = _now(now)
    row = _leased_row(session, job_id, worker_id)
    level = level or ("error" if status == JobStatus.FAILED else "info")
    text = (
        message
        or {
            JobStatus.SUCCEEDED: "Job succeeded",
            JobStatus.FAILED: "Job failed" + (f": {error['message']}" if error else ""),
            JobStatus.CANCELLED: "Job cancelled",
            JobStatus.PAUSED: "Job paused",
            JobStatus.QUEUED: "A worker released the job; queued again",
        }[status]
    )
    if status == JobStatus.QUEUED:
        row.requested_action = None
    _set_status(session, row, status, text, now=now, level=level, error=error)
    session.flush()
    return JobRecord.from_row(row)


def expire_leases(
    *, session: Session, max_crashes: int | None = None, now: datetime | None = None
) -> list[JobRecord]:
    """Running jobs whose worker stopped heartbeating: re-queue them at their old place
    (cancelled or paused instead when that was requested). Any process may call this.

    Each expiry counts as a crash of the job (`crashes`; `add_checkpoint` past the resume
    point sets it back to 0). A job at `max_crashes` is failed as poisoned rather than
    handed to the next worker to bring down in turn.
    """
    now = _now(now)
    rows = session.scalars(
        select(m.Job)
        .where(m.Job.status == JobStatus.RUNNING.value, m.Job.lease_expires_at < now)
        .with_for_update(skip_locked=True)
    ).all()
    out = []
    for row in rows:
        row.crashes = (row.crashes or 0) + 1
        lost = "its worker stopped heartbeating"
        if row.requested_action == RequestedAction.CANCEL.value:
            _set_status(session, row, JobStatus.CANCELLED, f"Job cancelled ({lost})", now=now)
        elif row.requested_action == RequestedAction.PAUSE.value:
            _set_status(session, row, JobStatus.PAUSED, f"Job paused ({lost})", now=now)
        elif max_crashes is not None and row.crashes >= max_crashes:
            why = (
                f"it stopped its worker {row.crashes} times without reaching a new checkpoint "
                "in between; it is not retried, so that it stops no more workers"
            )
            _set_status(
                session,
                row,
                JobStatus.FAILED,
                f"Job failed: {why}",
                now=now,
                level="error",
                error={"message": why, "code": "job_poisoned", "param": None},
            )
        else:
            _set_status(
                session,
                row,
                JobStatus.QUEUED,
                f"Job queued again: {lost}; it resumes from its last checkpoint",
                now=now,
                level="warning",
            )
        out.append(JobRecord.from_row(row))
    session.flush()
    return out


def set_job_status(
    *,
    session: Session,
    job_id: str,
    status: JobStatus,
    message: str | None = None,
    error: dict[str, Any] | None = None,
    now: datetime | None = None,
) -> JobRecord:
    """Set a status without a lease check (admin tools, tests, file re-validation)."""
    now = _now(now)
    row = _job_row(session, job_id, lock=True)
    if status == JobStatus.QUEUED:
        row.queued_at = now
    _set_status(session, row, status, message or f"Job {status.value}", now=now, error=error)
    session.flush()
    return JobRecord.from_row(row)


def set_adapter_path(
    *,
    session: Session,
    job_id: str,
    path: str,
    fine_tuned_model: str | None = None,
    trained_tokens: int | None = None,
    bytes: int | None = None,
    now: datetime | None = None,
) -> JobRecord:
    """Record the adapter the worker wrote: `path`, the folder of its final checkpoint (or,
    stored before, a zip); `bytes`: its own files' size, counted against the tenant's storage
    quota. The download route serves it."""
    row = _job_row(session, job_id, lock=True)
    row.adapter_path = path
    if bytes is not None:
        row.adapter_bytes = bytes
    row.fine_tuned_model = fine_tuned_model or row.fine_tuned_model
    if trained_tokens is not None:
        row.trained_tokens = trained_tokens
    row.updated_at = _now(now)
    session.flush()
    return JobRecord.from_row(row)


# --- events, metrics, checkpoints ---------------------------------------------------------


def _next_seq(row: m.Job) -> int:
    row.last_seq = (row.last_seq or 0) + 1
    return row.last_seq


def _event(
    session: Session,
    row: m.Job,
    message: str,
    *,
    level: str = "info",
    type: str = "message",
    data: dict[str, Any] | None = None,
    now: datetime,
) -> EventRecord:
    event = m.JobEvent(
        job_id=row.id,
        seq=_next_seq(row),
        created_at=now,
        level=level,
        type=type,
        message=message,
        data=data,
    )
    session.add(event)
    session.flush()
    return EventRecord.from_row(event)


def add_event(
    *,
    session: Session,
    job_id: str,
    message: str,
    level: str = "info",
    type: str = "message",
    data: dict[str, Any] | None = None,
    now: datetime | None = None,
) -> EventRecord:
    """Append an event; publish `record.to_message()` on the bus after commit."""
    row = _job_row(session, job_id, lock=True)
    return _event(session, row, message, level=level, type=type, data=data, now=_now(now))


def add_metrics(
    *,
    session: Session,
    job_id: str,
    step: int,
    values: dict[str, Any],
    now: datetime | None = None,
) -> MetricRecord:
    """Append one step's metrics (e.g. train_loss, learning_rate, tokens_per_second)."""
    row = _job_row(session, job_id, lock=True)
    metric = m.JobMetric(
        job_id=job_id, seq=_next_seq(row), step=step, created_at=_now(now), values=values
    )
    session.add(metric)
    session.flush()
    return MetricRecord.from_row(metric)


def add_checkpoint(
    *,
    session: Session,
    job_id: str,
    step: int,
    path: str,
    metrics: dict[str, Any] | None = None,
    bytes: int = 0,
    now: datetime | None = None,
) -> CheckpointRecord:
    """Record a checkpoint (`path`: its folder, the adapter at `step` and the trainer state;
    `bytes`: what it stores, less the adapter files when it is also the job's adapter); it
    is downloadable at once. A step past every recorded checkpoint is progress since the
    job last resumed: its crash count goes back to 0."""
    now = _now(now)
    row = _job_row(session, job_id, lock=True)
    last = session.scalar(select(func.max(m.Checkpoint.step)).where(m.Checkpoint.job_id == job_id))
    if last is None or step > last:
        row.crashes = 0
    ckpt = m.Checkpoint(
        id=new_id("ftckpt"),
        job_id=job_id,
        step=step,
        path=path,
        metrics=metrics,
        created_at=now,
        bytes=bytes,
    )
    session.add(ckpt)
    session.flush()
    _event(
        session,
        row,
        f"Checkpoint saved at step {step}",
        type="checkpoint",
        data={"checkpoint_id": ckpt.id, "step": step},
        now=now,
    )
    return CheckpointRecord.from_row(ckpt)


def resume_at(*, session: Session, job_id: str, step: int) -> list[CheckpointRecord]:
    """A job resumes from its checkpoint at `step` (0: from scratch): its metrics rows past
    `step` (trained by a run that died before its next checkpoint; the resumed run writes
    them again) and its checkpoint rows past `step` (refused as corrupt) are deleted, so
    the history has one row per step. Returns the deleted checkpoints, whose files the
    caller removes after commit. Run it in the transaction that starts the job."""
    session.execute(
        delete(m.JobMetric).where(m.JobMetric.job_id == job_id, m.JobMetric.step > step)
    )
    later = list(
        session.scalars(
            select(m.Checkpoint).where(m.Checkpoint.job_id == job_id, m.Checkpoint.step > step)
        )
    )
    return _delete_checkpoint_rows(session, later)


def retain_checkpoints(*, session: Session, job_id: str, keep_last: int) -> list[CheckpointRecord]:
    """Keep a job's last `keep_last` checkpoints (by step) and its best by validation loss;
    delete the other rows and return them, whose files the caller removes after commit."""
    rows = list(
        session.scalars(
            select(m.Checkpoint)
            .where(m.Checkpoint.job_id == job_id)
            .order_by(m.Checkpoint.step.desc(), m.Checkpoint.created_at.desc())
        )
    )
    keep = {r.id for r in rows[: max(keep_last, 1)]}
    scored = [r for r in rows if (r.metrics or {}).get("valid_loss") is not None]
    if scored:
        keep.add(min(scored, key=lambda r: (float(r.metrics["valid_loss"]), -r.step)).id)  # type: ignore[index]
    return _delete_checkpoint_rows(session, [r for r in rows if r.id not in keep])


def _delete_checkpoint_rows(session: Session, rows: list[m.Checkpoint]) -> list[CheckpointRecord]:
    """Delete the rows; each returned record's `path` is what to remove after commit
    (remove_stored_files): its folder, or only its trainer state when the folder is also
    its job's adapter."""
    out = []
    for r in rows:
        record = CheckpointRecord.from_row(r)
        job = session.get(m.Job, r.job_id)
        if job is not None and job.adapter_path == r.path and job.adapter_deleted_at is None:
            record = dataclasses.replace(record, path=f"{r.path}/{CHECKPOINT_STATE_FILES[0]}")
        out.append(record)
        session.delete(r)
    session.flush()
    return out


def list_events(
    *, session: Session, job_id: str, after: int | None = None, limit: int = 20
) -> tuple[list[EventRecord], bool]:
    """Newest first; `after` is the numeric id of the last event of the previous page."""
    query = select(m.JobEvent).where(m.JobEvent.job_id == job_id)
    if after is not None:
        query = query.where(m.JobEvent.id < after)
    rows = list(session.scalars(query.order_by(m.JobEvent.id.desc()).limit(limit + 1)))
    return [EventRecord.from_row(r) for r in rows[:limit]], len(rows) > limit


def list_metrics(
    *, session: Session, job_id: str, after_step: int | None = None, limit: int = 100
) -> tuple[list[MetricRecord], bool]:
    """Oldest step first (a series); `after_step` is the last step of the previous page."""
    query = select(m.JobMetric).where(m.JobMetric.job_id == job_id)
    if after_step is not None:
        query = query.where(m.JobMetric.step > after_step)
    query = query.order_by(m.JobMetric.step, m.JobMetric.seq).limit(limit + 1)
    rows = list(session.scalars(query))
    return [MetricRecord.from_row(r) for r in rows[:limit]], len(rows) > limit


def progress_since(
    *, session: Session, job_id: str, after_seq: int, limit: int = 500
) -> list[EventRecord | MetricRecord]:
    """Events and metrics with seq > after_seq, in seq order (SSE replay)."""
    events = session.scalars(
        select(m.JobEvent)
        .where(m.JobEvent.job_id == job_id, m.JobEvent.seq > after_seq)
        .order_by(m.JobEvent.seq)
        .limit(limit)
    )
    metrics = session.scalars(
        select(m.JobMetric)
        .where(m.JobMetric.job_id == job_id, m.JobMetric.seq > after_seq)
        .order_by(m.JobMetric.seq)
        .limit(limit)
    )
    merged: list[EventRecord | MetricRecord] = [EventRecord.from_row(r) for r in events]
    merged += [MetricRecord.from_row(r) for r in metrics]
    merged.sort(key=lambda r: r.seq)
    return merged[:limit]


def last_checkpoint_step(*, session: Session, job_id: str) -> int:
    """The step of the job's newest recorded checkpoint (0: none)."""
    step = session.scalar(select(func.max(m.Checkpoint.step)).where(m.Checkpoint.job_id == job_id))
    return int(step or 0)


def list_checkpoints(
    *, session: Session, job_id: str, after: str | None = None, limit: int = 10
) -> tuple[list[CheckpointRecord], bool]:
    """Newest first; `after` is the last checkpoint id of the previous page."""
    query = select(m.Checkpoint).where(m.Checkpoint.job_id == job_id)
    if after is not None:
        query = query.where(m.Checkpoint.id < after)
    rows = list(session.scalars(query.order_by(m.Checkpoint.id.desc()).limit(limit + 1)))
    return [CheckpointRecord.from_row(r) for r in rows[:limit]], len(rows) > limit


def checkpoint_at_step(*, session: Session, job_id: str, step: int) -> CheckpointRecord | None:
    """The job's checkpoint at `step` (the newest, if one was written twice), or None."""
    row = session.scalar(
        select(m.Checkpoint)
        .where(m.Checkpoint.job_id == job_id, m.Checkpoint.step == step)
        .order_by(m.Checkpoint.id.desc())
        .limit(1)
    )
    return CheckpointRecord.from_row(row) if row is not None else None


def get_checkpoint(*, session: Session, job_id: str, checkpoint_id: str) -> CheckpointRecord:
    row = session.scalar(
        select(m.Checkpoint).where(m.Checkpoint.id == checkpoint_id, m.Checkpoint.job_id == job_id)
    )
    if row is None:
        raise ObjectNotFoundError(
            f"job {job_id} has no checkpoint {checkpoint_id!r}",
            param="checkpoint_id",
            code="checkpoint_not_found",
        )
    return CheckpointRecord.from_row(row)


# --- deleting a finished job's checkpoints and adapter ------------------------------------


def _refuse_unfinished(row: m.Job, what: str) -> None:
    if not JobStatus(row.status).terminal:
        raise StateConflictError(
            f"job {row.id} is {row.status}: {what} can be deleted once it has finished "
            "(succeeded, failed or cancelled); wait for it, or cancel it first",
            param="job_id",
            code="job_not_finished",
        )


def delete_checkpoints(
    *,
    session: Session,
    job_id: str,
    tenant_id: str,
    checkpoint_id: str | None = None,
    now: datetime | None = None,
) -> list[CheckpointRecord]:
    """Delete the records of a finished job's checkpoints (all, or `checkpoint_id`) and
    return them: the caller removes their files after commit, so no record outlives its
    file. All of them again: []; an unknown checkpoint_id: ObjectNotFoundError."""
    row = _job_row(session, job_id, tenant_id, lock=True)
    _refuse_unfinished(row, "its checkpoints")
    query = select(m.Checkpoint).where(m.Checkpoint.job_id == job_id)
    if checkpoint_id is not None:
        query = query.where(m.Checkpoint.id == checkpoint_id)
    rows = list(session.scalars(query.order_by(m.Checkpoint.id)))
    if checkpoint_id is not None and not rows:
        raise ObjectNotFoundError(
            f"job {job_id} has no checkpoint {checkpoint_id!r} (deleted, or never written)",
            param="checkpoint_id",
            code="checkpoint_not_found",
        )
    removed = _delete_checkpoint_rows(session, rows)
    if removed:
        steps = ", ".join(str(c.step) for c in removed)
        freed = sum(c.bytes for c in removed)
        _event(
            session,
            row,
            f"Deleted {len(removed)} checkpoint(s) (steps {steps}), freeing {freed:,} bytes",
            data={"checkpoint_ids": [c.id for c in removed], "bytes": freed},
            now=_now(now),
        )
    session.flush()
    return removed


def delete_adapter(
    *, session: Session, job_id: str, tenant_id: str, now: datetime | None = None
) -> tuple[str | None, int]:
    """Delete the record of a finished job's final adapter; the job stays, with
    `adapter_deleted_at` set (its download answers 410). Returns the file for the caller
    to remove after commit and the bytes freed: (None, 0) when there is none (deleted
    before, or the job never wrote one). When its last checkpoint shares its folder, the
    files stay with that checkpoint, which counts their bytes from now on (none freed)."""
    now = _now(now)
    row = _job_row(session, job_id, tenant_id, lock=True)
    _refuse_unfinished(row, "its adapter")
    path = row.adapter_path
    if path is None:
        return None, 0
    size = row.adapter_bytes or 0
    keeper = session.scalar(
        select(m.Checkpoint).where(m.Checkpoint.job_id == job_id, m.Checkpoint.path == path)
    )
    row.adapter_path = None
    row.adapter_deleted_at = now
    row.updated_at = now
    if keeper is not None:
        keeper.bytes = (keeper.bytes or 0) + size
        message = (
            f"Deleted the adapter; its weights stay with the checkpoint at step {keeper.step}, "
            f"which now counts their {size:,} bytes (delete that checkpoint to free them)"
        )
        _event(session, row, message, data={"bytes": 0}, now=now)
        session.flush()
        return None, 0
    freeing = f"freeing {size:,} bytes"
    _event(session, row, f"Deleted the adapter, {freeing}", data={"bytes": size}, now=now)
    session.flush()
    return path, size


def remove_stored_files(paths: Iterable[str], *, store: ObjectStore) -> None:
    """After commit: the objects of deleted records (locations in `store`, or local paths
    of rows written before object storage). A checkpoint or an adapter is a folder
    (`step-N/`: the adapter and, for a checkpoint, its trainer state), removed whole; a
    checkpoint's `.../trainer_state.pt` (_delete_checkpoint_rows) removes its trainer state
    alone, leaving the adapter it shares the folder with. Stored before one copy: a
    checkpoint was `step-N.zip` beside its folder, an adapter a zip of its own. An object
    that cannot be removed (the store unreachable) is logged: one left behind is only
    space (no longer counted against the tenant's quota), a row without its bytes would
    be an error."""
    for name in paths:
        folder, _, last = name.rpartition("/")
        try:
            if last == CHECKPOINT_STATE_FILES[0]:
                objects.remove(store, folder, only=CHECKPOINT_STATE_FILES)
                continue
            objects.remove(store, name)
            legacy = Path(name).with_suffix("")
            if name.endswith(".zip") and legacy.name.startswith("step-") and legacy.is_dir():
                shutil.rmtree(legacy)
        except (OSError, objects.StoreUnavailableError):
            log.warning("could not remove %s of a deleted record", name, exc_info=True)


def set_evaluation(*, session: Session, job_id: str, evaluation: dict[str, Any]) -> None:
    """Store a job's evaluation as it now stands (its request, status, results or error)."""
    row = session.get(m.Job, job_id)
    if row is None:
        raise ObjectNotFoundError(
            f"no job with id {job_id!r}", param="job_id", code="job_not_found"
        )
    row.evaluation = evaluation
    session.flush()
