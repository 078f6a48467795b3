"""The statements that matter for correctness and speed, in one place.

They are ``text()`` on purpose: the status predicate stays literal so the planner can match the
partial indexes (PERF_NOTES trap 3), the statements are compiled once and cached (trap 5: SQLAlchemy
2.0 recompiles ``on_conflict_do_nothing()`` on every call), and the SQL a reviewer reads is the SQL
the database runs.

Each statement is rendered once per ledger for its dialect and clock:

* ``{now}`` is ``statement_timestamp()`` when Postgres's own clock serves, else the bound ``:now``;
* ``{lease_expires}`` is ``{now} + :lease`` (an interval) or the bound ``:lease_expires_at``;
* ``{cooldown_since}`` is ``{now} - :cooldown`` or the bound ``:cooldown_since``;
* ``{hash}`` casts the fingerprint to ``char(64)`` on Postgres, so the parameter's type can never
  turn the index lookup into a filter (trap 4).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from sqlalchemy import JSON, BindParameter, Integer, Interval, Text, TextClause, bindparam, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.sql.selectable import TextualSelect
from sqlalchemy.types import TypeEngine

from .models import OperationRun, UTCDateTime

__all__ = ["RUN_COLUMNS", "Statements"]

#: the columns a returned :class:`~opsrun_core.Run` is built from (not the lease token)
RUN_COLUMNS = (
    "id",
    "type",
    "workspace_id",
    "tenant_id",
    "identity_hash",
    "identity",
    "status",
    "outcome",
    "summary_counts",
    "failure_summary",
    "context",
    "initiator",
    "attempts",
    "lease_expires_at",
    "heartbeat_at",
    "created_at",
    "started_at",
    "completed_at",
    "updated_at",
)
_COLS = ", ".join(RUN_COLUMNS)
_ACTIVE = "status IN ('queued', 'running')"
_SUCCESS = "outcome IN ('succeeded', 'partially_succeeded')"

# -- dispatch ---------------------------------------------------------------------------------
# Relies on uq_operation_runs_active_identity (type, identity_hash) WHERE status IN (...): the
# conflict target names its predicate, so both Postgres and SQLite pick the partial index.
_INSERT = (
    """
INSERT INTO operation_runs (type, workspace_id, tenant_id, identity_hash, identity, status, outcome,
    attempts, lease_token, lease_expires_at, heartbeat_at, created_at, started_at, updated_at,
    context, initiator)
SELECT :type, :workspace_id, :tenant_id, {hash}, :identity, {values}, :context, :initiator
WHERE {guard}
ON CONFLICT (type, identity_hash) WHERE status IN ('queued', 'running') DO NOTHING
RETURNING """
    + _COLS
)

# a queued run, as dispatch creates it
_QUEUED_VALUES = "'queued', 'pending'"
_QUEUED_TAIL = "0, NULL, NULL, NULL, {now}, NULL, {now}"
# a running run holding a lease, as the inline path (run_now) creates it: dispatch + claim in one
_RUNNING_VALUES = "'running', 'pending'"
_RUNNING_TAIL = "1, :token, {lease_expires}, {now}, {now}, {now}, {now}"

# The cooldown guard: insert only if the latest completed run of the identity did not succeed
# within the cooldown (a failed latest run never starts a cooldown). Uses
# ix_operation_runs_identity_completed (type, identity_hash, completed_at), newest first.
_COOLDOWN_GUARD = (
    """NOT EXISTS (
    SELECT 1 FROM (
        SELECT outcome, completed_at FROM operation_runs
        WHERE type = :type AND identity_hash = {hash} AND status = 'completed'
        ORDER BY completed_at DESC LIMIT 1
    ) AS latest
    WHERE latest."""
    + _SUCCESS
    + """ AND latest.completed_at > {cooldown_since})"""
)

# The state of an identity after a conflict (or before a create, for a host claim policy): the
# active run (partial unique index) and the latest completed run (identity_completed index).
_STATE = f"""
SELECT {_COLS} FROM operation_runs
WHERE type = :type AND identity_hash = {{hash}} AND {_ACTIVE}
UNION ALL
SELECT {_COLS} FROM (
    SELECT {_COLS} FROM operation_runs
    WHERE type = :type AND identity_hash = {{hash}} AND status = 'completed'
    ORDER BY completed_at DESC LIMIT 1
) AS latest
"""

# -- execute-time guard -------------------------------------------------------------------------
# One conditional UPDATE by primary key: a queued run, or a running one whose lease expired
# (takeover). The new token fences every later write of this attempt.
_CLAIM = f"""
UPDATE operation_runs SET status = 'running', attempts = attempts + 1, lease_token = :token,
    lease_expires_at = {{lease_expires}}, heartbeat_at = {{now}},
    started_at = COALESCE(started_at, {{now}}), updated_at = {{now}}
