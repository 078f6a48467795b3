"""Housekeeping tracked like everything else: the reconcile sweep.

``Ledger.reconcile(workspace_id)`` is itself a workspace-scoped run of type
``ops.reconcile_adapter_runs``. It is dispatched and claimed in one statement, so two reconciles of
one workspace at the same time (threads, processes, two schedulers) cannot both work: the partial
unique index lets one insert the active run, the claim's lease keeps the other out, and the loser
gets the active run back without touching anything.

The sweep finishes, as ``failed``:

* ``running`` runs whose lease expired more than ``grace`` ago (``ops.run.lease_expired``);
* ``queued`` runs older than their operation's queued limit (``ops.run.never_started``);

unless a plugin's ``opsrun_is_alive`` says the job is still alive in the system that carries it.
It works in bounded batches, each its own short transaction (``FOR UPDATE SKIP LOCKED`` on
Postgres), heartbeating its own lease between batches.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from .catalog import DEFAULT_QUEUED_LIMIT, RECONCILE_TYPE
from .enums import RunStatus
from .errors import InvalidInput, OpsrunError
from .sanitize import sanitize_message
from .values import Attempt, Run

if TYPE_CHECKING:
    from .ledger import Ledger

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_GRACE",
    "LEASE_EXPIRED",
    "NEVER_STARTED",
    "ReconcileError",
    "ReconcileReport",
    "reconcile_workspace",
]

log = logging.getLogger("opsrun.reconcile")

#: failure code of a running run whose worker vanished
LEASE_EXPIRED = "ops.run.lease_expired"
#: failure code of a queued run no worker ever started
NEVER_STARTED = "ops.run.never_started"
#: a lease must have expired this long ago before reconcile calls the run dead
DEFAULT_GRACE = timedelta(seconds=30)
DEFAULT_BATCH_SIZE = 200

_ZERO_COUNTS = {"total": 0, "processed": 0, "failed": 0}


class ReconcileError(OpsrunError):
    """The reconcile sweep raised; its tracked run ended ``failed`` (see ``run``).

    The message is sanitized; the original exception is not chained, so no secret it carried can
    reach a log through the traceback.
    """

    def __init__(self, message: str, run: Run | None) -> None:
        super().__init__(message)
        self.run = run


@dataclass(frozen=True)
class ReconcileReport:
    """What one workspace's reconcile did; ``did_work`` is False when another reconcile held it."""

    run: Run
    did_work: bool


