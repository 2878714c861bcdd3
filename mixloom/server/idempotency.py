"""Idempotency-Key on creating POSTs: a retry with the same key and body gets the first
response again, and nothing is created twice."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any, TypeVar

from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from mixloom.errors import StateConflictError
from mixloom.storage import idempotency
from mixloom.storage.db import Database
from mixloom.storage.idempotency import IdempotencyRecordView

REPLAY_HEADER = "Idempotent-Replayed"
Public = TypeVar("Public", bound=BaseModel)


def create_once(
    db: Database,
    *,
    tenant_id: str,
    key: str | None,
    path: str,
    request: Any,
    create: Callable[[Session], Public],
    undo: Callable[[], None] | None = None,
) -> Public | JSONResponse:
    """`create(session)` in one transaction, returning what it made as the response.

    With an Idempotency-Key, a retry of the same request (`request`: what identifies it)
    gets the first response again and creates nothing. `undo` removes what `create` did
    outside the database (a written file) when its transaction does not commit.
    """
    digest = request_hash(request)
    for attempt in range(2):
        try:
            with db.transaction() as session:
                if key and (
                    stored := idempotency.get_idempotency(
                        session=session, tenant_id=tenant_id, key=key
                    )
                ):
                    return _replay(stored, path, digest)
                public = create(session)
                if key:
                    idempotency.save_idempotency(
                        session=session,
                        tenant_id=tenant_id,
                        key=key,
                        request_method="POST",
                        request_path=path,
                        request_hash=digest,
                        response_status=200,
                        response_body=public.model_dump(mode="json"),
                    )
        except BaseException as exc:
            if undo is not None:
                undo()
            if isinstance(exc, IntegrityError) and key and attempt == 0:
                continue  # a concurrent request with this key won; replay its response
            raise
        return public
    raise AssertionError("unreachable")


def request_hash(payload: Any) -> str:
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _replay(record: IdempotencyRecordView, path: str, digest: str) -> JSONResponse:
    """The response stored for this key; StateConflictError if the key was used for a
    different request."""
    if (record.request_method, record.request_path, record.request_hash) != ("POST", path, digest):
        raise StateConflictError(
            "this Idempotency-Key was already used with a different request; "
            "use a new key for a new request",
            param="Idempotency-Key",
            code="idempotency_key_reused",
        )
    return JSONResponse(
        record.response_body, status_code=record.response_status, headers={REPLAY_HEADER: "true"}
    )
