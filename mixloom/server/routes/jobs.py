"""Fine-tuning jobs: create, list, get, cancel/pause/resume, events, metrics, checkpoints,
adapter downloads, and deleting a finished job's checkpoints and adapter."""

from __future__ import annotations

import io
import logging
import re
import secrets
from typing import Annotated, Any

from fastapi import APIRouter, Query
from fastapi.responses import FileResponse, RedirectResponse, Response, StreamingResponse
from sqlalchemy.orm import Session

from mixloom.config import Settings
from mixloom.data.formats import Format, file_format
from mixloom.errors import (
    ConfigError,
    ObjectNotFoundError,
    Problem,
    ProblemList,
    QuotaExceededError,
    RequestError,
    StateConflictError,
    ValidationError,
)
from mixloom.eval.tasks import resolve_name, task_names
from mixloom.jobspec import EvaluationRequest, Method, limit_problems, steps_problems
from mixloom.server.deps import (
    CheckpointId,
    Context,
    CurrentTenant,
    Cursor,
    IdempotencyKey,
    JobId,
    ServerContext,
)
from mixloom.server.errors import ERROR_RESPONSES, ObjectGoneError
from mixloom.server.idempotency import create_once
from mixloom.server.registry import ServedModel, base_id_of, find_base, job_model_id
from mixloom.server.schemas import (
    AdapterDeleted,
    CheckpointDeleted,
    CheckpointPublic,
    CheckpointsDeleted,
    CheckpointsPublic,
    EvaluationPublic,
    EventPublic,
    EventsPublic,
    JobCreate,
    JobPublic,
    JobsPublic,
    MetricPublic,
    MetricsPublic,
)
from mixloom.storage import archives, files, jobs, objects, tenants, workers
from mixloom.storage.records import (
    CheckpointRecord,
    EventRecord,
    FileRecord,
    JobRecord,
    JobStatus,
    MetricRecord,
    TenantRecord,
)

router = APIRouter(tags=["fine_tuning"], responses=ERROR_RESPONSES)
log = logging.getLogger("mixloom.server")

JOBS = "/v1/fine_tuning/jobs"
_EVENT_ID = re.compile(r"^ftevent-(\d{1,18})$")
ZIP_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {
        "content": {"application/zip": {}},
        "description": "adapter_config.json + weights (adapter_model.safetensors, or with "
        "format=mixlora adapter_model.bin) + mixloom_adapter.json, built as it streams",
    },
    410: {"description": "the adapter was recorded but is gone from disk"},
}
ArchiveFormat = Annotated[
    archives.Format,
    Query(
        description='"safetensors" (default): the files as stored, for PEFT (LoRA) and '
        'mixloom.load_adapter_model; "mixlora": adapter_model.bin in place of the '
        "safetensors file, for the `mixlora` package (MixLoRA adapters only)"
    ),
]


def method_json(method: Method) -> dict[str, Any]:
    """The method with every hyperparameter filled in, as stored and shown."""
    return method.to_json()


def _check_against_model(
    ctx: ServerContext, body: JobCreate, method: Method
) -> tuple[ServedModel, Method]:
    """The served model, and every hyperparameter under the deployment's bounds; a
    max_seq_len left unset is fitted to the model's context (a body written for another
    model, as OpenAI's are, does not name one)."""
    served = find_base(ctx.models, body.model)
    if served is not None:
        method = method.within_context(served.max_position_embeddings)
    problems = ProblemList(limit_problems(method, ctx.settings))
    if served is None:
        names = ", ".join(m.id for m in ctx.models)
        problems.add(
            "model",
            f"this deployment does not fine-tune {body.model!r}; use one of: {names} "
            "(GET /v1/models)",
        )
    seq = method.hyperparameters.max_seq_len
    context = served.max_position_embeddings if served else seq
    if ctx.settings.max_seq_len >= seq > context:
        problems.add(
            method.where("max_seq_len"),
            f"{seq} exceeds the {context} tokens {body.model} takes",
        )
    problems.raise_if_any(ConfigError)
    assert served is not None
    return served, method


