"""The models this deployment serves, by their public ids, without loading them (no torch).

Two kinds of model have ids (mixloom/model_ids.py has the rules):

- base models: each of MIXLOOM_BASE_MODELS (or the one MIXLOOM_BASE_MODEL names), by its
  public id (`served_models`); a job's row stores its base's source, what workers holding
  that base claim by;
- fine-tuned models: a succeeded job's final adapter (`ft:BASE:ORG:SUFFIX:JOB`) and each
  of a job's checkpoints (that id and `:ckpt-step-N`), visible to their tenant alone.

`resolve_model` is the one place that turns an id a caller sent into one of them, scoped
to the caller's tenant; the model routes and the inference routes both use it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from sqlalchemy.orm import Session

from mixloom.config import Settings
from mixloom.errors import ObjectNotFoundError
from mixloom.model_ids import (
    DEFAULT_MODEL_ID,
    BaseModelSpec,
    base_model_id,
    checkpoint_model_id,
    fine_tuned_model_id,
    legacy_fine_tuned_model_id,
    parse_fine_tuned_model_id,
)
from mixloom.storage import jobs
from mixloom.storage.records import CheckpointRecord, JobRecord, JobStatus


@dataclass(frozen=True)
class ServedModel:
    id: str  # the public id: what GET /v1/models lists and a job's `model` names
    max_position_embeddings: int  # a job's max_seq_len may not exceed it
    description: str = ""
    # MIXLOOM_BASE_MODEL as the operator gave it (the embedded default's id, a path, a hub
    # id): what a worker loads and a job's row stores; never shown to a tenant
    source: str = ""


KNOWN_MODELS = {
    DEFAULT_MODEL_ID: ServedModel(
        DEFAULT_MODEL_ID,
        8192,
        "SmolLM2-135M-Instruct, the embedded default (offline)",
        DEFAULT_MODEL_ID,
    ),
}


def served_models(settings: Settings) -> list[ServedModel]:
    """The deployment's bases (`Settings.bases`: MIXLOOM_BASE_MODELS, or MIXLOOM_BASE_MODEL
    and its alias), in the operator's order. Each source is a known id, or a model directory
    whose config.json gives its context (else max_seq_len: a hub id is not read here).

    Raises:
        ConfigError: MIXLOOM_BASE_MODELS is malformed (at the API's start).
    """
    return [_served(settings, b) for b in settings.bases]


def _served(settings: Settings, base: BaseModelSpec) -> ServedModel:
    if base.source in KNOWN_MODELS:
        known = KNOWN_MODELS[base.source]
        return ServedModel(base.name, known.max_position_embeddings, known.description, base.source)
    context = _context_from_config(Path(base.source) / "config.json")
    return ServedModel(
        base.name, context or settings.max_seq_len, "configured base model", base.source
    )


def _context_from_config(path: Path) -> int | None:
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    value = config.get("max_position_embeddings") if isinstance(config, dict) else None
    return value if isinstance(value, int) and value > 0 else None


def find_base(models: list[ServedModel], name: str) -> ServedModel | None:
    """The served base model `name` names: by its public id, or by MIXLOOM_BASE_MODEL as the
    operator gave it (what jobs named before bases had public ids; it tells no one anything
    they did not send)."""
    return next((m for m in models if name in (m.id, m.source)), None)


def base_id_of(models: list[ServedModel], source: str) -> str:
    """The public id of the base a job's row names (`JobRecord.model`, MIXLOOM_BASE_MODEL
    as it was when the job was made): the served base's id, or else one made from it."""
    served = find_base(models, source)
    return served.id if served is not None else base_model_id(source)


def job_model_id(models: list[ServedModel], job: JobRecord) -> str:
    """The job's fine-tuned model id: the one its worker recorded when it succeeded, or the
    one it will get (its checkpoints are named after it before then)."""
    if job.fine_tuned_model:
        return job.fine_tuned_model
    return fine_tuned_model_id(
        base=base_id_of(models, job.model), org=job.tenant_id, suffix=job.suffix, job_id=job.id
    )