def reconcile_workspace(
    ledger: Ledger,
    workspace_id: object,
    *,
    grace: timedelta = DEFAULT_GRACE,
    batch_size: int = DEFAULT_BATCH_SIZE,
    initiator: str | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> ReconcileReport:
    if not isinstance(grace, timedelta) or grace < timedelta(0):
        raise InvalidInput("grace must be a non-negative timedelta")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidInput("batch_size must be a positive int")
    dispatch, attempt = ledger.ensure_and_claim(
        RECONCILE_TYPE, workspace_id=workspace_id, identity={}, initiator=initiator or "system"
    )
    if not attempt.acquired:
        log.info(
            "reconcile of workspace %s skipped: run %s is %s",
            dispatch.run.workspace_id,
            dispatch.run.id,
            attempt.reason,
        )
        current = ledger.get(dispatch.run.id) if attempt.reason != "not_found" else dispatch.run
        return ReconcileReport(run=current, did_work=False)
    assert attempt.run is not None
    own = attempt.run
    try:
        counts = _sweep(ledger, own, grace, batch_size, attempt, on_batch)
    except Exception as exc:
        message = f"{type(exc).__name__}: {sanitize_message(exc)}"
        failed: Run | None
        try:
            failed = ledger.fail(attempt, exc)
        except Exception:  # even a failing observer must not leak the original error unsanitized
            failed = None
        log.error("reconcile of workspace %s failed: %s", own.workspace_id, message)
        recorded = (
            "is recorded as failed"
            if failed is not None
            else "could not be recorded as failed (a later reconcile takes it over)"
        )
        raise ReconcileError(
            f"reconcile of workspace {own.workspace_id!r} failed ({message}); its run "
            f"{own.id} {recorded}",
            failed,
        ) from None
    attempt.set_counts(**counts)
    return ReconcileReport(run=ledger.complete(attempt), did_work=True)


def _sweep(
    ledger: Ledger,
    own: Run,
    grace: timedelta,
    batch_size: int,
    attempt: Attempt,
    on_batch: Callable[[int], None] | None,
) -> dict[str, int]:
    """Each batch in three short steps, so no transaction waits on a plugin or a queue:

    1. read up to ``batch_size`` candidates (a short transaction; SKIP LOCKED on Postgres passes
       over rows a worker is writing right now: the next sweep sees them);
    2. judge each outside any transaction (``opsrun_is_alive`` may ask a broker);
    3. finish the dead ones with the guarded UPDATE, which re-checks staleness itself, then tell
       the observers once that has committed.
    """
    sql = ledger._sql
    counts = {"total": 0, "processed": 0, "failed": 0, "reconciled": 0, "alive": 0, "changed": 0}
    queued_limit = min([DEFAULT_QUEUED_LIMIT, *(spec.queued_timeout for spec in ledger.catalog)])
    after = 0
    while True:
        with ledger._connection("reconcile", None, transaction=True) as conn:
            now = ledger._now(conn)
            params: dict[str, Any] = {
                "workspace_id": own.workspace_id,
                "after": after,
                "own_id": own.id,
                "stale_before": now - grace,
                "queued_before": now - queued_limit,
                "batch_size": batch_size,
            }
            rows = conn.execute(sql.reconcile_candidates, params).mappings().all()
        dead: list[tuple[Run, dict[str, str]]] = []
        for row in rows:
            run = Run.from_row(row)
            after = run.id
            entry = _verdict(ledger, run, now)
            if entry is None:
                continue  # a queued run inside its own (longer) limit
            counts["total"] += 1
            try:
                alive = ledger.pm.hook.opsrun_is_alive(run=run)
            except Exception as exc:
                counts["processed"] += 1
                counts["failed"] += 1
                log.warning("reconcile could not judge run %s: %s", run.id, sanitize_message(exc))
                continue
            if alive is True:
                counts["alive"] += 1
            else:
                dead.append((run, entry))
        finished_runs: list[Run] = []
        if dead:
            with ledger._connection("reconcile", None, transaction=True) as conn:
                for run, entry in dead:
                    finished = (
                        conn.execute(
                            sql.reconcile_finish,
                            {
                                "id": run.id,
                                "now": now,
                                "stale_before": params["stale_before"],
                                "queued_before": now - ledger.catalog.spec(run.type).queued_timeout,
                                "summary_counts": dict(_ZERO_COUNTS),
                                "failure_summary": [entry],
                            },
                        )
                        .mappings()
                        .first()
                    )
                    counts["processed"] += 1
                    if finished is None:
                        # a worker heartbeated, finished or took it over meanwhile: not stale
                        counts["changed"] += 1
                    else:
                        counts["reconciled"] += 1
                        finished_runs.append(Run.from_row(finished))
        for finished_run in finished_runs:  # committed: now the observers may hear of it
            ledger.pm.hook.opsrun_run_finished(run=finished_run)
        if on_batch is not None:
            on_batch(len(rows))
        if len(rows) < batch_size:
            return counts
        ledger.heartbeat(attempt)


def _verdict(ledger: Ledger, run: Run, now: datetime) -> dict[str, str] | None:
    if run.status is RunStatus.RUNNING:
        expired = run.lease_expires_at
        when = expired.isoformat(timespec="seconds") if expired else "unknown"
        return {
            "code": LEASE_EXPIRED,
            "message": f"lease expired at {when} after {run.attempts} attempt(s); "
            "the worker stopped without finishing (finished by reconcile)",
        }
    limit = ledger.catalog.spec(run.type).queued_timeout
    # a released run waits for its retry since it was queued again (updated_at), not since created
    if run.updated_at > now - limit:
        return None
    if run.started_at is None:
        what = f"queued since {run.created_at.isoformat(timespec='seconds')} and never started"
    else:
        what = (
            f"queued again for a retry since {run.updated_at.isoformat(timespec='seconds')} "
            f"after {run.attempts} attempt(s) and not started again"
        )
    return {
        "code": NEVER_STARTED,
        "message": f"{what} within {_human(limit)} (finished by reconcile)",
    }


def _human(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    if seconds % 3600 == 0:
        return f"{seconds // 3600} h"
    if seconds % 60 == 0:
        return f"{seconds // 60} min"
    return f"{seconds} s"
