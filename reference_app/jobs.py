"""The app's jobs: fetch and restore a policy's assignments, and the scheduled housekeeping.

Each assignment job is an opsrun operation (``@ledger.operation``), so it gets, from the ledger:

* dispatch-time dedupe: dispatching an identity that has a queued or running run returns that run;
* the execute-time guard: a duplicate or redelivered message whose run is held or finished skips;
* a 15-minute cooldown: a fetch or restore that succeeded (even partially) in the last 15 minutes
  answers a new dispatch of the same identity instead of running again;
* ``summary_counts`` (``total``, ``processed``, ``failed``) written once, from the final attempt;
* failure codes: per item (``directory.assignment_unreadable``, ``directory.target_not_found``) via
  ``ctx.fail_item``, and ``directory.throttled`` for a run the directory kept throttling (the app's
  ``opsrun_fail`` plugin).

The job functions take the directory's ``access_token`` as a keyword argument. It is not an
identity field, so it reaches the function and nothing else: never the ledger, never the queue
message (:class:`JobMessage`), never the app's tables.

App writes happen in short transactions of their own, never around a directory call (an SQLite
writer holds the whole database), and are idempotent upserts, so a retried attempt rewrites rather
than duplicates.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, ClassVar

from sqlalchemy import delete, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session, sessionmaker

from opsrun_core import (
    RECONCILE_TYPE,
    EnsureResult,
    ExecutionResult,
    InvalidInput,
    JobContext,
    Ledger,
    Run,
)
from opsrun_core.reconcile import ReconcileReport

from .directory import AssignmentTarget, DirectoryAdapter, DirectoryItemError, RemoteAssignment
from .identity import FETCH_TYPE, IDENTITY_FIELDS, RESTORE_TYPE
from .models import AssignmentBackup, Policy, PolicyAssignment, Tenant, utcnow

__all__ = [
    "COOLDOWN",
    "AssignmentJobError",
    "FetchAssignmentsJob",
    "JobMessage",
    "ReconcileAdapterRunsJob",
    "RestoreAssignmentsJob",
]

#: a successful fetch or restore answers new dispatches of its identity for this long
COOLDOWN = timedelta(minutes=15)
#: how long an assignment job is expected to take (its lease is twice that)
EXPECTED_DURATION = timedelta(minutes=2)
#: extend the lease after this many directory items
HEARTBEAT_EVERY = 25


class AssignmentJobError(Exception):
    """A job message that cannot be worked on (unknown policy, a backup of another policy, ...).

    Not transient: retrying cannot help (the worker does not), so the run fails with
    ``<type>.failed``.
    """


@dataclass(frozen=True)
class JobMessage:
    """What the queue carries for one run of an assignment job. Never a token."""

    type: str
    run_id: int
    workspace_id: str
    tenant_id: str
    policy_id: str
    backup_id: str | None = None

    @classmethod
    def for_run(cls, run: Run) -> JobMessage:
        """The message of an assignment run, rebuilt from the ledger (``work``, redelivery)."""
        if run.type not in IDENTITY_FIELDS or run.tenant_id is None:
            raise InvalidInput(f"run {run.id} ({run.type}) is not an assignment job")
        return cls(
            type=run.type,
            run_id=run.id,
            workspace_id=run.workspace_id,
            tenant_id=run.tenant_id,
            policy_id=str(run.identity["policy_id"]),
            backup_id=None if run.type == FETCH_TYPE else str(run.identity["backup_id"]),
        )

    def kwargs(self) -> dict[str, Any]:
        """The job function's keyword arguments, less the access token."""
        call: dict[str, Any] = {
            "workspace_id": self.workspace_id,
            "tenant_id": self.tenant_id,
            "policy_id": self.policy_id,
        }
        if self.backup_id is not None:
            call["backup_id"] = self.backup_id
        return call


@dataclass(frozen=True)
class _PolicyRef:
    id: int
    workspace_id: int
    tenant_external_id: uuid.UUID
    external_id: uuid.UUID


def _as_int(name: str, value: object) -> int:
    try:
        return int(str(value))
    except ValueError:
        raise AssignmentJobError(f"{name} {value!r} is not an id of this app") from None


