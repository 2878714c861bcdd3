"""Tests that play the worker claim jobs the way it does (scheduler.queue.claim_next)."""

from __future__ import annotations

from sqlalchemy.orm import Session

from mixloom.scheduler.memory import Admission
from mixloom.scheduler.queue import claim_next
from mixloom.storage.records import JobRecord


def claim(
    session: Session,
    *,
    model: str,
    worker: str,
    lease_seconds: float = 30,
    default_max_running: int | None = None,
) -> JobRecord | None:
    """The job a worker with room for any job would claim next, or None."""
    return claim_next(
        session=session,
        worker_id=worker,
        lease_seconds=lease_seconds,
        model=model,
        fits=lambda *_: Admission(ok=True),
        default_max_running=default_max_running,
        notified=set(),
    ).claimed
