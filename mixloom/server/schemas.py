"""Request and response bodies of the REST API (OpenAI-style names and shapes)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic import ValidationError as PydanticValidationError

from mixloom.jobspec import (
    EvaluationRequest,
    Method,
    SupervisedHyperparameters,
    SupervisedMethodBody,
)
from mixloom.model_ids import PUBLIC_NAME, checkpoint_model_id
from mixloom.server.registry import ResolvedModel, ServedModel
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
    """A model a job or an inference request may name: a base model, or one of the caller's
    fine-tuned models (a succeeded job's adapter, or one of its checkpoints)."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: Annotated[
        str, Field(description='"mixloom" for a base model; the tenant id for a fine-tuned one')
    ] = "mixloom"
    max_position_embeddings: int
    description: str
    parent: Annotated[
        str | None,
        Field(description="a fine-tuned model's base model id; a checkpoint's fine-tuned model id"),
    ] = None
    fine_tuning_job_id: Annotated[str | None, Field(description="the job that trained it")] = None
    step_number: Annotated[int | None, Field(description="a checkpoint's optimizer step")] = None
    adapter: Annotated[
        Literal["lora", "mixlora"] | None,
        Field(description="the adapter a fine-tuned model applies to its base"),
    ] = None

    @classmethod
    def of(cls, model: ServedModel, created: int) -> ModelPublic:
        return cls(
            id=model.id,
            created=created,
            max_position_embeddings=model.max_position_embeddings,
            description=model.description,
        )

    @classmethod
    def resolved(cls, found: ResolvedModel, created: int) -> ModelPublic:
        """A resolved model: a base (`created`: when the server started), or a fine-tuned
        model or checkpoint (created when its job finished or the checkpoint was saved)."""
        if found.job is None:
            assert found.served is not None
            return cls.of(found.served, created)
        job = found.job
        method = Method.model_validate(job.method)
        hp = method.hyperparameters
        context = found.served.max_position_embeddings if found.served else hp.max_seq_len
        adapter = "MixLoRA" if method.adapter_type == "mixlora" else "LoRA"
        if found.checkpoint is not None:
            when = found.checkpoint.created_at
            parent = found.id.rsplit(":", 1)[0]
            what = f"{adapter} checkpoint at step {found.checkpoint.step} of job {job.id}"
        else:
            when = job.finished_at or job.updated_at
            parent = found.base
            what = f"{adapter} fine-tune of {found.base} (job {job.id})"
        return cls(
            id=found.id,
            created=int(when.timestamp()),
            owned_by=job.tenant_id,
            max_position_embeddings=context,
            description=what,
            parent=parent,
            fine_tuning_job_id=job.id,
            step_number=found.checkpoint.step if found.checkpoint is not None else None,
            adapter=method.adapter_type,
        )


class ModelsPublic(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelPublic]