def _check_storage(ctx: ServerContext, session: Session, tenant: TenantRecord) -> None:
    """Refuse a job once the tenant's storage quota is used up: a job stores checkpoints
    and an adapter (the worker checks the quota before writing each)."""
    usage = tenants.tenant_usage(session=session, tenant_id=tenant.id)
    quota = tenant.max_total_bytes or ctx.settings.max_tenant_bytes
    used = usage["stored_bytes"]
    if used >= quota:
        raise QuotaExceededError(
            f"storage quota max_total_bytes is {quota:,} bytes and {used:,} are stored "
            f"(files {usage['file_bytes']:,}, checkpoints {usage['checkpoint_bytes']:,}, "
            f"adapters {usage['adapter_bytes']:,}), which leaves none for a new job's "
            f"checkpoints and adapter; delete files, finished jobs' checkpoints (DELETE "
            f"{JOBS}/{{id}}/checkpoints) or adapters (DELETE {JOBS}/{{id}}/adapter), or ask "
            "an admin for a larger quota",
            code="storage_quota_exceeded",
        )


def _check_file(session: Session, tenant: TenantRecord, file_id: str, param: str) -> FileRecord:
    """The file; ObjectNotFoundError naming `param` if it is not the tenant's."""
    try:
        return files.get_file(session=session, file_id=file_id, tenant_id=tenant.id)
    except ObjectNotFoundError:
        raise ObjectNotFoundError(
            f"{param}: no file with id {file_id!r}; upload the file first (POST /v1/files, "
            "or `mixloom files upload PATH`) and give the id it gets",
            param=param,
            code="file_not_found",
        ) from None


def _format_problems(
    settings: Settings, method: Method, file: FileRecord, param: str
) -> list[Problem]:
    """A dpo job takes preference rows, and only a dpo job does. An upload holds one format,
    so its first row tells which without reading the rest; ObjectGoneError naming `param`
    when the file is no longer on disk."""
    try:
        store, key = objects.resolve(objects.open_store(settings), file.path)
        with store.open(key) as stream:
            fmt = file_format(stream)
    except OSError:
        raise ObjectGoneError(
            f"{param}: file {file.id} was removed from the server's disk; upload it again "
            "and give the id it gets",
            param=param,
            code="file_missing",
        ) from None
    if method.objective == "dpo" and fmt is not Format.PREFERENCE:
        rows = f"{fmt.value} rows" if fmt else f"no training rows (purpose {file.purpose!r})"
        return [
            Problem(
                param,
                "the dpo method needs preference rows "
                f'({{"input", "preferred_output", "non_preferred_output"}}), and file {file.id} '
                f"has {rows}; upload the pairs in that format",
            )
        ]
    if method.objective == "supervised" and fmt is Format.PREFERENCE:
        return [
            Problem(
                param,
                f'file {file.id} has preference rows, which are for method.type "dpo"; use '
                "that method, or a file of chat, prompt/completion, alpaca or text rows",
            )
        ]
    return []


def _evaluation(
    session: Session, tenant: TenantRecord, request: EvaluationRequest | None
) -> dict[str, Any] | None:
    """What the job will be evaluated on, each task checked: a built-in task's name, or one
    of the tenant's files uploaded with purpose "evals" (ValidationError naming the task)."""
    if request is None:
        return None
    problems = []
    for i, task in enumerate(request.tasks):
        where = f"evaluation.tasks[{i}]"
        if task.startswith("file-"):
            try:
                record = files.get_file(session=session, file_id=task, tenant_id=tenant.id)
            except ObjectNotFoundError:
                problems.append(Problem(where, f"no file with id {task!r}; upload it first"))
                continue
            if record.purpose != "evals":
                problems.append(
                    Problem(
                        where,
                        f"file {task} was uploaded for {record.purpose!r}; an evaluation task "
                        'is a file uploaded with purpose "evals" ({"query", "choices", "gold"} '
                        "rows)",
                    )
                )
        elif resolve_name(task) is None:
            problems.append(
                Problem(
                    where,
                    f"unknown task {task!r}; use one of {', '.join(task_names())} or the id "
                    'of a file uploaded with purpose "evals"',
                )
            )
    ProblemList(problems).raise_if_any(ValidationError)
    return {"request": request.model_dump(), "status": "pending"}


def _public(ctx: ServerContext, session: Session, job: JobRecord) -> JobPublic:
    return JobPublic.of(
        job,
        model=base_id_of(ctx.models, job.model),
        queue_position=jobs.queue_position(session=session, job=job),
    )


