"""``Ledger.explain``: what a dispatch of an identity would do right now, on SQLite and Postgres.

Each answer is checked against the dispatch that follows it (``ensure_run`` does what ``explain``
said), and ``explain`` itself must leave the table exactly as it found it.
"""

from __future__ import annotations

from datetime import timedelta

from opsrun_core import Disposition, Ledger, ManualClock, OperationSpec, Run, RunStatus
from opsrun_core.ledger import Explanation

TYPE = "assignments.fetch"
IDENTITY = {"policy_id": "p1", "limit": 10}
COUNTS = {"total": 2, "processed": 2, "failed": 0}


def _explain(ledger: Ledger) -> Explanation:
    return ledger.explain(TYPE, workspace_id="w1", tenant_id="t1", identity=IDENTITY)


def _dispatch(ledger: Ledger) -> tuple[Run, Disposition]:
    result = ledger.ensure_run(TYPE, workspace_id="w1", tenant_id="t1", identity=IDENTITY)
    return result.run, result.disposition


def _completed(ledger: Ledger) -> Run:
    run, _ = _dispatch(ledger)
    return ledger.complete(ledger.claim(run.id), COUNTS)


def test_an_empty_ledger_would_create(opsrun_ledger: Ledger, opsrun_clock: ManualClock) -> None:
    explained = _explain(opsrun_ledger)
    assert isinstance(explained, Explanation)
    assert explained.decision.action == "create" and explained.decision.run is None
    assert explained.active is None and explained.latest_completed is None
    assert explained.spec == opsrun_ledger.catalog.spec(TYPE)
    assert explained.identity.inputs == IDENTITY
    assert explained.now == opsrun_clock()
    assert opsrun_ledger.runs() == []
    run, disposition = _dispatch(opsrun_ledger)
    assert disposition is Disposition.CREATED
    assert run.identity_hash == explained.identity.hash


def test_the_active_run_is_reused_queued_or_running(opsrun_ledger: Ledger) -> None:
    queued, _ = _dispatch(opsrun_ledger)
    explained = _explain(opsrun_ledger)
    assert explained.decision.action == "reuse_active"
    assert explained.decision.run == queued and explained.active == queued
    assert explained.latest_completed is None
    assert explained.identity.hash == queued.identity_hash
    attempt = opsrun_ledger.claim(queued.id)
    assert attempt.acquired and attempt.run is not None
    running = _explain(opsrun_ledger)
    assert running.decision.action == "reuse_active"
    assert running.active == attempt.run and running.active.status is RunStatus.RUNNING
    assert _dispatch(opsrun_ledger) == (attempt.run, Disposition.REUSED_ACTIVE)


def test_a_completed_run_answers_inside_the_cooldown_and_not_after(
    opsrun_ledger: Ledger, opsrun_clock: ManualClock
) -> None:
    opsrun_ledger.catalog.register(OperationSpec(TYPE, cooldown=timedelta(minutes=15)))
    done = _completed(opsrun_ledger)
    opsrun_clock.advance(timedelta(minutes=14))
    inside = _explain(opsrun_ledger)
    assert inside.decision.action == "reuse_cooldown" and inside.decision.run == done
    assert inside.latest_completed == done and inside.active is None
    assert inside.spec.cooldown == timedelta(minutes=15)
    assert inside.now == opsrun_clock()
    assert _dispatch(opsrun_ledger) == (done, Disposition.REUSED_COOLDOWN)
    opsrun_clock.advance(timedelta(minutes=2))
    after = _explain(opsrun_ledger)
    assert after.decision.action == "create" and after.decision.run is None
    assert after.latest_completed == done and after.active is None
    run, disposition = _dispatch(opsrun_ledger)
    assert disposition is Disposition.CREATED and run.id != done.id


def test_without_a_cooldown_a_completed_run_does_not_answer(opsrun_ledger: Ledger) -> None:
    done = _completed(opsrun_ledger)
    explained = _explain(opsrun_ledger)
    assert explained.spec.cooldown is None
    assert explained.decision.action == "create" and explained.latest_completed == done


def test_explain_writes_nothing(opsrun_ledger: Ledger, opsrun_clock: ManualClock) -> None:
    opsrun_ledger.catalog.register(OperationSpec(TYPE, cooldown=timedelta(minutes=15)))
    expected = ["create", "reuse_cooldown", "reuse_active"]
    seen = []
    for step in range(3):
        if step == 1:
            _completed(opsrun_ledger)
        elif step == 2:
            opsrun_clock.advance(timedelta(minutes=20))
            _dispatch(opsrun_ledger)
        before = opsrun_ledger.runs()
        for _ in range(3):
            seen.append(_explain(opsrun_ledger).decision.action)
        after = opsrun_ledger.runs()
        assert after == before  # same runs, every field unchanged
    assert seen == [action for action in expected for _ in range(3)]
    assert len(opsrun_ledger.runs()) == 2
