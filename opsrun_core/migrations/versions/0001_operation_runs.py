"""Create the operation_runs ledger.

Revision ID: 0001
Revises:
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

from opsrun_core.models import UTCDateTime

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

ACTIVE = "status IN ('queued', 'running')"
JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "operation_runs",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("type", sa.Text(), nullable=False),
        sa.Column("workspace_id", sa.Text(), nullable=False),
        sa.Column("tenant_id", sa.Text(), nullable=True),
        sa.Column("identity_hash", sa.CHAR(64), nullable=False),
        sa.Column("identity", JSON, nullable=False),
        sa.Column("status", sa.Text(), server_default=sa.text("'queued'"), nullable=False),
        sa.Column("outcome", sa.Text(), server_default=sa.text("'pending'"), nullable=False),
        sa.Column("summary_counts", JSON, nullable=True),
        sa.Column("failure_summary", JSON, nullable=True),
        sa.Column("context", JSON, nullable=True),
        sa.Column("initiator", sa.Text(), nullable=True),
        sa.Column("attempts", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("lease_token", sa.Text(), nullable=True),
        sa.Column("lease_expires_at", UTCDateTime(), nullable=True),
        sa.Column("heartbeat_at", UTCDateTime(), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("started_at", UTCDateTime(), nullable=True),
        sa.Column("completed_at", UTCDateTime(), nullable=True),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_operation_runs"),
        sa.CheckConstraint(
            "status IN ('queued', 'running', 'completed')", name=op.f("ck_operation_runs_status")
        ),
        sa.CheckConstraint(
            "outcome IN ('pending', 'succeeded', 'partially_succeeded', 'failed', 'cancelled')",
            name=op.f("ck_operation_runs_outcome"),
        ),
        sa.CheckConstraint(
            "(status = 'completed') = (outcome <> 'pending')",
            name=op.f("ck_operation_runs_outcome_matches_status"),
        ),
        sa.CheckConstraint("attempts >= 0", name=op.f("ck_operation_runs_attempts_non_negative")),
        sa.CheckConstraint(
            "length(identity_hash) = 64", name=op.f("ck_operation_runs_identity_hash_length")
        ),
        sa.CheckConstraint(
            "workspace_id <> ''", name=op.f("ck_operation_runs_workspace_id_not_empty")
        ),
    )
    op.create_index(
        "uq_operation_runs_active_identity",
        "operation_runs",
        ["type", "identity_hash"],
        unique=True,
        postgresql_where=sa.text(ACTIVE),
        sqlite_where=sa.text(ACTIVE),
    )
    op.create_index(
        "ix_operation_runs_identity_completed",
        "operation_runs",
        ["type", "identity_hash", "completed_at"],
    )
    op.create_index(
        "ix_operation_runs_active_workspace",
        "operation_runs",
        ["workspace_id", "status"],
        postgresql_where=sa.text(ACTIVE),
        sqlite_where=sa.text(ACTIVE),
    )
    op.create_index(
        "ix_operation_runs_workspace_created", "operation_runs", ["workspace_id", "created_at"]
    )


def downgrade() -> None:
    op.drop_table("operation_runs")
