"""The reference app on Celery (issue 9, part 2): ``demo --celery`` end to end, as a user runs it.

``python -m reference_app demo --celery --json`` runs in a subprocess on the test's Postgres
database and Redis; it starts two ``python -m reference_app worker`` processes of its own, so the
jobs run in real worker processes. Its summary (the demo's bookkeeping of what ``dispatch``
returned and what the workers reported for each delivery) is checked against what the ledger holds.

Without Redis (or without celery installed) the tests skip, saying why; ``OPSRUN_REQUIRE_REDIS=1``
(set by ``.ci/run``) makes that a failure. Redis comes from ``OPSRUN_TEST_REDIS_URL`` (default
``redis://127.0.0.1:6379/0``). Every wait is bounded: the demo's own (``--timeout``) and the
subprocess's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import JSON, Engine, String, Text, func, inspect, select, text
from sqlalchemy import column as sql_column
from sqlalchemy import table as sql_table
from sqlalchemy.sql.expression import ColumnClause

from opsrun_core.db import make_engine

pytestmark = [pytest.mark.opsrun_backends("postgres"), pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
#: the demo gives up on its workers after this long ...
DEMO_TIMEOUT_S = 60
#: ... and a demo that has not exited some time after that is a failed test, not a hung suite
TIMEOUT_S = DEMO_TIMEOUT_S + 30
ASSIGNMENT_TYPES = ("assignments.fetch", "assignments.restore")
#: what the fake directory's secrets look like: its tokens are JWTs, its client secret ``cs~...``
SECRET_MARKERS = ("eyJhbGci", "cs~", "Bearer ey")


def run_demo(*args: str, broker_url: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "OPSRUN_DATABASE_URL"}
    env["OPSRUN_BROKER_URL"] = broker_url
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", "reference_app", "demo", "--celery", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )


def ledger_rows(engine: Engine) -> list[Any]:
    with engine.connect() as conn:
        return list(
            conn.execute(
                text(
                    "SELECT id, type, identity_hash, status, outcome, attempts, summary_counts, "
                    "failure_summary, context FROM operation_runs ORDER BY id"
                )
            ).all()
        )


def columns_containing(engine: Engine, needle: str) -> list[str]:
    """``table.column`` of every text or JSON column, in every table, where ``needle`` occurs."""
    hits = []
    inspector = inspect(engine)
    with engine.connect() as conn:
        for table in inspector.get_table_names():
            for col in inspector.get_columns(table):
                kind = col["type"]
                if not (
                    isinstance(kind, (String, Text, JSON))
                    or type(kind).__name__ in ("JSONB", "JSON")
                ):
                    continue
                c: ColumnClause[Any] = sql_column(col["name"])
                query = (
                    select(func.count())
                    .select_from(sql_table(table, c))
                    .where(func.cast(c, Text).contains(needle, autoescape=True))
                )
                if conn.execute(query).scalar_one():
                    hits.append(f"{table}.{col['name']}")
    return hits


def leftover_workers(queue: str) -> list[int]:
    """Pids of processes whose command line names the demo's queue (its workers)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if queue.encode() in cmdline:
            found.append(int(entry.name))
    return found


