"""The hot statements use their indexes: EXPLAIN plans on Postgres, asserted by node type.

Each statement is explained exactly as opsrun sends it: the ledger's own rendered statement runs on
a SQLAlchemy connection whose ``before_cursor_execute`` hook prefixes ``EXPLAIN (FORMAT JSON)``, so
the SQL text, the bind casts and the parameters are the driver's (nothing is executed). The table
holds enough history (:data:`HISTORY` completed runs, then ``ANALYZE``) for a sequential scan to
look attractive to a planner that could use one.

Each statement is checked twice: with the custom plan Postgres makes for the first executions, and
with the generic plan a prepared statement settles on later (``plan_cache_mode =
force_generic_plan``; psycopg prepares a statement after five executions). A generic plan cannot
see parameter values, which is where a bound status list (PERF_NOTES trap 3) or a ``text``-typed
``identity_hash`` (trap 4) turned index lookups into scans. Timing is never asserted here; ``bench/``
measures.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Connection, Engine, event

from opsrun_core import Ledger
from opsrun_core.pytest_plugin import FROZEN_AT

pytestmark = pytest.mark.opsrun_backends("postgres")

TYPE = "assignments.fetch"
#: completed runs bulk-loaded before EXPLAIN (spread over 20 workspaces)
HISTORY = 20_000
#: queued and running runs in workspace w1 (what claim and reconcile look for)
ACTIVE = 200

PK = "pk_operation_runs"
ACTIVE_IDENTITY = "uq_operation_runs_active_identity"
ACTIVE_WORKSPACE = "ix_operation_runs_active_workspace"
IDENTITY_COMPLETED = "ix_operation_runs_identity_completed"
#: the partial indexes that hold only queued and running rows, however long the history
PARTIAL_ACTIVE = frozenset({ACTIVE_IDENTITY, ACTIVE_WORKSPACE})

_LOAD = f"""
INSERT INTO operation_runs (type, workspace_id, tenant_id, identity_hash, identity, status,
    outcome, summary_counts, attempts, created_at, started_at, completed_at, updated_at)
SELECT '{TYPE}', 'w' || mod(g, 20), 't1', encode(sha256(('policy-' || g)::bytea), 'hex'),
    jsonb_build_object('policy_id', g), 'completed',
    CASE WHEN mod(g, 10) = 0 THEN 'failed' ELSE 'succeeded' END,
    '{{"total": 1, "processed": 1, "failed": 0}}', 1,
    ts, ts, ts + interval '5 seconds', ts + interval '5 seconds'
FROM generate_series(1, {HISTORY}) AS g,
    LATERAL (SELECT TIMESTAMPTZ '2025-12-01 00:00:00+00' + g * interval '1 minute' AS ts) AS t;

INSERT INTO operation_runs (type, workspace_id, tenant_id, identity_hash, identity, status,
    outcome, attempts, lease_token, lease_expires_at, created_at, started_at, updated_at)
SELECT '{TYPE}', 'w1', 't1', encode(sha256(('active-' || g)::bytea), 'hex'),
    jsonb_build_object('policy_id', -g),
    CASE WHEN mod(g, 2) = 0 THEN 'running' ELSE 'queued' END, 'pending',
    CASE WHEN mod(g, 2) = 0 THEN 1 ELSE 0 END,
    CASE WHEN mod(g, 2) = 0 THEN md5(g::text) END,
    CASE WHEN mod(g, 2) = 0 THEN TIMESTAMPTZ '2026-01-01 00:05:00+00' END,
    TIMESTAMPTZ '2025-12-31 23:00:00+00',
    CASE WHEN mod(g, 2) = 0 THEN TIMESTAMPTZ '2025-12-31 23:30:00+00' END,
    TIMESTAMPTZ '2025-12-31 23:30:00+00'
FROM generate_series(1, {ACTIVE}) AS g;
"""


@pytest.fixture
def loaded_engine(opsrun_engine: Engine) -> Engine:
    """The test database with history and a few active runs, analyzed (never while empty)."""
    with opsrun_engine.begin() as conn:
        for statement in _LOAD.split(";"):
            if statement.strip():
                conn.exec_driver_sql(statement)
    with opsrun_engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql("ANALYZE operation_runs")
    return opsrun_engine


@pytest.fixture(params=["server_clock", "manual_clock"])
def ledger(request: pytest.FixtureRequest, loaded_engine: Engine, opsrun_clock: Any) -> Ledger:
    """The statements as rendered with Postgres's own clock (production) and with a bound one."""
    if request.param == "server_clock":
        return Ledger(loaded_engine)
    return Ledger(loaded_engine, clock=opsrun_clock)