WHERE id = :id AND (status = 'queued' OR (status = 'running' AND lease_expires_at <= {{now}}))
RETURNING {_COLS}
"""

_STATUS_OF = "SELECT type, status FROM operation_runs WHERE id = :id"

_HEARTBEAT = f"""
UPDATE operation_runs SET lease_expires_at = {{lease_expires}}, heartbeat_at = {{now}},
    updated_at = {{now}}
WHERE id = :id AND lease_token = :token AND status = 'running'
RETURNING {_COLS}
"""

# -- terminal writes, fenced by the lease token -------------------------------------------------
_FINISH = f"""
UPDATE operation_runs SET status = 'completed', outcome = :outcome,
    summary_counts = :summary_counts, failure_summary = :failure_summary,
    completed_at = {{now}}, updated_at = {{now}},
    lease_token = NULL, lease_expires_at = NULL
WHERE id = :id AND lease_token = :token AND status = 'running'
RETURNING {_COLS}
"""

_RELEASE = f"""
UPDATE operation_runs SET status = 'queued', lease_token = NULL, lease_expires_at = NULL,
    updated_at = {{now}}
WHERE id = :id AND lease_token = :token AND status = 'running'
RETURNING {_COLS}
"""

_GET = f"SELECT {_COLS} FROM operation_runs WHERE id = :id"

# -- housekeeping --------------------------------------------------------------------------------
# The reconcile sweep: one bounded batch of a workspace's stale candidates, walked by id (keyset),
# through ix_operation_runs_active_workspace (workspace_id, status) WHERE status IN (...): it only
# ever reads active rows, however much history the table holds. Postgres locks the batch with
# SKIP LOCKED, so a sweep never waits on (or blocks) a worker's row; SQLite's single writer needs no
# row locks. Timestamps here are always bound (:now and the thresholds derive from one reading).
_RECONCILE_CANDIDATES = f"""
SELECT {_COLS} FROM operation_runs
WHERE workspace_id = :workspace_id AND {_ACTIVE} AND id > :after AND id <> :own_id
  AND ((status = 'running' AND lease_expires_at <= :stale_before)
       OR (status = 'queued' AND updated_at <= :queued_before))
ORDER BY id
LIMIT :batch_size{{lock}}
"""

# Finishes one candidate, re-checking in the WHERE that it is still stale (a worker may have
# heartbeated or completed it since it was read on SQLite; on Postgres the row is locked).
_RECONCILE_FINISH = f"""
UPDATE operation_runs SET status = 'completed', outcome = 'failed',
    summary_counts = :summary_counts, failure_summary = :failure_summary,
    completed_at = :now, updated_at = :now, lease_token = NULL, lease_expires_at = NULL
WHERE id = :id
  AND ((status = 'running' AND lease_expires_at <= :stale_before)
       OR (status = 'queued' AND updated_at <= :queued_before))
