"""The ledger table, ``operation_runs``, as typed SQLAlchemy 2 models.

The database enforces the rules that matter under concurrency: the partial unique index
``uq_operation_runs_active_identity`` allows one queued-or-running run per ``(type, identity_hash)``,
and CHECK constraints pin statuses, outcomes and counters. Python-side checks are only courtesy.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    CHAR,
    JSON,
    CheckConstraint,
    DateTime,
    Dialect,
    Index,
    Integer,
    MetaData,
    Text,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

__all__ = ["ACTIVE_PREDICATE", "Base", "OperationRun", "UTCDateTime", "metadata"]

#: constraint names are stable across backends, so migrations and ``alembic check`` agree
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = MetaData(naming_convention=NAMING_CONVENTION)

#: the partial-index predicate, literal on purpose (PERF_NOTES trap 3: a bound parameter loses the index)
ACTIVE_PREDICATE = "status IN ('queued', 'running')"

_JSON = JSON(none_as_null=True).with_variant(JSONB(none_as_null=True), "postgresql")


class UTCDateTime(TypeDecorator[datetime]):
    """An aware UTC timestamp on every backend.

    Postgres stores ``timestamptz``. SQLite has no such type: values are stored as naive UTC text of a
    fixed width, so they compare correctly as text, and read back as aware UTC datetimes.
    Naive datetimes are refused: a timestamp without a zone is a bug waiting to happen.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError("opsrun timestamps must be timezone-aware (UTC); got a naive datetime")
        value = value.astimezone(timezone.utc)
        if dialect.name == "sqlite":
            return value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


class Base(DeclarativeBase):
    metadata = metadata


class OperationRun(Base):
    """One run of one operation: the durable record of a background job."""

    __tablename__ = "operation_runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    type: Mapped[str] = mapped_column(Text)
    workspace_id: Mapped[str] = mapped_column(Text)
    tenant_id: Mapped[str | None] = mapped_column(Text)
    identity_hash: Mapped[str] = mapped_column(CHAR(64))
    identity: Mapped[dict[str, Any]] = mapped_column(_JSON)
    status: Mapped[str] = mapped_column(Text, server_default=text("'queued'"))
    outcome: Mapped[str] = mapped_column(Text, server_default=text("'pending'"))
    summary_counts: Mapped[dict[str, Any] | None] = mapped_column(_JSON)
    failure_summary: Mapped[list[dict[str, Any]] | None] = mapped_column(_JSON)
    context: Mapped[dict[str, Any] | None] = mapped_column(_JSON)
    initiator: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    lease_token: Mapped[str | None] = mapped_column(Text)
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())

    __table_args__ = (
        CheckConstraint("status IN ('queued', 'running', 'completed')", name="status"),
        CheckConstraint(
            "outcome IN ('pending', 'succeeded', 'partially_succeeded', 'failed', 'cancelled')",
            name="outcome",
        ),
        # a run is pending exactly while it is not completed
        CheckConstraint(
            "(status = 'completed') = (outcome <> 'pending')", name="outcome_matches_status"
        ),
        CheckConstraint("attempts >= 0", name="attempts_non_negative"),
        CheckConstraint("length(identity_hash) = 64", name="identity_hash_length"),
        CheckConstraint("workspace_id <> ''", name="workspace_id_not_empty"),
        # dispatch dedupe: at most one active run per identity (the dispatch INSERT's ON CONFLICT target)
        Index(
            "uq_operation_runs_active_identity",
            "type",
            "identity_hash",
            unique=True,
            postgresql_where=text(ACTIVE_PREDICATE),
            sqlite_where=text(ACTIVE_PREDICATE),
        ),
        # cooldown lookup: the latest completed run of an identity
        Index("ix_operation_runs_identity_completed", "type", "identity_hash", "completed_at"),
        # reconcile sweep: the active runs of a workspace (tiny: only active rows)
        Index(
            "ix_operation_runs_active_workspace",
            "workspace_id",
            "status",
            postgresql_where=text(ACTIVE_PREDICATE),
            sqlite_where=text(ACTIVE_PREDICATE),
        ),
        # listing: a workspace's runs, newest first
        Index("ix_operation_runs_workspace_created", "workspace_id", "created_at"),
    )