def test_demo_on_celery_workers_completes_every_run_once_and_its_summary_matches_the_ledger(
    opsrun_database_url: str, redis_url: str
) -> None:
    result = run_demo(
        "--json",
        "--timeout",
        str(DEMO_TIMEOUT_S),
        "--database-url",
        opsrun_database_url,
        broker_url=redis_url,
    )
    assert result.returncode == 0, result.stderr + result.stdout
    assert "Traceback" not in result.stderr
    report = json.loads(result.stdout)
    summary = report["summary"]
    celery = summary["celery"]
    engine = make_engine(opsrun_database_url)
    try:
        rows = ledger_rows(engine)
        leaks = {marker: columns_containing(engine, marker) for marker in SECRET_MARKERS}
        redacted = columns_containing(engine, "[REDACTED]")
    finally:
        engine.dispose()

    # every run completed, on the workers, and the report shows the ledger as it is
    assert rows and {r.status for r in rows} == {"completed"}
    assert [run["id"] for run in report["runs"]] == [r.id for r in rows]
    assert {r.type for r in rows} == set(ASSIGNMENT_TYPES)
    assert all((r.context or {}).get("celery_task_id") for r in rows)  # dispatched via Celery

    # one run per unique identity: 10 policies fetched, 3 backups restored
    assert len({(r.type, r.identity_hash) for r in rows}) == len(rows)
    assert Counter(r.type for r in rows) == {"assignments.fetch": 10, "assignments.restore": 3}

    # duplicates reused the active run and never reached the broker; the late click, the cooldown
    dispatches = summary["dispatches"]
    assert dispatches["created"] == summary["runs_created"] == len(rows)
    assert dispatches["reused_active"] == 2 and dispatches["reused_cooldown"] == 1
    assert summary["dispatches_reused"] == 3
    assert celery["clicks"] == dispatches["total"] == len(rows) + 3
    assert celery["messages_sent"] == len(rows)
    assert celery["messages_waiting_before_workers"] == len(rows)
    assert summary["reconcile_runs"] == 0

    # what the workers reported matches the ledger: one final delivery per run, a release per
    # extra attempt, and the redelivered message skipped
    deliveries = summary["deliveries"]
    assert deliveries["completed"] + deliveries["failed"] == len(rows)
    assert summary["attempts"] == sum(r.attempts for r in rows)
    assert deliveries["released"] == sum(r.attempts - 1 for r in rows) >= 2
    assert summary["skipped_deliveries"] == {"completed": 1}
    assert deliveries["total"] == (
        deliveries["completed"]
        + deliveries["failed"]
        + deliveries["released"]
        + deliveries["skipped"]
    )
    assert celery["workers"] == 2
    assert sum(celery["deliveries_by_worker"].values()) == deliveries["total"]
    assert summary["outcomes"] == dict(sorted(Counter(r.outcome for r in rows).items()))
    codes = Counter(entry["code"] for r in rows for entry in r.failure_summary or ())
    assert summary["failure_codes"] == dict(sorted(codes.items()))
    assert set(codes) == {
        "directory.assignment_unreadable",
        "directory.target_not_found",
        "directory.throttled",
    }
    items: Counter[str] = Counter()
    for r in rows:
        items.update({k: r.summary_counts[k] for k in ("total", "processed", "failed")})
    assert summary["items"] == {k: items[k] for k in ("total", "processed", "failed")}

    # the throttled run was retried by Celery up to its bound, then failed
    (throttled,) = [
        r for r in rows if any(e["code"] == "directory.throttled" for e in r.failure_summary or ())
    ]
    assert throttled.outcome == "failed"
    assert throttled.attempts == 4  # MAX_RETRIES = 3: four attempts, three Celery retries

    # no token and no client secret anywhere in the database; the throttling message was redacted
    assert leaks == {marker: [] for marker in SECRET_MARKERS}
    assert "operation_runs.failure_summary" in redacted

    # the workers are gone, and so is the demo's queue
    assert leftover_workers(celery["queue"]) == []
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        assert list(client.scan_iter(match=f"*{celery['queue']}*")) == []
    finally:
        client.close()


def test_demo_on_celery_without_a_broker_is_one_line_and_exit_code_4(
    opsrun_database_url: str, celery_installed: None
) -> None:
    from opsrun_core import Ledger

    ledger = Ledger(opsrun_database_url)
    try:
        before = ledger.ensure_run("sentinel.op", workspace_id="w1", identity={"k": "v"}).run
    finally:
        ledger.engine.dispose()

    result = run_demo(
        "--database-url",
        opsrun_database_url,
        broker_url="redis://:s3cr3t@127.0.0.1:1/0",
    )

    assert result.returncode == 4, result.stderr + result.stdout
    assert result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith("reference_app: error: no broker answers at redis://")
    assert "OPSRUN_BROKER_URL" in line and "s3cr3t" not in line
    engine = make_engine(opsrun_database_url)
    try:
        assert [r.id for r in ledger_rows(engine)] == [before.id]  # the database was not touched
    finally:
        engine.dispose()
