"""The workers registry: each running worker, the base model it holds, its role and devices,
and whether it is alive.

A worker registers when its base is loaded (`register`), refreshes its row with its leases'
heartbeat (`heartbeat`) and removes it when it exits cleanly (`unregister`). A killed
worker's row stays: it is dead once its heartbeat is older than its own lease
(`WorkerRecord.alive`), and is removed DEAD_KEPT_SECONDS later by the next `register` or
`prune`. What a worker holds now is read from the jobs and inference requests it leases
(their `worker_id`), never stored twice.

Readers: the API (is any live worker holding a job's base?), the operator's dashboard and
metrics (`list_workers`). Keyword-only functions over a session from
`Database.transaction()`, returning frozen records, as the rest of storage/.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from mixloom.storage import jobs
from mixloom.storage import models as m
from mixloom.storage.inference import InferenceStatus
from mixloom.storage.records import JobStatus

# A dead worker's row stays this long after its last heartbeat (the dashboard shows it as
# dead), then `register` or `prune` removes it.
DEAD_KEPT_SECONDS = 3600.0
# The roles whose workers train: a job waits for one of these holding its base.
TRAINING_ROLES = ("all", "training")


@dataclass(frozen=True)
class WorkerRecord:
    """A registered worker and what it holds now."""

    id: str  # its worker_id, as jobs and inference requests name it
    host: str
    pid: int
    base: str  # the public id of the base it holds (GET /v1/models)
    source: str  # that base as the worker loaded it (a job's `model` column)
    role: str  # "all" | "training" | "inference" (worker_role)
    devices: str  # "cpu", "cuda:0", "cuda:0,cuda:1"
    lease_seconds: float  # its heartbeat may be this old before it counts as dead
    started_at: datetime
    heartbeat_at: datetime
    alive: bool  # heartbeat_at + lease_seconds is not yet past
    job_ids: tuple[str, ...] = ()  # the running jobs it trains (jobs.worker_id), by id
    inference_requests: int = 0  # the running inference requests it decodes

    @classmethod
    def of(
        cls,
        row: m.Worker,
        now: datetime,
        job_ids: tuple[str, ...] = (),
        inference_requests: int = 0,
    ) -> WorkerRecord:
        return cls(
            id=row.id,
            host=row.host,
            pid=row.pid,
            base=row.base,
            source=row.source,
            role=row.role,
            devices=row.devices,
            lease_seconds=row.lease_seconds,
            started_at=row.started_at,
            heartbeat_at=row.heartbeat_at,
            alive=_alive(row, now),
            job_ids=job_ids,
            inference_requests=inference_requests,
        )


def _alive(row: m.Worker, now: datetime) -> bool:
    return row.heartbeat_at + timedelta(seconds=row.lease_seconds) >= now


def register(
    *,
    session: Session,
    worker_id: str,
    host: str,
    pid: int,
    base: str,
    source: str,
    role: str,
    devices: str,
    lease_seconds: float,
    now: datetime | None = None,
) -> WorkerRecord:
    """Add the worker's row, or replace it (a worker id registered again starts afresh), and
    remove rows dead for over DEAD_KEPT_SECONDS."""
    now = now or datetime.now(UTC)
    prune(session=session, now=now)
    row = session.get(m.Worker, worker_id)
    if row is None:
        row = m.Worker(id=worker_id)
        session.add(row)
    row.host, row.pid, row.base, row.source = host, pid, base, source
    row.role, row.devices, row.lease_seconds = role, devices, lease_seconds
    row.started_at = row.heartbeat_at = now
    session.flush()
    return WorkerRecord.of(row, now)


def heartbeat(
    *, session: Session, worker_id: str, lease_seconds: float, now: datetime | None = None
) -> bool:
    """Refresh the worker's heartbeat (and its lease, which grows on a slow machine);
    False when it has no row (it was pruned as dead: register again)."""
    row = session.get(m.Worker, worker_id)
    if row is None:
        return False
    row.heartbeat_at = now or datetime.now(UTC)
    row.lease_seconds = lease_seconds
    session.flush()
    return True


def unregister(*, session: Session, worker_id: str) -> None:
    """Remove the worker's row (a clean exit); nothing when it has none."""
    session.execute(delete(m.Worker).where(m.Worker.id == worker_id))


def prune(*, session: Session, now: datetime | None = None) -> int:
    """Remove the rows of workers dead for over DEAD_KEPT_SECONDS; how many were removed."""
    cutoff = (now or datetime.now(UTC)) - timedelta(seconds=DEAD_KEPT_SECONDS)
    result = session.execute(delete(m.Worker).where(m.Worker.heartbeat_at < cutoff))
    return int(getattr(result, "rowcount", 0) or 0)


def list_workers(
    *, session: Session, include_dead: bool = True, now: datetime | None = None
) -> list[WorkerRecord]:
    """Every registered worker (by base, then id) with the running jobs and inference
    requests it holds; dead ones too unless `include_dead` is False."""
    now = now or datetime.now(UTC)
    rows = [
        r
        for r in session.scalars(select(m.Worker).order_by(m.Worker.base, m.Worker.id))
        if include_dead or _alive(r, now)
    ]
    if not rows:
        return []
    ids = [r.id for r in rows]
    held: dict[str, list[str]] = {}
    for worker_id, job_id in session.execute(
        select(m.Job.worker_id, m.Job.id)
        .where(m.Job.status == JobStatus.RUNNING.value, m.Job.worker_id.in_(ids))
        .order_by(m.Job.id)
    ):
        held.setdefault(str(worker_id), []).append(job_id)
    requests = dict(
        session.execute(
            select(m.InferenceRequest.worker_id, func.count())
            .where(
                m.InferenceRequest.status == InferenceStatus.RUNNING.value,
                m.InferenceRequest.worker_id.in_(ids),
            )
            .group_by(m.InferenceRequest.worker_id)
        ).all()
    )
    return [
        WorkerRecord.of(r, now, tuple(held.get(r.id, ())), int(requests.get(r.id, 0))) for r in rows
    ]


def live_holders(
    *,
    session: Session,
    source: str,
    roles: tuple[str, ...] = TRAINING_ROLES,
    now: datetime | None = None,
) -> list[WorkerRecord]:
    """The live workers holding the base `source` names (a job's `model`), in `roles`
    (default: those that train). Their held jobs are not read (see `list_workers`)."""
    now = now or datetime.now(UTC)
    rows = session.scalars(
        select(m.Worker).where(m.Worker.source == source, m.Worker.role.in_(roles))
    )
    return [WorkerRecord.of(r, now) for r in rows if _alive(r, now)]


def tell_if_unheld(
    *, session: Session, job_id: str, source: str, base: str, now: datetime | None = None
) -> bool:
    """A new job's one event when no live worker trains its base (`source`, public id
    `base`): it stays queued until one starts. True when it was told. Asked once, when the
    job is created, so the event is never repeated."""
    if live_holders(session=session, source=source, now=now):
        return False
    jobs.add_event(
        session=session,
        job_id=job_id,
        message=f"Waiting for a worker that holds base {base}: none is running",
        level="warning",
        data={"reason": "no_worker", "base": base},
        now=now,
    )
    return True
