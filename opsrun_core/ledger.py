"""The ledger service: dispatch dedupe, the execute-time claim, final-attempt summaries, failures.

Every write that matters is one statement from :mod:`opsrun_core.sql`; the database's partial unique
index, not a Python check, guarantees one active run per identity.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar
from uuid import UUID

import pluggy
from sqlalchemy import Connection, Engine, select
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.orm import Session

from . import migrate
from .catalog import OperationCatalog, OperationSpec
from .clock import Clock, system_clock
from .db import check_connection, make_engine
from .enums import Disposition, Outcome, RunStatus
from .errors import (
    ConfigurationError,
    DatabaseError,
    DispatchRejected,
    InvalidInput,
    LeaseLost,
    OpsrunError,
    PluginError,
    RunNotFound,
)
from .models import OperationRun
from .plugins import get_plugin_manager
from .reconcile import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_GRACE,
    ReconcileError,
    ReconcileReport,
    reconcile_workspace,
)
from .sanitize import sanitize_message
from .sql import RUN_COLUMNS, Statements
from .values import (
    Attempt,
    ClaimDecision,
    EnsureResult,
    FailureEntry,
    Identity,
    Run,
    Summary,
    validate_counts,
)

if TYPE_CHECKING:
    from .operation import Operation

__all__ = ["Explanation", "Ledger", "scope_id"]

log = logging.getLogger("opsrun")

T = TypeVar("T")

#: how often a dispatch re-reads and re-inserts when the active run finishes under it
MAX_DISPATCH_ROUNDS = 20
#: at most this many failure entries are stored on one run (the rest are counted in a last entry)
MAX_FAILURE_ENTRIES = 50
_SUPPORTED = ("postgresql", "sqlite")


@dataclass(frozen=True)
class Explanation:
    """The state an identity is in and what a dispatch would do with it (``Ledger.explain``)."""

    spec: OperationSpec
    identity: Identity
    active: Run | None
    latest_completed: Run | None
    decision: ClaimDecision
    now: datetime


def scope_id(value: object, *, name: str, nullable: bool = False) -> str | None:
    """Normalise a host's scope id (str, int, UUID, ...) to the non-empty string stored."""
    if value is None:
        if nullable:
            return None
        raise InvalidInput(f"{name} is required (a non-empty id such as 'w1' or 42)")
    if isinstance(value, bool) or not isinstance(value, (str, int, UUID)):
        raise InvalidInput(f"{name} must be a string, int or UUID, not {type(value).__name__}")
    text = str(value)
    if "\x00" in text:
        raise InvalidInput(f"{name} holds a NUL character, which Postgres cannot store")
    if not text.strip():
        raise InvalidInput(f"{name} must not be empty")
    if len(text) > 255:
        raise InvalidInput(f"{name} is longer than 255 characters")
    return text


