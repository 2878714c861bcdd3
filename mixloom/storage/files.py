"""Uploaded data files. The bytes live in the object store (storage/objects.py) under
`file_key`; rows hold metadata and the bytes' location."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from mixloom.errors import ObjectNotFoundError, StateConflictError
from mixloom.storage import models as m
from mixloom.storage.ids import new_id
from mixloom.storage.records import TERMINAL_STATUSES, FileRecord

FILE_STATUS_PROCESSED = "processed"  # validated line by line at upload; jobs may use it
PART_SUFFIX = ".part"  # an upload being written; renamed into place once valid
# An upload writes its .part file at least once a second while it lasts, so one untouched
# this long belongs to a process that died mid-upload (other API processes may be writing
# theirs right now).
STALE_PART_SECONDS = 3600.0


def remove_stale_parts(files_dir: Path, *, older_than_s: float = STALE_PART_SECONDS) -> int:
    """Remove the .part files that uploads of dead processes left; returns how many."""
    removed = 0
    cutoff = time.time() - older_than_s
    for part in files_dir.glob(f"*/*{PART_SUFFIX}"):
        try:
            if part.stat().st_mtime < cutoff:
                part.unlink()
                removed += 1
        except FileNotFoundError:  # finished or removed meanwhile
            continue
    return removed


def new_file_id() -> str:
    return new_id("file")


def file_key(tenant_id: str, file_id: str) -> str:
    """Where an upload's bytes live in the object store."""
    return f"files/{tenant_id}/{file_id}.jsonl"


def create_file(
    *,
    session: Session,
    file_id: str,
    tenant_id: str,
    filename: str,
    purpose: str,
    size: int,
    rows: int,
    sha256: str,
    path: str,
    now: datetime | None = None,
) -> FileRecord:
    row = m.File(
        id=file_id,
        tenant_id=tenant_id,
        filename=filename,
        purpose=purpose,
        bytes=size,
        rows=rows,
        sha256=sha256,
        path=path,
        status=FILE_STATUS_PROCESSED,
        created_at=now or datetime.now(UTC),
        deleted_at=None,
    )
    session.add(row)
    session.flush()
    return FileRecord.from_row(row)


def _file_row(session: Session, file_id: str, tenant_id: str | None) -> m.File:
    query = select(m.File).where(m.File.id == file_id, m.File.deleted_at.is_(None))
    if tenant_id is not None:
        query = query.where(m.File.tenant_id == tenant_id)
    row = session.scalar(query)
    if row is None:
        raise ObjectNotFoundError(
            f"no file with id {file_id!r}", param="file_id", code="file_not_found"
        )
    return row


def get_file(*, session: Session, file_id: str, tenant_id: str | None = None) -> FileRecord:
    """A live file; ObjectNotFoundError if it is missing, deleted, or another tenant's."""
    return FileRecord.from_row(_file_row(session, file_id, tenant_id))


def list_files(
    *,
    session: Session,
    tenant_id: str,
    after: str | None = None,
    limit: int = 20,
    purpose: str | None = None,
) -> tuple[list[FileRecord], bool]:
    """Newest first; `after` is the last id of the previous page. Returns (page, has_more)."""
    query = select(m.File).where(m.File.tenant_id == tenant_id, m.File.deleted_at.is_(None))
    if purpose is not None:
        query = query.where(m.File.purpose == purpose)
    if after is not None:
        query = query.where(m.File.id < after)
    rows = list(session.scalars(query.order_by(m.File.id.desc()).limit(limit + 1)))
    return [FileRecord.from_row(r) for r in rows[:limit]], len(rows) > limit


def delete_file(
    *, session: Session, file_id: str, tenant_id: str, now: datetime | None = None
) -> FileRecord:
    """Mark a file deleted (the caller removes its bytes after commit).

    Refused while an unfinished job reads it; finished jobs keep the id for the record.
    """
    row = _file_row(session, file_id, tenant_id)
    users = session.scalars(
        select(m.Job.id)
        .where(
            (m.Job.training_file_id == file_id) | (m.Job.validation_file_id == file_id),
            m.Job.status.not_in([s.value for s in TERMINAL_STATUSES]),
        )
        .limit(3)
    ).all()
    if users:
        raise StateConflictError(
            f"file {file_id} is in use by unfinished job(s) {', '.join(users)}; "
            "cancel them or wait until they finish, then delete it",
            param="file_id",
            code="file_in_use",
        )
    row.deleted_at = now or datetime.now(UTC)
    session.flush()
    return FileRecord.from_row(row)
