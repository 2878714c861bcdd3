"""fault containment and storage quotas: crash counter, stored sizes, dashboard sessions

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-03 12:50:00

`jobs.crashes` counts expired leases (a job that keeps killing its worker is failed as
poisoned); `checkpoints.bytes` and `jobs.adapter_bytes` let a tenant's storage quota count
everything stored for it; `dashboard_sessions` replaces the API key in the dashboard cookie.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("crashes", sa.Integer(), nullable=False, server_default="0"))
        batch_op.add_column(sa.Column("adapter_bytes", sa.BigInteger(), nullable=True))
        batch_op.add_column(
            sa.Column("adapter_deleted_at", sa.DateTime(timezone=True), nullable=True)
        )
    with op.batch_alter_table("checkpoints", schema=None) as batch_op:
        batch_op.add_column(sa.Column("bytes", sa.BigInteger(), nullable=False, server_default="0"))
    op.create_table(
        "dashboard_sessions",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("tenant_id", sa.String(length=40), nullable=False),
        sa.Column("api_key_id", sa.String(length=40), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["api_key_id"], ["api_keys.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("token_hash"),
    )
    with op.batch_alter_table("dashboard_sessions", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_dashboard_sessions_api_key_id"), ["api_key_id"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("dashboard_sessions", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_dashboard_sessions_api_key_id"))
    op.drop_table("dashboard_sessions")
    with op.batch_alter_table("checkpoints", schema=None) as batch_op:
        batch_op.drop_column("bytes")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("adapter_deleted_at")
        batch_op.drop_column("adapter_bytes")
        batch_op.drop_column("crashes")
