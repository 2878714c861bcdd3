"""OpenAI's inference routes: `POST /v1/chat/completions` and `POST /v1/completions`.

The API process loads no model. A request is validated here, its model resolved among the
bases and the caller's own fine-tuned models, and stored (storage/inference.py); a worker
holding its base decodes it beside training and appends what each step added; this route
reads that back and answers: one JSON body, or server-sent `data:` chunks ending in
`data: [DONE]` (`stream: true`). An error the worker finds before the first token (a prompt
longer than the context) is a 4xx here too, since nothing has been sent yet.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any, Literal

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator

from mixloom.errors import ValidationError
from mixloom.server.deps import Context, CurrentTenant, ServerContext
from mixloom.server.errors import ERROR_RESPONSES, error_response
from mixloom.server.registry import resolve_model
from mixloom.storage import inference
from mixloom.storage.inference import InferenceRecord, InferenceStatus
from mixloom.storage.records import TenantRecord

router = APIRouter(tags=["inference"], responses=ERROR_RESPONSES)

BUSY_RETRY_AFTER_S = 2  # a tenant at its limit of requests in flight: when to try again
NO_WORKER_RETRY_AFTER_S = 10


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False  # a last chunk with `usage` and no choices


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: Annotated[str, Field(min_length=1, max_length=255)]
    max_tokens: Annotated[int | None, Field(ge=1)] = None
    temperature: Annotated[float, Field(ge=0, le=2, allow_inf_nan=False)] = 1.0
    top_p: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)] = 1.0
    n: Annotated[int, Field(ge=1)] = 1
    seed: Annotated[int | None, Field(ge=-(2**63), le=2**63 - 1)] = None
    stop: (
        Annotated[str, Field(min_length=1, max_length=200)]
        | Annotated[list[Annotated[str, Field(min_length=1, max_length=200)]], Field(max_length=4)]
        | None
    ) = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # accepted as OpenAI's clients send them; mixloom applies no penalties, so only 0
    presence_penalty: Annotated[float, Field(ge=0, le=0)] = 0.0
    frequency_penalty: Annotated[float, Field(ge=0, le=0)] = 0.0
    user: Annotated[str | None, Field(max_length=256)] = None  # accepted, not used

    @property
    def stops(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: Annotated[str, Field(max_length=1_000_000)]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant"]
    content: Annotated[str, Field(max_length=1_000_000)] | list[TextPart]
    name: Annotated[str | None, Field(max_length=64)] = None

    @property
    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatCompletionCreate(_Body):
    """OpenAI's chat completion body (the fields mixloom serves)."""

    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=1000)]
    max_completion_tokens: Annotated[int | None, Field(ge=1)] = None
    logprobs: bool = False
    top_logprobs: Annotated[int | None, Field(ge=0, le=20)] = None

    @model_validator(mode="after")
    def _consistent(self) -> ChatCompletionCreate:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise ValueError("give max_completion_tokens or max_tokens, not both")
        return self


class CompletionCreate(_Body):
    """OpenAI's (legacy) completion body: a raw prompt, no chat template."""

    prompt: (
        Annotated[str, Field(max_length=1_000_000)]
        | Annotated[list[Annotated[str, Field(max_length=1_000_000)]], Field(min_length=1)]
    )
    max_tokens: Annotated[int | None, Field(ge=1)] = 16  # OpenAI's default here
    logprobs: Annotated[int | None, Field(ge=0, le=5)] = None
    echo: Literal[False] = False
    best_of: Annotated[int | None, Field(ge=1)] = None

    @model_validator(mode="after")
    def _consistent(self) -> CompletionCreate:
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of other than n is not supported; leave it out")
        return self

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


