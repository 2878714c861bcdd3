"""Public model ids: what the API calls a base model and a fine-tuned one, never a path.

- A base model's id is the operator's alias (MIXLOOM_BASE_MODEL_ALIAS) when set; else the
  embedded default's id (`smollm2-135m`); else the name of the folder (or hub repository)
  MIXLOOM_BASE_MODEL names, in letters, digits, '.', '_' and '-'.
- A fine-tuned model's id has OpenAI's shape, `ft:BASE:ORG:SUFFIX:JOB`: the base's id,
  the owning tenant's id, the job's `suffix` (empty when it has none) and the job's id.
- A checkpoint's id is its job's fine-tuned id and `:ckpt-step-N`, as OpenAI's
  `fine_tuned_model_checkpoint` is.

A deployment serves one base (MIXLOOM_BASE_MODEL) or several (MIXLOOM_BASE_MODELS,
`parse_base_models`): `Settings.bases` is the list either way, the API serves each of them
and a worker holds one (`Settings.held_base`).

Torch-free and database-free: the API names and parses ids with it (server/registry.py),
and the worker names the model a job produced (scheduler/worker.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import TYPE_CHECKING

from mixloom.errors import ConfigError, Problem

if TYPE_CHECKING:
    from mixloom.config import Settings

DEFAULT_MODEL_ID = "smollm2-135m"  # the embedded default (model/base.py loads it offline)
FINE_TUNED_PREFIX = "ft"
CHECKPOINT_TAG = "ckpt-step-"
# A base id and a suffix are single fields of a fine-tuned id: no ':' (the separator) and
# nothing a URL path would need escaped.
PUBLIC_NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_CHECKPOINT = re.compile(rf"^{CHECKPOINT_TAG}([0-9]{{1,9}})$")


def base_model_id(source: str, alias: str | None = None) -> str:
    """The public id of the base model that `source` (MIXLOOM_BASE_MODEL: the embedded
    default's id, a local folder or a hub id) names: `alias` when given, else the folder's
    or repository's last name, each run of other characters made '-'."""
    if alias:
        return alias
    if source == DEFAULT_MODEL_ID:
        return source
    name = PurePosixPath(source.replace("\\", "/").rstrip("/")).name or source
    return _UNSAFE.sub("-", name).strip("-.")[:64] or "base"


BASE_MODELS_VARIABLE = "MIXLOOM_BASE_MODELS"
BASE_MODELS_SYNTAX = "NAME=SOURCE or NAME=SOURCE|HUB_ID, separated by commas"


@dataclass(frozen=True)
class BaseModelSpec:
    """One base model of the deployment: its public id, and what a worker loads."""

    name: str  # its public id: GET /v1/models, a job's `model`, `ft:NAME:...`
    source: str  # the embedded default's id, a local folder or a hub id (MIXLOOM_BASE_MODEL)
    # what its adapters name as base_model_name_or_path (MIXLOOM_BASE_MODEL_HUB_ID); None:
    # the embedded default's hub id, or `source` itself
    hub_id: str | None = None


def parse_base_models(text: str) -> tuple[BaseModelSpec, ...]:
    """MIXLOOM_BASE_MODELS: `NAME=SOURCE[|HUB_ID]`, comma-separated, e.g.
    `small=smollm2-135m,tiny=/models/tiny|org/tiny-llama`: each base's public name, then
    what a worker loads (the embedded `smollm2-135m`, a local folder or a hub id), then
    optionally the hub id its adapters name as their base (as MIXLOOM_BASE_MODEL_HUB_ID).

    Raises:
        ConfigError: every problem at once, each naming MIXLOOM_BASE_MODELS and the entry.
    """
    problems: list[Problem] = []
    bases: list[BaseModelSpec] = []
    entries = [e.strip() for e in text.split(",")]
    for i, entry in enumerate(entries, 1):
        if not entry:
            continue
        where = f"{BASE_MODELS_VARIABLE} entry {i} ({entry!r})"
        name, sep, rest = entry.partition("=")
        source, bar, hub_id = rest.partition("|")
        name, source, hub_id = name.strip(), source.strip(), hub_id.strip()
        if not sep or not source:
            problems.append(Problem(where, f"expected {BASE_MODELS_SYNTAX}"))
            continue
        if not PUBLIC_NAME.match(name):
            problems.append(
                Problem(where, f"the name {name!r} is not 1-64 letters, digits, '.', '_' or '-'")
            )
        if bar and (not hub_id or "|" in hub_id):
            problems.append(Problem(where, f"expected one HUB_ID after '|' ({BASE_MODELS_SYNTAX})"))
        bases.append(BaseModelSpec(name, source, hub_id or None))
    for what, values in (("name", [b.name for b in bases]), ("source", [b.source for b in bases])):
        twice = sorted({v for v in values if values.count(v) > 1})
        if twice:
            problems.append(
                Problem(
                    BASE_MODELS_VARIABLE,
                    f"the {what} {', '.join(map(repr, twice))} is listed twice; each base needs "
                    f"a {what} of its own (jobs are claimed by source, shown by name)",
                )
            )
    if not bases and not problems:
        problems.append(
            Problem(BASE_MODELS_VARIABLE, f"lists no base model ({BASE_MODELS_SYNTAX})")
        )
    if problems:
        raise ConfigError(problems)
    return tuple(bases)


def served_base_id(settings: Settings) -> str:
    """The public id of the base model this process serves (MIXLOOM_BASE_MODEL, renamed by
    MIXLOOM_BASE_MODEL_ALIAS)."""
    return base_model_id(settings.base_model, settings.base_model_alias)


def fine_tuned_model_id(*, base: str, org: str, suffix: str | None, job_id: str) -> str:
    """`ft:BASE:ORG:SUFFIX:JOB`, e.g. `ft:smollm2-135m:tenant-0192...:support-bot:ftjob-...`;
    the suffix field is empty when the job has none (`ft:smollm2-135m:tenant-...::ftjob-...`)."""
    return f"{FINE_TUNED_PREFIX}:{base}:{org}:{suffix or ''}:{job_id}"


def checkpoint_model_id(fine_tuned: str, step: int) -> str:
    """The id of a job's checkpoint at `step`: its fine-tuned id and `:ckpt-step-N`."""
    return f"{fine_tuned}:{CHECKPOINT_TAG}{step}"


def legacy_fine_tuned_model_id(*, source: str, suffix: str | None, job_id: str) -> str:
    """The name a job got before migration 0003 (`ft:<MIXLOOM_BASE_MODEL as given>:<suffix
    or "mixloom">:<job>`), still accepted from callers who kept it."""
    return f"{FINE_TUNED_PREFIX}:{source}:{suffix or 'mixloom'}:{job_id}"


@dataclass(frozen=True)
class ModelIdParts:
    """What a fine-tuned or checkpoint id names: a job, and a checkpoint step or None."""

    name: str  # the id without its `:ckpt-step-N`
    job_id: str
    step: int | None


def parse_fine_tuned_model_id(model_id: str) -> ModelIdParts | None:
    """The job (and checkpoint step) a fine-tuned or checkpoint id names, or None when it is
    not shaped like one. The job is the last field before any `ckpt-step-N`, in every shape
    mixloom has given out: `ft:BASE:ORG:SUFFIX:JOB`, the names before migration 0003, and a
    bare job id with `:ckpt-step-N` (a checkpoint of a job that had not finished)."""
    fields = model_id.split(":")
    step = None
    if len(fields) > 1 and (match := _CHECKPOINT.match(fields[-1])):
        step = int(match.group(1))
        fields = fields[:-1]
    job_id = fields[-1]
    if not job_id.startswith("ftjob-") or (len(fields) > 1 and fields[0] != FINE_TUNED_PREFIX):
        return None
    if len(fields) == 1 and step is None:
        return None  # a bare job id names a job, not a model
    return ModelIdParts(name=":".join(fields), job_id=job_id, step=step)
