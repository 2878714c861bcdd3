"""a job's evaluation: what to evaluate once it has trained, and the results

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03 17:10:00

`jobs.evaluation` holds {"request": {"tasks", "limit", "protocol", "num_fewshot"}, "status":
"pending" | "succeeded" | "failed", "results": [...], "error": {...}} (mixloom/eval).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("evaluation", JSON, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("evaluation")