@router.post(
    "/v1/chat/completions",
    responses={200: {"content": {"text/event-stream": {}}, "description": "with stream: SSE"}},
)
async def create_chat_completion(
    ctx: Context, request: Request, tenant: CurrentTenant, body: ChatCompletionCreate
) -> Response:
    """A chat completion from a base model or one of your fine-tuned models; the messages are
    rendered with the base model's chat template. `stream: true` answers with server-sent
    `data:` chunks (`chat.completion.chunk`) ending in `data: [DONE]`; `stream_options:
    {include_usage: true}` adds a last chunk with `usage`."""
    max_tokens = body.max_completion_tokens or body.max_tokens
    job = {
        "messages": [{"role": m.role, "content": m.text} for m in body.messages],
        **_sampling(ctx, body, max_tokens, len(body.messages)),
        "logprobs": (body.top_logprobs or 0) if body.logprobs else None,
    }
    return await _serve(ctx, request, tenant, "chat", body, job)


@router.post(
    "/v1/completions",
    responses={200: {"content": {"text/event-stream": {}}, "description": "with stream: SSE"}},
)
async def create_completion(
    ctx: Context, request: Request, tenant: CurrentTenant, body: CompletionCreate
) -> Response:
    """A completion of a raw prompt (no chat template), or of each of a list of prompts
    (choice `index` = prompt index x n + sample), from a base model or one of your
    fine-tuned models. `stream: true` answers with server-sent `data:` chunks
    (`text_completion`) ending in `data: [DONE]`."""
    job = {
        "prompts": body.prompts,
        **_sampling(ctx, body, body.max_tokens, len(body.prompts)),
        "logprobs": body.logprobs,
    }
    return await _serve(ctx, request, tenant, "completion", body, job)


def _sampling(
    ctx: ServerContext, body: _Body, max_tokens: int | None, prompts: int
) -> dict[str, Any]:
    """The decoding settings as the worker reads them, checked against the deployment's
    limits (what depends on the prompt's length, the worker checks)."""
    limits = ctx.settings
    problems = []
    if max_tokens is not None and max_tokens > limits.inference_max_tokens:
        problems.append(
            f"max_tokens is {max_tokens}, over this deployment's limit of "
            f"{limits.inference_max_tokens} (MIXLOOM_INFERENCE_MAX_TOKENS); ask for fewer"
        )
    if body.n * prompts > limits.inference_max_n:
        what = f"n ({body.n})" if prompts == 1 else f"n x prompts ({body.n} x {prompts})"
        problems.append(
            f"{what} is over this deployment's limit of {limits.inference_max_n} samples a "
            "request (MIXLOOM_INFERENCE_MAX_N); send several requests"
        )
    if problems:
        raise ValidationError("; ".join(problems), where="max_tokens" if max_tokens else "n")
    return {
        "max_tokens": max_tokens or limits.inference_default_max_tokens,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "n": body.n,
        "seed": body.seed,
        "stop": body.stops,
    }