class ModelDeleted(BaseModel):
    """OpenAI's answer to DELETE /v1/models/{id}, the same each time it is asked."""

    id: str
    object: Literal["model"] = "model"
    deleted: bool = True


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
    """Body of POST /v1/fine_tuning/jobs: OpenAI's (its `supervised` method, or its older
    top-level `hyperparameters`) or mixloom's (`lora` / `mixlora` methods). Unknown keys are
    errors, at every depth."""

    model_config = ConfigDict(extra="forbid")

    model: Annotated[
        str,
        Field(min_length=1, max_length=200, description="a base model's id (GET /v1/models)"),
    ]
    training_file: Annotated[str, Field(pattern=_FILE_ID)]
    validation_file: Annotated[str | None, Field(pattern=_FILE_ID)] = None
    method: Annotated[
        Method | None,
        Field(
            description='How to train. OpenAI\'s: {"type": "supervised", "supervised": '
            '{"hyperparameters": {"n_epochs", "batch_size", "learning_rate_multiplier" (each '
            "a number or \"auto\": mixloom's default) and mixloom's other training ones}, "
            '"adapter": {"type": "lora" | "mixlora", "hyperparameters": {"r", '
            '"num_experts", ...}}}}; `adapter` is mixloom\'s extension (default: the '
            "deployment's default adapter, LoRA unless its operator chose otherwise). "
            'mixloom\'s: {"type": "lora" | "mixlora", "<type>": {"hyperparameters": '
            "{...every hyperparameter...}}}. Unset: supervised with the default adapter."
        ),
    ] = None
    hyperparameters: Annotated[
        SupervisedHyperparameters | None,
        Field(
            description="OpenAI's older body: the supervised method's hyperparameters, "
            "given without `method`",
            json_schema_extra={"deprecated": True},
        ),
    ] = None
    seed: Annotated[int | None, Field(ge=0, le=2**31 - 1)] = None  # None: a random seed, reported
    suffix: Annotated[
        str | None,
        Field(
            max_length=64,
            description="up to 64 letters, digits, '_', '.' or '-', put in the fine-tuned "
            "model's id (ft:BASE:ORG:SUFFIX:JOB)",
        ),
    ] = None
    metadata: Annotated[
        Metadata | None,
        Field(
            description=f"up to {MAX_METADATA_KEYS} pairs of strings (keys up to "
            f"{MAX_METADATA_KEY_LEN} characters, values up to {MAX_METADATA_VALUE_LEN}), "
            "kept and shown with the job"
        ),
    ] = None

    evaluation: Annotated[
        EvaluationRequest | None,
        Field(
            description="mixloom's extension: evaluate the adapter and its base once the job "
            'has trained, e.g. {"tasks": ["arc_easy", "file-..."], "limit": 200}; tasks are '
            "built-in names (arc_easy, arc_challenge, boolq, openbookqa, piqa, social_iqa, "
            'hellaswag, winogrande) or ids of your files uploaded with purpose "evals"; '
            "results at GET .../evaluation"
        ),
    ] = None

    @field_validator("metadata")
    @classmethod
    def _few_keys(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is not None and len(value) > MAX_METADATA_KEYS:
            raise ValueError(
                f"{len(value)} keys; at most {MAX_METADATA_KEYS} metadata keys are kept"
            )
        return value

    @field_validator("suffix")
    @classmethod
    def _suffix_fits_an_id(cls, value: str | None) -> str | None:
        if not value:
            return None  # OpenAI's SDK may send "": no suffix
        if not PUBLIC_NAME.match(value):
            raise ValueError(
                f"{value!r} cannot be part of a model id: use up to 64 letters, digits, "
                "'_', '.' or '-'"
            )
        return value

    @field_validator("hyperparameters")
    @classmethod
    def _not_beside_a_method(
        cls, value: SupervisedHyperparameters | None, info: ValidationInfo
    ) -> SupervisedHyperparameters | None:
        if value is not None and info.data.get("method") is not None:
            raise ValueError(
                "give hyperparameters inside the method (method.<type>.hyperparameters, "
                "OpenAI's current body) or at the top level without a method (its older "
                "body), not both"
            )
        return value

    @model_validator(mode="after")
    def _one_method(self) -> JobCreate:
        if self.hyperparameters is not None:
            body = SupervisedMethodBody(hyperparameters=self.hyperparameters)
            self.method = Method(type="supervised", supervised=body)
        elif self.method is None:
            self.method = Method(type="supervised")
        return self

    @property
    def training_method(self) -> Method:
        """The method to train by (the legacy top-level hyperparameters folded in)."""
        assert self.method is not None  # set by _one_method
        return self.method


class JobError(BaseModel):
    message: str
    code: str | None = None
    param: str | None = None


class OpenAIHyperparameters(BaseModel):
    """OpenAI's top-level `hyperparameters` of a job, whichever method it was given with."""

    n_epochs: int
    batch_size: int
    learning_rate_multiplier: float  # learning_rate / mixloom's default learning_rate


class EvaluationResultPublic(BaseModel):
    """One model's score on one task (mixloom/eval/results.py's TaskResult)."""

    model: str = Field(description='"base", or the job\'s fine-tuned model')
    task: str
    n: int = Field(description="questions scored")
    acc: float | None
    acc_stderr: float | None
    acc_norm: float | None = Field(description="length-normalised accuracy (loglik protocol)")
    acc_norm_stderr: float | None


class EvaluationPublic(BaseModel):
    """GET /v1/fine_tuning/jobs/{id}/evaluation: the job's adapter and its base model scored
    on each task once the job has trained."""

    object: Literal["fine_tuning.job.evaluation"] = "fine_tuning.job.evaluation"
    status: Literal["not_requested", "pending", "succeeded", "failed"] = Field(
        description="pending until the job has trained; failed: `error` says why (the job "
        "itself still succeeded); not_requested: the job has no `evaluation`"
    )
    tasks: list[str]
    limit: int | None
    protocol: str
    num_fewshot: int
    results: list[EvaluationResultPublic]
    error: JobError | None

    @classmethod
    def of(cls, job: JobRecord) -> EvaluationPublic:
        e = job.evaluation or {}
        request = e.get("request", {})
        return cls(
            status=e.get("status", "pending"),
            tasks=request.get("tasks", []),
            limit=request.get("limit"),
            protocol=request.get("protocol", "loglik"),
            num_fewshot=request.get("num_fewshot", 0),
            results=[EvaluationResultPublic(**r) for r in e.get("results", [])],
            error=JobError(**e["error"]) if e.get("error") else None,
        )


class JobPublic(BaseModel):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    started_at: int | None
    finished_at: int | None
    model: str = Field(description="the base model's id")
    organization_id: str = Field(description="the tenant that owns the job")
    training_file: str
    validation_file: str | None
    method: dict[str, Any] = Field(
        description="the method as given (its own spelling), every hyperparameter filled in"
    )
    hyperparameters: OpenAIHyperparameters | None = Field(
        description="OpenAI's summary of the method's hyperparameters (n_epochs, batch_size, "
        "learning_rate_multiplier)"
    )
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
    fine_tuned_model: str | None = Field(
        description="the model a succeeded job made, ft:BASE:ORG:SUFFIX:JOB (a `model` for "
        "inference); kept after its adapter is deleted, like OpenAI's"
    )
    trained_tokens: int | None
    result_files: list[str] = Field(
        default_factory=list, description="always empty: metrics are at GET .../metrics"
    )
    adapter_available: bool  # GET .../adapter serves the zip
    adapter_deleted_at: int | None  # DELETE .../adapter removed it; GET .../adapter is 410
    evaluation: EvaluationPublic | None = Field(
        default=None, description="what the job asked to be evaluated on, and the results"
    )

    @classmethod
    def of(cls, job: JobRecord, *, model: str, queue_position: int | None = None) -> JobPublic:
        """`model`: the public id of the job's base (registry.base_id_of)."""
        return cls(
            id=job.id,
            created_at=_ts(job.created_at),
            started_at=_ts(job.started_at),
            finished_at=_ts(job.finished_at),
            model=model,
            organization_id=job.tenant_id,
            training_file=job.training_file_id,
            validation_file=job.validation_file_id,
            method=job.method,
            hyperparameters=_openai_hyperparameters(job.method),
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
            evaluation=EvaluationPublic.of(job) if job.evaluation else None,
        )


def _openai_hyperparameters(method: dict[str, Any]) -> OpenAIHyperparameters | None:
    try:
        return OpenAIHyperparameters(**Method.model_validate(method).openai_hyperparameters())
    except PydanticValidationError:
        return None  # a row written by a later version of mixloom


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
    def of(cls, c: CheckpointRecord, model: str) -> CheckpointPublic:
        """`model`: the job's fine-tuned model id (registry.job_model_id)."""
        return cls(
            id=c.id,
            created_at=int(c.created_at.timestamp()),
            fine_tuning_job_id=c.job_id,
            step_number=c.step,
            metrics=c.metrics,
            fine_tuned_model_checkpoint=checkpoint_model_id(model, c.step),
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
