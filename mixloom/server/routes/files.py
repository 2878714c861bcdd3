"""Files: JSONL training data, validated line by line on upload."""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path, PurePath
from typing import Annotated, Any

from fastapi import APIRouter, File, Form, Query, UploadFile
from fastapi.responses import FileResponse, RedirectResponse, Response, StreamingResponse
from sqlalchemy.orm import Session

from mixloom.config import Settings
from mixloom.data.formats import validate_jsonl_file
from mixloom.errors import DataError, TooLargeError, ValidationError
from mixloom.eval.tasks import parse_choice_file
from mixloom.server.deps import ID_PATTERN, Context, CurrentTenant, Cursor, FileId, IdempotencyKey
from mixloom.server.errors import ERROR_RESPONSES, ObjectGoneError
from mixloom.server.idempotency import create_once
from mixloom.server.schemas import FileDeleted, FilePublic, FilesPublic
from mixloom.storage import files, objects, tenants

log = logging.getLogger("mixloom.server")
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
    copied in 1 MiB chunks to a local `.part` file, validated from there line by line, and
    put into the object store (renamed into place locally; a multipart upload to S3) only
    when it is valid and within the tenant's quota, before its row is written. On any
    failure the `.part` file and the object are removed; a store that cannot be reached
    is a 503 with Retry-After, and no row.
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
    store = objects.open_store(settings)
    key = files.file_key(tenant.id, file_id)
    stored = False
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
        # into the store before the row: a row never names bytes that are not there (a
        # store that is down is a 503 here, and nothing is recorded)
        store.put_file(key, part, move=True)
        stored = True

        def create(session: Session) -> FilePublic:
            tenants.lock_tenant(session=session, tenant_id=tenant.id)
            tenants.check_storage(
                session=session,
                tenant_id=tenant.id,
                default_max_bytes=settings.max_tenant_bytes,
                adding=size,
                what="this file",
            )
            record = files.create_file(
                session=session,
                file_id=file_id,
                tenant_id=tenant.id,
                filename=filename,
                purpose=purpose,
                size=size,
                rows=rows,
                sha256=sha256,
                path=store.location(key),
            )
            return FilePublic.of(record)

        made = create_once(
            ctx.db,
            tenant_id=tenant.id,
            key=idempotency_key,
            path="/v1/files",
            request={"purpose": purpose, "filename": filename, "sha256": sha256},
            create=create,
        )
        if isinstance(made, FilePublic):
            stored = False  # recorded: the row owns the object now
        return made
    finally:
        part.unlink(missing_ok=True)
        if stored:  # refused, failed or a replay of an earlier upload: not recorded
            _remove_quietly(store, store.location(key))


def _remove_quietly(store: objects.ObjectStore, location: str) -> None:
    """Remove an object no row names (any failure is logged: it is only space)."""
    try:
        objects.remove(store, location)
    except (OSError, objects.StoreUnavailableError) as exc:
        log.warning("could not remove %s, which no row names: %s", location, exc)


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
    responses={
        200: {"content": {"application/jsonl": {}}, "description": "the file's bytes"},
        307: {"description": "storage_downloads=redirect: a presigned URL of the store"},
    },
)
def get_file_content(ctx: Context, tenant: CurrentTenant, file_id: FileId) -> Response:
    with ctx.db.transaction() as session:
        record = files.get_file(session=session, file_id=file_id, tenant_id=tenant.id)
    return download(ctx.settings, record.path, record.filename, "application/jsonl")


def download(settings: Settings, location: str, filename: str, media_type: str) -> Response:
    """The object at a row's location as a download: the file from the local store, or,
    from S3, streamed through (storage_downloads=stream) or a 307 to a presigned URL
    (redirect). ObjectGoneError (410) when the row outlived its bytes."""
    store, key = objects.resolve(objects.open_store(settings), location)
    if isinstance(store, objects.LocalStore):
        if store.size(key) is None:
            raise _gone(filename)
        return FileResponse(store.path(key), media_type=media_type, filename=filename)
    if settings.storage_downloads == "redirect":
        url = store.presign(key, filename, settings.storage_presign_seconds)
        if url is not None:
            return RedirectResponse(url, status_code=307)
    chunks = store.iter_bytes(key)
    try:
        first = next(chunks, b"")  # a missing object is a 410 before the 200 goes out
    except FileNotFoundError:
        raise _gone(filename) from None

    def stream() -> Iterator[bytes]:
        yield first
        yield from chunks

    return StreamingResponse(
        stream(),
        media_type=media_type,
        headers={"Content-Disposition": f'attachment; filename="{filename}"'},
    )


def _gone(filename: str) -> ObjectGoneError:
    return ObjectGoneError(
        f"the bytes of {filename} are no longer in storage", code="archive_missing"
    )


@router.delete("/v1/files/{file_id}", response_model=FileDeleted)
def delete_file(ctx: Context, tenant: CurrentTenant, file_id: FileId) -> FileDeleted:
    """Refused (409) while an unfinished job uses the file."""
    with ctx.db.transaction() as session:
        record = files.delete_file(session=session, file_id=file_id, tenant_id=tenant.id)
    _remove_quietly(objects.open_store(ctx.settings), record.path)
    return FileDeleted(id=record.id)
