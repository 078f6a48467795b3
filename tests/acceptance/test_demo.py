"""The demo end to end, as a user runs it: ``python -m reference_app demo`` in a subprocess.

Its summary is the demo's own bookkeeping of what dispatch and execute returned; these tests check
it against what the ledger holds, queried with SQL. On Postgres the demo drops and recreates the
tables of the test's throwaway database.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, text

from opsrun_core.db import make_engine

REPO = Path(__file__).resolve().parents[2]
#: a demo that has not finished by then is a failed test, not a hung suite
TIMEOUT_S = 120
ASSIGNMENT_TYPES = ("assignments.fetch", "assignments.restore")


def run_demo(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "OPSRUN_DATABASE_URL"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["COLUMNS"] = "200"
    result = subprocess.run(
        [sys.executable, "-m", "reference_app", "demo", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )
    assert result.returncode == 0, result.stderr + result.stdout
    assert "Traceback" not in result.stderr
    return result


def ledger_facts(engine: Engine) -> dict[str, Any]:
    """What the ledger holds, in the shape of the demo's summary."""
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT id, type, status, outcome, attempts, summary_counts, failure_summary "
                "FROM operation_runs ORDER BY id"
            )
        ).all()

    def as_json(value: Any) -> Any:
        return json.loads(value) if isinstance(value, str) else value

    codes: Counter[str] = Counter()
    items: Counter[str] = Counter()
    for row in rows:
        for entry in as_json(row.failure_summary) or ():
            codes[entry["code"]] += 1
        if row.type in ASSIGNMENT_TYPES:
            counts = as_json(row.summary_counts)
            for key in ("total", "processed", "failed"):
                items[key] += counts[key]
    return {
        "runs_created": len(rows),
        "reconcile_runs": sum(1 for r in rows if r.type == "ops.reconcile_adapter_runs"),
        "statuses": sorted({r.status for r in rows}),
        "attempts": sum(r.attempts for r in rows),
        "outcomes": dict(sorted(Counter(r.outcome for r in rows).items())),
        "failure_codes": dict(sorted(codes.items())),
        "items": {key: items[key] for key in ("total", "processed", "failed")},
        "ids": [r.id for r in rows],
    }


def assert_matches(summary: dict[str, Any], facts: dict[str, Any]) -> None:
    for key in ("runs_created", "reconcile_runs", "attempts", "outcomes", "failure_codes", "items"):
        assert summary[key] == facts[key], key
    assert facts["statuses"] == ["completed"]
    # every path the demo promises actually happened
    dispatches, deliveries = summary["dispatches"], summary["deliveries"]
    assert dispatches["created"] + summary["reconcile_runs"] == summary["runs_created"]
    assert dispatches["reused_active"] >= 2 and dispatches["reused_cooldown"] >= 1
    assert (
        summary["dispatches_reused"] == dispatches["reused_active"] + dispatches["reused_cooldown"]
    )
    assert deliveries["released"] >= 1 and deliveries["abandoned"] == 1
    assert deliveries["skipped"] == sum(summary["skipped_deliveries"].values())
    assert set(summary["skipped_deliveries"]) == {"completed", "running"}
    assert set(facts["failure_codes"]) == {
        "directory.assignment_unreadable",
        "directory.target_not_found",
        "directory.throttled",
        "ops.run.lease_expired",
    }
    assert set(facts["outcomes"]) == {"succeeded", "partially_succeeded", "failed"}


def assert_no_secrets(engine: Engine) -> None:
    """The fake directory's tokens are JWTs and its client secret starts with ``cs~``."""
    with engine.connect() as conn:
        leaked = conn.execute(
            text(
                "SELECT count(*) FROM operation_runs WHERE CAST(failure_summary AS TEXT) LIKE "
                "'%eyJhbGci%' OR CAST(failure_summary AS TEXT) LIKE '%cs~%' "
                "OR CAST(context AS TEXT) LIKE '%eyJhbGci%'"
            )
        ).scalar_one()
        redacted = conn.execute(
            text(
                "SELECT count(*) FROM operation_runs "
                "WHERE CAST(failure_summary AS TEXT) LIKE '%[REDACTED]%'"
            )
        ).scalar_one()
    assert leaked == 0 and redacted >= 1


@pytest.mark.slow
def test_demo_json_summary_matches_the_ledger(opsrun_database_url: str) -> None:
    result = run_demo("--json", "--database-url", opsrun_database_url)

    report = json.loads(result.stdout)
    engine = make_engine(opsrun_database_url)
    try:
        facts = ledger_facts(engine)
        assert_no_secrets(engine)
    finally:
        engine.dispose()
    assert_matches(report["summary"], facts)
    assert [run["id"] for run in report["runs"]] == facts["ids"]
    assert "ReconcileAdapterRunsJob" in result.stderr  # the story went to stderr


@pytest.mark.slow
def test_demo_prints_the_ledger_and_a_summary_on_an_sqlite_file_by_default(tmp_path: Path) -> None:
    result = run_demo(cwd=tmp_path)

    database = tmp_path / "reference_app.db"
    assert database.exists()
    out = result.stdout
    assert "The ledger (operation_runs)" in out and "Summary" in out

    def line(name: str) -> str:
        found = re.search(rf"^\s*{re.escape(name)}\s+(.+?)\s*$", out, re.MULTILINE)
        assert found, f"no {name!r} line in the summary"
        return found.group(1)

    engine = make_engine(f"sqlite:///{database}")
    try:
        facts = ledger_facts(engine)
    finally:
        engine.dispose()
    created = facts["runs_created"]
    assert line("runs created") == f"{created} ({facts['reconcile_runs']} reconcile)"
    assert line("attempts") == str(facts["attempts"])
    assert line("outcomes") == ", ".join(f"{k} {v}" for k, v in facts["outcomes"].items())
    assert line("failure codes") == ", ".join(f"{k} {v}" for k, v in facts["failure_codes"].items())
    items = facts["items"]
    assert line("assignments (total/processed/failed)") == (
        f"{items['total']}/{items['processed']}/{items['failed']}"
    )
    for run_id in facts["ids"]:
        assert re.search(rf"^\s*{run_id}\s+\S", out, re.MULTILINE), f"run {run_id} not in table"
