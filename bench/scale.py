"""History at scale: bulk-loaded completed runs, and reconcile timed over them.

The history is loaded with ``INSERT … SELECT … FROM generate_series`` in chunks, then
``VACUUM ANALYZE`` (the planner must know the table is big; an empty table is never analyzed, see
PERF_NOTES trap 6). Runs are spread over 100 workspaces (``w0`` … ``w99``) and 90 days, 10% failed,
all older than the benchmark operation's cooldown, under the benchmark's operation type, so the
dispatch's cooldown guard searches the same index ranges a real ledger's would.
"""

from __future__ import annotations

import secrets
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

from harness import Database
from workloads import SPEC, TYPE

from opsrun_core import Ledger
from opsrun_core.db import make_engine

#: the workspace reconcile is timed on (it holds 1% of the history)
RECONCILE_WORKSPACE = "w0"
#: stale runs planted in it before each timed reconcile: half queued too long, half lease expired
STALE_RUNS = 40
CHUNK = 250_000

# no '%' in these statements: psycopg would read it as a placeholder
_LOAD = """
INSERT INTO operation_runs (type, workspace_id, tenant_id, identity_hash, identity, status,
    outcome, summary_counts, attempts, created_at, started_at, completed_at, updated_at)
SELECT '{type}', 'w' || mod(g, 100), 't1', encode(sha256(('hist-' || g)::bytea), 'hex'),
    jsonb_build_object('policy_id', 'hist-' || g), 'completed',
    CASE WHEN mod(g, 10) = 0 THEN 'failed' ELSE 'succeeded' END,
    '{{"total": 10, "processed": 10, "failed": 0}}', 1, ts, ts, ts + interval '2 minutes',
    ts + interval '2 minutes'
FROM generate_series({start}, {end}) AS g,
    LATERAL (SELECT statement_timestamp() - interval '1 day'
             - (interval '90 days' * g / {total}) AS ts) AS t
"""

_STALE = """
INSERT INTO operation_runs (type, workspace_id, tenant_id, identity_hash, identity, status,
    outcome, attempts, lease_token, lease_expires_at, created_at, started_at, updated_at)
SELECT '{type}', '{workspace}', 't1', encode(sha256(('stale-{salt}-' || g)::bytea), 'hex'), '{{}}',
    CASE WHEN mod(g, 2) = 0 THEN 'running' ELSE 'queued' END, 'pending',
    CASE WHEN mod(g, 2) = 0 THEN 1 ELSE 0 END,
    CASE WHEN mod(g, 2) = 0 THEN md5(g::text) END,
    CASE WHEN mod(g, 2) = 0 THEN statement_timestamp() - interval '1 hour' END,
    statement_timestamp() - interval '2 hours',
    CASE WHEN mod(g, 2) = 0 THEN statement_timestamp() - interval '2 hours' END,
    statement_timestamp() - interval '1 hour'
FROM generate_series(1, {count}) AS g
"""


def load_history(db: Database, rows: int, progress: Callable[[str], None]) -> float:
    """Bulk-load ``rows`` completed runs, then VACUUM ANALYZE; returns the seconds it took."""
    if rows <= 0:
        return 0.0
    engine = make_engine(db.url)
    started = time.perf_counter()
    try:
        for start in range(1, rows + 1, CHUNK):
            end = min(rows, start + CHUNK - 1)
            with engine.begin() as conn:
                conn.exec_driver_sql(_LOAD.format(type=TYPE, start=start, end=end, total=rows))
            progress(f"  {db.key}: loaded {end:,} / {rows:,} completed runs")
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql("VACUUM ANALYZE operation_runs")
    finally:
        engine.dispose()
    return time.perf_counter() - started


@dataclass(frozen=True)
class ReconcileTiming:
    key: str
    median_ms: float
    times_ms: list[float]
    candidates: int


def time_reconciles(
    dbs: list[Database], rounds: int, progress: Callable[[str], None]
) -> dict[str, ReconcileTiming]:
    """Plant :data:`STALE_RUNS` stale runs, time ``reconcile`` of their workspace; interleaved."""
    ledgers = {}
    for db in dbs:
        ledger = Ledger(db.url)
        ledger.catalog.register(SPEC)
        ledgers[db.key] = ledger
    times: dict[str, list[float]] = {db.key: [] for db in dbs}
    candidates: dict[str, int] = {}
    try:
        for number in range(rounds + 1):  # the first round warms up and is not counted
            for db in dbs:
                ledger = ledgers[db.key]
                with ledger.engine.begin() as conn:
                    conn.exec_driver_sql(
                        _STALE.format(
                            type=TYPE,
                            workspace=RECONCILE_WORKSPACE,
                            salt=secrets.token_hex(4),
                            count=STALE_RUNS,
                        )
                    )
                started = time.perf_counter()
                run = ledger.reconcile(RECONCILE_WORKSPACE)
                elapsed = (time.perf_counter() - started) * 1000
                counts = run.summary_counts or {}
                if counts.get("reconciled") != STALE_RUNS:
                    raise RuntimeError(
                        f"reconcile on {db.key} finished {counts} instead of {STALE_RUNS} runs"
                    )
                candidates[db.key] = counts["total"]
                if number:
                    times[db.key].append(elapsed)
            if number:
                progress(
                    f"  reconcile round {number}/{rounds}: "
                    + ", ".join(f"{k} {v[-1]:.1f} ms" for k, v in times.items())
                )
    finally:
        for ledger in ledgers.values():
            ledger.engine.dispose()
    return {
        key: ReconcileTiming(key, statistics.median(values), values, candidates[key])
        for key, values in times.items()
    }
