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

from mixloom.data.formats import validate_jsonl_file
from mixloom.errors import DataError, TooLargeError, ValidationError
from mixloom.eval.tasks import parse_choice_file
from mixloom.server.deps import ID_PATTERN, Context, CurrentTenant, Cursor, FileId, IdempotencyKey
from mixloom.server.errors import ERROR_RESPONSES
from mixloom.server.idempotency import create_once
from mixloom.server.schemas import FileDeleted, FilePublic, FilesPublic
from mixloom.storage import files, tenants

router = APIRouter(tags=["files"], responses=ERROR_RESPONSES)

PURPOSES = ("fine-tune", "evals")  # training rows; evaluation tasks ({"query", "choices", "gold"})
_COPY_CHUNK = 1024 * 1024  # per request in memory while the upload is copied and hashed


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
    """Upload a JSONL data file. Every line is checked; all problems come back at once.

    The body never sits in memory whole: Starlette spools it to a temporary file, which is
    copied in 1 MiB chunks to a `.part` file beside the files, validated from there line
    by line, and renamed into place only when it is valid and within the tenant's quota.
    On any failure the `.part` file is removed.
    """
    settings = ctx.settings
    if purpose not in PURPOSES:
        raise ValidationError(
            f"unknown purpose {purpose!r}; use 'fine-tune' (training rows) or 'evals' (an "
            'evaluation task: {"query", "choices", "gold"} rows)',
            where="purpose",
        )
    cap = min(settings.max_upload_bytes, tenant.max_file_bytes or settings.max_upload_bytes)
    filename = _clean_filename(file.filename)
    folder = settings.files_dir / tenant.id
    folder.mkdir(parents=True, exist_ok=True)
    file_id = files.new_file_id()
    part = folder / f"{file_id}.part"
    path = folder / f"{file_id}.jsonl"
    try:
        size, sha256 = _copy_capped(file, part, cap)
        if size > cap:
            raise TooLargeError(
                f"file {filename} is larger than the {cap} bytes allowed; split it into "
                "several files",
                param="file",
                code="file_too_large",
            )
        if size == 0:
            raise ValidationError(
                f"file {filename} is empty; upload one JSON object per line", where="file"
            )
        with ctx.db.transaction() as session:  # before reading every line of a big file
            tenants.check_storage(
                session=session,
                tenant_id=tenant.id,
                default_max_bytes=settings.max_tenant_bytes,
                adding=size,
                what="this file",
            )
        if purpose == "evals":
            rows = len(parse_choice_file(part.read_bytes(), filename=filename))
        else:
            rows, problems = validate_jsonl_file(
                part, filename=filename, max_lines=settings.max_file_lines
            )
            if problems:
                raise DataError(problems)

        def create(session: Session) -> FilePublic:
            tenants.lock_tenant(session=session, tenant_id=tenant.id)
            tenants.check_storage(
                session=session,
                tenant_id=tenant.id,
                default_max_bytes=settings.max_tenant_bytes,
                adding=size,
                what="this file",
            )
            os.replace(part, path)
            record = files.create_file(
                session=session,
                file_id=file_id,
                tenant_id=tenant.id,
                filename=filename,
                purpose=purpose,
                size=size,
                rows=rows,
                sha256=sha256,
                path=str(path),
            )
            return FilePublic.of(record)

        def undo() -> None:  # the transaction did not commit: back to .part, removed below
            if path.exists():
                os.replace(path, part)

        return create_once(
            ctx.db,
            tenant_id=tenant.id,
            key=idempotency_key,
            path="/v1/files",
            request={"purpose": purpose, "filename": filename, "sha256": sha256},
            create=create,
            undo=undo,
        )
    finally:
        part.unlink(missing_ok=True)


def _copy_capped(upload: UploadFile, dest: Path, cap: int) -> tuple[int, str]:
    """Copy at most cap + 1 bytes of the upload to dest (enough to tell that it is over the
    cap), fsynced; returns (bytes copied, their sha256)."""
    digest = hashlib.sha256()
    size = 0
    with open(dest, "wb") as out:
        while size <= cap:
            chunk = upload.file.read(min(_COPY_CHUNK, cap + 1 - size))
            if not chunk:
                break
            digest.update(chunk)
            out.write(chunk)
            size += len(chunk)
        out.flush()
        os.fsync(out.fileno())
    return size, digest.hexdigest()


@router.get("/v1/files", response_model=FilesPublic)
async def list_files(
    ctx: Context,
    tenant: CurrentTenant,
    after: Cursor = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    purpose: Annotated[str | None, Query(pattern=ID_PATTERN)] = None,
) -> FilesPublic:
    """Newest first. `after`: the last id of the previous page."""
    page, has_more = await ctx.read(
        lambda s: files.list_files(
            session=s, tenant_id=tenant.id, after=after, limit=limit, purpose=purpose
        )
    )
    data = [FilePublic.of(f) for f in page]
    return FilesPublic(
        data=data,
        has_more=has_more,
        first_id=data[0].id if data else None,
        last_id=data[-1].id if data else None,
    )


@router.get("/v1/files/{file_id}", response_model=FilePublic)
async def get_file(ctx: Context, tenant: CurrentTenant, file_id: FileId) -> FilePublic:
    record = await ctx.read(
        lambda s: files.get_file(session=s, file_id=file_id, tenant_id=tenant.id)
    )
    return FilePublic.of(record)


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
