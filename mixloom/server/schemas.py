"""Request and response bodies of the REST API (OpenAI-style names and shapes)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from mixloom.jobspec import Method
from mixloom.server.registry import ServedModel
from mixloom.storage.records import (
    CheckpointRecord,
    EventRecord,
    FileRecord,
    JobRecord,
    JobStatus,
    MetricRecord,
    RequestedAction,
)

MAX_METADATA_KEYS = 16
MAX_METADATA_KEY_LEN = 64
MAX_METADATA_VALUE_LEN = 512


class ProblemPublic(BaseModel):
    where: str
    message: str


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None
    problems: list[ProblemPublic] | None = None  # every problem found, when there are several


class ErrorResponse(BaseModel):
    error: ErrorBody


class ModelPublic(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "mixloom"
    max_position_embeddings: int
    description: str

    @classmethod
    def of(cls, model: ServedModel, created: int) -> ModelPublic:
        return cls(
            id=model.id,
            created=created,
            max_position_embeddings=model.max_position_embeddings,
            description=model.description,
        )


class ModelsPublic(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelPublic]


class FilePublic(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: str
    rows: int  # non-blank JSONL lines, each one training example

    @classmethod
    def of(cls, f: FileRecord) -> FilePublic:
        return cls(
            id=f.id,
            bytes=f.bytes,
            created_at=int(f.created_at.timestamp()),
            filename=f.filename,
            purpose=f.purpose,
            status=f.status,
            rows=f.rows,
        )


class FilesPublic(BaseModel):
    object: Literal["list"] = "list"
    data: list[FilePublic]
    has_more: bool
    first_id: str | None
    last_id: str | None


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True


_NO_NUL = r"^[^\x00]*$"  # Postgres text cannot hold NUL
Metadata = dict[
    Annotated[str, Field(min_length=1, max_length=MAX_METADATA_KEY_LEN, pattern=_NO_NUL)],
    Annotated[str, Field(max_length=MAX_METADATA_VALUE_LEN, pattern=_NO_NUL)],
]
_FILE_ID = r"^[A-Za-z0-9_.:-]{1,64}$"


class JobCreate(BaseModel):
    """Body of POST /v1/fine_tuning/jobs. Unknown keys are errors, at every depth."""

    model_config = ConfigDict(extra="forbid")

    model: Annotated[str, Field(min_length=1, max_length=200)]
    training_file: Annotated[str, Field(pattern=_FILE_ID)]
    validation_file: Annotated[str | None, Field(pattern=_FILE_ID)] = None
    method: Method
    seed: Annotated[int | None, Field(ge=0, le=2**31 - 1)] = None  # None: a random seed, reported
    suffix: Annotated[str | None, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")] = None
    metadata: Metadata | None = None

    @field_validator("metadata")
    @classmethod
    def _few_keys(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is not None and len(value) > MAX_METADATA_KEYS:
            raise ValueError(f"at most {MAX_METADATA_KEYS} metadata keys")
        return value


class JobError(BaseModel):
    message: str
    code: str | None = None
    param: str | None = None


class JobPublic(BaseModel):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    started_at: int | None
    finished_at: int | None
    model: str
    training_file: str
    validation_file: str | None
    method: dict[str, Any]  # the method as given, every hyperparameter filled in
    seed: int
    suffix: str | None
    metadata: dict[str, Any] | None
    status: JobStatus
    requested_action: RequestedAction | None  # cancel/pause asked of the running job
    queue_position: Annotated[
        int | None,
        Field(
            description="Set only while queued: the job's fair-share round, 1 + this tenant's "
            "own jobs ahead of it (running, or queued earlier). Workers start every tenant's "
            "round-1 jobs before any round-2 job, so 1 means it starts at the next free slot "
            "but for other tenants' round-1 jobs; it counts nothing of other tenants'."
        ),
    ]
    error: JobError | None
    fine_tuned_model: str | None  # kept after the adapter is deleted, like OpenAI's
    trained_tokens: int | None
    adapter_available: bool  # GET .../adapter serves the zip
    adapter_deleted_at: int | None  # DELETE .../adapter removed it; GET .../adapter is 410

    @classmethod
    def of(cls, job: JobRecord, queue_position: int | None = None) -> JobPublic:
        return cls(
            id=job.id,
            created_at=_ts(job.created_at),
            started_at=_ts(job.started_at),
            finished_at=_ts(job.finished_at),
            model=job.model,
            training_file=job.training_file_id,
            validation_file=job.validation_file_id,
            method=job.method,
            seed=job.seed,
            suffix=job.suffix,
            metadata=job.metadata,
            status=job.status,
            requested_action=job.requested_action,
            queue_position=queue_position,
            error=JobError(**job.error) if job.error else None,
            fine_tuned_model=job.fine_tuned_model,
            trained_tokens=job.trained_tokens,
            adapter_available=job.adapter_path is not None,
            adapter_deleted_at=_ts(job.adapter_deleted_at),
        )


def _ts(value: Any) -> Any:
    return int(value.timestamp()) if value is not None else None


class JobsPublic(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobPublic]
    has_more: bool


class EventPublic(BaseModel):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: str
    type: str
    message: str
    data: dict[str, Any] | None

    @classmethod
    def of(cls, e: EventRecord) -> EventPublic:
        return cls(**e.to_message()["data"])


class EventsPublic(BaseModel):
    object: Literal["list"] = "list"
    data: list[EventPublic]
    has_more: bool


class MetricPublic(BaseModel):
    object: Literal["fine_tuning.job.metric"] = "fine_tuning.job.metric"
    step: int
    created_at: int
    metrics: dict[str, Any]

    @classmethod
    def of(cls, r: MetricRecord) -> MetricPublic:
        return cls(**r.to_message()["data"])


class MetricsPublic(BaseModel):
    object: Literal["list"] = "list"
    data: list[MetricPublic]
    has_more: bool


class CheckpointPublic(BaseModel):
    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuning_job_id: str
    step_number: int
    metrics: dict[str, Any] | None
    fine_tuned_model_checkpoint: str

    @classmethod
    def of(cls, c: CheckpointRecord, job: JobRecord) -> CheckpointPublic:
        return cls(
            id=c.id,
            created_at=int(c.created_at.timestamp()),
            fine_tuning_job_id=c.job_id,
            step_number=c.step,
            metrics=c.metrics,
            fine_tuned_model_checkpoint=f"{job.fine_tuned_model or job.id}:ckpt-step-{c.step}",
        )


class CheckpointsPublic(BaseModel):
    object: Literal["list"] = "list"
    data: list[CheckpointPublic]
    has_more: bool
    first_id: str | None
    last_id: str | None


class CheckpointDeleted(BaseModel):
    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    deleted: bool = True
    bytes: int  # freed: no longer counted against the storage quota


class CheckpointsDeleted(BaseModel):
    object: Literal["list"] = "list"
    data: list[CheckpointDeleted]  # empty when the job had none left
    bytes: int  # freed, in all


class AdapterDeleted(BaseModel):
    id: str  # the job's id: a job has one adapter
    object: Literal["fine_tuning.job.adapter"] = "fine_tuning.job.adapter"
    deleted: bool = True
    bytes: int  # freed by this request (0 when it was deleted before, or never written)


class UsagePublic(BaseModel):
    """What counts against the tenant's quotas, and the quotas."""

    object: Literal["usage"] = "usage"
    stored_bytes: int  # file_bytes + checkpoint_bytes + adapter_bytes
    file_bytes: int  # uploaded files not deleted
    checkpoint_bytes: int  # jobs' checkpoints (a job keeps its last few and its best)
    adapter_bytes: int  # succeeded jobs' final adapters not deleted
    max_total_bytes: int  # the storage quota over stored_bytes
    max_file_bytes: int  # the largest upload
    waiting_jobs: int  # validating_files, queued or paused
    max_queued_jobs: int
    running_jobs: int
    max_running_jobs: int