class _AssignmentJob:
    """What fetch and restore share: the operation, dispatch, execute and the policy lookup."""

    type: ClassVar[str]
    label: ClassVar[str]
    #: the job function (``ctx`` first, then keyword arguments), defined by each job
    handle: Callable[..., int]

    def __init__(
        self, ledger: Ledger, directory: DirectoryAdapter, sessions: sessionmaker[Session]
    ) -> None:
        self.ledger = ledger
        self.directory = directory
        self.sessions = sessions
        self.operation = ledger.operation(
            self.type,
            identity=IDENTITY_FIELDS[self.type],
            label=self.label,
            expected_duration=EXPECTED_DURATION,
            cooldown=COOLDOWN,
        )(self.handle)

    def _dispatch(
        self, *, initiator: str | None, context: dict[str, Any] | None, **call: Any
    ) -> EnsureResult:
        return self.operation.dispatch(initiator=initiator, context=context, **call)

    def execute(
        self, message: JobMessage, *, access_token: str, retries_left: int = 0
    ) -> ExecutionResult:
        """Deliver ``message``: claim its run and work, or skip if the run is held or finished.

        Errors do not propagate (``ExecutionResult.error`` has them): with ``retries_left > 0`` the
        run is released for another delivery, otherwise it fails with a stable code.
        """
        if message.type != self.type:
            raise InvalidInput(f"a {message.type} message was delivered to {self.type}")
        return self.operation.execute(
            message.run_id,
            retries_left=retries_left,
            reraise=False,
            access_token=access_token,
            **message.kwargs(),
        )

    def _policy(self, workspace_id: object, tenant_id: object, policy_id: object) -> _PolicyRef:
        with self.sessions() as session:
            row = session.execute(
                select(
                    Policy.id,
                    Policy.workspace_id,
                    Policy.tenant_id,
                    Policy.external_id,
                    Tenant.external_id.label("tenant_external_id"),
                )
                .join(Tenant, Tenant.id == Policy.tenant_id)
                .where(Policy.id == _as_int("policy_id", policy_id))
            ).first()
        if row is None:
            raise AssignmentJobError(f"policy {policy_id} does not exist (deleted since dispatch?)")
        if str(row.workspace_id) != str(workspace_id) or str(row.tenant_id) != str(tenant_id):
            raise AssignmentJobError(
                f"policy {policy_id} belongs to tenant {row.tenant_id} of workspace "
                f"{row.workspace_id}, not to tenant {tenant_id} of workspace {workspace_id}"
            )
        return _PolicyRef(row.id, row.workspace_id, row.tenant_external_id, row.external_id)

    def _store(self, ref: _PolicyRef, items: Sequence[RemoteAssignment], run_id: int) -> None:
        """Upsert the assignments: one statement on the unique ``(policy_id, external_id)``."""
        if not items:
            return
        now = utcnow()
        rows = [
            {
                "workspace_id": ref.workspace_id,
                "policy_id": ref.id,
                "external_id": item.id,
                "target_kind": item.target.target_kind,
                "target_id": item.target.target_id,
                "intent": item.target.intent,
                "run_id": run_id,
                "synced_at": now,
            }
            for item in items
        ]
        with self.sessions.begin() as session:
            insert = pg_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert
            stmt = insert(PolicyAssignment).values(rows)
            stmt = stmt.on_conflict_do_update(
                index_elements=["policy_id", "external_id"],
                set_={
                    name: stmt.excluded[name]
                    for name in ("target_kind", "target_id", "intent", "run_id", "synced_at")
                },
            )
            session.execute(stmt)

    @staticmethod
    def _each(
        ctx: JobContext,
        items: Iterable[Any],
        work: Callable[[Any], RemoteAssignment],
        done: list[RemoteAssignment],
    ) -> None:
        """Work on every item: a failing item is recorded and the run goes on (partial success)."""
        for index, item in enumerate(items, 1):
            try:
                result = work(item)
            except DirectoryItemError as exc:
                ctx.fail_item(exc.code, exc)  # the message is sanitized before it is stored
            else:
                done.append(result)
                ctx.count(processed=1)
            if index % HEARTBEAT_EVERY == 0:
                ctx.heartbeat()


