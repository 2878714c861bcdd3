"""What the operator reads about the fleet: the queue per base and the jobs by state (the
API's /metrics and /v1/admin/queue), and which tenant each held job belongs to (the
operator view). Cheap queries: the queue's read the (status, queued_at) index, and the
state counts leave the terminal states (which grow without bound) out.

Keyword-only functions over a session, as the rest of storage/. Tenants appear here by id
only, for the operator's view; /metrics keeps only the counts.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from mixloom.storage import models as m
from mixloom.storage.records import TERMINAL_STATUSES, JobStatus

LIVE_STATUSES = tuple(s.value for s in JobStatus if s not in TERMINAL_STATUSES)


@dataclass(frozen=True)
class QueuedBase:
    """The queued jobs of one base (as jobs name it: its source, `JobRecord.model`)."""

    source: str
    queued: int
    oldest_job_id: str
    oldest_tenant_id: str
    oldest_queued_at: datetime

    def waited_seconds(self, now: datetime) -> float:
        return max(0.0, (now - self.oldest_queued_at).total_seconds())


def queue_by_base(*, session: Session) -> list[QueuedBase]:
    """Each base with queued jobs: how many, and the one waiting longest."""
    counts = session.execute(
        select(m.Job.model, func.count(), func.min(m.Job.queued_at))
        .where(m.Job.status == JobStatus.QUEUED.value)
        .group_by(m.Job.model)
        .order_by(m.Job.model)
    ).all()
    out = []
    for source, count, oldest_at in counts:
        oldest = session.execute(
            select(m.Job.id, m.Job.tenant_id, m.Job.queued_at)
            .where(m.Job.status == JobStatus.QUEUED.value, m.Job.model == source)
            .order_by(m.Job.queued_at, m.Job.id)
            .limit(1)
        ).first()
        if oldest is None:  # taken between the two reads
            continue
        out.append(
            QueuedBase(
                source=source,
                queued=int(count),
                oldest_job_id=oldest.id,
                oldest_tenant_id=oldest.tenant_id,
                oldest_queued_at=oldest.queued_at or oldest_at or datetime.now(UTC),
            )
        )
    return out


def live_job_counts(*, session: Session) -> dict[str, int]:
    """Jobs in each live state (validating_files, queued, running, paused), zeros included."""
    counts = dict.fromkeys(LIVE_STATUSES, 0)
    for status, count in session.execute(
        select(m.Job.status, func.count())
        .where(m.Job.status.in_(LIVE_STATUSES))
        .group_by(m.Job.status)
    ):
        counts[status] = int(count)
    return counts


def tenants_of(*, session: Session, job_ids: list[str]) -> dict[str, str]:
    """job id -> its tenant's id."""
    if not job_ids:
        return {}
    rows = session.execute(select(m.Job.id, m.Job.tenant_id).where(m.Job.id.in_(job_ids)))
    return {job_id: tenant_id for job_id, tenant_id in rows}
