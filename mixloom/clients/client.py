"""`Client`: the mixloom REST API from Python, over HTTP only.

    from mixloom.clients import Client
    client = Client("http://127.0.0.1:8000", api_key="mxl-...")
    f = client.upload_file("train.jsonl")
    job = client.create_job(training_file=f.id, method="mixlora", hyperparameters={"r": 8})
    for message in client.stream(job.id):
        ...

Requests that fail with 429 or 5xx, or cannot connect, are retried with exponential
backoff (honouring `Retry-After`); creating POSTs carry an `Idempotency-Key`, so a retry
never creates a thing twice. Error responses raise the typed exceptions of
`mixloom.clients.errors`, carrying the server's message.
"""

from __future__ import annotations

import email.utils
import json
import os
import random
import shutil
import time
import urllib.parse
import uuid
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal, TypeVar, overload

import httpx

from mixloom.clients.errors import APIConnectionError, ServerError, error_for
from mixloom.clients.types import (
    Checkpoint,
    Completion,
    Deleted,
    Event,
    File,
    Job,
    Metric,
    Model,
    Page,
    StreamMessage,
    TextDelta,
    Usage,
)

T = TypeVar("T")

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
BASE_URL_ENV = "MIXLOOM_BASE_URL"
API_KEY_ENV = "MIXLOOM_API_KEY"
JOBS = "/v1/fine_tuning/jobs"
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
# 429s that report a full tenant quota: waiting seconds will not free it, so no retry.
_QUOTA_CODES = frozenset({"job_quota_exceeded", "storage_quota_exceeded"})
_CHUNK = 1024 * 1024