class FetchAssignmentsJob(_AssignmentJob):
    """Fetch a policy's assignments from the directory into ``policy_assignments``.

    Identity: tenant + policy. Counts: ``total`` assignments listed, ``processed`` read or failed,
    ``failed`` unreadable.
    """

    type = FETCH_TYPE
    label = "Fetch assignments"

    def dispatch(
        self,
        *,
        workspace_id: object,
        tenant_id: object,
        policy_id: object,
        initiator: str | None = None,
        context: dict[str, Any] | None = None,
    ) -> EnsureResult:
        """Create the run of this identity, or return the active or cooling-down one."""
        return self._dispatch(
            workspace_id=workspace_id,
            tenant_id=tenant_id,
            policy_id=policy_id,
            initiator=initiator,
            context=context,
        )

    def handle(
        self,
        ctx: JobContext,
        *,
        workspace_id: str,
        tenant_id: str,
        policy_id: str,
        access_token: str,
    ) -> int:
        """The job function: list, read each assignment, store what was read; return that number."""
        ref = self._policy(workspace_id, tenant_id, policy_id)
        ids = self.directory.list_assignments(
            tenant=ref.tenant_external_id, policy=ref.external_id, access_token=access_token
        )
        ctx.set_counts(total=len(ids))
        fetched: list[RemoteAssignment] = []
        self._each(
            ctx,
            ids,
            lambda assignment_id: self.directory.read_assignment(
                tenant=ref.tenant_external_id,
                policy=ref.external_id,
                assignment_id=assignment_id,
                access_token=access_token,
            ),
            fetched,
        )
        self._store(ref, fetched, ctx.run.id)
        with self.sessions.begin() as session:
            # the listing is complete: assignments the directory no longer has are gone
            session.execute(
                delete(PolicyAssignment).where(
                    PolicyAssignment.policy_id == ref.id,
                    PolicyAssignment.external_id.not_in(ids),
                )
            )
        return len(fetched)


class RestoreAssignmentsJob(_AssignmentJob):
    """Restore a policy's assignments from a backup into the directory.

    Identity: tenant + policy + backup. Counts: ``total`` items in the backup, ``processed``
    applied or failed, ``failed`` refused by the directory (e.g. the target group is gone).
    """

    type = RESTORE_TYPE
    label = "Restore assignments"

    def dispatch(
        self,
        *,
        workspace_id: object,
        tenant_id: object,
        policy_id: object,
        backup_id: object,
        initiator: str | None = None,
        context: dict[str, Any] | None = None,
    ) -> EnsureResult:
        """Create the run of this identity, or return the active or cooling-down one."""
        return self._dispatch(
            workspace_id=workspace_id,
            tenant_id=tenant_id,
            policy_id=policy_id,
            backup_id=backup_id,
            initiator=initiator,
            context=context,
        )

    def handle(
        self,
        ctx: JobContext,
        *,
        workspace_id: str,
        tenant_id: str,
        policy_id: str,
        backup_id: str,
        access_token: str,
    ) -> int:
        """The job function: apply each backed-up assignment, store what was applied."""
        ref = self._policy(workspace_id, tenant_id, policy_id)
        with self.sessions() as session:
            backup = session.get(AssignmentBackup, _as_int("backup_id", backup_id))
            if backup is None or backup.policy_id != ref.id:
                raise AssignmentJobError(f"backup {backup_id} is not a backup of policy {ref.id}")
            targets = [AssignmentTarget.from_dict(item) for item in backup.items]
        ctx.set_counts(total=len(targets))
        applied: list[RemoteAssignment] = []
        self._each(
            ctx,
            targets,
            lambda target: self.directory.apply_assignment(
                tenant=ref.tenant_external_id,
                policy=ref.external_id,
                target=target,
                access_token=access_token,
            ),
            applied,
        )
        self._store(ref, applied, ctx.run.id)
        return len(applied)


class ReconcileAdapterRunsJob:
    """The scheduled housekeeping of a workspace, tracked as an ``ops.reconcile_adapter_runs`` run.

    It finishes the workspace's runs whose worker vanished (their lease expired:
    ``ops.run.lease_expired``) or that no worker ever started (``ops.run.never_started``). Two
    schedulers firing it at once are safe: the database lets one do the work, the other gets the
    active run back.
    """

    type = RECONCILE_TYPE

    def __init__(self, ledger: Ledger, *, grace: timedelta | None = None) -> None:
        self.ledger = ledger
        self.grace = grace

    def handle(self, workspace_id: object, *, initiator: str = "scheduler") -> ReconcileReport:
        """Reconcile one workspace.

        :raises opsrun_core.reconcile.ReconcileError: the sweep failed; its run is recorded
            ``failed`` with code ``ops.reconcile_adapter_runs.failed`` (``error.run``), and the
            message is sanitized.
        """
        return self.ledger.reconcile_report(workspace_id, grace=self.grace, initiator=initiator)

    def handle_all(self, *, initiator: str = "scheduler") -> list[ReconcileReport]:
        """Reconcile every workspace that has active runs, one tracked run each."""
        reports: list[ReconcileReport] = []
        self.ledger.reconcile_all(
            grace=self.grace, initiator=initiator, on_workspace=reports.append
        )
        return reports