RETURNING {_COLS}
"""

# Workspaces with active runs (reconcile_all), from the same partial index.
_ACTIVE_WORKSPACES = f"SELECT DISTINCT workspace_id FROM operation_runs WHERE {_ACTIVE}"


@dataclass(frozen=True)
class Statements:
    """The rendered statements of one ledger (one dialect, one clock mode)."""

    insert_queued: TextualSelect
    insert_queued_cooldown: TextualSelect
    insert_running: TextualSelect
    insert_running_cooldown: TextualSelect
    state: TextualSelect
    claim: TextualSelect
    status_of: TextClause
    heartbeat: TextualSelect
    finish: TextualSelect
    release: TextualSelect
    get: TextualSelect
    reconcile_candidates: TextualSelect
    reconcile_finish: TextualSelect
    active_workspaces: TextClause

    @classmethod
    def render(cls, *, dialect: str, db_clock: bool) -> Statements:
        postgres = dialect == "postgresql"
        if db_clock:
            now = "statement_timestamp()"
            parts = {
                "now": now,
                "lease_expires": f"{now} + :lease",
                "cooldown_since": f"{now} - :cooldown",
            }
        else:
            parts = {
                "now": ":now",
                "lease_expires": ":lease_expires_at",
                "cooldown_since": ":cooldown_since",
            }
        parts["hash"] = "CAST(:identity_hash AS char(64))" if postgres else ":identity_hash"
        json_type = JSONB(none_as_null=True) if postgres else JSON(none_as_null=True)

        def build(sql: str) -> TextualSelect:
            clause = _typed(text(sql.format(**parts)), json_type)
            table = OperationRun.__table__
            return clause.columns(*(table.c[name] for name in RUN_COLUMNS))

        def insert(values: str, tail: str, guard: str) -> TextualSelect:
            sql = _INSERT.replace("{values}", f"{values}, {tail}").replace("{guard}", guard)
            return build(sql)

        return cls(
            insert_queued=insert(_QUEUED_VALUES, _QUEUED_TAIL, "1 = 1"),
            insert_queued_cooldown=insert(_QUEUED_VALUES, _QUEUED_TAIL, _COOLDOWN_GUARD),
            insert_running=insert(_RUNNING_VALUES, _RUNNING_TAIL, "1 = 1"),
            insert_running_cooldown=insert(_RUNNING_VALUES, _RUNNING_TAIL, _COOLDOWN_GUARD),
            state=build(_STATE),
            claim=build(_CLAIM),
            status_of=text(_STATUS_OF),
            heartbeat=build(_HEARTBEAT),
            finish=build(_FINISH),
            release=build(_RELEASE),
            get=build(_GET),
            reconcile_candidates=build(
                _RECONCILE_CANDIDATES.replace(
                    "{lock}", " FOR UPDATE SKIP LOCKED" if postgres else ""
                )
            ),
            reconcile_finish=build(_RECONCILE_FINISH),
            active_workspaces=text(_ACTIVE_WORKSPACES),
        )


_PARAM_TYPES = {
    "identity": "json",
    "context": "json",
    "summary_counts": "json",
    "failure_summary": "json",
    "now": "ts",
    "lease_expires_at": "ts",
    "cooldown_since": "ts",
    "lease": "interval",
    "cooldown": "interval",
    "id": "int",
    "type": "text",
    "workspace_id": "text",
    "tenant_id": "text",
    "identity_hash": "text",
    "initiator": "text",
    "token": "text",
    "outcome": "text",
    "stale_before": "ts",
    "queued_before": "ts",
    "after": "int",
    "own_id": "int",
    "batch_size": "int",
}


def _typed(clause: TextClause, json_type: JSON) -> TextClause:
    """Give every bound parameter of ``clause`` its type (JSON serialised, timestamps in UTC)."""
    kinds: dict[str, TypeEngine[Any]] = {
        "json": json_type,
        "ts": UTCDateTime(),
        "interval": Interval(),
        "int": Integer(),
        "text": Text(),
    }
    params: list[BindParameter[Any]] = [
        bindparam(name, type_=kinds[kind])
        for name, kind in _PARAM_TYPES.items()
        if re.search(rf":{name}\b", clause.text)
    ]
    return clause.bindparams(*params)
