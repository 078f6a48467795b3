"""The opsrun hook specifications (project name ``opsrun``).

Every pluggable decision goes through one of these hooks. The built-in behaviour is itself a set of
plugins (``opsrun_plugins``) registered through the ``opsrun`` entry-point group and marked
``trylast=True``, so a host's plugin that returns a non-``None`` result wins.

Implement a hook with :data:`hookimpl`::

    from opsrun_core import hookimpl, FailureEntry

    class ThrottlingCodes:
        @hookimpl
        def opsrun_fail(self, spec, run, error):
            if isinstance(error, ThrottledError):
                return [FailureEntry("directory.throttled", str(error))]
            return None   # no opinion: the next implementation decides

Timing or logging around a hook uses ``@hookimpl(wrapper=True)``, not a new hook.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from .catalog import OperationSpec
    from .values import ClaimDecision, FailureEntry, Identity, Run, Summary

__all__ = ["PROJECT_NAME", "hookimpl", "hookspec"]

#: the pluggy project name, which is also the entry-point group plugins are loaded from
PROJECT_NAME = "opsrun"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec(firstresult=True)
def opsrun_identity(
    spec: OperationSpec, workspace_id: str, tenant_id: str | None, inputs: Mapping[str, Any]
) -> Identity | None:
    """Build the identity of a dispatch: its fingerprint and the inputs to store.

    Called by ``Ledger.ensure_run`` before anything touches the database.

    :param spec: the catalog entry of the operation type (unknown types get a default spec).
    :param workspace_id: the scope, already a non-empty string.
    :param tenant_id: the tenant scope as a string, or ``None`` for a workspace-scoped run.
    :param inputs: the identity inputs given by the caller (never secrets: the built-in refuses
        secret-named keys).
    :return: an :class:`~opsrun_core.Identity`, or ``None`` for no opinion.

    Stops at the first non-None result. The built-in (``opsrun_plugins.identity``) hashes with
    :func:`opsrun_core.fingerprint`.
    """


@hookspec(firstresult=True)
def opsrun_claim(
    spec: OperationSpec,
    identity: Identity,
    active: Run | None,
    latest_completed: Run | None,
    now: datetime,
) -> ClaimDecision | None:
    """Decide what a dispatch does: create a run, reuse the active one, reuse one in cooldown,
    or reject.

    Called by ``Ledger.ensure_run`` once the current state of the identity is known (and again if a
    create lost a race). Whatever it decides, the partial unique index still allows one active run
    per identity: a ``create`` that conflicts is retried with the new state.

    :param spec: the operation's catalog entry (``spec.cooldown`` is the cooldown window).
    :param identity: the identity built by ``opsrun_identity``.
    :param active: the queued or running run of this identity, or ``None``.
    :param latest_completed: the most recently completed run of this identity, or ``None``.
    :param now: the ledger's current time (aware UTC).
    :return: a :class:`~opsrun_core.ClaimDecision`, or ``None`` for no opinion.

    Stops at the first non-None result. The built-in (``opsrun_plugins.dedupe``) reuses the active
    run, reuses a ``succeeded``/``partially_succeeded`` latest run inside the cooldown, and otherwise
    creates. A plugin module or class whose policy is exactly that may set
    ``OPSRUN_INSERT_FIRST = True``: when every implementation says so, the ledger inserts first and
    consults the hook only on conflict, saving a round trip per dispatch.
    """


@hookspec(firstresult=True)
def opsrun_summarize(
    spec: OperationSpec,
    run: Run,
    counts: Mapping[str, int],
    failures: Sequence[FailureEntry],
    error: BaseException | None,
) -> Summary | None:
    """Turn the finishing attempt's counts into ``summary_counts`` and an outcome.

    Called by ``Ledger.complete`` and ``Ledger.fail`` with the counts of the attempt that finishes
    (counts of released or taken-over attempts are never included).

    :param spec: the operation's catalog entry.
    :param run: the run as claimed by this attempt.
    :param counts: the attempt's counts (validated non-negative ints).
    :param failures: the per-item failure entries the attempt recorded.
    :param error: the exception that ended the run, or ``None`` on completion.
    :return: a :class:`~opsrun_core.Summary` whose counts hold at least ``total``, ``processed`` and
        ``failed``, or ``None`` for no opinion.

    Stops at the first non-None result. The built-in lives in ``opsrun_plugins.tracking``.
    """


@hookspec(firstresult=True)
def opsrun_fail(spec: OperationSpec, run: Run, error: BaseException) -> list[FailureEntry] | None:
    """Turn an exception into failure entries (stable code, message).

    Called by ``Ledger.fail`` (and by the job layer when a job raises on its last attempt).
    Messages are passed through :func:`opsrun_core.sanitize_message` after this hook, whatever it
    returns.

    :param spec: the operation's catalog entry.
    :param run: the run that failed.
    :param error: the exception.
    :return: a non-empty list of :class:`~opsrun_core.FailureEntry`, or ``None`` for no opinion.

    Stops at the first non-None result. The built-in gives code ``<type>.failed`` and the message
    ``"<ExceptionClass>: <text>"``.
    """


@hookspec
def opsrun_register_operations() -> Iterable[OperationSpec] | None:
    """Add operations to a ledger's catalog.

    Called once when a ``Ledger`` is built. Every implementation is called; each returns the
    :class:`~opsrun_core.OperationSpec` objects it contributes (or ``None``). A type registered with
    different settings by two plugins is an error.
    """


@hookspec
def opsrun_run_finished(run: Run) -> None:
    """Observe a run that just finished (completed, failed or reconciled).

    Called after the terminal write has been committed, with the run as stored. Every
    implementation is called; return values are ignored. Use it for metrics and notifications.
    An exception raised here propagates to the caller of the finishing call; the run stays finished.
    """


@hookspec(firstresult=True)
def opsrun_is_alive(run: Run) -> bool | None:
    """Tell reconcile whether a stale-looking run is still alive in the system that carries it.

    Called by ``Ledger.reconcile`` for each candidate (a running run whose lease expired past the
    grace period, or a queued run older than its operation's queued limit).

    :param run: the candidate run.
    :return: ``True`` if the job is known to be alive (reconcile leaves it alone), ``False`` if it is
        known to be gone (reconcile finishes it), ``None`` for no opinion (judge by time).

    Stops at the first non-None result. There is no built-in implementation: queue adapters such as
    ``opsrun_plugins.celery`` provide one.
    """
