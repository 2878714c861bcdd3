"""OpenAI-shaped model ids: fine-tuned models named ft:BASE:ORG:SUFFIX:ID, never by a path

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-03 15:30:00

No table changes: OpenAI's job bodies (`suffix`, `metadata`, the `supervised` method) fit
the columns 0001 made. Jobs that succeeded before this revision were named
`ft:<MIXLOOM_BASE_MODEL as given>:<suffix or "mixloom">:<job id>`, which put the server's
path of a local base model in every tenant's hands; they are renamed to the shape new jobs
get (mixloom/model_ids.py): `ft:<the base's folder name>:<tenant id>:<suffix>:<job id>`.
The API still finds a model by its old name (`model_ids.legacy_fine_tuned_model_id`), and
downgrade writes the old names back. The rules are copied here, frozen, so that a later
change of the naming code cannot change what this revision did.
"""

import re
from collections.abc import Sequence
from pathlib import PurePosixPath

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_JOBS = sa.table(
    "jobs",
    sa.column("id", sa.String),
    sa.column("tenant_id", sa.String),
    sa.column("model", sa.String),
    sa.column("suffix", sa.String),
    sa.column("fine_tuned_model", sa.String),
)
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def _base_name(source: str) -> str:
    name = PurePosixPath(source.replace("\\", "/").rstrip("/")).name or source
    return _UNSAFE.sub("-", name).strip("-.")[:64] or "base"


def _rename(new: bool) -> None:
    conn = op.get_bind()
    rows = conn.execute(
        sa.select(_JOBS.c.id, _JOBS.c.tenant_id, _JOBS.c.model, _JOBS.c.suffix).where(
            _JOBS.c.fine_tuned_model.is_not(None)
        )
    ).all()
    for job_id, tenant_id, model, suffix in rows:
        if new:
            name = f"ft:{_base_name(model)}:{tenant_id}:{suffix or ''}:{job_id}"
        else:
            name = f"ft:{model}:{suffix or 'mixloom'}:{job_id}"
        conn.execute(
            sa.update(_JOBS).where(_JOBS.c.id == job_id).values(fine_tuned_model=name[:255])
        )


def upgrade() -> None:
    _rename(new=True)


def downgrade() -> None:
    _rename(new=False)