def _notify(ctx: ServerContext, job_id: str, after_seq: int, *, wake: bool) -> None:
    """After commit: push the events a change added to live SSE streams, and wake idle
    workers. Best effort: the change is stored, streams and workers also poll the database,
    so a bus outage (Redis down) must not turn a done request into an error."""
    try:
        with ctx.db.transaction() as session:
            new = jobs.progress_since(session=session, job_id=job_id, after_seq=after_seq)
        for record in new:
            ctx.bus.publish(job_id, record.to_message())
        if wake:
            ctx.bus.wake()
    except Exception:
        log.warning(
            "progress bus unavailable; job %s changes reach streams by polling",
            job_id,
            exc_info=True,
        )


@router.post(JOBS, response_model=JobPublic)
def create_job(
    ctx: Context, tenant: CurrentTenant, body: JobCreate, idempotency_key: IdempotencyKey = None
) -> Any:
    """Validate the job against the served base model and the tenant's files, and queue it.
    A method that names no adapter (OpenAI's `supervised` body, or its older top-level
    `hyperparameters`) trains the deployment's default adapter (MIXLOOM_DEFAULT_ADAPTER)."""
    method = body.training_method.with_default_adapter(ctx.settings.default_adapter)
    served, method = _check_against_model(ctx, body, method)

    def create(session: Session) -> JobPublic:
        training = _check_file(session, tenant, body.training_file, "training_file")
        problems = _format_problems(ctx.settings, method, training, "training_file")
        if body.validation_file is not None:
            validation = _check_file(session, tenant, body.validation_file, "validation_file")
            problems += _format_problems(ctx.settings, method, validation, "validation_file")
        evaluation = _evaluation(session, tenant, body.evaluation)
        problems += steps_problems(method, ctx.settings, training.rows)
        ProblemList(problems).raise_if_any(ConfigError)
        tenants.lock_tenant(session=session, tenant_id=tenant.id)
        _check_storage(ctx, session, tenant)
        waiting = tenants.tenant_usage(session=session, tenant_id=tenant.id)
        cap = tenant.max_queued_jobs or ctx.settings.max_queued_jobs
        if waiting["waiting_jobs"] >= cap:
            raise QuotaExceededError(
                f"this tenant already has {waiting['waiting_jobs']} jobs waiting "
                f"(the limit is {cap}); wait for some to start or cancel them",
                code="job_quota_exceeded",
            )
        job = jobs.create_job(
            session=session,
            tenant_id=tenant.id,
            model=served.source,  # what workers holding this base claim by
            model_name=served.id,
            training_file_id=body.training_file,
            validation_file_id=body.validation_file,
            method=method_json(method),
            seed=body.seed if body.seed is not None else secrets.randbelow(2**31),
            suffix=body.suffix,
            metadata=body.metadata,
            evaluation=evaluation,
        )
        workers.tell_if_unheld(session=session, job_id=job.id, source=served.source, base=served.id)
        return _public(ctx, session, job)

    created = create_once(
        ctx.db,
        tenant_id=tenant.id,
        key=idempotency_key,
        path=JOBS,
        request=body.model_dump(mode="json"),
        create=create,
    )
    if isinstance(created, JobPublic):
        _notify(ctx, created.id, 0, wake=True)
    return created


@router.get(JOBS, response_model=JobsPublic)
async def list_jobs(
    ctx: Context,
    tenant: CurrentTenant,
    after: Cursor = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    status: JobStatus | None = None,
) -> JobsPublic:
    """Newest first. `after`: the last id of the previous page."""

    def read(session: Session) -> JobsPublic:
        page, has_more = jobs.list_jobs(
            session=session, tenant_id=tenant.id, after=after, limit=limit, status=status
        )
        return JobsPublic(data=[_public(ctx, session, j) for j in page], has_more=has_more)

    return await ctx.read(read)


@router.get(JOBS + "/{job_id}", response_model=JobPublic)
async def get_job(ctx: Context, tenant: CurrentTenant, job_id: JobId) -> JobPublic:
    return await ctx.read(
        lambda s: _public(ctx, s, jobs.get_job(session=s, job_id=job_id, tenant_id=tenant.id))
    )


