"""The reference app's domain: workspaces, tenants, policies, their assignments and backups.

These tables live beside opsrun's ``operation_runs`` in the same database, but in their own
:data:`metadata`, so the two schemas never mix.

**Why ``create_all``/``drop_all`` and not migrations of our own.** The app's schema is a fixed demo
schema that ``seed --fresh`` recreates from scratch every time (the equivalent of
``migrate:fresh --seed``); nobody upgrades a reference-app database in place, so a second Alembic
history would be ceremony with nothing to migrate. :func:`create_tables` is idempotent
(``checkfirst``), :func:`drop_tables` drops only these tables. The ledger's table is another
matter: it always comes from opsrun's packaged migrations (``opsrun_core.migrate``), because its
partial unique index and its own version table are the library's contract (see
:mod:`reference_app.schema`). A production host app would keep its tables in its own Alembic history
and run opsrun's migrations beside it (docs/migrations.md).

The rules that must hold whatever the code does are constraints: a tenant's ``external_id`` is
unique and NOT NULL, every tenant and policy carries a NOT NULL ``workspace_id``, a policy's
workspace is its tenant's (a composite foreign key), and a workspace has at most one platform tenant
(a partial unique index).
"""

from __future__ import annotations

import uuid
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    ForeignKey,
    ForeignKeyConstraint,
    Index,
    Integer,
    MetaData,
    String,
    UniqueConstraint,
    Uuid,
    text,
)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from opsrun_core.models import UTCDateTime

__all__ = [
    "AssignmentBackup",
    "Base",
    "Policy",
    "PolicyAssignment",
    "Tenant",
    "Workspace",
    "create_tables",
    "drop_tables",
    "metadata",
    "utcnow",
]

#: stable constraint names on both backends (the same convention as opsrun's own models)
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

#: the app's own tables; opsrun's ``operation_runs`` is not in here
metadata = MetaData(naming_convention=NAMING_CONVENTION)


def utcnow() -> datetime:
    """The process clock as an aware UTC datetime (for the app's own timestamps)."""
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    """Declarative base of the app's models, bound to :data:`metadata`."""

    metadata = metadata


class Workspace(Base):
    """The outermost scope: every tenant, policy and operation run belongs to one workspace."""

    __tablename__ = "workspaces"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    slug: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    tenants: Mapped[list[Tenant]] = relationship(back_populates="workspace")


class Tenant(Base):
    """A customer's directory tenant, managed from a workspace.

    ``external_id`` is the tenant's id in the remote directory: a UUID, unique, never NULL (the seed
    generates fresh UUID v4 values). ``is_platform`` marks the workspace's own tenant.
    """

    __tablename__ = "tenants"
    __table_args__ = (
        # the target of the policies' composite foreign key (tenant_id, workspace_id)
        UniqueConstraint("id", "workspace_id", name="uq_tenants_id_workspace_id"),
        UniqueConstraint("workspace_id", "slug"),
        # one platform tenant per workspace, enforced by the database
        Index(
            "uq_tenants_platform_per_workspace",
            "workspace_id",
            unique=True,
            sqlite_where=text("is_platform = 1"),
            postgresql_where=text("is_platform"),
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    workspace_id: Mapped[int] = mapped_column(ForeignKey("workspaces.id", ondelete="CASCADE"))
    slug: Mapped[str] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(200))
    external_id: Mapped[uuid.UUID] = mapped_column(Uuid(), unique=True)
    is_platform: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    workspace: Mapped[Workspace] = relationship(back_populates="tenants")
    policies: Mapped[list[Policy]] = relationship(back_populates="tenant")


class Policy(Base):
    """A device-management policy of a tenant, whose assignments the jobs fetch and restore."""

    __tablename__ = "policies"
    __table_args__ = (
        # a policy's workspace is its tenant's: the database refuses any other pairing
        ForeignKeyConstraint(
            ["tenant_id", "workspace_id"],
            ["tenants.id", "tenants.workspace_id"],
            name="fk_policies_tenant_id_workspace_id_tenants",
            ondelete="CASCADE",
        ),
        UniqueConstraint("tenant_id", "external_id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    workspace_id: Mapped[int] = mapped_column(ForeignKey("workspaces.id", ondelete="CASCADE"))
    tenant_id: Mapped[int] = mapped_column(Integer)
    external_id: Mapped[uuid.UUID] = mapped_column(Uuid())
    name: Mapped[str] = mapped_column(String(200))
    platform: Mapped[str] = mapped_column(String(40))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    tenant: Mapped[Tenant] = relationship(back_populates="policies")
    assignments: Mapped[list[PolicyAssignment]] = relationship(back_populates="policy")
    backups: Mapped[list[AssignmentBackup]] = relationship(back_populates="policy")


class PolicyAssignment(Base):
    """One assignment of a policy as last seen in the directory (written by the jobs).

    Keyed by ``(policy_id, external_id)``, so a retried or repeated fetch updates rows rather than
    adding duplicates.
    """

    __tablename__ = "policy_assignments"
    __table_args__ = (UniqueConstraint("policy_id", "external_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    workspace_id: Mapped[int] = mapped_column(ForeignKey("workspaces.id", ondelete="CASCADE"))
    policy_id: Mapped[int] = mapped_column(ForeignKey("policies.id", ondelete="CASCADE"))
    external_id: Mapped[str] = mapped_column(String(64))
    target_kind: Mapped[str] = mapped_column(String(40))
    target_id: Mapped[str | None] = mapped_column(String(64))
    intent: Mapped[str] = mapped_column(String(20))
    #: the operation run that last wrote this row
    run_id: Mapped[int | None] = mapped_column(Integer)
    synced_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    policy: Mapped[Policy] = relationship(back_populates="assignments")


class AssignmentBackup(Base):
    """An immutable snapshot of a policy's assignments, which a restore reads.

    ``items`` is a JSON list of ``{"target_kind", "target_id", "intent"}`` objects.
    """

    __tablename__ = "assignment_backups"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    workspace_id: Mapped[int] = mapped_column(ForeignKey("workspaces.id", ondelete="CASCADE"))
    policy_id: Mapped[int] = mapped_column(ForeignKey("policies.id", ondelete="CASCADE"))
    label: Mapped[str] = mapped_column(String(200))
    items: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    taken_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    policy: Mapped[Policy] = relationship(back_populates="backups")


def create_tables(bind: Engine | Connection) -> None:
    """Create the app's tables that do not exist yet (idempotent)."""
    metadata.create_all(bind, checkfirst=True)


def drop_tables(bind: Engine | Connection) -> None:
    """Drop the app's tables (only these; the ledger's table is left to its migrations)."""
    metadata.drop_all(bind, checkfirst=True)
