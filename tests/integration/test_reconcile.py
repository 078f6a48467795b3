"""Housekeeping tracked like everything else (DESIGN semantics 6), on SQLite and Postgres."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest

from opsrun_core import (
    RECONCILE_TYPE,
    Disposition,
    Ledger,
    OperationSpec,
    Outcome,
    RunStatus,
    hookimpl,
)
from opsrun_core.reconcile import LEASE_EXPIRED, NEVER_STARTED, ReconcileError

FETCH = "assignments.fetch"
LEASE = timedelta(minutes=4)
QUEUED_LIMIT = timedelta(minutes=30)


@pytest.fixture
def ledger(opsrun_ledger: Ledger) -> Ledger:
    opsrun_ledger.catalog.register(OperationSpec(FETCH, lease=LEASE, queued_limit=QUEUED_LIMIT))
    return opsrun_ledger


def _dispatch(ledger: Ledger, policy: str, workspace: str = "w1") -> int:
    return ledger.ensure_run(
        FETCH, workspace_id=workspace, tenant_id="t1", identity={"policy_id": policy}
    ).run.id


def test_reconcile_finishes_stale_runs_and_leaves_healthy_ones(
    ledger: Ledger, opsrun_clock
) -> None:
    stale = _dispatch(ledger, "stale")
    ledger.claim(stale)  # a worker that will vanish
    never = _dispatch(ledger, "never")  # queued, never claimed
    other_workspace = _dispatch(ledger, "elsewhere", workspace="w2")
    ledger.claim(other_workspace)
    opsrun_clock.advance(QUEUED_LIMIT + timedelta(minutes=1))
    healthy = _dispatch(ledger, "healthy")
    healthy_attempt = ledger.claim(healthy)
    fresh = _dispatch(ledger, "fresh")

    report = ledger.reconcile_report("w1")
    run = report.run
    assert report.did_work
    assert run.type == RECONCILE_TYPE and run.workspace_id == "w1" and run.tenant_id is None
    assert run.status is RunStatus.COMPLETED and run.outcome is Outcome.SUCCEEDED
    assert run.summary_counts["total"] == 2
    assert run.summary_counts["processed"] == 2 and run.summary_counts["failed"] == 0
    assert ledger.catalog.label(run.type) == "Reconcile adapter runs"

    lease_expired = ledger.get(stale)
    assert lease_expired.status is RunStatus.COMPLETED and lease_expired.outcome is Outcome.FAILED
    [entry] = lease_expired.failure_summary
    assert entry["code"] == LEASE_EXPIRED and "1 attempt" in entry["message"]
    assert set(lease_expired.summary_counts) >= {"total", "processed", "failed"}
    never_started = ledger.get(never)
    assert never_started.outcome is Outcome.FAILED
    assert never_started.failure_summary[0]["code"] == NEVER_STARTED
    for untouched in (healthy, fresh, other_workspace):
        assert ledger.get(untouched).status is not RunStatus.COMPLETED
    assert (
        ledger.complete(healthy_attempt, {"total": 1, "processed": 1}).outcome is Outcome.SUCCEEDED
    )
    # the identities of the finished runs are free again
    assert ledger.ensure_run(
        FETCH, workspace_id="w1", tenant_id="t1", identity={"policy_id": "stale"}
    ).created


def test_grace_period_protects_a_lease_that_just_expired(ledger: Ledger, opsrun_clock) -> None:
    run_id = _dispatch(ledger, "p1")
    ledger.claim(run_id)
    opsrun_clock.advance(LEASE + timedelta(seconds=10))
    ledger.reconcile("w1", grace=timedelta(seconds=30))
    assert ledger.get(run_id).status is RunStatus.RUNNING
    opsrun_clock.advance(timedelta(seconds=30))
    ledger.reconcile("w1", grace=timedelta(seconds=30))
    assert ledger.get(run_id).outcome is Outcome.FAILED


def test_batches_cover_every_candidate(ledger: Ledger, opsrun_clock) -> None:
    ids = [_dispatch(ledger, f"p{i}") for i in range(7)]
    opsrun_clock.advance(QUEUED_LIMIT + timedelta(seconds=1))
    batches: list[int] = []
    report = ledger.reconcile_report("w1", batch_size=3, on_batch=batches.append)
    assert report.run.summary_counts["processed"] == 7
    assert batches == [3, 3, 1]
    assert all(ledger.get(i).failure_summary[0]["code"] == NEVER_STARTED for i in ids)


def test_a_plugin_can_say_a_candidate_is_alive(ledger: Ledger, opsrun_clock) -> None:
    alive_id = _dispatch(ledger, "alive")
    dead_id = _dispatch(ledger, "dead")

    class Queue:
        @hookimpl
        def opsrun_is_alive(self, run):
            return run.id == alive_id or None

    plugin = Queue()
    ledger.pm.register(plugin)
    try:
        opsrun_clock.advance(QUEUED_LIMIT + timedelta(seconds=1))
        run = ledger.reconcile("w1")
    finally:
        ledger.pm.unregister(plugin)
    assert run.summary_counts["alive"] == 1 and run.summary_counts["processed"] == 1
    assert ledger.get(alive_id).status is RunStatus.QUEUED
    assert ledger.get(dead_id).outcome is Outcome.FAILED


def test_a_failing_sweep_ends_the_reconcile_run_failed_without_secrets(
    ledger: Ledger, opsrun_clock
) -> None:
    _dispatch(ledger, "p1")

    class Broken:
        @hookimpl
        def opsrun_is_alive(self, run):
            raise ConnectionError(
                "broker at amqp://ops:hunter2secret@mq:5672 said Authorization: Bearer abc.def.ghi"
            )

    class Exploding:
        @hookimpl
        def opsrun_run_finished(self, run):
            if run.type == FETCH:
                raise RuntimeError("metrics push failed password=hunter2secret")

    exploding = Exploding()
    ledger.pm.register(exploding)
    try:
        opsrun_clock.advance(QUEUED_LIMIT + timedelta(seconds=1))
        with pytest.raises(ReconcileError) as caught:
            ledger.reconcile("w1")
    finally:
        ledger.pm.unregister(exploding)
    assert "hunter2secret" not in str(caught.value)
    assert caught.value.__cause__ is None and caught.value.__suppress_context__
    run = caught.value.run
    assert run is not None and run.type == RECONCILE_TYPE
    assert run.outcome is Outcome.FAILED
    [entry] = run.failure_summary
    assert entry["code"] == "ops.reconcile_adapter_runs.failed"
    assert "hunter2secret" not in entry["message"] and "RuntimeError" in entry["message"]
    # the observer heard only of the committed finish: the stale run is finished all the same
    assert ledger.runs(type=FETCH)[0].failure_summary[0]["code"] == NEVER_STARTED
    # a hook that only judged a candidate badly is counted, not fatal
    _dispatch(ledger, "p2")
    broken = Broken()
    ledger.pm.register(broken)
    try:
        opsrun_clock.advance(QUEUED_LIMIT + timedelta(seconds=1))
        counted = ledger.reconcile("w1")
    finally:
        ledger.pm.unregister(broken)
    assert counted.outcome is Outcome.FAILED  # every processed candidate failed
    assert counted.summary_counts["failed"] == counted.summary_counts["processed"] >= 1


def test_a_second_reconcile_while_one_runs_reuses_it_and_touches_nothing(
    ledger: Ledger, opsrun_clock
) -> None:
    stale = _dispatch(ledger, "p1")
    opsrun_clock.advance(QUEUED_LIMIT + timedelta(seconds=1))
    # a reconcile in progress elsewhere holds the workspace
    holder, attempt = ledger.ensure_and_claim(RECONCILE_TYPE, workspace_id="w1", identity={})
    assert holder.disposition is Disposition.CREATED and attempt.acquired
    report = ledger.reconcile_report("w1")
    assert not report.did_work and report.run.id == holder.run.id
    assert report.run.status is RunStatus.RUNNING
    assert ledger.get(stale).status is RunStatus.QUEUED


def test_a_crashed_reconcile_is_taken_over_after_its_lease(ledger: Ledger, opsrun_clock) -> None:
    _, attempt = ledger.ensure_and_claim(RECONCILE_TYPE, workspace_id="w1", identity={})
    lease = ledger.catalog.spec(RECONCILE_TYPE).lease_duration
    opsrun_clock.advance(lease + timedelta(seconds=1))
    report = ledger.reconcile_report("w1")
    assert report.did_work and report.run.attempts == 2 and report.run.id == attempt.run_id


def test_reconcile_all_covers_every_workspace_with_active_runs(
    ledger: Ledger, opsrun_clock
) -> None:
    a = _dispatch(ledger, "p1", workspace="w1")
    b = _dispatch(ledger, "p1", workspace="w2")
    opsrun_clock.advance(QUEUED_LIMIT + timedelta(seconds=1))
    runs = ledger.reconcile_all()
    assert sorted(r.workspace_id for r in runs) == ["w1", "w2"]
    assert all(r.type == RECONCILE_TYPE and r.outcome is Outcome.SUCCEEDED for r in runs)
    assert ledger.get(a).outcome is Outcome.FAILED and ledger.get(b).outcome is Outcome.FAILED
    assert ledger.reconcile_all() == []


def test_concurrent_reconciles_in_threads_do_the_work_once(ledger: Ledger, opsrun_clock) -> None:
    stale = [_dispatch(ledger, f"p{i}") for i in range(5)]
    opsrun_clock.advance(QUEUED_LIMIT + timedelta(seconds=1))
    n = 6
    barrier = threading.Barrier(n)
    reports: list = [None] * n

    def worker(i: int) -> None:
        barrier.wait()
        reports[i] = ledger.reconcile_report("w1")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    workers = [r for r in reports if r.did_work and r.run.summary_counts["processed"] > 0]
    assert len(workers) == 1
    # every tracked reconcile run (a late caller may start a new one after the first finished)
    tracked = ledger.runs(type=RECONCILE_TYPE)
    assert sum(r.summary_counts["processed"] for r in tracked) == 5
    assert sum(r.summary_counts["reconciled"] for r in tracked) == 5
    assert all(ledger.get(i).outcome is Outcome.FAILED for i in stale)


def test_a_released_run_waits_from_its_release_not_its_creation(
    ledger: Ledger, opsrun_clock
) -> None:
    run_id = _dispatch(ledger, "p1")
    opsrun_clock.advance(QUEUED_LIMIT - timedelta(minutes=1))
    ledger.release(ledger.claim(run_id))  # attempt 1 gave it back for a retry
    opsrun_clock.advance(timedelta(minutes=2))  # past the limit since creation, not since release
    ledger.reconcile("w1")
    assert ledger.get(run_id).status is RunStatus.QUEUED
    opsrun_clock.advance(QUEUED_LIMIT)
    ledger.reconcile("w1")
    [entry] = ledger.get(run_id).failure_summary
    assert entry["code"] == NEVER_STARTED and "queued again for a retry" in entry["message"]


def test_reconcile_all_goes_on_past_a_failing_workspace(ledger: Ledger, opsrun_clock) -> None:
    a = _dispatch(ledger, "p1", workspace="w1")
    b = _dispatch(ledger, "p1", workspace="w2")

    class BrokenForW1:
        @hookimpl
        def opsrun_run_finished(self, run):
            if run.workspace_id == "w1" and run.type == FETCH:
                raise RuntimeError("observer down")

    plugin = BrokenForW1()
    ledger.pm.register(plugin)
    try:
        opsrun_clock.advance(QUEUED_LIMIT + timedelta(seconds=1))
        runs = ledger.reconcile_all()
    finally:
        ledger.pm.unregister(plugin)
    outcomes = {r.workspace_id: r.outcome for r in runs}
    assert outcomes == {"w1": Outcome.FAILED, "w2": Outcome.SUCCEEDED}
    assert ledger.get(b).outcome is Outcome.FAILED and ledger.get(a).outcome is Outcome.FAILED
