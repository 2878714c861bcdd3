"""Server-sent events: a job's live events and metrics, resumable with Last-Event-ID."""

from __future__ import annotations

import json
import time
import weakref
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import Response, StreamingResponse

from mixloom.errors import ValidationError
from mixloom.server.deps import (
    Context,
    Credential,
    CurrentTenant,
    JobId,
    ServerContext,
)
from mixloom.server.errors import ERROR_RESPONSES, error_response
from mixloom.storage import jobs
from mixloom.storage.records import EventRecord, JobStatus, MetricRecord

router = APIRouter(tags=["fine_tuning"], responses=ERROR_RESPONSES)

RETRY_MS = 3000  # EventSource reconnect delay
STREAM_RETRY_AFTER_S = 5  # a tenant at its stream limit: when to try again
_REPLAY_BATCH = 500


def _frame(message: dict[str, Any]) -> str:
    return (
        f"id: {message['id']}\nevent: {message['event']}\ndata: {json.dumps(message['data'])}\n\n"
    )


@router.get(
    "/v1/fine_tuning/jobs/{job_id}/stream",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}, "description": "SSE stream"}},
)
def stream_job(
    ctx: Context,
    request: Request,
    tenant: CurrentTenant,
    job_id: JobId,
    last_event_id: Annotated[
        str | None, Header(alias="Last-Event-ID", max_length=20, pattern=r"^\d+$")
    ] = None,
    after: Annotated[int | None, Query(ge=0, le=2**62)] = None,
) -> Response:
    """`event: event` (a job event) and `event: metrics` (one step) frames whose `id` is the
    job's sequence number; reconnect with `Last-Event-ID` (or `?after=`) to resume without
    loss. Ends with `event: end` once the job is finished. A stream whose API key is revoked
    (or whose dashboard session ends) closes within `sse_auth_check_seconds`; its reconnect
    gets a 401. A tenant has at most `sse_max_streams_per_tenant` streams open at once: one
    more is a 429 with Retry-After."""
    if last_event_id is not None:
        start = int(last_event_id)
        if start > 2**62:
            raise ValidationError("Last-Event-ID is out of range", where="Last-Event-ID")
    else:
        start = after or 0
    with ctx.db.transaction() as session:
        jobs.get_job(session=session, job_id=job_id, tenant_id=tenant.id)
    release = ctx.sse_streams.open(tenant.id)
    if release is None:
        return error_response(
            429,
            f"this API key's tenant already has {ctx.sse_streams.limit} streams open, the "
            "most it may; close one (or follow several jobs with GET .../events and "
            f".../metrics) and retry in {STREAM_RETRY_AFTER_S} s",
            code="too_many_streams",
            headers={"Retry-After": str(STREAM_RETRY_AFTER_S)},
        )
    body = _events(ctx, job_id, start, request.state.credential, release)
    # A stream that never starts (the client left first) never runs its `finally`.
    weakref.finalize(body, release)
    return StreamingResponse(
        body,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _events(
    ctx: ServerContext, job_id: str, last: int, credential: Credential, release: Callable[[], None]
) -> AsyncIterator[str]:
    # Subscribe before reading the database, so nothing published in between is missed.
    sub = ctx.bus.subscribe(job_id, after=last)
    check_every = ctx.settings.sse_auth_check_seconds
    next_check = time.monotonic() + check_every
    try:
        yield f"retry: {RETRY_MS}\n\n"
        while True:
            rows, status = await anyio.to_thread.run_sync(
                _replay, ctx, job_id, last, limiter=ctx.sse_limiter
            )
            for row in rows:
                last = row.seq
                yield _frame(row.to_message())
            if len(rows) == _REPLAY_BATCH:
                continue
            if status.terminal:
                yield f"event: end\ndata: {json.dumps({'status': status.value})}\n\n"
                return
            # Live messages in order go straight out; a gap, a status change or a quiet
            # poll interval (a bus outage reads as quiet) sends us back to the database.
            while True:
                if time.monotonic() >= next_check:
                    if not await anyio.to_thread.run_sync(_still_valid, ctx, credential):
                        # No `end`: the client's reconnect gets the 401 that says why.
                        return
                    next_check = time.monotonic() + check_every
                wait = min(ctx.settings.sse_poll_seconds, max(0.0, next_check - time.monotonic()))
                messages = await anyio.to_thread.run_sync(sub.get, wait, limiter=ctx.sse_limiter)
                if not messages:
                    yield ": keepalive\n\n"
                    break
                back_to_db = False
                for message in messages:
                    if message["id"] <= last:
                        continue
                    if message["id"] != last + 1 or _is_status(message):
                        back_to_db = True
                        break
                    last = message["id"]
                    yield _frame(message)
                if back_to_db:
                    break
    finally:
        sub.close()
        release()


def _still_valid(ctx: ServerContext, credential: Credential) -> bool:
    with ctx.db.transaction() as session:
        return credential.tenant(session) is not None


def _replay(
    ctx: ServerContext, job_id: str, after: int
) -> tuple[list[EventRecord | MetricRecord], JobStatus]:
    with ctx.db.transaction() as session:
        status = jobs.get_job(session=session, job_id=job_id).status
        rows = jobs.progress_since(
            session=session, job_id=job_id, after_seq=after, limit=_REPLAY_BATCH
        )
    return rows, status


def _is_status(message: dict[str, Any]) -> bool:
    return message.get("event") == "event" and message["data"].get("type") == "status"
