"""Wiring: one database, one ledger with the app's plugin, the directory and the jobs."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterable
from types import TracebackType

from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from opsrun_core import ExecutionResult, Ledger, Run, get_plugin_manager
from opsrun_core.clock import Clock
from opsrun_core.db import make_engine

from .directory import DirectoryAdapter, FakeDirectory
from .jobs import (
    AssignmentJobError,
    FetchAssignmentsJob,
    JobMessage,
    ReconcileAdapterRunsJob,
    RestoreAssignmentsJob,
)
from .models import Policy, Tenant
from .plugin import ReferenceAppPlugin
from .schema import DATABASE_SETTING

__all__ = [
    "BROKER_URL_ENV",
    "DATABASE_URL_ENV",
    "DEFAULT_BROKER_URL",
    "DEFAULT_DATABASE_URL",
    "DEFAULT_QUEUE",
    "ReferenceApp",
    "database_url",
]

#: the environment variable naming the database (shared with the ``opsrun`` command)
DATABASE_URL_ENV = "OPSRUN_DATABASE_URL"
#: an SQLite file in the current directory
DEFAULT_DATABASE_URL = "sqlite:///reference_app.db"
#: the environment variable naming the Celery broker (:mod:`reference_app.celery_app`)
BROKER_URL_ENV = "OPSRUN_BROKER_URL"
#: Redis on this machine
DEFAULT_BROKER_URL = "redis://127.0.0.1:6379/0"
#: the Celery queue the tasks go to, and the workers consume, unless told otherwise
DEFAULT_QUEUE = "reference_app"


def database_url(explicit: str | None = None) -> str:
    """``explicit``, else ``$OPSRUN_DATABASE_URL``, else :data:`DEFAULT_DATABASE_URL`."""
    return explicit or os.environ.get(DATABASE_URL_ENV) or DEFAULT_DATABASE_URL


class ReferenceApp:
    """The host app: its database, its ledger, its directory and its jobs.

    :param database: a URL or an engine (an engine given here is not disposed by :meth:`close`).
    :param directory: the directory adapter (default: a :class:`FakeDirectory`).
    :param clock: the ledger's clock (default: opsrun's; tests and the demo pass one they move).
    :param plugins: extra opsrun plugins, registered after the app's own (so called before it).
    """

    def __init__(
        self,
        database: str | Engine,
        *,
        directory: DirectoryAdapter | None = None,
        clock: Clock | None = None,
        plugins: Iterable[object] = (),
    ) -> None:
        self._owns_engine = not isinstance(database, Engine)
        engine = (
            make_engine(database, setting=DATABASE_SETTING)
            if isinstance(database, str)
            else database
        )
        self.engine = engine
        self.plugin = ReferenceAppPlugin()
        self.ledger = Ledger(
            engine,
            plugin_manager=get_plugin_manager(plugins=[self.plugin, *plugins]),
            clock=clock,
        )
        self.sessions = sessionmaker(engine, expire_on_commit=False)
        self.directory: DirectoryAdapter = directory if directory is not None else FakeDirectory()
        self.fetch = FetchAssignmentsJob(self.ledger, self.directory, self.sessions)
        self.restore = RestoreAssignmentsJob(self.ledger, self.directory, self.sessions)
        self.reconcile = ReconcileAdapterRunsJob(self.ledger)
        self._tenants: dict[str, uuid.UUID] = {}

    def __enter__(self) -> ReferenceApp:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Dispose of the engine if this app made it."""
        if self._owns_engine:
            self.engine.dispose()

    def job(self, type_: str) -> FetchAssignmentsJob | RestoreAssignmentsJob:
        """The assignment job of an operation type."""
        for job in (self.fetch, self.restore):
            if job.type == type_:
                return job
        raise AssignmentJobError(f"{type_!r} is not an assignment job of this app")

    def access_token(self, tenant_id: object) -> str:
        """A fresh directory token for a tenant (acquired per delivery, never stored)."""
        key = str(tenant_id)
        external = self._tenants.get(key)
        if external is None:
            with self.sessions() as session:
                found = session.scalar(select(Tenant.external_id).where(Tenant.id == int(key)))
            if found is None:
                raise AssignmentJobError(f"tenant {tenant_id} does not exist")
            external = self._tenants[key] = found
        return self.directory.acquire_token(external)

    def deliver(self, message: JobMessage, *, retries_left: int = 0) -> ExecutionResult:
        """Deliver a message once, with a fresh token (:mod:`reference_app.worker` retries)."""
        job = self.job(message.type)
        return job.execute(
            message, access_token=self.access_token(message.tenant_id), retries_left=retries_left
        )

    def display_names(self, runs: Iterable[Run]) -> tuple[dict[str, str], dict[int, str]]:
        """Names to show for runs: tenant id -> slug, and run id -> policy (and backup)."""
        with self.sessions() as session:
            tenants = {str(t.id): t.slug for t in session.scalars(select(Tenant))}
            policies = {str(p.id): p.name for p in session.scalars(select(Policy))}
        targets: dict[int, str] = {}
        for run in runs:
            policy = run.identity.get("policy_id")
            if policy is None:
                continue
            name = policies.get(str(policy), f"policy {policy}")
            backup = run.identity.get("backup_id")
            targets[run.id] = name if backup is None else f"{name} ← backup {backup}"
        return tenants, targets

    def session(self) -> Session:
        """A new ORM session on the app's database."""
        return self.sessions()