def _transition(ctx: ServerContext, tenant: TenantRecord, job_id: str, action: Any) -> JobPublic:
    with ctx.db.transaction() as session:
        before = jobs.get_job(session=session, job_id=job_id, tenant_id=tenant.id)
        job = action(session=session, job_id=job_id, tenant_id=tenant.id)
        public = _public(ctx, session, job)
    requeued = job.status == JobStatus.QUEUED and before.status != JobStatus.QUEUED
    if job.last_seq != before.last_seq:
        _notify(ctx, job_id, before.last_seq, wake=requeued)
    return public


@router.post(JOBS + "/{job_id}/cancel", response_model=JobPublic)
def cancel_job(ctx: Context, tenant: CurrentTenant, job_id: JobId) -> JobPublic:
    """Queued or paused: cancelled at once. Running: `requested_action` becomes "cancel"
    and the worker stops the job within a heartbeat. A cancelled job: returned unchanged."""
    return _transition(ctx, tenant, job_id, jobs.cancel_job)


@router.post(JOBS + "/{job_id}/pause", response_model=JobPublic)
def pause_job(ctx: Context, tenant: CurrentTenant, job_id: JobId) -> JobPublic:
    """Queued: paused at once. Running: `requested_action` becomes "pause"; the worker
    saves a checkpoint and releases it as paused."""
    return _transition(ctx, tenant, job_id, jobs.pause_job)


@router.post(JOBS + "/{job_id}/resume", response_model=JobPublic)
def resume_job(ctx: Context, tenant: CurrentTenant, job_id: JobId) -> JobPublic:
    """Paused: queued again (training resumes from the last checkpoint). Running with a
    pending pause: the request is withdrawn."""
    return _transition(ctx, tenant, job_id, jobs.resume_job)


@router.get(JOBS + "/{job_id}/evaluation", response_model=EvaluationPublic)
async def get_evaluation(ctx: Context, tenant: CurrentTenant, job_id: JobId) -> EvaluationPublic:
    """The job's evaluation (its `evaluation` body field): pending until the job has trained,
    then its adapter and the base model scored on each task; "not_requested" when the job
    asked for none."""

    def read(session: Session) -> EvaluationPublic:
        return EvaluationPublic.of(
            jobs.get_job(session=session, job_id=job_id, tenant_id=tenant.id)
        )

    return await ctx.read(read)


