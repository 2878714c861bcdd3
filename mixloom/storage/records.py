"""Frozen records handed out by storage functions (never live ORM objects), and the job status."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any, ClassVar, Self


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
class Record:
    """A frozen copy of an ORM row: each field read from the column of the same name."""

    # field -> column, where the ORM needs another name
    _columns: ClassVar[dict[str, str]] = {}
    # field -> the enum its stored string becomes
    _enums: ClassVar[dict[str, type[StrEnum]]] = {}

    @classmethod
    def from_row(cls, row: Any) -> Self:
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            value = getattr(row, cls._columns.get(f.name, f.name))
            if isinstance(value, dict):
                value = dict(value)  # a JSON column: a copy the caller cannot change the row by
            elif value is not None and f.name in cls._enums:
                value = cls._enums[f.name](value)
            values[f.name] = value
        return cls(**values)


@dataclass(frozen=True)
class TenantRecord(Record):
    id: str
    name: str
    created_at: datetime
    max_queued_jobs: int | None
    max_running_jobs: int | None
    max_file_bytes: int | None
    max_total_bytes: int | None


@dataclass(frozen=True)
class ApiKeyRecord(Record):
    id: str
    tenant_id: str
    prefix: str
    created_at: datetime
    revoked_at: datetime | None


@dataclass(frozen=True)
class FileRecord(Record):
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


@dataclass(frozen=True)
class JobRecord(Record):
    _columns: ClassVar[dict[str, str]] = {"metadata": "meta"}  # a reserved name in SQLAlchemy
    _enums: ClassVar[dict[str, type[StrEnum]]] = {
        "status": JobStatus,
        "requested_action": RequestedAction,
    }

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
    crashes: int
    adapter_bytes: int | None
    adapter_deleted_at: datetime | None
    last_seq: int
    evaluation: dict[str, Any] | None = None  # what to evaluate, and how it went


@dataclass(frozen=True)
class EventRecord(Record):
    id: int
    job_id: str
    seq: int
    created_at: datetime
    level: str
    type: str
    message: str
    data: dict[str, Any] | None

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


# Stored with a step's metrics for operators, never sent to a tenant: which worker process
# (host:pid by default) trained the step.
OPERATOR_METRICS = frozenset({"worker_id"})


@dataclass(frozen=True)
class MetricRecord(Record):
    id: int
    job_id: str
    seq: int
    step: int
    created_at: datetime
    values: dict[str, Any]

    def to_message(self) -> dict[str, Any]:
        """The progress-bus / SSE / API form, the one a tenant sees: without the values
        stored for operators alone (`OPERATOR_METRICS`)."""
        values = {k: v for k, v in self.values.items() if k not in OPERATOR_METRICS}
        if isinstance(values.get("shared_with"), list):
            # stored before shared_with became a count: the job ids may be other tenants'
            values["shared_with"] = len(values["shared_with"])
        return {
            "id": self.seq,
            "event": "metrics",
            "data": {
                "object": "fine_tuning.job.metric",
                "step": self.step,
                "created_at": int(self.created_at.timestamp()),
                "metrics": values,
            },
        }


@dataclass(frozen=True)
class CheckpointRecord(Record):
    id: str
    job_id: str
    step: int
    path: str
    metrics: dict[str, Any] | None
    created_at: datetime
    bytes: int
