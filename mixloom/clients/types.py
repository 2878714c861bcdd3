"""What the client returns: frozen records of the API's objects, and pages of them.

Each record keeps the whole JSON object in `raw`, so a field the server adds later is
still reachable before the client knows its name.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

T = TypeVar("T")


def _known(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls) if f.name != "raw"}
    return {k: v for k, v in data.items() if k in names}


@dataclass(frozen=True)
class Model:
    """A base model, or one of your fine-tuned models (`fine_tuning_job_id` set) or their
    checkpoints (`step_number` set too)."""

    id: str
    created: int
    max_position_embeddings: int
    description: str = ""
    owned_by: str = "mixloom"  # a fine-tuned model: your tenant id
    parent: str | None = None  # the base of a fine-tuned model; the model of a checkpoint
    fine_tuning_job_id: str | None = None
    step_number: int | None = None
    adapter: str | None = None  # "lora" | "mixlora" for a fine-tuned model
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def fine_tuned(self) -> bool:
        return self.fine_tuning_job_id is not None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Model:
        return cls(**_known(cls, data), raw=data)


@dataclass(frozen=True)
class File:
    id: str
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: str
    rows: int
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> File:
        return cls(**_known(cls, data), raw=data)


@dataclass(frozen=True)
class JobError:
    message: str
    code: str | None = None
    param: str | None = None


@dataclass(frozen=True)
class Job:
    id: str
    created_at: int
    model: str
    training_file: str
    status: str
    method: dict[str, Any]
    seed: int
    started_at: int | None = None
    finished_at: int | None = None
    validation_file: str | None = None
    suffix: str | None = None
    metadata: dict[str, Any] | None = None
    requested_action: str | None = None
    queue_position: int | None = None
    error: JobError | None = None
    fine_tuned_model: str | None = None
    trained_tokens: int | None = None
    organization_id: str | None = None  # the tenant that owns the job
    adapter_available: bool = False
    adapter_deleted_at: int | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Job:
        values = _known(cls, data)
        err = data.get("error")
        values["error"] = JobError(**_known(JobError, err)) if isinstance(err, dict) else None
        return cls(**values, raw=data)

    @property
    def method_type(self) -> str:
        """ "supervised" (OpenAI's spelling), or mixloom's "lora" / "mixlora"."""
        return str(self.method.get("type", ""))

    @property
    def _body(self) -> dict[str, Any]:
        body = self.method.get(self.method_type)
        return body if isinstance(body, dict) else {}

    @property
    def adapter_type(self) -> str:
        """The adapter the job trains: "lora" or "mixlora"."""
        adapter = self._body.get("adapter")
        if isinstance(adapter, dict) and adapter.get("type"):
            return str(adapter["type"])
        return self.method_type

    @property
    def method_label(self) -> str:
        """e.g. "mixlora", or "supervised/lora" for OpenAI's spelling."""
        if self.adapter_type == self.method_type:
            return self.method_type
        return f"{self.method_type}/{self.adapter_type}"

    @property
    def hyperparameters(self) -> dict[str, Any]:
        """Every hyperparameter, training and adapter ones together, whichever spelling."""
        hp = self._body.get("hyperparameters")
        out = dict(hp) if isinstance(hp, dict) else {}
        adapter = self._body.get("adapter")
        if isinstance(adapter, dict) and isinstance(adapter.get("hyperparameters"), dict):
            out.update(adapter["hyperparameters"])
        return out

    @property
    def finished(self) -> bool:
        return self.status in ("succeeded", "failed", "cancelled")


@dataclass(frozen=True)
class Event:
    id: str
    created_at: int
    level: str
    type: str
    message: str
    data: dict[str, Any] | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Event:
        return cls(**_known(cls, data), raw=data)


@dataclass(frozen=True)
class Metric:
    step: int
    created_at: int
    metrics: dict[str, Any]
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Metric:
        return cls(**_known(cls, data), raw=data)

    @property
    def train_loss(self) -> float | None:
        value = self.metrics.get("train_loss")
        return float(value) if isinstance(value, int | float) else None


@dataclass(frozen=True)
class Checkpoint:
    id: str
    created_at: int
    fine_tuning_job_id: str
    step_number: int
    fine_tuned_model_checkpoint: str
    metrics: dict[str, Any] | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Checkpoint:
        return cls(**_known(cls, data), raw=data)


@dataclass(frozen=True)
class Deleted:
    """What a DELETE removed: a checkpoint (ftckpt-...), a job's adapter (the job's id) or
    a model (its id), and the bytes it freed from the storage quota (0 for a model)."""

    id: str
    object: str
    bytes: int = 0
    deleted: bool = True
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Deleted:
        return cls(**_known(cls, data), raw=data)


@dataclass(frozen=True)
class Usage:
    """GET /v1/usage: stored bytes by kind and jobs, beside the tenant's quotas."""

    stored_bytes: int  # file_bytes + checkpoint_bytes + adapter_bytes, bounded by max_total_bytes
    file_bytes: int
    checkpoint_bytes: int
    adapter_bytes: int
    max_total_bytes: int
    max_file_bytes: int
    waiting_jobs: int
    max_queued_jobs: int
    running_jobs: int
    max_running_jobs: int
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Usage:
        return cls(**_known(cls, data), raw=data)


@dataclass(frozen=True)
class Page(Generic[T]):
    """One page of a list route; `next_after` is the cursor of the next page, if any."""

    data: list[T]
    has_more: bool
    next_after: str | None

    def __iter__(self) -> Iterator[T]:
        return iter(self.data)

    def __len__(self) -> int:
        return len(self.data)


@dataclass(frozen=True)
class StreamMessage:
    """One SSE frame of a job's live stream: `event` is "event", "metrics" or "end"."""

    event: str
    id: int | None
    data: dict[str, Any]

    @property
    def metric(self) -> Metric | None:
        return Metric.from_json(self.data) if self.event == "metrics" else None

    @property
    def job_event(self) -> Event | None:
        return Event.from_json(self.data) if self.event == "event" else None


@dataclass(frozen=True)
class CompletionChoice:
    """One answer of a completion: `text` (for chat, the assistant message's content)."""

    index: int
    text: str
    finish_reason: str | None  # "stop" | "length"
    logprobs: Any = None  # OpenAI's shape for the route, when asked for


@dataclass(frozen=True)
class Completion:
    """POST /v1/chat/completions or /v1/completions without streaming."""

    id: str
    model: str
    choices: list[CompletionChoice]
    usage: dict[str, int]  # prompt_tokens, completion_tokens, total_tokens
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def text(self) -> str:
        """The first choice's text."""
        return self.choices[0].text

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Completion:
        choices = []
        for c in data["choices"]:
            message = c.get("message")
            text = (message or {}).get("content") or "" if message is not None else c["text"]
            choices.append(
                CompletionChoice(c["index"], text, c.get("finish_reason"), c.get("logprobs"))
            )
        return cls(data["id"], data["model"], choices, dict(data.get("usage") or {}), raw=data)


@dataclass(frozen=True)
class TextDelta:
    """The text a streamed completion's next chunk added to choice `index`."""

    index: int
    text: str
    finish_reason: str | None