class Client:
    """Typed methods for every route of the API.

    Args:
        base_url: the server, e.g. "http://127.0.0.1:8000"; default $MIXLOOM_BASE_URL.
        api_key: a tenant's key; default $MIXLOOM_API_KEY.
        timeout: seconds per request (connect, read, write).
        max_retries: retries after the first try, for 429, 5xx and connection errors.
        backoff: first delay in seconds; doubles each retry (with jitter), capped by
            `max_backoff`. A `Retry-After` header wins over the computed delay (capped too).
    """

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 60.0,
        max_retries: int = 3,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.base_url = (base_url or os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL).rstrip("/")
        self.api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self._sleep = sleep
        headers = {"User-Agent": "mixloom-client"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # --- transport --------------------------------------------------------------------

    def _delay(self, attempt: int, response: httpx.Response | None) -> float:
        if response is not None:
            after = _retry_after(response.headers.get("Retry-After"))
            if after is not None:
                return min(after, self.max_backoff)
        base = min(self.backoff * 2**attempt, self.max_backoff)
        return base * (0.5 + random.random() / 2)

    def _send(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, Any] | None = None,
        json_body: Any = None,
        files: Callable[[], dict[str, Any]] | None = None,
        data: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
        stream: bool = False,
        timeout: httpx.Timeout | None = None,
    ) -> httpx.Response:
        """One request with retries; raises the typed error of a final error status.
        `files` is a factory so that every attempt sends the upload from its start."""
        params = {k: v for k, v in (params or {}).items() if v is not None}
        attempt = 0
        while True:
            response: httpx.Response | None = None
            try:
                request = self._http.build_request(
                    method,
                    path,
                    params=params,
                    json=json_body,
                    files=files() if files else None,
                    data=data,
                    headers=headers,
                    timeout=timeout if timeout is not None else httpx.USE_CLIENT_DEFAULT,
                )
                response = self._http.send(request, stream=stream)
            except httpx.TransportError as exc:
                if attempt >= self.max_retries:
                    raise APIConnectionError(
                        f"cannot reach the mixloom server at {self.base_url} ({exc}); "
                        f"is it running? set --base-url or ${BASE_URL_ENV}"
                    ) from exc
            else:
                if response.status_code < 400:
                    return response
                if stream:
                    response.read()
                error = error_for(response.status_code, _body(response), dict(response.headers))
                retriable = (
                    response.status_code in RETRY_STATUSES and error.code not in _QUOTA_CODES
                )
                if not retriable or attempt >= self.max_retries:
                    raise error
            self._sleep(self._delay(attempt, response))
            attempt += 1

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        return self._send(method, path, **kwargs).json()

    def _page(
        self,
        path: str,
        parse: Callable[[dict[str, Any]], T],
        cursor: Callable[[T], str],
        params: dict[str, Any],
    ) -> Page[T]:
        body = self._json("GET", path, params=params)
        data = [parse(item) for item in body["data"]]
        has_more = bool(body.get("has_more"))
        return Page(data=data, has_more=has_more, next_after=cursor(data[-1]) if data else None)

    @staticmethod
    def _iterate(fetch: Callable[[str | None], Page[T]]) -> Iterator[T]:
        after: str | None = None
        while True:
            page = fetch(after)
            yield from page.data
            if not page.has_more or page.next_after is None:
                return
            after = page.next_after

    # --- models -----------------------------------------------------------------------

    def list_models(self) -> list[Model]:
        """GET /v1/models: the base models a job may name, then your fine-tuned models
        (succeeded jobs whose adapter is not deleted), newest first."""
        return [Model.from_json(m) for m in self._json("GET", "/v1/models")["data"]]

    def get_model(self, model_id: str) -> Model:
        """GET /v1/models/{id}: a base model, or one of your fine-tuned models or
        checkpoints (a job's `fine_tuned_model`, a checkpoint's
        `fine_tuned_model_checkpoint`); NotFoundError for anything else."""
        return Model.from_json(self._json("GET", _model_path(model_id)))

    def delete_model(self, model_id: str) -> Deleted:
        """DELETE /v1/models/{id}: a fine-tuned model's adapter (the job stays, with
        `adapter_deleted_at` set) or a checkpoint model's checkpoint. Deleting again
        answers the same; a base model is a BadRequestError."""
        return Deleted.from_json(self._json("DELETE", _model_path(model_id)))

    # --- files ------------------------------------------------------------------------

    def upload_file(
        self,
        file: str | os.PathLike[str] | bytes,
        *,
        filename: str | None = None,
        purpose: str = "fine-tune",
        idempotency_key: str | None = None,
    ) -> File:
        """POST /v1/files: a JSONL path or its bytes. The server checks every line and
        raises BadRequestError listing all problems at once."""
        if isinstance(file, bytes):
            content, name = file, filename or "upload.jsonl"
        else:
            path = Path(file)
            content, name = path.read_bytes(), filename or path.name

        def parts() -> dict[str, Any]:
            return {"file": (name, content, "application/jsonl")}

        headers = {"Idempotency-Key": idempotency_key or _new_key()}
        body = self._json(
            "POST", "/v1/files", files=parts, data={"purpose": purpose}, headers=headers
        )
        return File.from_json(body)

    def list_files(
        self, *, after: str | None = None, limit: int = 20, purpose: str | None = None
    ) -> Page[File]:
        """GET /v1/files: newest first."""
        params = {"after": after, "limit": limit, "purpose": purpose}
        return self._page("/v1/files", File.from_json, lambda f: f.id, params)

    def iter_files(self, *, purpose: str | None = None, page_size: int = 100) -> Iterator[File]:
        """Every file, newest first, fetching pages as needed."""
        return self._iterate(
            lambda after: self.list_files(after=after, limit=page_size, purpose=purpose)
        )

    def get_file(self, file_id: str) -> File:
        return File.from_json(self._json("GET", f"/v1/files/{file_id}"))

    def download_file(self, file_id: str, dest: str | os.PathLike[str]) -> Path:
        """GET /v1/files/{id}/content into `dest` (a file path or a directory)."""
        return self._download(f"/v1/files/{file_id}/content", dest, f"{file_id}.jsonl")

    def delete_file(self, file_id: str) -> bool:
        """DELETE /v1/files/{id}; ConflictError while an unfinished job uses it."""
        return bool(self._json("DELETE", f"/v1/files/{file_id}").get("deleted"))

    # --- usage ------------------------------------------------------------------------

    def usage(self) -> Usage:
        """GET /v1/usage: stored bytes (files, checkpoints, adapters) and jobs, against the
        tenant's quotas."""
        return Usage.from_json(self._json("GET", "/v1/usage"))

    # --- jobs -------------------------------------------------------------------------

    def create_job(
        self,
        *,
        training_file: str,
        model: str | None = None,
        method: str | dict[str, Any] = "lora",
        hyperparameters: dict[str, Any] | None = None,
        validation_file: str | None = None,
        seed: int | None = None,
        suffix: str | None = None,
        metadata: dict[str, str] | None = None,
        evaluation: dict[str, Any] | None = None,
        idempotency_key: str | None = None,
    ) -> Job:
        """POST /v1/fine_tuning/jobs.

        `method` is "lora" or "mixlora" (with `hyperparameters` by PEFT/MixLoRA names), or a
        whole method object as the API takes it (e.g. OpenAI's `{"type": "supervised",
        "supervised": {"hyperparameters": {...}, "adapter": {"type": "mixlora", ...}}}`).
        `model` defaults to the first served model. `suffix` goes into the fine-tuned
        model's id; `metadata` (up to 16 string pairs) is kept and shown with the job.
        `evaluation` ({"tasks": [...], "limit": N, ...}): scored once it has trained
        (`get_evaluation`).
        """
        if isinstance(method, str):
            method_body: dict[str, Any] = {"type": method}
            if hyperparameters:
                method_body[method] = {"hyperparameters": hyperparameters}
        else:
            if hyperparameters:
                raise ValueError("give hyperparameters inside the method object, not beside it")
            method_body = method
        body: dict[str, Any] = {
            "model": model or self.list_models()[0].id,
            "training_file": training_file,
            "method": method_body,
        }
        optional = {
            "validation_file": validation_file,
            "seed": seed,
            "suffix": suffix,
            "metadata": metadata,
            "evaluation": evaluation,
        }
        body.update({k: v for k, v in optional.items() if v is not None})
        headers = {"Idempotency-Key": idempotency_key or _new_key()}
        return Job.from_json(self._json("POST", JOBS, json_body=body, headers=headers))

    def list_jobs(
        self, *, after: str | None = None, limit: int = 20, status: str | None = None
    ) -> Page[Job]:
        """GET /v1/fine_tuning/jobs: newest first."""
        params = {"after": after, "limit": limit, "status": status}
        return self._page(JOBS, Job.from_json, lambda j: j.id, params)

    def iter_jobs(self, *, status: str | None = None, page_size: int = 100) -> Iterator[Job]:
        return self._iterate(
            lambda after: self.list_jobs(after=after, limit=page_size, status=status)
        )

    def get_job(self, job_id: str) -> Job:
        return Job.from_json(self._json("GET", f"{JOBS}/{job_id}"))

    def cancel_job(self, job_id: str) -> Job:
        """A running job gets `requested_action="cancel"` and stops within a heartbeat."""
        return Job.from_json(self._json("POST", f"{JOBS}/{job_id}/cancel"))

    def pause_job(self, job_id: str) -> Job:
        return Job.from_json(self._json("POST", f"{JOBS}/{job_id}/pause"))

    def resume_job(self, job_id: str) -> Job:
        return Job.from_json(self._json("POST", f"{JOBS}/{job_id}/resume"))

    def get_evaluation(self, job_id: str) -> dict[str, Any]:
        """GET .../evaluation: {status, tasks, results: [{model, task, n, acc, ...}], error}."""
        result: dict[str, Any] = self._json("GET", f"{JOBS}/{job_id}/evaluation")
        return result

    def list_events(self, job_id: str, *, after: str | None = None, limit: int = 20) -> Page[Event]:
        """GET .../events: newest first."""
        params = {"after": after, "limit": limit}
        return self._page(f"{JOBS}/{job_id}/events", Event.from_json, lambda e: e.id, params)

    def iter_events(self, job_id: str, *, page_size: int = 100) -> Iterator[Event]:
        return self._iterate(lambda after: self.list_events(job_id, after=after, limit=page_size))

    def list_metrics(
        self, job_id: str, *, after: int | None = None, limit: int = 100
    ) -> Page[Metric]:
        """GET .../metrics: oldest step first; `after` is a step."""
        params = {"after": after, "limit": limit}
        return self._page(
            f"{JOBS}/{job_id}/metrics", Metric.from_json, lambda m: str(m.step), params
        )

    def iter_metrics(self, job_id: str, *, page_size: int = 1000) -> Iterator[Metric]:
        return self._iterate(
            lambda after: self.list_metrics(
                job_id, after=int(after) if after is not None else None, limit=page_size
            )
        )

    def list_checkpoints(
        self, job_id: str, *, after: str | None = None, limit: int = 10
    ) -> Page[Checkpoint]:
        """GET .../checkpoints: newest first."""
        params = {"after": after, "limit": limit}
        return self._page(
            f"{JOBS}/{job_id}/checkpoints", Checkpoint.from_json, lambda c: c.id, params
        )

    def iter_checkpoints(self, job_id: str, *, page_size: int = 100) -> Iterator[Checkpoint]:
        return self._iterate(
            lambda after: self.list_checkpoints(job_id, after=after, limit=page_size)
        )

    def delete_checkpoints(self, job_id: str, *, checkpoint_id: str | None = None) -> list[Deleted]:
        """DELETE .../checkpoints (every one) or .../checkpoints/{id}: a finished job's
        checkpoints, freeing their bytes. ConflictError while the job is unfinished;
        deleting all again returns []."""
        if checkpoint_id:
            body = self._json("DELETE", f"{JOBS}/{job_id}/checkpoints/{checkpoint_id}")
            return [Deleted.from_json(body)]
        body = self._json("DELETE", f"{JOBS}/{job_id}/checkpoints")
        return [Deleted.from_json(d) for d in body["data"]]

    def delete_adapter(self, job_id: str) -> Deleted:
        """DELETE .../adapter: a finished job's final adapter; the job stays, and its
        download then raises GoneError. ConflictError while the job is unfinished."""
        return Deleted.from_json(self._json("DELETE", f"{JOBS}/{job_id}/adapter"))

    def download_adapter(
        self,
        job_id: str,
        dest: str | os.PathLike[str] = ".",
        *,
        checkpoint_id: str | None = None,
        format: str | None = None,
        extract: bool = False,
    ) -> Path:
        """The adapter zip of a succeeded job, or of one checkpoint. `dest`: a file path, or
        a directory (one that exists, or a path ending in '/': made) for the server's file
        name. `format="mixlora"`: adapter_model.bin (what the `mixlora` package reads) in
        place of the safetensors file. `extract`: unpack it instead, into `dest` as a
        folder (a directory `dest`: a folder in it named after the archive); returns the
        folder. ConflictError until the adapter exists."""
        if checkpoint_id:
            path = f"{JOBS}/{job_id}/checkpoints/{checkpoint_id}/adapter"
            default = f"{job_id}-{checkpoint_id}.zip"
        else:
            path, default = f"{JOBS}/{job_id}/adapter", f"{job_id}-adapter.zip"
        params = {"format": format} if format else None
        if not extract:
            return self._download(path, dest, default, params=params)
        into_dir = _is_directory(dest)
        target = Path(dest)
        staging = (target if into_dir else target.parent) / f".{job_id}.download"
        staging.mkdir(parents=True, exist_ok=True)
        try:
            archive = self._download(path, staging, default, params=params)
            folder = target / archive.stem if into_dir else target
            with zipfile.ZipFile(archive) as zf:
                unsafe = [n for n in zf.namelist() if n.startswith("/") or ".." in Path(n).parts]
                if unsafe:
                    raise ValueError(f"the archive names paths outside its folder: {unsafe[:3]}")
                folder.mkdir(parents=True, exist_ok=True)
                zf.extractall(folder)
            return folder
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _download(
        self,
        path: str,
        dest: str | os.PathLike[str],
        default: str,
        *,
        params: dict[str, Any] | None = None,
    ) -> Path:
        response = self._send("GET", path, params=params, stream=True)
        store: httpx.Client | None = None
        if response.status_code == 307 and "location" in response.headers:
            # the server's storage_downloads=redirect: a presigned URL of its object store,
            # fetched without this client's API key (the URL is its own credential)
            response.close()
            store = httpx.Client(timeout=self._http.timeout)
            response = store.send(
                store.build_request("GET", response.headers["location"]), stream=True
            )
            if response.status_code >= 400:
                response.close()
                store.close()
                raise APIConnectionError(
                    f"the server's object store refused the download ({response.status_code})"
                )
        try:
            target = Path(dest)
            if _is_directory(dest):
                target.mkdir(parents=True, exist_ok=True)
                target = target / (_attachment_name(response) or default)
            part = target.with_name(target.name + ".part")
            with open(part, "wb") as out:
                for chunk in response.iter_bytes(_CHUNK):
                    out.write(chunk)
            os.replace(part, target)
            return target
        finally:
            response.close()
            if store is not None:
                store.close()

    def stream(self, job_id: str, *, after: int = 0) -> Iterator[StreamMessage]:
        """GET .../stream: the job's events and metrics live, replayed from sequence number
        `after`. Reconnects (with Last-Event-ID) when the connection drops; ends after the
        server's `end` frame, once the job is finished."""
        last = after
        failures = 0
        while True:
            headers = {"Accept": "text/event-stream", "Last-Event-ID": str(last)}
            read_forever = httpx.Timeout(self._http.timeout.connect, read=None)
            try:
                response = self._send(
                    "GET",
                    f"{JOBS}/{job_id}/stream",
                    headers=headers,
                    stream=True,
                    timeout=read_forever,
                )
                try:
                    for message in _parse_sse(response.iter_lines()):
                        failures = 0
                        if message.id is not None:
                            last = message.id
                        yield message
                        if message.event == "end":
                            return
                finally:
                    response.close()
            except (httpx.TransportError, APIConnectionError) as exc:
                failures += 1
                if failures > self.max_retries:
                    raise APIConnectionError(f"lost the stream of job {job_id}: {exc}") from exc
                self._sleep(self._delay(failures - 1, None))

    # --- inference ------------------------------------------------------------------

    @overload
    def chat(
        self,
        model: str,
        messages: list[dict[str, Any]],
        *,
        stream: Literal[False] = False,
        **params: Any,
    ) -> Completion: ...

    @overload
    def chat(
        self, model: str, messages: list[dict[str, Any]], *, stream: Literal[True], **params: Any
    ) -> CompletionStream: ...

    def chat(
        self, model: str, messages: list[dict[str, Any]], *, stream: bool = False, **params: Any
    ) -> Completion | CompletionStream:
        """POST /v1/chat/completions: `messages` as OpenAI's ([{"role", "content"}]); params
        are OpenAI's (max_tokens, temperature, top_p, n, seed, stop, logprobs, ...). With
        `stream=True`, a CompletionStream: iterate it for TextDeltas as they come."""
        return self._infer(
            "/v1/chat/completions", {"model": model, "messages": messages, **params}, stream
        )

    @overload
    def complete(
        self, model: str, prompt: str | list[str], *, stream: Literal[False] = False, **params: Any
    ) -> Completion: ...

    @overload
    def complete(
        self, model: str, prompt: str | list[str], *, stream: Literal[True], **params: Any
    ) -> CompletionStream: ...

    def complete(
        self, model: str, prompt: str | list[str], *, stream: bool = False, **params: Any
    ) -> Completion | CompletionStream:
        """POST /v1/completions: a raw prompt (no chat template), or a list of them."""
        return self._infer("/v1/completions", {"model": model, "prompt": prompt, **params}, stream)

    def _infer(
        self, path: str, body: dict[str, Any], stream: bool
    ) -> Completion | CompletionStream:
        if not stream:
            return Completion.from_json(self._json("POST", path, json_body=body))
        # an error before the first token is an HTTP error (retried like any other); once
        # the answer streams, nothing is sent again
        started = time.perf_counter()  # the server answers once the first token is decoded
        response = self._send(
            "POST",
            path,
            json_body={**body, "stream": True, "stream_options": {"include_usage": True}},
            stream=True,
            timeout=httpx.Timeout(self._http.timeout.connect, read=None),
        )
        return CompletionStream(response, started)

    def wait(self, job_id: str, *, poll: float = 2.0, timeout: float | None = None) -> Job:
        """Poll until the job is succeeded, failed or cancelled; TimeoutError after
        `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.get_job(job_id)
            if job.finished:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} is still {job.status} after {timeout} s")
            self._sleep(poll)


class CompletionStream:
    """A streamed completion: iterate it for TextDeltas (chat: the assistant's text) as the
    server sends them. Once iterated, `usage`, `time_to_first_token` (seconds from the
    request) and `tokens_per_second` (completion tokens after the first, over the time they
    took) are set; `close()` stops it early (the server stops decoding)."""

    def __init__(self, response: httpx.Response, started: float) -> None:
        self._response = response
        self.id: str | None = None
        self.model: str | None = None
        self.usage: dict[str, int] | None = None
        self.time_to_first_token: float | None = None
        self.tokens_per_second: float | None = None
        self._started = started  # time.perf_counter() when the request was sent

    def __iter__(self) -> Iterator[TextDelta]:
        first = last = None
        try:
            for line in self._response.iter_lines():
                if not line.startswith("data: "):
                    continue
                payload = line[len("data: ") :]
                if payload == "[DONE]":
                    break
                chunk = json.loads(payload)
                if "error" in chunk:  # the answer failed after it began
                    error = chunk["error"] or {}
                    raise ServerError(
                        str(error.get("message") or "the answer failed"),
                        code=error.get("code"),
                        body=chunk,
                    )
                self.id, self.model = chunk.get("id"), chunk.get("model")
                if chunk.get("usage"):
                    self.usage = chunk["usage"]
                for c in chunk.get("choices", []):
                    text = c["delta"].get("content") or "" if "delta" in c else c.get("text", "")
                    if text:
                        last = time.perf_counter()
                        first = first or last
                    if text or c.get("finish_reason"):
                        yield TextDelta(c["index"], text, c.get("finish_reason"))
        finally:
            self._response.close()
        if first is not None:
            self.time_to_first_token = first - self._started
        tokens = (self.usage or {}).get("completion_tokens")
        if tokens and first is not None and last is not None and last > first and tokens > 1:
            self.tokens_per_second = (tokens - 1) / (last - first)

    def close(self) -> None:
        self._response.close()


def _model_path(model_id: str) -> str:
    # a model id is ':'-separated fields; one named before migration 0003 may hold a '/'
    return "/v1/models/" + urllib.parse.quote(model_id, safe=":")


def _new_key() -> str:
    return f"mixloom-client-{uuid.uuid4()}"


def _body(response: httpx.Response) -> Any:
    try:
        return response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return response.text


def _retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header: a number, or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _is_directory(dest: str | os.PathLike[str]) -> bool:
    """A download target that names a directory: one that exists, or a path written with a
    trailing separator (`-o dl/`), which is made."""
    text = os.fspath(dest)
    return Path(text).is_dir() or text.endswith(("/", os.sep))


def _attachment_name(response: httpx.Response) -> str | None:
    disposition = response.headers.get("Content-Disposition", "")
    for part in disposition.split(";"):
        key, _, value = part.strip().partition("=")
        if key.lower() == "filename" and value:
            name = Path(value.strip('"')).name
            return name or None
    return None


def _parse_sse(lines: Iterator[str]) -> Iterator[StreamMessage]:
    """Frames of a text/event-stream; comments and `retry:` lines are skipped."""
    event, ident, data = "message", None, list[str]()
    for line in lines:
        if not line:
            if data:
                payload = json.loads("\n".join(data))
                yield StreamMessage(event=event, id=ident, data=payload)
            event, ident, data = "message", None, list[str]()
            continue
        if line.startswith(":"):
            continue
        key, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if key == "event":
            event = value
        elif key == "data":
            data.append(value)
        elif key == "id" and value.isdigit():
            ident = int(value)