def _run_id(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise InvalidInput(f"a run id is a positive int, got {type(value).__name__} {value!r}")
    return value


#: run ids are a 32-bit integer column; a larger id cannot exist (and would overflow the driver)
MAX_RUN_ID = 2**31 - 1
#: a lease longer than this is a bug, not a policy (and now + lease must stay representable)
MAX_LEASE = timedelta(days=36500)


class Ledger:
    """A ledger of operation runs on one database.

    :param database: a SQLAlchemy URL (``"sqlite:///opsrun.db"``, ``"postgresql+psycopg://..."``)
        or an :class:`~sqlalchemy.Engine`.
    :param plugin_manager: a manager from :func:`opsrun_core.get_plugin_manager` (default: a new
        one with the installed plugins).
    :param catalog: the operation catalog (default: a new one; plugins add to it either way).
    :param clock: a zero-argument callable returning an aware UTC datetime. Default: the database
        server's clock on Postgres, the process clock on SQLite.
    """

    def __init__(
        self,
        database: str | Engine,
        *,
        plugin_manager: pluggy.PluginManager | None = None,
        catalog: OperationCatalog | None = None,
        clock: Clock | None = None,
    ) -> None:
        if isinstance(database, Engine):
            self.engine = database
        elif isinstance(database, str):
            self.engine = make_engine(database)
        else:
            raise ConfigurationError(
                "Ledger takes a database URL string or a SQLAlchemy Engine, "
                f"not {type(database).__name__}"
            )
        self.dialect = self.engine.dialect.name
        if self.dialect not in _SUPPORTED:
            raise ConfigurationError(
                f"opsrun supports PostgreSQL and SQLite, not {self.dialect!r}; fix the database URL"
            )
        if clock is not None and not callable(clock):
            raise ConfigurationError("clock must be a zero-argument callable returning a datetime")
        self._db_clock = clock is None and self.dialect == "postgresql"
        self.clock: Clock = clock if clock is not None else system_clock
        self.pm = plugin_manager if plugin_manager is not None else get_plugin_manager()
        self.catalog = catalog if catalog is not None else OperationCatalog()
        for specs in self.pm.hook.opsrun_register_operations():
            for spec in specs or ():
                self.catalog.register(spec)
        self._sql = Statements.render(dialect=self.dialect, db_clock=self._db_clock)
        # single statements on Postgres run in autocommit (see _connection); same pool
        self._autocommit: Engine | None = (
            self.engine.execution_options(isolation_level="AUTOCOMMIT")
            if self.dialect == "postgresql"
            else None
        )

    def __repr__(self) -> str:
        return f"Ledger({self.engine.url.render_as_string(hide_password=True)!r})"

    # -- schema ----------------------------------------------------------------------------------

    def upgrade(self) -> None:
        """Apply the packaged migrations (idempotent)."""
        check_connection(self.engine)
        with self._translate("upgrade"):
            migrate.upgrade(self.engine)

    # -- dispatch --------------------------------------------------------------------------------

    def ensure_run(
        self,
        type: str,
        *,
        workspace_id: object,
        tenant_id: object | None = None,
        identity: Mapping[str, Any] | None = None,
        context: Mapping[str, Any] | None = None,
        initiator: str | None = None,
        session: Session | None = None,
    ) -> EnsureResult:
        """Create the run of this identity, or return the one that already answers it.

        Exactly one concurrent dispatcher of an identity gets ``CREATED``; the others get
        ``REUSED_ACTIVE`` with the same run. Inside the operation's cooldown a successful run is
        returned as ``REUSED_COOLDOWN``. With ``session``, the insert joins that session's
        transaction (nothing is committed here: roll back and no run remains).
        """
        spec, ident, params = self._prepare(
            type, workspace_id, tenant_id, identity, context, initiator
        )
        with self._connection("dispatch", session) as conn:
            result, _ = self._dispatch(conn, spec, ident, params, claim_lease=None)
        return result

    def ensure_workspace_run(
        self,
        type: str,
        *,
        workspace_id: object,
        identity: Mapping[str, Any] | None = None,
        context: Mapping[str, Any] | None = None,
        initiator: str | None = None,
        session: Session | None = None,
    ) -> EnsureResult:
        """:meth:`ensure_run` for a workspace-scoped run (``tenant_id`` null)."""
        return self.ensure_run(
            type,
            workspace_id=workspace_id,
            tenant_id=None,
            identity=identity,
            context=context,
            initiator=initiator,
            session=session,
        )

    def ensure_and_claim(
        self,
        type: str,
        *,
        workspace_id: object,
        tenant_id: object | None = None,
        identity: Mapping[str, Any] | None = None,
        context: Mapping[str, Any] | None = None,
        initiator: str | None = None,
    ) -> tuple[EnsureResult, Attempt]:
        """Dispatch and claim in one statement (the inline path of schedulers and ``run_now``).

        A new run is inserted already ``running`` under this caller's lease. If the identity is
        answered by another run, that run is returned and claimed the ordinary way (which skips
        while its lease holds, or when it is completed).
        """
        spec, ident, params = self._prepare(
            type, workspace_id, tenant_id, identity, context, initiator
        )
        lease = spec.lease_duration
        with self._connection("dispatch", None) as conn:
            result, token = self._dispatch(conn, spec, ident, params, claim_lease=lease)
        if token is not None:
            attempt = Attempt(
                run_id=result.run.id,
                acquired=True,
                reason="acquired",
                run=result.run,
                token=token,
                lease=lease,
            )
            return result, attempt
        return result, self.claim(result.run.id, lease=lease)

    def _prepare(
        self,
        type_: str,
        workspace_id: object,
        tenant_id: object | None,
        identity: Mapping[str, Any] | None,
        context: Mapping[str, Any] | None,
        initiator: str | None,
    ) -> tuple[OperationSpec, Identity, dict[str, Any]]:
        if not isinstance(type_, str) or not type_:
            raise InvalidInput(
                "an operation type is a non-empty string such as 'assignments.fetch'"
            )
        spec = self.catalog.spec(type_)
        workspace = scope_id(workspace_id, name="workspace_id")
        tenant = scope_id(tenant_id, name="tenant_id", nullable=True)
        if identity is None:
            identity = {}
        if not isinstance(identity, Mapping):
            raise InvalidInput("identity must be a mapping of identity field to plain value")
        if context is not None and not isinstance(context, Mapping):
            raise InvalidInput("context must be a mapping (non-secret extra data) or None")
        if initiator is not None and (
            not isinstance(initiator, str)
            or not 0 < len(initiator) <= 200
            or sanitize_message(initiator, max_length=200) != initiator
        ):
            raise InvalidInput(
                "initiator must be a short plain string such as 'user:42' or 'scheduler' "
                "(no control characters, nothing that looks like a credential)"
            )
        ident = self.pm.hook.opsrun_identity(
            spec=spec, workspace_id=workspace, tenant_id=tenant, inputs=identity
        )
        if not isinstance(ident, Identity):
            raise PluginError(
                "no plugin answered opsrun_identity with an Identity; is the built-in 'identity' "
                "plugin blocked (OPSRUN_DISABLE_PLUGINS) or opsrun not installed?"
            )
        params = {
            "type": spec.type,
            "workspace_id": workspace,
            "tenant_id": tenant,
            "identity_hash": ident.hash,
            "identity": ident.inputs,
            "context": _sanitize_context(context),
            "initiator": initiator,
        }
        return spec, ident, params

    def _insert_first(self) -> bool:
        impls = self.pm.hook.opsrun_claim.get_hookimpls()
        return bool(impls) and all(
            getattr(impl.plugin, "OPSRUN_INSERT_FIRST", False) for impl in impls
        )

    def _dispatch(
        self,
        conn: Connection,
        spec: OperationSpec,
        ident: Identity,
        params: dict[str, Any],
        *,
        claim_lease: timedelta | None,
    ) -> tuple[EnsureResult, str | None]:
        sql = self._sql
        token = secrets.token_hex(16) if claim_lease is not None else None
        insert_first = self._insert_first()
        for _round in range(MAX_DISPATCH_ROUNDS):
            now = self._bound_now()
            values = dict(params)
            self._time_params(values, now, lease=claim_lease, cooldown=spec.cooldown)
            if token is not None:
                values["token"] = token
            if claim_lease is None:
                stmt = sql.insert_queued_cooldown if spec.cooldown else sql.insert_queued
            else:
                stmt = sql.insert_running_cooldown if spec.cooldown else sql.insert_running
            if insert_first:
                row = conn.execute(stmt, values).mappings().first()
                if row is not None:
                    return EnsureResult(Run.from_row(row), Disposition.CREATED), token
            decision = self._decide(conn, spec, ident, params)
            if decision.action == "create":
                if insert_first:
                    continue  # the active run finished under us (PERF_NOTES trap 1): insert again
                # a host policy said create: insert without the built-in cooldown guard
                plain = sql.insert_queued if claim_lease is None else sql.insert_running
                row = conn.execute(plain, values).mappings().first()
                if row is not None:
                    return EnsureResult(Run.from_row(row), Disposition.CREATED), token
                continue  # somebody else created it first: decide again on the new state
            if decision.action == "reject":
                raise DispatchRejected(spec.type, decision.reason)
            assert decision.run is not None
            disposition = (
                Disposition.REUSED_ACTIVE
                if decision.action == "reuse_active"
                else Disposition.REUSED_COOLDOWN
            )
            log.debug("dispatch of %s reused run %s (%s)", spec.type, decision.run.id, disposition)
            return EnsureResult(decision.run, disposition), None
        raise DatabaseError(
            f"dispatch of {spec.type!r} did not settle after {MAX_DISPATCH_ROUNDS} rounds "
            "(runs of this identity keep finishing under it); retry the dispatch"
        )

    def _decide(
        self, conn: Connection, spec: OperationSpec, ident: Identity, params: dict[str, Any]
    ) -> ClaimDecision:
        return self._explain(conn, spec, ident, params).decision

    def _explain(
        self, conn: Connection, spec: OperationSpec, ident: Identity, params: dict[str, Any]
    ) -> Explanation:
        rows = (
            conn.execute(
                self._sql.state, {"type": params["type"], "identity_hash": params["identity_hash"]}
            )
            .mappings()
            .all()
        )
        active = latest = None
        for row in rows:
            run = Run.from_row(row)
            if run.status is RunStatus.COMPLETED:
                latest = run
            else:
                active = run
        now = self._now(conn)
        decision = self.pm.hook.opsrun_claim(
            spec=spec, identity=ident, active=active, latest_completed=latest, now=now
        )
        if not isinstance(decision, ClaimDecision):
            raise PluginError(
                "no plugin answered opsrun_claim with a ClaimDecision; is the built-in 'dedupe' "
                "plugin blocked (OPSRUN_DISABLE_PLUGINS)?"
            )
        return Explanation(spec, ident, active, latest, decision, now)

    def explain(
        self,
        type: str,
        *,
        workspace_id: object,
        tenant_id: object | None = None,
        identity: Mapping[str, Any] | None = None,
    ) -> Explanation:
        """What a dispatch of this identity would do right now, without writing anything:
        the identity, its active and latest completed runs, and the claim policy's decision."""
        spec, ident, params = self._prepare(type, workspace_id, tenant_id, identity, None, None)
        with self._connection("explain", None) as conn:
            return self._explain(conn, spec, ident, params)

    # -- execute-time guard ------------------------------------------------------------------------

    def claim(self, run_id: int, *, lease: timedelta | None = None) -> Attempt:
        """Try to take the run for one execution.

        Succeeds for a ``queued`` run, or a ``running`` run whose lease expired (a takeover after a
        crashed worker; ``attempts`` goes up by one). Otherwise ``attempt.acquired`` is False and
        ``attempt.reason`` is ``"not_found"``, ``"running"`` or ``"completed"``.

        :param lease: how long the lease lasts; default: the operation's lease from the catalog
            (which costs a read of the run's type first: the job layer passes it).
        """
        run_id = _run_id(run_id)
        if lease is not None and (
            not isinstance(lease, timedelta) or not timedelta(0) < lease <= MAX_LEASE
        ):
            raise InvalidInput("lease must be a positive timedelta of at most 100 years")
        if run_id > MAX_RUN_ID:
            return Attempt(run_id=run_id, acquired=False, reason="not_found")
        with self._connection("claim", None) as conn:
            if lease is None:
                found = conn.execute(self._sql.status_of, {"id": run_id}).first()
                if found is None:
                    return Attempt(run_id=run_id, acquired=False, reason="not_found")
                lease = self.catalog.spec(found.type).lease_duration
            token = secrets.token_hex(16)
            values: dict[str, Any] = {"id": run_id, "token": token}
            self._time_params(values, self._bound_now(), lease=lease, cooldown=None)
            row = conn.execute(self._sql.claim, values).mappings().first()
            if row is not None:
                run = Run.from_row(row)
                return Attempt(
                    run_id=run_id,
                    acquired=True,
                    reason="acquired",
                    run=run,
                    token=token,
                    lease=lease,
                )
            found = conn.execute(self._sql.status_of, {"id": run_id}).first()
        if found is None:
            return Attempt(run_id=run_id, acquired=False, reason="not_found")
        if found.status == RunStatus.COMPLETED.value:
            return Attempt(run_id=run_id, acquired=False, reason="completed")
        return Attempt(run_id=run_id, acquired=False, reason="running")

    def heartbeat(self, attempt: Attempt) -> Run:
        """Extend the attempt's lease by the operation's lease length.

        :raises LeaseLost: another worker took the run over, or it was finished.
        """
        token, lease = self._held(attempt, "heartbeat")
        values: dict[str, Any] = {"id": attempt.run_id, "token": token}
        self._time_params(values, self._bound_now(), lease=lease, cooldown=None)
        with self._connection("heartbeat", None) as conn:
            row = conn.execute(self._sql.heartbeat, values).mappings().first()
        if row is None:
            raise self._lost(attempt, "heartbeat")
        attempt.run = Run.from_row(row)
        return attempt.run

    # -- terminal writes ---------------------------------------------------------------------------

    def complete(self, attempt: Attempt, summary_counts: Mapping[str, int] | None = None) -> Run:
        """Finish the run with this attempt's counts; the outcome is derived from them.

        ``summary_counts`` (if given) is merged over the counts the attempt collected; the stored
        ``summary_counts`` always hold ``total``, ``processed`` and ``failed``.

        :raises LeaseLost: the attempt lost the run (its write changed nothing).
        :raises InvalidInput: counts that are not non-negative ints, or inconsistent.
        """
        self._held(attempt, "complete")
        counts = dict(attempt.counts)
        if summary_counts is not None:
            counts.update(validate_counts(summary_counts, where="complete()"))
        return self._finish(attempt, counts, error=None)

    def fail(self, attempt: Attempt, error: BaseException | str) -> Run:
        """Finish the run as ``failed``; ``failure_summary`` comes from ``opsrun_fail``, sanitized.

        :raises LeaseLost: the attempt lost the run (its write changed nothing).
        """
        self._held(attempt, "fail")
        if not isinstance(error, BaseException):
            error = RuntimeError(str(error))
        return self._finish(attempt, dict(attempt.counts), error=error)

    def release(self, attempt: Attempt, error: BaseException | None = None) -> Run:
        """Give the run back for a retry: it is ``queued`` again and this attempt's counts are
        dropped (the final attempt's counts win).

        :raises LeaseLost: the attempt had already lost the run.
        """
        token, _ = self._held(attempt, "release")
        values: dict[str, Any] = {"id": attempt.run_id, "token": token}
        self._time_params(values, self._bound_now(), lease=None, cooldown=None)
        with self._connection("release", None) as conn:
            row = conn.execute(self._sql.release, values).mappings().first()
        if row is None:
            raise self._lost(attempt, "release")
        if error is not None:
            log.warning(
                "run %s (%s) released for retry after %s: %s",
                attempt.run_id,
                row["type"],
                type(error).__name__,
                sanitize_message(error),
            )
        attempt.token = None
        attempt.run = Run.from_row(row)
        return attempt.run

    def _finish(
        self, attempt: Attempt, counts: dict[str, int], *, error: BaseException | None
    ) -> Run:
        what = "complete" if error is None else "fail"
        token, _ = self._held(attempt, what)
        assert attempt.run is not None
        run = attempt.run
        spec = self.catalog.spec(run.type)
        failures = list(attempt.failures)
        fallback = FailureEntry(f"{run.type}.failed", type(error).__name__)
        if error is not None:
            try:
                entries = _entries(
                    self.pm.hook.opsrun_fail(spec=spec, run=run, error=error) or [fallback],
                    "opsrun_fail",
                )
            except Exception as exc:  # a broken plugin must not keep a failure from being recorded
                log.error("opsrun_fail raised %s; recording the default code", type(exc).__name__)
                entries = [fallback]
            failures.extend(entries)
        try:
            summary = self.pm.hook.opsrun_summarize(
                spec=spec, run=run, counts=counts, failures=failures, error=error
            )
        except Exception as exc:
            if error is None:
                raise  # bad counts on completion are the caller's to fix (the run stays claimed)
            log.error("opsrun_summarize raised %s; recording zero counts", type(exc).__name__)
            summary = Summary({"total": 0, "processed": 0, "failed": 0}, Outcome.FAILED)
        if not isinstance(summary, Summary):
            raise PluginError(
                "no plugin answered opsrun_summarize with a Summary; is the built-in 'tracking' "
                "plugin blocked (OPSRUN_DISABLE_PLUGINS)?"
            )
        stored_counts = validate_counts(summary.counts, where="opsrun_summarize")
        missing = [k for k in ("total", "processed", "failed") if k not in stored_counts]
        if missing:
            raise PluginError(f"opsrun_summarize returned counts without {missing}")
        outcome = Outcome(summary.outcome)
        if outcome is Outcome.PENDING:
            raise PluginError("opsrun_summarize returned the outcome 'pending' for a finished run")
        values: dict[str, Any] = {
            "id": attempt.run_id,
            "token": token,
            "outcome": outcome.value,
            "summary_counts": stored_counts,
            "failure_summary": _failure_summary(failures) or None,
        }
        self._time_params(values, self._bound_now(), lease=None, cooldown=None)
        with self._connection("complete", None) as conn:
            row = conn.execute(self._sql.finish, values).mappings().first()
        if row is None:
            raise self._lost(attempt, what)
        attempt.token = None
        attempt.run = Run.from_row(row)
        self.pm.hook.opsrun_run_finished(run=attempt.run)
        return attempt.run

    # -- reads ---------------------------------------------------------------------------------

    def get(self, run_id: int) -> Run:
        """The run with this id. :raises RunNotFound: no such run."""
        run_id = _run_id(run_id)
        if run_id > MAX_RUN_ID:
            raise RunNotFound(run_id)
        with self._connection("get", None) as conn:
            row = conn.execute(self._sql.get, {"id": run_id}).mappings().first()
        if row is None:
            raise RunNotFound(run_id)
        return Run.from_row(row)

    def runs(
        self,
        *,
        type: str | None = None,
        workspace_id: object | None = None,
        tenant_id: object | None = None,
        status: str | RunStatus | Sequence[str | RunStatus] | None = None,
        outcome: str | Outcome | Sequence[str | Outcome] | None = None,
        since: datetime | None = None,
        limit: int | None = None,
    ) -> list[Run]:
        """Runs matching every given filter, newest first."""
        table = OperationRun.__table__
        query = select(*(table.c[name] for name in RUN_COLUMNS)).order_by(
            table.c.created_at.desc(), table.c.id.desc()
        )
        if type is not None:
            query = query.where(table.c.type == type)
        if workspace_id is not None:
            query = query.where(table.c.workspace_id == scope_id(workspace_id, name="workspace_id"))
        if tenant_id is not None:
            query = query.where(table.c.tenant_id == scope_id(tenant_id, name="tenant_id"))
        if status is not None:
            query = query.where(table.c.status.in_(_enum_values(status, RunStatus, "status")))
        if outcome is not None:
            query = query.where(table.c.outcome.in_(_enum_values(outcome, Outcome, "outcome")))
        if since is not None:
            if not isinstance(since, datetime) or since.tzinfo is None:
                raise InvalidInput("since must be an aware datetime")
            query = query.where(table.c.created_at >= since)
        if limit is not None:
            if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
                raise InvalidInput("limit must be a positive int")
            query = query.limit(limit)
        with self._connection("runs", None) as conn:
            return [Run.from_row(row) for row in conn.execute(query).mappings()]

    # -- housekeeping ----------------------------------------------------------------------------

    def reconcile(
        self,
        workspace_id: object,
        *,
        grace: timedelta | None = None,
        batch_size: int | None = None,
        initiator: str | None = None,
    ) -> Run:
        """Finish the workspace's stale runs, tracked as an ``ops.reconcile_adapter_runs`` run.

        Returns that run: ``completed`` with its ``summary_counts`` when this call did the work, or
        the other reconcile's active run (left untouched) when one already holds the workspace.

        :raises ReconcileError: the sweep raised; the run is recorded ``failed`` with code
            ``ops.reconcile_adapter_runs.failed`` and a sanitized message.
        """
        return self.reconcile_report(
            workspace_id, grace=grace, batch_size=batch_size, initiator=initiator
        ).run

    def reconcile_report(
        self,
        workspace_id: object,
        *,
        grace: timedelta | None = None,
        batch_size: int | None = None,
        initiator: str | None = None,
        on_batch: Callable[[int], None] | None = None,
    ) -> ReconcileReport:
        """:meth:`reconcile`, also saying whether this call did the work."""
        return reconcile_workspace(
            self,
            workspace_id,
            grace=DEFAULT_GRACE if grace is None else grace,
            batch_size=DEFAULT_BATCH_SIZE if batch_size is None else batch_size,
            initiator=initiator,
            on_batch=on_batch,
        )

    def active_workspaces(self) -> list[str]:
        """The workspaces that have queued or running runs."""
        with self._connection("active_workspaces", None) as conn:
            return sorted(row[0] for row in conn.execute(self._sql.active_workspaces))

    def reconcile_all(
        self,
        *,
        grace: timedelta | None = None,
        batch_size: int | None = None,
        initiator: str | None = None,
        on_workspace: Callable[[ReconcileReport], None] | None = None,
    ) -> list[Run]:
        """Reconcile every workspace that has active runs, one tracked run each.

        A workspace whose reconcile fails does not stop the others: its failure is logged
        (sanitized) and its failed reconcile run is among the runs returned.
        """
        runs = []
        for workspace in self.active_workspaces():
            try:
                report = self.reconcile_report(
                    workspace, grace=grace, batch_size=batch_size, initiator=initiator
                )
            except ReconcileError as exc:
                log.error("%s", exc)  # ReconcileError's message is sanitized
                if exc.run is not None:
                    runs.append(exc.run)
                continue
            if on_workspace is not None:
                on_workspace(report)
            runs.append(report.run)
        return runs

    # -- the job-facing layer ----------------------------------------------------------------------

    def operation(
        self,
        type: str,
        *,
        identity: Sequence[str] = (),
        retry_on: tuple[type[BaseException], ...] = (Exception,),
        **spec_fields: Any,
    ) -> Callable[[Callable[..., Any]], Operation]:
        """Decorate a job function as an operation (registering its spec from ``spec_fields``).

        ``retry_on``: the exceptions worth a retry; any other exception fails the run at once,
        whatever retries remain.
        """
        from .operation import Operation

        self.catalog.define(type, **spec_fields)

        def decorate(fn: Callable[..., Any]) -> Operation:
            return Operation(self, type, fn, identity=identity, retry_on=retry_on)

        return decorate

    # -- plumbing --------------------------------------------------------------------------------

    def now(self) -> datetime:
        """The ledger's current time (the database server's on Postgres by default)."""
        with self._connection("now", None) as conn:
            return self._now(conn)

    def _bound_now(self) -> datetime | None:
        return None if self._db_clock else self.clock()

    def _now(self, conn: Connection) -> datetime:
        if self._db_clock:
            value = conn.exec_driver_sql("SELECT statement_timestamp()").scalar_one()
            assert isinstance(value, datetime)
            return value
        return self.clock()

    def _time_params(
        self,
        values: dict[str, Any],
        now: datetime | None,
        *,
        lease: timedelta | None,
        cooldown: timedelta | None,
    ) -> None:
        if self._db_clock:
            if lease is not None:
                values["lease"] = lease
            if cooldown is not None:
                values["cooldown"] = cooldown
            return
        assert now is not None
        if now.tzinfo is None:
            raise ConfigurationError("the ledger's clock returned a naive datetime; return UTC")
        values["now"] = now
        if lease is not None:
            values["lease_expires_at"] = now + lease
        if cooldown is not None:
            values["cooldown_since"] = now - cooldown

    def _held(self, attempt: Attempt, what: str) -> tuple[str, timedelta]:
        if not isinstance(attempt, Attempt):
            raise InvalidInput(f"{what}() takes the Attempt returned by claim()")
        if (
            not attempt.acquired
            or attempt.token is None
            or attempt.lease is None
            or attempt.run is None
        ):
            raise LeaseLost(
                f"{what}() of run {attempt.run_id}: this attempt does not hold the run "
                f"(claim said {attempt.reason!r}, or it already finished or released it); "
                "stop working on it"
            )
        return attempt.token, attempt.lease

    def _lost(self, attempt: Attempt, what: str) -> LeaseLost:
        attempt.token = None
        return LeaseLost(
            f"{what}() of run {attempt.run_id} changed nothing: the attempt lost its lease (another "
            "worker took the run over, or reconcile finished it); stop working on it"
        )

    @contextmanager
    def _connection(
        self, what: str, session: Session | None, *, transaction: bool = False
    ) -> Iterator[Connection]:
        """A connection for one ledger call.

        Every write of the ledger is one statement whose correctness comes from the database's
        constraints, never from a surrounding transaction; so on Postgres they run in autocommit,
        which saves the BEGIN and COMMIT round trips (4 of the 12 a full path would otherwise
        wait for). ``transaction=True`` (the reconcile sweep's SKIP LOCKED batches) and a caller's
        ``session`` get a real transaction. SQLite keeps BEGIN IMMEDIATE: its writers must queue.
        """
        with self._translate(what):
            if session is not None:
                bind = session.get_bind()
                bind_url = bind.engine.url if isinstance(bind, Connection) else bind.url
                if bind is not self.engine and bind_url != self.engine.url:
                    raise InvalidInput("the session is bound to another database than the ledger")
                yield session.connection()
            elif self._autocommit is not None and not transaction:
                with self._autocommit.connect() as conn:
                    yield conn
            else:
                with self.engine.begin() as conn:
                    yield conn

    @contextmanager
    def _translate(self, what: str) -> Iterator[None]:
        try:
            yield
        except OpsrunError:
            raise
        except DBAPIError as exc:
            orig = exc.orig if exc.orig is not None else exc
            raise DatabaseError(
                f"{what} failed in the database ({type(orig).__name__}: "
                f"{sanitize_message(orig, max_length=200)}); its transaction was rolled back unless "
                "the connection dropped during the commit itself; retry it (that is safe: a "
                "dispatch reuses the run, a claim skips it), and check the database if it persists"
            ) from exc
        except SQLAlchemyError as exc:
            raise DatabaseError(
                f"{what} failed ({type(exc).__name__}: {sanitize_message(exc, max_length=200)}); "
                "check the database and that `opsrun migrate` has run"
            ) from exc


def _enum_values(value: Any, enum_: type[Any], name: str) -> list[str]:
    items = [value] if isinstance(value, str) else list(value)
    try:
        return [enum_(item).value for item in items]
    except ValueError:
        allowed = ", ".join(member.value for member in enum_)
        raise InvalidInput(f"unknown {name} in {items!r}; use one of: {allowed}") from None


def _entries(entries: object, hook: str) -> list[FailureEntry]:
    if not isinstance(entries, (list, tuple)):
        raise PluginError(
            f"{hook} must return a list of FailureEntry, not {type(entries).__name__}"
        )
    out = []
    for entry in entries:
        if isinstance(entry, FailureEntry):
            out.append(entry)
        elif isinstance(entry, Mapping) and "code" in entry:
            out.append(FailureEntry(str(entry["code"]), str(entry.get("message", ""))))
        else:
            raise PluginError(f"{hook} returned {type(entry).__name__}, not a FailureEntry")
    return out


def _failure_summary(failures: Sequence[FailureEntry]) -> list[dict[str, str]]:
    """Every message sanitized, whatever a plugin or a job returned; bounded in size."""
    clean = [
        {
            "code": sanitize_message(f.code, max_length=100) or "opsrun.failed",
            "message": sanitize_message(f.message),
        }
        for f in failures
    ]
    if len(clean) > MAX_FAILURE_ENTRIES:
        dropped = len(clean) - MAX_FAILURE_ENTRIES + 1
        clean = [
            *clean[: MAX_FAILURE_ENTRIES - 1],
            {"code": "opsrun.failures_truncated", "message": f"{dropped} more failure entries"},
        ]
    return clean


def _sanitize_context(context: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Context is host data for display: plain data by the fingerprint's rules (so no
    secret-named key), and every string sanitized on top."""
    if context is None:
        return None
    from .fingerprint import normalise_plain

    def clean(value: Any) -> Any:
        if isinstance(value, dict):
            return {key: clean(item) for key, item in value.items()}
        if isinstance(value, list):
            return [clean(item) for item in value]
        if isinstance(value, str) and value:
            return sanitize_message(value, max_length=2000)
        return value

    result = clean(normalise_plain(context, "context"))
    assert isinstance(result, dict)
    return result