async def _serve(
    ctx: ServerContext,
    request: Request,
    tenant: TenantRecord,
    kind: str,
    body: _Body,
    job: dict[str, Any],
) -> Response:
    target = await ctx.read(
        lambda session: resolve_model(
            session=session, models=ctx.models, model_id=body.model, tenant_id=tenant.id
        )
    )
    release = ctx.inference_slots.open(tenant.id)
    if release is None:
        return error_response(
            429,
            f"this API key's tenant already has {ctx.inference_slots.limit} inference "
            f"requests in flight, the most it may; retry in {BUSY_RETRY_AFTER_S} s",
            code="too_many_requests",
            headers={"Retry-After": str(BUSY_RETRY_AFTER_S)},
        )
    try:
        rid = inference.new_request_id(kind)

        def submit() -> None:
            with ctx.db.transaction() as session:
                inference.submit(
                    session=session,
                    request_id=rid,
                    tenant_id=tenant.id,
                    model=body.model,
                    base=target.source,  # what the workers holding it were given
                    job_id=target.job_id,
                    checkpoint_step=target.checkpoint_step,
                    kind=kind,
                    body=job,
                )

        await anyio.to_thread.run_sync(submit)
        ctx.bus.wake()
        reader = _Reader(ctx, rid)
        first = await reader.first(request, base=target.base)  # the public id, in errors
        if isinstance(first, Response):
            release()
            return first
        if not body.stream:
            try:
                record = await reader.until_done(request)
            finally:
                release()
            if isinstance(record, Response):
                return record
            return JSONResponse(_complete(kind, record))
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(
            _chunks(kind, reader, first, include_usage, release),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    except BaseException:
        release()
        raise


class _Reader:
    """A request's chunks, read back as the worker appends them: the bus (keyed by request
    id) says when there is something new, the database holds it."""

    def __init__(self, ctx: ServerContext, request_id: str) -> None:
        self.ctx = ctx
        self.id = request_id
        self.after = 0
        self.record: InferenceRecord | None = None
        self.created = int(time.time())
        self._sub = ctx.bus.subscribe(request_id)

    async def next(self) -> list[dict[str, Any]]:
        """The chunks past the last read (maybe none), with self.record updated."""
        chunks, self.record = await anyio.to_thread.run_sync(self._read)
        if chunks:
            self.after = chunks[-1][0]
        return [data for _, data in chunks]

    def _read(self) -> tuple[list[tuple[int, dict[str, Any]]], InferenceRecord]:
        with self.ctx.db.read() as session:
            return inference.chunks_since(session=session, request_id=self.id, after=self.after)

    async def wait(self) -> None:
        await anyio.to_thread.run_sync(
            self._sub.get, self.ctx.settings.inference_poll_seconds, limiter=self.ctx.sse_limiter
        )

    async def first(self, request: Request, *, base: str) -> list[dict[str, Any]] | Response:
        """The first chunks (or the finished request), or the error response to send: the
        worker's refusal, no worker taking the request in time, the caller gone."""
        deadline = time.monotonic() + self.ctx.settings.inference_queue_seconds
        while True:
            chunks = await self.next()
            record = self.record
            assert record is not None
            if record.status in (InferenceStatus.FAILED, InferenceStatus.CANCELLED):
                return _failed(record)
            if chunks or record.status.terminal:
                return chunks
            if record.status == InferenceStatus.QUEUED and time.monotonic() > deadline:
                await self.cancel()
                return error_response(
                    503,
                    f"no worker serving base model {base!r} took the request within "
                    f"{self.ctx.settings.inference_queue_seconds:g} s; retry later",
                    code="no_worker_available",
                    headers={"Retry-After": str(NO_WORKER_RETRY_AFTER_S)},
                )
            if await request.is_disconnected():
                await self.cancel()
                return Response(status_code=499)
            await self.wait()

    async def until_done(self, request: Request) -> InferenceRecord | Response:
        while True:
            await self.next()
            assert self.record is not None
            if self.record.status.terminal:
                if self.record.status != InferenceStatus.SUCCEEDED:
                    return _failed(self.record)
                return self.record
            if await request.is_disconnected():
                await self.cancel()
                return Response(status_code=499)
            await self.wait()

    async def cancel(self) -> None:
        def cancel() -> None:
            with self.ctx.db.transaction() as session:
                inference.request_cancel(session=session, request_id=self.id)

        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(cancel)

    def close(self) -> None:
        self._sub.close()


def _failed(record: InferenceRecord) -> Response:
    error = record.result or {}
    status = int(error.get("status", 500 if record.status == InferenceStatus.FAILED else 499))
    return error_response(
        status,
        str(error.get("message", "the request failed")),
        param=error.get("param"),
        code=error.get("code"),
    )


async def _chunks(
    kind: str,
    reader: _Reader,
    first: list[dict[str, Any]],
    include_usage: bool,
    release: Callable[[], None],
) -> AsyncIterator[str]:
    record = reader.record
    assert record is not None
    finished = False
    try:
        if kind == "chat":  # OpenAI's first chunk names the role
            yield _sse(
                _chat_chunk(
                    record,
                    reader.created,
                    [
                        {
                            "index": i,
                            "delta": {"role": "assistant", "content": ""},
                            "logprobs": None,
                            "finish_reason": None,
                        }
                        for i in range(record.body["n"])
                    ],
                )
            )
        chunks = first
        while True:
            for data in chunks:
                yield _sse(_stream_chunk(kind, record, reader.created, data))
            if record.status.terminal:
                break
            await reader.wait()
            chunks = await reader.next()
            assert reader.record is not None
            record = reader.record
        if record.status != InferenceStatus.SUCCEEDED:
            error = record.result or {}
            yield _sse({"error": {k: error.get(k) for k in ("message", "code", "param")}})
        elif include_usage:
            yield _sse(
                {
                    **_envelope(kind, record, reader.created, chunk=True),
                    "choices": [],
                    "usage": _usage(record),
                }
            )
        yield "data: [DONE]\n\n"
        finished = True
    finally:
        if not finished:
            await reader.cancel()
        reader.close()
        release()


def _sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"


def _envelope(kind: str, record: InferenceRecord, created: int, *, chunk: bool) -> dict[str, Any]:
    if kind == "chat":
        obj = "chat.completion.chunk" if chunk else "chat.completion"
    else:
        obj = "text_completion"
    return {
        "id": record.id,
        "object": obj,
        "created": created,
        "model": record.model,
        "system_fingerprint": None,
    }


def _chat_chunk(
    record: InferenceRecord, created: int, choices: list[dict[str, Any]]
) -> dict[str, Any]:
    return {**_envelope("chat", record, created, chunk=True), "choices": choices}


def _stream_chunk(
    kind: str, record: InferenceRecord, created: int, data: dict[str, Any]
) -> dict[str, Any]:
    choices = [_choice(kind, c, chunk=True) for c in data["choices"]]
    return {**_envelope(kind, record, created, chunk=True), "choices": choices}


def _complete(kind: str, record: InferenceRecord) -> dict[str, Any]:
    assert record.result is not None
    return {
        **_envelope(kind, record, int(record.created_at.timestamp()), chunk=False),
        "choices": [_choice(kind, c, chunk=False) for c in record.result["choices"]],
        "usage": _usage(record),
    }


def _choice(kind: str, c: dict[str, Any], *, chunk: bool) -> dict[str, Any]:
    """A choice as the worker stored it ({index, text, finish_reason, logprobs}) in OpenAI's
    shape: a chat's `delta` (a stream chunk) or `message`, a completion's `text`."""
    out: dict[str, Any] = {"index": c["index"]}
    if kind != "chat":
        out["text"] = c["text"]
        out["logprobs"] = _completion_logprobs(c["logprobs"])
    elif chunk:  # the last chunk may carry only the finish reason
        out["delta"] = {"content": c["text"]} if c["text"] or not c["finish_reason"] else {}
        out["logprobs"] = _chat_logprobs(c["logprobs"])
    else:
        out["message"] = {"role": "assistant", "content": c["text"], "refusal": None}
        out["logprobs"] = _chat_logprobs(c["logprobs"])
    out["finish_reason"] = c["finish_reason"]
    return out


def _usage(record: InferenceRecord) -> dict[str, int]:
    assert record.result is not None
    u = record.result["usage"]
    return {
        "prompt_tokens": u["prompt_tokens"],
        "completion_tokens": u["completion_tokens"],
        "total_tokens": u["prompt_tokens"] + u["completion_tokens"],
    }


def _token(text: str) -> dict[str, Any]:
    return {"token": text, "bytes": list(text.encode("utf-8"))}


def _chat_logprobs(tokens: list[dict[str, Any]] | None) -> dict[str, Any] | None:
    """OpenAI's chat shape: {content: [{token, logprob, bytes, top_logprobs}]}."""
    if tokens is None:
        return None
    return {
        "content": [
            {
                **_token(t["token"]),
                "logprob": t["logprob"],
                "top_logprobs": [{**_token(s), "logprob": lp} for s, lp in t["top"]],
            }
            for t in tokens
        ],
        "refusal": None,
    }


def _completion_logprobs(tokens: list[dict[str, Any]] | None) -> dict[str, Any] | None:
    """OpenAI's completions shape: parallel lists, top_logprobs as {token: logprob}."""
    if tokens is None:
        return None
    return {
        "tokens": [t["token"] for t in tokens],
        "token_logprobs": [t["logprob"] for t in tokens],
        "top_logprobs": [dict(t["top"]) for t in tokens],
        "text_offset": [t["offset"] for t in tokens],
    }
