"""Idempotency-Key on creating POSTs: a retry with the same key and body gets the first
response again, and nothing is created twice."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from fastapi.responses import JSONResponse
from sqlalchemy.orm import Session

from mixloom.errors import ConflictError
from mixloom.storage import idempotency

REPLAY_HEADER = "Idempotent-Replayed"


def request_hash(payload: Any) -> str:
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def stored_response(
    *, session: Session, tenant_id: str, key: str, method: str, path: str, digest: str
) -> JSONResponse | None:
    """The stored response for this key, or None if the key is new.

    ConflictError if the key was used for a different request.
    """
    record = idempotency.get_idempotency(session=session, tenant_id=tenant_id, key=key)
    if record is None:
        return None
    if (record.request_method, record.request_path, record.request_hash) != (method, path, digest):
        raise ConflictError(
            "this Idempotency-Key was already used with a different request; "
            "use a new key for a new request",
            param="Idempotency-Key",
            code="idempotency_key_reused",
        )
    return JSONResponse(
        record.response_body, status_code=record.response_status, headers={REPLAY_HEADER: "true"}
    )
