"""Files: JSONL training data, validated line by line on upload."""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path, PurePath
from typing import Annotated, Any

from fastapi import APIRouter, File, Form, Query, UploadFile
from fastapi.responses import FileResponse
from sqlalchemy.orm import Session

from mixloom.data.formats import validate_jsonl_bytes
from mixloom.errors import DataError, QuotaExceededError, TooLargeError, ValidationError
from mixloom.server.deps import ID_PATTERN, Context, CurrentTenant, Cursor, FileId, IdempotencyKey
from mixloom.server.errors import ERROR_RESPONSES
from mixloom.server.idempotency import create_once
from mixloom.server.schemas import FileDeleted, FilePublic, FilesPublic
from mixloom.storage import files, tenants

router = APIRouter(tags=["files"], responses=ERROR_RESPONSES)

PURPOSES = ("fine-tune",)
_READ_CHUNK = 1024 * 1024


def _read_capped(upload: UploadFile, cap: int) -> bytes:
    """At most cap + 1 bytes: enough to tell that the file is over the cap."""
    chunks, size = [], 0
    while size <= cap:
        chunk = upload.file.read(min(_READ_CHUNK, cap + 1 - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def _clean_filename(name: str | None) -> str:
    base = PurePath((name or "").replace("\\", "/")).name.strip()
    base = "".join(c for c in base if c.isprintable())[:255]
    return base or "upload.jsonl"


@router.post("/v1/files", response_model=FilePublic)
def upload_file(
    ctx: Context,
    tenant: CurrentTenant,
    file: Annotated[UploadFile, File(description="JSONL, one training example per line")],
    purpose: Annotated[str, Form(max_length=64)],
    idempotency_key: IdempotencyKey = None,
) -> Any:
    """Upload a JSONL data file. Every line is checked; all problems come back at once."""
    settings = ctx.settings
    if purpose not in PURPOSES:
        raise ValidationError(f"unknown purpose {purpose!r}; use 'fine-tune'", where="purpose")
    cap = min(settings.max_upload_bytes, tenant.max_file_bytes or settings.max_upload_bytes)
    filename = _clean_filename(file.filename)
    data = _read_capped(file, cap)
    if len(data) > cap:
        raise TooLargeError(
            f"file {filename} is larger than the {cap} bytes allowed; split it into several files",
            param="file",
            code="file_too_large",
        )
    if not data:
        raise ValidationError(
            f"file {filename} is empty; upload one JSON object per line", where="file"
        )
    rows, problems = validate_jsonl_bytes(
        data, filename=filename, max_lines=settings.max_file_lines
    )
    if problems:
        raise DataError(problems)

    sha256 = hashlib.sha256(data).hexdigest()
    written: list[Path] = []

    def create(session: Session) -> FilePublic:
        tenants.lock_tenant(session=session, tenant_id=tenant.id)
        used = tenants.tenant_usage(session=session, tenant_id=tenant.id)["stored_bytes"]
        quota = tenant.max_total_bytes or settings.max_tenant_bytes
        if used + len(data) > quota:
            raise QuotaExceededError(
                f"storing {len(data)} more bytes would exceed this tenant's {quota} bytes "
                f"({used} in use); delete files you no longer need",
                param="file",
                code="storage_quota_exceeded",
            )
        file_id = files.new_file_id()
        path = settings.files_dir / tenant.id / f"{file_id}.jsonl"
        _write_atomically(path, data)
        written.append(path)
        record = files.create_file(
            session=session,
            file_id=file_id,
            tenant_id=tenant.id,
            filename=filename,
            purpose=purpose,
            size=len(data),
            rows=rows,
            sha256=sha256,
            path=str(path),
        )
        return FilePublic.of(record)

    def undo() -> None:
        while written:
            written.pop().unlink(missing_ok=True)

    return create_once(
        ctx.db,
        tenant_id=tenant.id,
        key=idempotency_key,
        path="/v1/files",
        request={"purpose": purpose, "filename": filename, "sha256": sha256},
        create=create,
        undo=undo,
    )


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".part")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@router.get("/v1/files", response_model=FilesPublic)
def list_files(
    ctx: Context,
    tenant: CurrentTenant,
    after: Cursor = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    purpose: Annotated[str | None, Query(pattern=ID_PATTERN)] = None,
) -> FilesPublic:
    """Newest first. `after`: the last id of the previous page."""
    with ctx.db.transaction() as session:
        page, has_more = files.list_files(
            session=session, tenant_id=tenant.id, after=after, limit=limit, purpose=purpose
        )
    data = [FilePublic.of(f) for f in page]
    return FilesPublic(
        data=data,
        has_more=has_more,
        first_id=data[0].id if data else None,
        last_id=data[-1].id if data else None,
    )


@router.get("/v1/files/{file_id}", response_model=FilePublic)
def get_file(ctx: Context, tenant: CurrentTenant, file_id: FileId) -> FilePublic:
    with ctx.db.transaction() as session:
        return FilePublic.of(files.get_file(session=session, file_id=file_id, tenant_id=tenant.id))


@router.get(
    "/v1/files/{file_id}/content",
    response_class=FileResponse,
    responses={200: {"content": {"application/jsonl": {}}, "description": "the file's bytes"}},
)
def get_file_content(ctx: Context, tenant: CurrentTenant, file_id: FileId) -> FileResponse:
    with ctx.db.transaction() as session:
        record = files.get_file(session=session, file_id=file_id, tenant_id=tenant.id)
    return FileResponse(record.path, media_type="application/jsonl", filename=record.filename)


@router.delete("/v1/files/{file_id}", response_model=FileDeleted)
def delete_file(ctx: Context, tenant: CurrentTenant, file_id: FileId) -> FileDeleted:
    """Refused (409) while an unfinished job uses the file."""
    with ctx.db.transaction() as session:
        record = files.delete_file(session=session, file_id=file_id, tenant_id=tenant.id)
    with contextlib.suppress(FileNotFoundError):
        Path(record.path).unlink()
    return FileDeleted(id=record.id)
