"""The invariant checker (``opsrun check``): silent on a healthy ledger, loud on each broken rule.

Violations are made by writing to ``operation_runs`` directly, as a buggy host, a hand edit or a
half-applied migration would. The two the schema itself forbids (two active runs of one identity,
a completed run still ``pending``) are made inside a transaction that drops the index or the CHECK
constraint and is rolled back afterwards, so the session's shared Postgres database keeps its
schema for every other test.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import Connection, Engine, inspect, text, update
from sqlalchemy.exc import IntegrityError

from opsrun_core import (
    ConfigurationError,
    DatabaseError,
    InvalidInput,
    Ledger,
    OperationSpec,
    RunStatus,
)
from opsrun_core.invariants import RULES, Violation, check_invariants, format_violations
from opsrun_core.models import OperationRun

FETCH = "assignments.fetch"
LEASE = timedelta(minutes=4)
SECRET = "Bearer abcdefghijklmnopqrstuvwxyz0123456789"
TABLE = OperationRun.__table__


@pytest.fixture
def ledger(opsrun_ledger: Ledger) -> Ledger:
    opsrun_ledger.catalog.register(
        OperationSpec(FETCH, lease=LEASE, cooldown=timedelta(minutes=15))
    )
    return opsrun_ledger


def _run(ledger: Ledger, policy: str, workspace: str = "w1") -> int:
    return ledger.ensure_run(
        FETCH, workspace_id=workspace, tenant_id="t1", identity={"policy_id": policy}
    ).run.id


def _queued(ledger: Ledger) -> int:
    return _run(ledger, "queued")


def _running(ledger: Ledger) -> int:
    run_id = _run(ledger, "running")
    assert ledger.claim(run_id).acquired
    return run_id


def _completed(ledger: Ledger, policy: str = "completed") -> int:
    run_id = _run(ledger, policy)
    attempt = ledger.claim(run_id)
    attempt.add_failure("directory.throttled", f"429 from the directory ({SECRET})")
    ledger.complete(attempt, {"total": 3, "processed": 3, "failed": 1})
    return run_id


def _rules(violations: list[Violation]) -> list[tuple[int, str]]:
    return [(v.run_id, v.rule) for v in violations]


def _json(engine: Engine, value: Any) -> tuple[str, dict[str, Any]]:
    """A SQL expression and its parameter for a JSON value, as each backend spells it."""
    expr = "CAST(:v AS jsonb)" if engine.dialect.name == "postgresql" else ":v"
    return expr, {"v": json.dumps(value)}


def _set_json(engine: Engine, run_id: int, column: str, value: Any) -> None:
    expr, params = _json(engine, value)
    with engine.begin() as conn:
        conn.execute(
            text(f"UPDATE operation_runs SET {column} = {expr} WHERE id = :id"),
            {**params, "id": run_id},
        )


def _sql(engine: Engine, statement: str, **params: Any) -> None:
    with engine.begin() as conn:
        conn.execute(text(statement), params)


@contextmanager
def _rolled_back(engine: Engine) -> Iterator[Connection]:
    """A connection in a transaction that is always rolled back (DDL included: both backends
    have transactional DDL)."""
    with engine.connect() as conn:
        tx = conn.begin()
        try:
            yield conn
        finally:
            tx.rollback()


# -- a healthy ledger ---------------------------------------------------------------------------


def test_a_healthy_ledger_in_every_state_has_no_violations(ledger: Ledger, opsrun_clock) -> None:
    _queued(ledger)
    _running(ledger)
    _completed(ledger)
    # failed by an exception whose message carried a secret
    failed = ledger.claim(_run(ledger, "failed"))
    ledger.fail(failed, RuntimeError(f"upstream said no; Authorization: {SECRET}"))
    # released for a retry, then completed by the second attempt
    retried = _run(ledger, "retried")
    ledger.release(ledger.claim(retried), RuntimeError("flaky"))
    ledger.complete(ledger.claim(retried), {"total": 1, "processed": 1})
    # taken over after a lease expired, and the takeover completes
    taken = _run(ledger, "taken")
    ledger.claim(taken)
    opsrun_clock.advance(LEASE + timedelta(seconds=1))
    ledger.complete(ledger.claim(taken), {"total": 2, "processed": 2})
    # cooldown reuse, and a vanished worker finished by reconcile
    assert not ledger.ensure_run(
        FETCH, workspace_id="w1", tenant_id="t1", identity={"policy_id": "retried"}
    ).created
    ledger.claim(_run(ledger, "vanished", workspace="w2"))
    opsrun_clock.advance(timedelta(hours=2))
    assert ledger.reconcile("w2").summary_counts["reconciled"] == 1
    assert len(ledger.runs()) == 8  # and the reconcile's own run

    assert check_invariants(ledger) == []
    assert check_invariants(ledger.engine, batch_size=1) == []
    assert format_violations([]) == "ledger consistent: no invariant violations"


def test_every_source_kind_is_accepted(ledger: Ledger, opsrun_database_url: str) -> None:
    running = _running(ledger)
    _sql(ledger.engine, "UPDATE operation_runs SET lease_token = NULL WHERE id = :id", id=running)
    expected = [(running, "running_lease")]
    assert _rules(check_invariants(ledger)) == expected
    assert _rules(check_invariants(ledger.engine)) == expected
    assert _rules(check_invariants(opsrun_database_url)) == expected
    with ledger.engine.connect() as conn:
        assert _rules(check_invariants(conn)) == expected


# -- each rule ----------------------------------------------------------------------------------


BAD_COUNTS = {
    "null": None,
    "missing": {"total": 3, "processed": 3},
    "null-key": {"total": 3, "processed": 3, "failed": None},
    "negative": {"total": 3, "processed": 3, "failed": -1},
    "float": {"total": 3.0, "processed": 3, "failed": 0},
    "bool": {"total": True, "processed": 3, "failed": 0},
    "string-value": {"total": "3", "processed": 3, "failed": 0},
    "array": [3, 3, 0],
    "string": "3/3",
}


def test_bad_summary_counts_on_completed_runs(ledger: Ledger) -> None:
    broken = {}
    for case, counts in BAD_COUNTS.items():
        run_id = broken[case] = _completed(ledger, case)
        if counts is None:
            _sql(
                ledger.engine,
                "UPDATE operation_runs SET summary_counts = NULL WHERE id = :id",
                id=run_id,
            )
        else:
            _set_json(ledger.engine, run_id, "summary_counts", counts)
    violations = check_invariants(ledger)
    assert _rules(violations) == [(run_id, "summary_counts") for run_id in broken.values()]
    details = {case: violations[i].detail for i, case in enumerate(broken)}
    assert details["null"] == "completed without summary_counts"
    assert details["missing"] == "summary_counts: failed missing"
    assert details["negative"] == "summary_counts: failed is negative (-1)"
    assert details["bool"] == "summary_counts: total is a JSON boolean, not an int"
    assert details["array"] == "summary_counts is a JSON array, not an object"


def test_summary_counts_with_extra_keys_are_fine(ledger: Ledger) -> None:
    run_id = _completed(ledger)
    _set_json(
        ledger.engine,
        run_id,
        "summary_counts",
        {"total": 3, "processed": 3, "failed": 1, "skipped": 7},
    )
    assert check_invariants(ledger) == []


def test_completed_before_started(ledger: Ledger) -> None:
    run_id = _completed(ledger)
    run = ledger.get(run_id)
    assert run.started_at is not None
    with ledger.engine.begin() as conn:
        conn.execute(
            update(TABLE)
            .where(TABLE.c.id == run_id)
            .values(completed_at=run.started_at - timedelta(seconds=1))
        )
    violations = check_invariants(ledger)
    assert _rules(violations) == [(run_id, "timestamps")]
    assert "before started_at" in violations[0].detail


def test_completed_without_completed_at(ledger: Ledger) -> None:
    run_id = _completed(ledger)
    _sql(ledger.engine, "UPDATE operation_runs SET completed_at = NULL WHERE id = :id", id=run_id)
    assert _rules(check_invariants(ledger)) == [(run_id, "timestamps")]


def test_completed_at_equal_to_started_at_is_fine(ledger: Ledger) -> None:
    run_id = _completed(ledger)  # the frozen clock: started and completed at the same instant
    run = ledger.get(run_id)
    assert run.completed_at == run.started_at
    assert check_invariants(ledger) == []


BAD_FAILURES = {
    "secret": ([{"code": "x.failed", "message": SECRET}], 1),
    "newline": ([{"code": "x.failed", "message": "line one\nline two"}], 1),
    "too-long": ([{"code": "x.failed", "message": "x" * 501}], 1),
    "empty-code": ([{"code": "", "message": "fine"}], 1),
    "blank-code": ([{"code": "   ", "message": "fine"}], 1),
    "no-code": ([{"message": "fine"}], 1),
    "message-not-string": ([{"code": "x.failed", "message": 42}], 1),
    "entry-not-object": ([{"code": "x.failed", "message": "fine"}, "oops"], 1),
    "two-problems": ([{"code": "", "message": SECRET}], 2),
    "not-a-list": ({"code": "x.failed", "message": "fine"}, 1),
}


def test_bad_failure_summaries(ledger: Ledger) -> None:
    expected = []
    for case, (entries, problems) in BAD_FAILURES.items():
        run_id = _completed(ledger, case)
        _set_json(ledger.engine, run_id, "failure_summary", entries)
        expected += [(run_id, "failure_summary")] * problems
    violations = check_invariants(ledger)
    assert _rules(violations) == expected
    report = format_violations(violations)
    assert "abcdefghijklmnopqrstuvwxyz" not in report  # the secret is never echoed
    assert "failure_summary[0].message is not sanitized (43 characters)" in report


def test_failure_summary_is_checked_on_active_runs_too(ledger: Ledger) -> None:
    run_id = _queued(ledger)
    _set_json(ledger.engine, run_id, "failure_summary", [{"code": "x", "message": SECRET}])
    assert _rules(check_invariants(ledger)) == [(run_id, "failure_summary")]


@pytest.mark.parametrize("column", ["lease_token", "lease_expires_at"])
def test_running_without_a_lease(ledger: Ledger, column: str) -> None:
    run_id = _running(ledger)
    _sql(ledger.engine, f"UPDATE operation_runs SET {column} = NULL WHERE id = :id", id=run_id)
    violations = check_invariants(ledger)
    assert _rules(violations) == [(run_id, "running_lease")]
    assert column in violations[0].detail


def test_queued_with_a_lease(ledger: Ledger) -> None:
    run_id = _queued(ledger)
    _sql(ledger.engine, "UPDATE operation_runs SET lease_token = 'abc' WHERE id = :id", id=run_id)
    assert _rules(check_invariants(ledger)) == [(run_id, "queued_lease")]


def test_an_undecodable_json_column(ledger: Ledger, opsrun_backend: str) -> None:
    if opsrun_backend == "postgres":
        pytest.skip("jsonb refuses invalid JSON on write; only SQLite can hold it")
    run_id = _completed(ledger)
    _sql(
        ledger.engine,
        "UPDATE operation_runs SET summary_counts = '{oops' WHERE id = :id",
        id=run_id,
    )
    assert _rules(check_invariants(ledger)) == [(run_id, "unreadable")]


def test_a_completed_run_still_pending(ledger: Ledger, opsrun_backend: str) -> None:
    run_id = _completed(ledger)
    with _rolled_back(ledger.engine) as conn:
        if opsrun_backend == "postgres":
            # looked up, not spelled: see test_check_constraints_carry_the_names_of_the_migration
            name = conn.exec_driver_sql(
                "SELECT conname FROM pg_constraint WHERE conrelid = 'operation_runs'::regclass "
                "AND conname LIKE '%%outcome_matches_status'"
            ).scalar_one()
            conn.exec_driver_sql(f'ALTER TABLE operation_runs DROP CONSTRAINT "{name}"')
        else:
            conn.exec_driver_sql("PRAGMA ignore_check_constraints = ON")
        try:
            conn.execute(
                text("UPDATE operation_runs SET outcome = 'pending' WHERE id = :id"), {"id": run_id}
            )
            assert _rules(check_invariants(conn)) == [(run_id, "completed_pending")]
        finally:
            if opsrun_backend == "sqlite":
                conn.exec_driver_sql("PRAGMA ignore_check_constraints = OFF")
    # the constraint is back: the database refuses the same write
    with pytest.raises(IntegrityError):
        _sql(
            ledger.engine, "UPDATE operation_runs SET outcome = 'pending' WHERE id = :id", id=run_id
        )
    assert check_invariants(ledger) == []


def test_two_active_runs_of_one_identity(ledger: Ledger) -> None:
    first = _queued(ledger)
    other = _running(ledger)  # another identity: not involved
    with _rolled_back(ledger.engine) as conn:
        conn.exec_driver_sql("DROP INDEX uq_operation_runs_active_identity")
        second = conn.execute(
            text(
                "INSERT INTO operation_runs (type, workspace_id, tenant_id, identity_hash, "
                "identity, status, outcome, attempts, created_at, updated_at) "
                "SELECT type, workspace_id, tenant_id, identity_hash, identity, 'queued', "
                "'pending', 0, created_at, updated_at FROM operation_runs WHERE id = :id "
                "RETURNING id"
            ),
            {"id": first},
        ).scalar_one()
        violations = check_invariants(conn)
        assert _rules(violations) == [(first, "duplicate_active"), (second, "duplicate_active")]
        assert f"also run(s) {second}" in violations[0].detail
        assert other not in {v.run_id for v in violations}
    # rolled back: the index is there again and dispatch reuses the one active run
    again = ledger.ensure_run(
        FETCH, workspace_id="w1", tenant_id="t1", identity={"policy_id": "queued"}
    )
    assert again.run.id == first and not again.created
    assert check_invariants(ledger) == []


def test_completed_runs_of_one_identity_are_not_duplicates(ledger: Ledger) -> None:
    for _ in range(3):
        run_id = _run(ledger, "daily")
        ledger.fail(ledger.claim(run_id), "boom")  # a failure starts no cooldown
    assert len(ledger.runs(status=RunStatus.COMPLETED)) == 3
    assert check_invariants(ledger) == []


def test_check_constraints_carry_the_names_of_the_migration(opsrun_engine: Engine) -> None:
    names = {c["name"] for c in inspect(opsrun_engine).get_check_constraints("operation_runs")}
    assert names == {
        "ck_operation_runs_status",
        "ck_operation_runs_outcome",
        "ck_operation_runs_outcome_matches_status",
        "ck_operation_runs_attempts_non_negative",
        "ck_operation_runs_identity_hash_length",
        "ck_operation_runs_workspace_id_not_empty",
    }


# -- streaming and reporting --------------------------------------------------------------------


@pytest.mark.parametrize("batch_size", [1, 2, 3, 500])
def test_violations_across_batch_boundaries_are_all_found(ledger: Ledger, batch_size: int) -> None:
    ids = [_run(ledger, f"p{i}") for i in range(9)]
    broken = [ids[1], ids[4], ids[8]]
    for run_id in broken:
        _sql(ledger.engine, "UPDATE operation_runs SET lease_token = 'x' WHERE id = :id", id=run_id)
    violations = check_invariants(ledger, batch_size=batch_size)
    assert _rules(violations) == [(run_id, "queued_lease") for run_id in broken]


def test_format_violations_lists_each_and_counts_them(ledger: Ledger) -> None:
    queued = _queued(ledger)
    completed = _completed(ledger)
    _sql(ledger.engine, "UPDATE operation_runs SET lease_token = 'x' WHERE id = :id", id=queued)
    _sql(
        ledger.engine,
        "UPDATE operation_runs SET summary_counts = NULL WHERE id = :id",
        id=completed,
    )
    violations = check_invariants(ledger)
    report = format_violations(violations).splitlines()
    assert report[0] == f"run {queued}: queued_lease: queued but holds a lease (lease_token set)"
    assert report[1] == f"run {completed}: summary_counts: completed without summary_counts"
    assert report[2] == "2 invariant violations (queued_lease, summary_counts)"
    assert violations[0].as_dict() == {
        "run_id": queued,
        "rule": "queued_lease",
        "detail": "queued but holds a lease (lease_token set)",
    }
    assert {v.rule for v in violations} <= set(RULES)


# -- misuse -------------------------------------------------------------------------------------


def test_bad_arguments_are_refused(ledger: Ledger) -> None:
    with pytest.raises(ConfigurationError, match="takes a Ledger"):
        check_invariants(42)  # type: ignore[arg-type]
    for bad in (0, -1, True, 1.5):
        with pytest.raises(InvalidInput, match="batch_size"):
            check_invariants(ledger, batch_size=bad)  # type: ignore[arg-type]


def test_a_database_without_a_ledger_is_a_database_error(tmp_path) -> None:
    with pytest.raises(DatabaseError, match="opsrun migrate"):
        check_invariants(f"sqlite:///{tmp_path / 'empty.sqlite3'}")
