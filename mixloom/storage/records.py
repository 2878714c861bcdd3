"""Frozen records handed out by storage functions (never live ORM objects), and the job status."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

from mixloom.storage import models as m


class JobStatus(StrEnum):
    VALIDATING_FILES = "validating_files"
    QUEUED = "queued"
    RUNNING = "running"
    PAUSED = "paused"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATUSES


TERMINAL_STATUSES = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})
# Jobs that count against a tenant's max_queued_jobs: waiting for, or between, worker turns.
WAITING_STATUSES = frozenset({JobStatus.VALIDATING_FILES, JobStatus.QUEUED, JobStatus.PAUSED})


class RequestedAction(StrEnum):
    """What the API asked of a running job; the worker holding its lease carries it out."""

    CANCEL = "cancel"
    PAUSE = "pause"


@dataclass(frozen=True)
class TenantRecord:
    id: str
    name: str
    created_at: datetime
    max_queued_jobs: int | None
    max_running_jobs: int | None
    max_file_bytes: int | None
    max_total_bytes: int | None

    @classmethod
    def from_row(cls, row: m.Tenant) -> TenantRecord:
        return cls(
            id=row.id,
            name=row.name,
            created_at=row.created_at,
            max_queued_jobs=row.max_queued_jobs,
            max_running_jobs=row.max_running_jobs,
            max_file_bytes=row.max_file_bytes,
            max_total_bytes=row.max_total_bytes,
        )


@dataclass(frozen=True)
class ApiKeyRecord:
    id: str
    tenant_id: str
    prefix: str
    created_at: datetime
    revoked_at: datetime | None

    @classmethod
    def from_row(cls, row: m.ApiKey) -> ApiKeyRecord:
        return cls(
            id=row.id,
            tenant_id=row.tenant_id,
            prefix=row.prefix,
            created_at=row.created_at,
            revoked_at=row.revoked_at,
        )


@dataclass(frozen=True)
class FileRecord:
    id: str
    tenant_id: str
    filename: str
    purpose: str
    bytes: int
    rows: int
    sha256: str
    path: str
    status: str
    created_at: datetime

    @classmethod
    def from_row(cls, row: m.File) -> FileRecord:
        return cls(
            id=row.id,
            tenant_id=row.tenant_id,
            filename=row.filename,
            purpose=row.purpose,
            bytes=row.bytes,
            rows=row.rows,
            sha256=row.sha256,
            path=row.path,
            status=row.status,
            created_at=row.created_at,
        )


@dataclass(frozen=True)
class JobRecord:
    id: str
    tenant_id: str
    model: str
    training_file_id: str
    validation_file_id: str | None
    method: dict[str, Any]  # jobspec.Method as JSON, every hyperparameter filled in
    seed: int
    suffix: str | None
    metadata: dict[str, Any] | None
    status: JobStatus
    requested_action: RequestedAction | None
    error: dict[str, Any] | None
    fine_tuned_model: str | None
    adapter_path: str | None
    trained_tokens: int | None
    created_at: datetime
    updated_at: datetime
    queued_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    worker_id: str | None
    lease_expires_at: datetime | None
    heartbeat_at: datetime | None
    attempts: int
    last_seq: int

    @classmethod
    def from_row(cls, row: m.Job) -> JobRecord:
        return cls(
            id=row.id,
            tenant_id=row.tenant_id,
            model=row.model,
            training_file_id=row.training_file_id,
            validation_file_id=row.validation_file_id,
            method=dict(row.method),
            seed=row.seed,
            suffix=row.suffix,
            metadata=dict(row.meta) if row.meta is not None else None,
            status=JobStatus(row.status),
            requested_action=RequestedAction(row.requested_action)
            if row.requested_action
            else None,
            error=dict(row.error) if row.error is not None else None,
            fine_tuned_model=row.fine_tuned_model,
            adapter_path=row.adapter_path,
            trained_tokens=row.trained_tokens,
            created_at=row.created_at,
            updated_at=row.updated_at,
            queued_at=row.queued_at,
            started_at=row.started_at,
            finished_at=row.finished_at,
            worker_id=row.worker_id,
            lease_expires_at=row.lease_expires_at,
            heartbeat_at=row.heartbeat_at,
            attempts=row.attempts,
            last_seq=row.last_seq,
        )


@dataclass(frozen=True)
class EventRecord:
    id: int
    job_id: str
    seq: int
    created_at: datetime
    level: str
    type: str
    message: str
    data: dict[str, Any] | None

    @classmethod
    def from_row(cls, row: m.JobEvent) -> EventRecord:
        return cls(
            id=row.id,
            job_id=row.job_id,
            seq=row.seq,
            created_at=row.created_at,
            level=row.level,
            type=row.type,
            message=row.message,
            data=dict(row.data) if row.data is not None else None,
        )

    def to_message(self) -> dict[str, Any]:
        """The progress-bus / SSE form; `id` is the job-wide sequence number."""
        return {
            "id": self.seq,
            "event": "event",
            "data": {
                "id": f"ftevent-{self.id}",
                "object": "fine_tuning.job.event",
                "created_at": int(self.created_at.timestamp()),
                "level": self.level,
                "type": self.type,
                "message": self.message,
                "data": self.data,
            },
        }


@dataclass(frozen=True)
class MetricRecord:
    id: int
    job_id: str
    seq: int
    step: int
    created_at: datetime
    values: dict[str, Any]

    @classmethod
    def from_row(cls, row: m.JobMetric) -> MetricRecord:
        return cls(
            id=row.id,
            job_id=row.job_id,
            seq=row.seq,
            step=row.step,
            created_at=row.created_at,
            values=dict(row.values),
        )

    def to_message(self) -> dict[str, Any]:
        return {
            "id": self.seq,
            "event": "metrics",
            "data": {
                "object": "fine_tuning.job.metric",
                "step": self.step,
                "created_at": int(self.created_at.timestamp()),
                "metrics": self.values,
            },
        }


@dataclass(frozen=True)
class CheckpointRecord:
    id: str
    job_id: str
    step: int
    path: str
    metrics: dict[str, Any] | None
    created_at: datetime

    @classmethod
    def from_row(cls, row: m.Checkpoint) -> CheckpointRecord:
        return cls(
            id=row.id,
            job_id=row.job_id,
            step=row.step,
            path=row.path,
            metrics=dict(row.metrics) if row.metrics is not None else None,
            created_at=row.created_at,
        )