@dataclass(frozen=True)
class ResolvedModel:
    """What a model id names, for the model and inference routes.

    A base model: `job` is None. A fine-tuned model: `job` is the caller's job and
    `checkpoint` None (its final adapter, `job.adapter_path`) or one of its checkpoints
    (`checkpoint.path`; `checkpoint_step` its step).
    """

    id: str  # the model's public id (a legacy name resolves to the current one)
    base: str  # the public id of the base model under it
    source: str  # MIXLOOM_BASE_MODEL for that base, as a worker holding it was given it
    served: ServedModel | None  # that base as this deployment serves it; None: not served
    job: JobRecord | None = None
    checkpoint: CheckpointRecord | None = None
    checkpoint_step: int | None = None
    deleted: bool = False  # its weights were deleted (only with include_deleted=True)

    @property
    def job_id(self) -> str | None:
        return self.job.id if self.job is not None else None

    @property
    def tenant_id(self) -> str | None:
        """The owner of a fine-tuned model; None for a base model (everyone's)."""
        return self.job.tenant_id if self.job is not None else None

    @property
    def adapter_path(self) -> str | None:
        """The adapter archive (zip) of a fine-tuned model; None for a base model."""
        if self.checkpoint is not None:
            return self.checkpoint.path
        return self.job.adapter_path if self.job is not None else None


def fine_tuned(models: list[ServedModel], job: JobRecord) -> ResolvedModel:
    """A job's fine-tuned model (its final adapter), as `resolve_model` finds it by id; for
    listing a tenant's models without a query each (storage.jobs.list_fine_tuned)."""
    return ResolvedModel(
        id=job_model_id(models, job),
        base=base_id_of(models, job.model),
        source=job.model,
        served=find_base(models, job.model),
        job=job,
    )


def _not_found(model_id: str) -> ObjectNotFoundError:
    return ObjectNotFoundError(
        f"no model {model_id!r}: GET /v1/models lists the base models and your fine-tuned ones",
        param="model",
        code="model_not_found",
    )


def resolve_model(
    *,
    session: Session,
    models: list[ServedModel],
    model_id: str,
    tenant_id: str | None,
    include_deleted: bool = False,
) -> ResolvedModel:
    """The base model or the caller's fine-tuned model (or checkpoint) `model_id` names.

    Args:
        session: a database session (read-only is enough).
        models: the served base models (`ServerContext.models`).
        model_id: a base's public id (or MIXLOOM_BASE_MODEL as given), a job's
            `fine_tuned_model` (also the name it had before migration 0003), or a
            checkpoint's `fine_tuned_model_checkpoint`.
        tenant_id: the caller's tenant; None (no API key) finds base models only.
        include_deleted: also return a fine-tuned model whose weights were deleted, or a
            checkpoint id of the caller's finished job that no longer has that checkpoint,
            with `deleted` set (for an idempotent DELETE).

    Raises:
        ObjectNotFoundError (404, param "model", code "model_not_found"): no such model,
            or another tenant's (the two are answered alike, in the same words); code
            "model_deleted" for the caller's own model whose weights were deleted.
    """
    served = find_base(models, model_id)
    if served is not None:
        return ResolvedModel(id=served.id, base=served.id, source=served.source, served=served)
    parts = parse_fine_tuned_model_id(model_id)
    if tenant_id is None or parts is None:
        raise _not_found(model_id)
    try:
        job = jobs.get_job(session=session, job_id=parts.job_id, tenant_id=tenant_id)
    except ObjectNotFoundError:
        raise _not_found(model_id) from None
    current = job_model_id(models, job)
    names = {
        current,
        legacy_fine_tuned_model_id(source=job.model, suffix=job.suffix, job_id=job.id),
    }
    if parts.step is not None:
        names.add(job.id)  # the name of a checkpoint of an unfinished job before 0003
    if parts.name not in names:
        raise _not_found(model_id)
    found = replace(fine_tuned(models, job), checkpoint_step=parts.step)
    if parts.step is None:
        if job.status != JobStatus.SUCCEEDED or job.fine_tuned_model is None:
            raise _not_found(model_id)
        if job.adapter_path is None:
            if not include_deleted:
                raise _deleted(model_id, "its adapter")
            return replace(found, deleted=True)
        return found
    checkpoint = jobs.checkpoint_at_step(session=session, job_id=job.id, step=parts.step)
    found = replace(found, id=checkpoint_model_id(current, parts.step))
    if checkpoint is None:
        if include_deleted and job.status.terminal:
            return replace(found, deleted=True)
        raise _not_found(model_id)
    return replace(found, checkpoint=checkpoint)


def _deleted(model_id: str, what: str) -> ObjectNotFoundError:
    return ObjectNotFoundError(
        f"model {model_id!r} was deleted ({what} was removed with DELETE); "
        "GET /v1/models lists your models",
        param="model",
        code="model_deleted",
    )