@router.get(JOBS + "/{job_id}/events", response_model=EventsPublic)
async def list_events(
    ctx: Context,
    tenant: CurrentTenant,
    job_id: JobId,
    after: Annotated[str | None, Query(max_length=64, description="an event id")] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> EventsPublic:
    """Newest first. `after`: the last event id of the previous page."""
    after_id = None
    if after is not None:
        match = _EVENT_ID.match(after)
        if match is None:
            raise ValidationError(f"{after!r} is not an event id (ftevent-N)", where="after")
        after_id = int(match.group(1))

    def read(session: Session) -> tuple[list[EventRecord], bool]:
        jobs.get_job(session=session, job_id=job_id, tenant_id=tenant.id)
        return jobs.list_events(session=session, job_id=job_id, after=after_id, limit=limit)

    page, has_more = await ctx.read(read)
    return EventsPublic(data=[EventPublic.of(e) for e in page], has_more=has_more)


@router.get(JOBS + "/{job_id}/metrics", response_model=MetricsPublic)
async def list_metrics(
    ctx: Context,
    tenant: CurrentTenant,
    job_id: JobId,
    after: Annotated[int | None, Query(ge=0, le=2**31 - 1, description="a step")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> MetricsPublic:
    """Oldest step first. `after`: the last step of the previous page."""

    def read(session: Session) -> tuple[list[MetricRecord], bool]:
        jobs.get_job(session=session, job_id=job_id, tenant_id=tenant.id)
        return jobs.list_metrics(session=session, job_id=job_id, after_step=after, limit=limit)

    page, has_more = await ctx.read(read)
    return MetricsPublic(data=[MetricPublic.of(r) for r in page], has_more=has_more)


@router.get(JOBS + "/{job_id}/checkpoints", response_model=CheckpointsPublic)
async def list_checkpoints(
    ctx: Context,
    tenant: CurrentTenant,
    job_id: JobId,
    after: Cursor = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 10,
) -> CheckpointsPublic:
    """Newest first. `after`: the last checkpoint id of the previous page."""

    def read(session: Session) -> tuple[JobRecord, list[CheckpointRecord], bool]:
        job = jobs.get_job(session=session, job_id=job_id, tenant_id=tenant.id)
        page, has_more = jobs.list_checkpoints(
            session=session, job_id=job_id, after=after, limit=limit
        )
        return job, page, has_more

    job, page, has_more = await ctx.read(read)
    model = job_model_id(ctx.models, job)
    data = [CheckpointPublic.of(c, model) for c in page]
    return CheckpointsPublic(
        data=data,
        has_more=has_more,
        first_id=data[0].id if data else None,
        last_id=data[-1].id if data else None,
    )


def _zip(
    settings: Settings, path: str, filename: str, format: archives.Format = "safetensors"
) -> Response:
    """The stored adapter at `path` (a row's location: a folder, locally or in S3) as a zip,
    its files streamed from the store into the zip as it streams out; with
    storage_downloads=redirect (S3), the zip is written to the store once, beside the
    folder, and the answer is a 307 to a presigned URL of it. A zip stored before one
    copy is sent as it is."""
    store, key = objects.resolve(objects.open_store(settings), path)
    if settings.storage_downloads == "redirect" and not isinstance(store, objects.LocalStore):
        return _redirect_zip(settings, store, key, filename, format)
    try:
        chunks = archives.stream_adapter_zip(store, key, format)
        first = next(chunks)  # a refused format is a 400 before the 200 goes out
    except archives.ArchiveError as exc:
        raise RequestError(str(exc), param="format", code="invalid_value") from None
    except FileNotFoundError:
        if isinstance(store, objects.LocalStore) and store.size(key) is not None:
            return FileResponse(store.path(key), media_type="application/zip", filename=filename)
        raise ObjectGoneError(
            f"the adapter {filename} was removed from storage", code="archive_missing"
        ) from None

    def stream() -> Any:
        yield first
        yield from chunks

    return StreamingResponse(
        stream(),
        media_type="application/zip",
        headers={"Content-Disposition": f'attachment; filename="{filename}"'},
    )


def _redirect_zip(
    settings: Settings,
    store: objects.ObjectStore,
    key: str,
    filename: str,
    format: archives.Format,
) -> Response:
    """A 307 to a presigned URL of the adapter's zip, written to the store (as a multipart
    upload of the stream) the first time it is asked for."""
    zipped = archives.zip_key(key, format)
    if store.size(zipped) is None:
        try:
            chunks = archives.stream_adapter_zip(store, key, format)
            store.put_stream(zipped, io.BufferedReader(archives.ChunkReader(chunks)))
        except archives.ArchiveError as exc:
            raise RequestError(str(exc), param="format", code="invalid_value") from None
        except FileNotFoundError:
            raise ObjectGoneError(
                f"the adapter {filename} was removed from storage", code="archive_missing"
            ) from None
    url = store.presign(zipped, filename, settings.storage_presign_seconds)
    assert url is not None  # S3 presigns
    return RedirectResponse(url, status_code=307)


@router.get(JOBS + "/{job_id}/adapter", response_class=FileResponse, responses=ZIP_RESPONSE)
def download_adapter(
    ctx: Context, tenant: CurrentTenant, job_id: JobId, format: ArchiveFormat = "safetensors"
) -> Response:
    """The trained adapter as a zip (PEFT layout for LoRA, MixLoRA layout for MixLoRA; its
    adapter_config.json names the base by its public id). 409 until the job has succeeded;
    checkpoints are downloadable earlier."""
    with ctx.db.transaction() as session:
        job = jobs.get_job(session=session, job_id=job_id, tenant_id=tenant.id)
    if job.adapter_deleted_at is not None:
        raise ObjectGoneError(
            f"the adapter of job {job.id} was deleted (DELETE {JOBS}/{job.id}/adapter at "
            f"{job.adapter_deleted_at:%Y-%m-%d %H:%M:%S} UTC); its remaining checkpoints "
            f"are listed at GET {JOBS}/{job.id}/checkpoints",
            param="job_id",
            code="adapter_deleted",
        )
    if job.adapter_path is None:
        if job.status in (JobStatus.FAILED, JobStatus.CANCELLED):
            hint = "it has no final adapter; its checkpoints may be downloadable"
        else:
            hint = "the adapter is written when it succeeds; try again then"
        raise StateConflictError(
            f"job {job.id} is {job.status.value}: {hint}", param="job_id", code="adapter_not_ready"
        )
    return _zip(ctx.settings, job.adapter_path, f"{job.id}-adapter.zip", format)


@router.get(
    JOBS + "/{job_id}/checkpoints/{checkpoint_id}/adapter",
    response_class=FileResponse,
    responses=ZIP_RESPONSE,
)
def download_checkpoint(
    ctx: Context,
    tenant: CurrentTenant,
    job_id: JobId,
    checkpoint_id: CheckpointId,
    format: ArchiveFormat = "safetensors",
) -> Response:
    """A checkpoint's adapter as a zip, in the same layout as the final one."""
    with ctx.db.transaction() as session:
        jobs.get_job(session=session, job_id=job_id, tenant_id=tenant.id)
        ckpt = jobs.get_checkpoint(session=session, job_id=job_id, checkpoint_id=checkpoint_id)
    return _zip(ctx.settings, ckpt.path, f"{job_id}-step-{ckpt.step}.zip", format)


def delete_checkpoints_of(
    ctx: ServerContext, tenant: TenantRecord, job_id: str, checkpoint_id: str | None
) -> list[CheckpointRecord]:
    """Delete a finished job's checkpoints (all, or one) and then their files; tell live
    streams. Also DELETE /v1/models/{id} of a checkpoint model."""
    with ctx.db.transaction() as session:
        before = jobs.get_job(session=session, job_id=job_id, tenant_id=tenant.id)
        removed = jobs.delete_checkpoints(
            session=session, job_id=job_id, tenant_id=tenant.id, checkpoint_id=checkpoint_id
        )
    jobs.remove_stored_files((c.path for c in removed), store=objects.open_store(ctx.settings))
    if removed:
        _notify(ctx, job_id, before.last_seq, wake=False)
    return removed


@router.delete(JOBS + "/{job_id}/checkpoints", response_model=CheckpointsDeleted)
def delete_checkpoints(ctx: Context, tenant: CurrentTenant, job_id: JobId) -> CheckpointsDeleted:
    """Every checkpoint of a finished job (succeeded, failed or cancelled; 409 before),
    freeing their bytes from the storage quota. Again: an empty list."""
    removed = delete_checkpoints_of(ctx, tenant, job_id, None)
    return CheckpointsDeleted(
        data=[CheckpointDeleted(id=c.id, bytes=c.bytes) for c in removed],
        bytes=sum(c.bytes for c in removed),
    )


@router.delete(JOBS + "/{job_id}/checkpoints/{checkpoint_id}", response_model=CheckpointDeleted)
def delete_checkpoint(
    ctx: Context, tenant: CurrentTenant, job_id: JobId, checkpoint_id: CheckpointId
) -> CheckpointDeleted:
    """One checkpoint of a finished job (409 before); 404 once it is gone."""
    (removed,) = delete_checkpoints_of(ctx, tenant, job_id, checkpoint_id)
    return CheckpointDeleted(id=removed.id, bytes=removed.bytes)


@router.delete(JOBS + "/{job_id}/adapter", response_model=AdapterDeleted)
def delete_adapter(ctx: Context, tenant: CurrentTenant, job_id: JobId) -> AdapterDeleted:
    """The final adapter of a finished job (409 before), freeing its bytes from the storage
    quota. The job stays, `fine_tuned_model` too; `adapter_deleted_at` is set and its
    download answers 410. Again: 0 bytes freed."""
    return AdapterDeleted(id=job_id, bytes=delete_adapter_of(ctx, tenant, job_id))


def delete_adapter_of(ctx: ServerContext, tenant: TenantRecord, job_id: str) -> int:
    """Delete a finished job's final adapter and then its file; tell live streams. Returns
    the bytes freed (0 when it was gone). Also DELETE /v1/models/{id} of a fine-tuned model."""
    with ctx.db.transaction() as session:
        before = jobs.get_job(session=session, job_id=job_id, tenant_id=tenant.id)
        path, freed = jobs.delete_adapter(session=session, job_id=job_id, tenant_id=tenant.id)
    if path is not None:
        jobs.remove_stored_files([path], store=objects.open_store(ctx.settings))
        _notify(ctx, job_id, before.last_seq, wake=False)
    return freed