def _sample_values(conn: Connection) -> dict[str, Any]:
    """A value for every parameter any hot statement takes, pointing at real rows."""
    queued_id = conn.exec_driver_sql(
        "SELECT min(id) FROM operation_runs WHERE status = 'queued'"
    ).scalar_one()
    return {
        "type": TYPE,
        "workspace_id": "w1",
        "tenant_id": "t1",
        "identity_hash": hashlib.sha256(b"policy-41").hexdigest(),  # has a completed run
        "identity": {"policy_id": 41},
        "context": None,
        "initiator": None,
        "id": queued_id,
        "token": "f" * 32,
        "outcome": "succeeded",
        "summary_counts": {"total": 1, "processed": 1, "failed": 0},
        "failure_summary": None,
        "lease": timedelta(minutes=10),
        "cooldown": timedelta(minutes=15),
        "now": FROZEN_AT,
        "lease_expires_at": FROZEN_AT + timedelta(minutes=10),
        "cooldown_since": FROZEN_AT - timedelta(minutes=15),
        "stale_before": FROZEN_AT - timedelta(seconds=30),
        "queued_before": FROZEN_AT - timedelta(hours=1),
        "after": 0,
        "own_id": 0,
        "batch_size": 200,
    }


# -- what each statement must use -----------------------------------------------------------------
# Every scan of operation_runs must be an index scan on one of the allowed indexes; ``identity``
# lists the indexes that must be searched by identity_hash (an Index Cond, not a Filter: trap 4).
EXPECTATIONS: dict[str, dict[str, Any]] = {
    # the dispatch insert with its cooldown guard (the latest completed run of the identity)
    "insert_queued_cooldown": {
        "allowed": {IDENTITY_COMPLETED},
        "identity": {IDENTITY_COMPLETED},
        "arbiter": ACTIVE_IDENTITY,
    },
    # the inline path's insert (dispatch + claim in one statement), same guard
    "insert_running_cooldown": {
        "allowed": {IDENTITY_COMPLETED},
        "identity": {IDENTITY_COMPLETED},
        "arbiter": ACTIVE_IDENTITY,
    },
    # the state of an identity after a conflict: its active run and its latest completed run
    "state": {
        "allowed": {ACTIVE_IDENTITY, IDENTITY_COMPLETED},
        "identity": {ACTIVE_IDENTITY, IDENTITY_COMPLETED},
    },
    # claim and complete: by primary key, or through a partial index of active rows only
    "claim": {"allowed": {PK, *PARTIAL_ACTIVE}},
    "finish": {"allowed": {PK, *PARTIAL_ACTIVE}},
    # the reconcile sweep touches active rows only, never the history
    "reconcile_candidates": {"allowed": set(PARTIAL_ACTIVE)},
}


@contextmanager
def _explaining(conn: Connection, captured: list[tuple[str, Any]]) -> Iterator[None]:
    """Send every statement on ``conn`` as ``EXPLAIN (FORMAT JSON) <statement>`` (plans only)."""

    def prefix(
        _conn: Any, _cursor: Any, statement: str, parameters: Any, _context: Any, _many: bool
    ) -> tuple[str, Any]:
        captured.append((statement, parameters))
        return f"EXPLAIN (FORMAT JSON) {statement}", parameters

    event.listen(conn, "before_cursor_execute", prefix, retval=True)
    try:
        yield
    finally:
        event.remove(conn, "before_cursor_execute", prefix)


def _custom_plan(ledger: Ledger, conn: Connection, name: str) -> tuple[dict[str, Any], str, Any]:
    """The plan of statement ``name`` as opsrun sends it, and the driver's SQL and parameters."""
    clause = getattr(ledger._sql, name).element  # the text() clause, without result columns
    compiled = clause.compile(dialect=conn.dialect)
    values = _sample_values(conn)
    params = {key: values[key] for key in compiled.params}
    captured: list[tuple[str, Any]] = []
    with _explaining(conn, captured):
        document = conn.execute(clause, params).scalar_one()
    (statement, driver_params) = captured[-1]
    return document[0]["Plan"], statement, driver_params


