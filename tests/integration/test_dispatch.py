"""Dispatch-time dedupe and the cooldown (DESIGN semantics 1 and 2), on SQLite and Postgres."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session

from opsrun_core import Disposition, InvalidInput, Ledger, OperationSpec, Outcome, RunStatus

FETCH = "assignments.fetch"


def test_dispatch_twice_reuses_the_active_run(opsrun_ledger: Ledger) -> None:
    first = opsrun_ledger.ensure_run(
        FETCH, workspace_id="w1", tenant_id="t1", identity={"policy_id": "p1"}
    )
    second = opsrun_ledger.ensure_run(
        FETCH, workspace_id="w1", tenant_id="t1", identity={"policy_id": "p1"}
    )
    assert first.disposition is Disposition.CREATED and first.created
    assert second.disposition is Disposition.REUSED_ACTIVE and not second.created
    assert second.run.id == first.run.id
    run = first.run
    assert run.status is RunStatus.QUEUED and run.outcome is Outcome.PENDING
    assert run.identity == {"policy_id": "p1"}
    assert len(run.identity_hash) == 64 and run.attempts == 0
    assert run.created_at.tzinfo is not None and run.created_at.utcoffset() == timedelta(0)
    assert len(opsrun_ledger.runs(type=FETCH)) == 1


def test_reuse_while_running_then_new_run_after_completion(opsrun_ledger: Ledger) -> None:
    run = opsrun_ledger.ensure_run(
        FETCH, workspace_id="w1", tenant_id="t1", identity={"policy_id": "p1"}
    ).run
    attempt = opsrun_ledger.claim(run.id)
    again = opsrun_ledger.ensure_run(
        FETCH, workspace_id="w1", tenant_id="t1", identity={"policy_id": "p1"}
    )
    assert again.disposition is Disposition.REUSED_ACTIVE and again.run.status is RunStatus.RUNNING
    opsrun_ledger.complete(attempt, summary_counts={"total": 1, "processed": 1, "failed": 0})
    # no cooldown registered for this type: a completed run never answers a new dispatch
    after = opsrun_ledger.ensure_run(
        FETCH, workspace_id="w1", tenant_id="t1", identity={"policy_id": "p1"}
    )
    assert after.disposition is Disposition.CREATED and after.run.id != run.id


def test_cooldown_reuses_a_recent_success_until_it_passes(
    opsrun_ledger: Ledger, opsrun_clock
) -> None:
    opsrun_ledger.catalog.register(OperationSpec(FETCH, cooldown=timedelta(minutes=15)))
    run = opsrun_ledger.ensure_run(
        FETCH, workspace_id="w1", tenant_id="t1", identity={"policy_id": "p1"}
    ).run
    opsrun_ledger.complete(opsrun_ledger.claim(run.id), summary_counts={"total": 3, "processed": 3})
    opsrun_clock.advance(timedelta(minutes=14, seconds=59))
    inside = opsrun_ledger.ensure_run(
        FETCH, workspace_id="w1", tenant_id="t1", identity={"policy_id": "p1"}
    )
    assert inside.disposition is Disposition.REUSED_COOLDOWN and inside.run.id == run.id
    assert inside.run.outcome is Outcome.SUCCEEDED
    opsrun_clock.advance(timedelta(seconds=2))
    outside = opsrun_ledger.ensure_run(
        FETCH, workspace_id="w1", tenant_id="t1", identity={"policy_id": "p1"}
    )
    assert outside.disposition is Disposition.CREATED and outside.run.id != run.id


def test_partial_success_starts_a_cooldown(opsrun_ledger: Ledger, opsrun_clock) -> None:
    opsrun_ledger.catalog.register(OperationSpec(FETCH, cooldown=timedelta(minutes=15)))
    run = opsrun_ledger.ensure_run(FETCH, workspace_id="w1", identity={"policy_id": "p1"}).run
    done = opsrun_ledger.complete(
        opsrun_ledger.claim(run.id), {"total": 4, "processed": 4, "failed": 1}
    )
    assert done.outcome is Outcome.PARTIALLY_SUCCEEDED
    opsrun_clock.advance(timedelta(minutes=1))
    again = opsrun_ledger.ensure_run(FETCH, workspace_id="w1", identity={"policy_id": "p1"})
    assert again.disposition is Disposition.REUSED_COOLDOWN


def test_a_failed_run_never_starts_a_cooldown(opsrun_ledger: Ledger, opsrun_clock) -> None:
    opsrun_ledger.catalog.register(OperationSpec(FETCH, cooldown=timedelta(minutes=15)))
    run = opsrun_ledger.ensure_run(
        FETCH, workspace_id="w1", tenant_id="t1", identity={"policy_id": "p1"}
    ).run
    failed = opsrun_ledger.fail(opsrun_ledger.claim(run.id), RuntimeError("boom"))
    assert failed.outcome is Outcome.FAILED
    opsrun_clock.advance(timedelta(seconds=1))
    retry = opsrun_ledger.ensure_run(
        FETCH, workspace_id="w1", tenant_id="t1", identity={"policy_id": "p1"}
    )
    assert retry.disposition is Disposition.CREATED and retry.run.id != run.id


def test_a_failure_after_a_success_ends_the_cooldown(opsrun_ledger: Ledger, opsrun_clock) -> None:
    """The latest completed run decides: a user retrying a failure gets a new run."""
    opsrun_ledger.catalog.register(OperationSpec(FETCH, cooldown=timedelta(minutes=15)))
    ok = opsrun_ledger.ensure_run(FETCH, workspace_id="w1", identity={"policy_id": "p1"}).run
    opsrun_ledger.complete(opsrun_ledger.claim(ok.id), {"total": 1, "processed": 1})
    opsrun_clock.advance(timedelta(minutes=16))
    bad = opsrun_ledger.ensure_run(FETCH, workspace_id="w1", identity={"policy_id": "p1"}).run
    opsrun_ledger.fail(opsrun_ledger.claim(bad.id), RuntimeError("boom"))
    opsrun_clock.advance(timedelta(minutes=1))
    again = opsrun_ledger.ensure_run(FETCH, workspace_id="w1", identity={"policy_id": "p1"})
    assert again.disposition is Disposition.CREATED


@pytest.mark.parametrize(
    ("workspace", "tenant", "identity", "type_"),
    [
        ("w2", "t1", {"policy_id": "p1"}, FETCH),
        ("w1", "t2", {"policy_id": "p1"}, FETCH),
        ("w1", None, {"policy_id": "p1"}, FETCH),
        ("w1", "t1", {"policy_id": "p2"}, FETCH),
        ("w1", "t1", {"policy_id": "p1"}, "assignments.restore"),
    ],
)
def test_different_scope_identity_or_type_gets_its_own_run(
    opsrun_ledger: Ledger, workspace, tenant, identity, type_
) -> None:
    base = opsrun_ledger.ensure_run(
        FETCH, workspace_id="w1", tenant_id="t1", identity={"policy_id": "p1"}
    )
    other = opsrun_ledger.ensure_run(
        type_, workspace_id=workspace, tenant_id=tenant, identity=identity
    )
    assert other.created and other.run.id != base.run.id


def test_workspace_run_has_no_tenant(opsrun_ledger: Ledger) -> None:
    res = opsrun_ledger.ensure_workspace_run(
        "ops.reconcile_adapter_runs", workspace_id="w1", identity={}
    )
    assert res.created and res.run.tenant_id is None and res.run.workspace_id == "w1"
    again = opsrun_ledger.ensure_workspace_run("ops.reconcile_adapter_runs", workspace_id="w1")
    assert again.disposition is Disposition.REUSED_ACTIVE and again.run.id == res.run.id


def test_host_ids_of_any_type_are_stored_as_strings(opsrun_ledger: Ledger) -> None:
    res = opsrun_ledger.ensure_run(FETCH, workspace_id=7, tenant_id=42, identity={"policy_id": 9})
    assert res.run.workspace_id == "7" and res.run.tenant_id == "42"
    assert (
        opsrun_ledger.ensure_run(
            FETCH, workspace_id="7", tenant_id="42", identity={"policy_id": 9}
        ).run.id
        == res.run.id
    )


def test_dispatch_joins_the_callers_transaction(opsrun_ledger: Ledger) -> None:
    with Session(opsrun_ledger.engine) as session:
        res = opsrun_ledger.ensure_run(
            FETCH, workspace_id="w1", identity={"policy_id": "p1"}, session=session
        )
        assert res.created
        # visible inside the caller's transaction ...
        count = session.execute(text("SELECT count(*) FROM operation_runs")).scalar_one()
        assert count == 1
        session.rollback()
    # ... and gone with it
    assert opsrun_ledger.runs() == []
    with Session(opsrun_ledger.engine) as session:
        kept = opsrun_ledger.ensure_run(
            FETCH, workspace_id="w1", identity={"policy_id": "p1"}, session=session
        )
        session.commit()
    assert [r.id for r in opsrun_ledger.runs()] == [kept.run.id]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"workspace_id": ""},
        {"workspace_id": "   "},
        {"workspace_id": None},
        {"workspace_id": True},
        {"workspace_id": "w1", "tenant_id": ""},
        {"workspace_id": "w1", "identity": {"access_token": "abc"}},
        {"workspace_id": "w1", "identity": {"when": object()}},
        {"workspace_id": "w1", "identity": ["not", "a", "mapping"]},
        {"workspace_id": "w1", "context": {"password": "x"}},
    ],
)
def test_bad_dispatch_input_is_refused_and_writes_nothing(opsrun_ledger: Ledger, kwargs) -> None:
    with pytest.raises(InvalidInput):
        opsrun_ledger.ensure_run(FETCH, **kwargs)
    assert opsrun_ledger.runs() == []


def test_concurrent_dispatch_in_threads_creates_one_run(opsrun_ledger: Ledger) -> None:
    n = 8
    barrier = threading.Barrier(n)
    results: list = [None] * n

    def worker(i: int) -> None:
        barrier.wait()
        results[i] = opsrun_ledger.ensure_run(
            FETCH, workspace_id="w1", tenant_id="t1", identity={"policy_id": "p1"}
        )

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    created = [r for r in results if r.disposition is Disposition.CREATED]
    assert len(created) == 1
    assert {r.run.id for r in results} == {created[0].run.id}
    assert all(r.disposition is Disposition.REUSED_ACTIVE for r in results if r is not created[0])
