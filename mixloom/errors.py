"""One exception hierarchy for mixloom. Every message says what is wrong, where, and the fix."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol


class MixloomError(Exception):
    """Base class of every error mixloom raises on purpose."""


@dataclass
class Problem:
    """One problem found while validating input: where it is and what is wrong."""

    where: str  # e.g. "jobs[1].method.lora.hyperparameters.r" or "data.jsonl:12: messages"
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}" if self.where else self.message


class ValidationError(MixloomError):
    """Bad input (config, data, request). Carries every problem found, not just the first."""

    def __init__(self, problems: list[Problem] | str, *, where: str = "") -> None:
        if isinstance(problems, str):
            problems = [Problem(where, problems)]
        self.problems = problems
        super().__init__(self._render())

    def _render(self) -> str:
        if len(self.problems) == 1:
            return str(self.problems[0])
        lines = [f"{len(self.problems)} problems:"]
        lines += [f"  - {p}" for p in self.problems]
        return "\n".join(lines)


class ConfigError(ValidationError):
    """A training or server configuration is invalid."""


class DataError(ValidationError):
    """A training or validation data file is invalid."""


class ModelLoadError(MixloomError):
    """The base model or an adapter could not be loaded."""


@dataclass
class ProblemList:
    """Collects problems and raises them all at once."""

    problems: list[Problem] = field(default_factory=list)

    def add(self, where: str, message: str) -> None:
        self.problems.append(Problem(where, message))

    def __bool__(self) -> bool:
        return bool(self.problems)

    def raise_if_any(self, cls: type[ValidationError] = ValidationError) -> None:
        if self.problems:
            raise cls(list(self.problems))


class _PydanticErrors(Protocol):
    """pydantic's ValidationError, or FastAPI's RequestValidationError (not imported here:
    the client package imports this module and needs neither)."""

    def errors(self) -> Sequence[Mapping[str, Any]]: ...


def pydantic_problems(exc: _PydanticErrors, prefix: str = "") -> list[Problem]:
    """Every error pydantic found, as Problems whose `where` is a dotted path under `prefix`."""
    problems = []
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ()) if not str(p).startswith("function-")]
        where = ".".join(([prefix] if prefix else []) + loc)
        kind = err.get("type", "")
        msg = str(err.get("msg", "invalid value"))
        if kind == "json_invalid":
            ctx = err.get("ctx") or {}
            where = prefix
            msg = (
                f"not valid JSON ({ctx.get('error', 'parse error')} at character "
                f"{loc[-1] if loc else 0}); send one JSON object"
            )
        elif kind == "extra_forbidden":
            msg = "unknown key (not a mixloom setting; check the spelling)"
        elif kind == "missing":
            msg = "required; it is missing"
        elif kind == "finite_number":
            msg = "must be a finite number (not Infinity, NaN, or beyond 1.8e308 like 1e400)"
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        problems.append(Problem(where, msg))
    return problems


class RequestError(MixloomError):
    """A request that cannot be served as asked; `param` names the offending field if any.

    These are raised where the request is served (storage, server). The HTTP client raises
    its own classes, named for the response it got (`mixloom.clients.NotFoundError` for a
    404), so no two classes here and there share a name.
    """

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


class ObjectNotFoundError(RequestError):
    """The object does not exist, or belongs to another tenant (the two look the same)."""


class StateConflictError(RequestError):
    """The object exists but its state forbids the action (e.g. cancelling a finished job)."""


class QuotaExceededError(RequestError):
    """A tenant limit (queued jobs, stored bytes) would be exceeded."""


class TooLargeError(RequestError):
    """A request body or uploaded file is larger than the deployment allows."""


class APIKeyError(RequestError):
    """The API key is missing, malformed, unknown or revoked."""


class OperatorOnlyError(RequestError):
    """A tenant's key (or a wrong key) on an operator-only route (a 403): /v1/admin/* and
    the API's /metrics take the admin key (MIXLOOM_ADMIN_KEY)."""


class GenerationError(RequestError):
    """A generation request the inference engine cannot serve as asked: an empty prompt, a
    prompt or `max_tokens` beyond the model's context, `n` or `logprobs` beyond the limits,
    sampling settings out of range (a 400). `code` is "context_length_exceeded" for what
    does not fit in the context or the engine's cache, "invalid_value" otherwise."""


class EvaluationError(RequestError):
    """An evaluation that cannot run as asked (a 400): an unknown task or split, a choice
    file with bad rows (every problem is in `problems` and the message, each naming its
    file and line), or a setting the protocol does not take. `code`: "unknown_task",
    "unknown_split", "invalid_task_file" or "invalid_value"; `param`: the field the caller
    took the task or setting from (the API names the body's field, the CLI its flag)."""

    def __init__(
        self, message: str | list[Problem], *, param: str | None = None, code: str | None = None
    ) -> None:
        self.problems = [Problem("", message)] if isinstance(message, str) else list(message)
        lines = [str(p) for p in self.problems]
        if len(lines) > 1:
            lines = [f"{len(lines)} problems:", *(f"  - {line}" for line in lines)]
        super().__init__("\n".join(lines), param=param, code=code)