# psycopg 3's default dumpers: str and None go out untyped ("unknown", resolved by the casts the
# dialect renders into the SQL), ints as integers (the SQL casts them to INTEGER), Jsonb as jsonb,
# timedelta as interval, aware datetime as timestamptz.
def _pg_type(value: Any) -> str:
    from psycopg.types.json import Jsonb

    if value is None or isinstance(value, str):
        return "unknown"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "bigint"
    if isinstance(value, Jsonb):
        return "jsonb"
    if isinstance(value, timedelta):
        return "interval"
    if isinstance(value, datetime):
        return "timestamptz"
    raise AssertionError(f"no Postgres type known for a parameter of type {type(value).__name__}")


def _generic_plan(conn: Connection, statement: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """The generic plan of the driver's ``statement``, prepared with psycopg's parameter types."""
    from psycopg import sql

    order: list[str] = []

    def number(match: re.Match[str]) -> str:
        if match.group(1) not in order:
            order.append(match.group(1))
        return f"${order.index(match.group(1)) + 1}"

    positional = re.sub(r"%\((\w+)\)s", number, statement)
    types = ", ".join(_pg_type(params[name]) for name in order)
    dbapi = conn.connection.dbapi_connection
    args = ", ".join(sql.Literal(params[name]).as_string(dbapi) for name in order)
    conn.exec_driver_sql("SET LOCAL plan_cache_mode = force_generic_plan")
    conn.exec_driver_sql(f"PREPARE opsrun_explain ({types}) AS {positional}")
    try:
        document = conn.exec_driver_sql(
            f"EXPLAIN (FORMAT JSON) EXECUTE opsrun_explain ({args})"
        ).scalar_one()
    finally:
        conn.exec_driver_sql("DEALLOCATE opsrun_explain")
    return document[0]["Plan"]


def _nodes(plan: Mapping[str, Any]) -> Iterator[Mapping[str, Any]]:
    yield plan
    for child in plan.get("Plans", ()):
        yield from _nodes(child)


def _check(plan: Mapping[str, Any], name: str, mode: str) -> None:
    expect = EXPECTATIONS[name]
    nodes = list(_nodes(plan))
    where = f"{name} ({mode} plan): {[n['Node Type'] for n in nodes]}"
    seq = [n for n in nodes if n["Node Type"] == "Seq Scan"]
    assert not seq, f"{where} scans {[n.get('Relation Name') for n in seq]} sequentially"
    scans = [
        n
        for n in nodes
        if n["Node Type"] in ("Index Scan", "Index Only Scan", "Bitmap Index Scan")
        and n.get("Relation Name", "operation_runs") == "operation_runs"
    ]
    used = {n["Index Name"] for n in scans}
    assert used, f"{where} uses no index on operation_runs"
    assert used <= expect["allowed"], f"{where} uses {used}, expected only {expect['allowed']}"
    for index in expect.get("identity", ()):
        conds = [n.get("Index Cond", "") for n in scans if n["Index Name"] == index]
        assert conds, f"{where} does not search {index}"
        assert all("identity_hash" in c for c in conds), (
            f"{where}: {index} is not searched by identity_hash (Index Cond {conds}); a parameter "
            "typed text against char(64) turns the lookup into a filter (PERF_NOTES trap 4)"
        )
    if "arbiter" in expect:
        assert plan.get("Conflict Arbiter Indexes") == [expect["arbiter"]], where


def _each_statement(ledger: Ledger, check: Callable[[Connection, str], None]) -> None:
    with ledger.engine.connect() as conn:
        try:
            for name in EXPECTATIONS:
                check(conn, name)
        finally:
            conn.rollback()


def test_hot_statements_use_indexes_with_custom_plans(ledger: Ledger) -> None:
    def check(conn: Connection, name: str) -> None:
        plan, _, _ = _custom_plan(ledger, conn, name)
        _check(plan, name, "custom")

    _each_statement(ledger, check)


def test_hot_statements_use_indexes_with_generic_plans(ledger: Ledger) -> None:
    def check(conn: Connection, name: str) -> None:
        _, statement, params = _custom_plan(ledger, conn, name)
        _check(_generic_plan(conn, statement, params), name, "generic")

    _each_statement(ledger, check)


def test_history_is_loaded_and_analyzed(loaded_engine: Engine) -> None:
    """The premise of the plans above: the planner knows the table is big."""
    with loaded_engine.connect() as conn:
        estimate = conn.exec_driver_sql(
            "SELECT reltuples FROM pg_class WHERE relname = 'operation_runs'"
        ).scalar_one()
    assert estimate >= HISTORY
