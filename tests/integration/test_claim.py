"""The execute-time guard, leases, fencing and final-attempt summaries (semantics 3-5)."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest

from opsrun_core import (
    InvalidInput,
    LeaseLost,
    Ledger,
    OperationSpec,
    Outcome,
    RunNotFound,
    RunStatus,
)

FETCH = "assignments.fetch"
LEASE = timedelta(minutes=4)


@pytest.fixture
def run_id(opsrun_ledger: Ledger) -> int:
    opsrun_ledger.catalog.register(
        OperationSpec(FETCH, expected_duration=timedelta(minutes=2), lease=LEASE)
    )
    res = opsrun_ledger.ensure_run(
        FETCH, workspace_id="w1", tenant_id="t1", identity={"policy_id": "p1"}
    )
    return res.run.id


def test_claim_takes_a_queued_run(opsrun_ledger: Ledger, opsrun_clock, run_id: int) -> None:
    attempt = opsrun_ledger.claim(run_id)
    assert attempt.acquired and attempt.reason == "acquired" and attempt.number == 1
    run = opsrun_ledger.get(run_id)
    assert run.status is RunStatus.RUNNING and run.attempts == 1
    assert run.started_at == opsrun_clock()
    assert run.lease_expires_at == opsrun_clock() + LEASE


def test_second_claim_while_the_lease_holds_skips(
    opsrun_ledger: Ledger, opsrun_clock, run_id: int
) -> None:
    assert opsrun_ledger.claim(run_id).acquired
    opsrun_clock.advance(LEASE - timedelta(seconds=1))
    second = opsrun_ledger.claim(run_id)
    assert not second.acquired and second.reason == "running"
    assert opsrun_ledger.get(run_id).attempts == 1


def test_claim_of_a_completed_run_skips(opsrun_ledger: Ledger, run_id: int) -> None:
    opsrun_ledger.complete(opsrun_ledger.claim(run_id), {"total": 0})
    late = opsrun_ledger.claim(run_id)
    assert not late.acquired and late.reason == "completed"


def test_claim_of_an_unknown_run_skips_and_get_raises(opsrun_ledger: Ledger) -> None:
    attempt = opsrun_ledger.claim(987654)
    assert not attempt.acquired and attempt.reason == "not_found"
    with pytest.raises(RunNotFound, match="987654"):
        opsrun_ledger.get(987654)


@pytest.mark.parametrize("bad", [0, -1, "1", 1.5, True, None])
def test_bad_run_ids_are_refused(opsrun_ledger: Ledger, bad) -> None:
    with pytest.raises(InvalidInput):
        opsrun_ledger.claim(bad)
    with pytest.raises(InvalidInput):
        opsrun_ledger.get(bad)


def test_takeover_after_the_lease_expires_fences_the_first_attempt(
    opsrun_ledger: Ledger, opsrun_clock, run_id: int
) -> None:
    first = opsrun_ledger.claim(run_id)
    first.count(processed=5)
    opsrun_clock.advance(LEASE + timedelta(seconds=1))
    second = opsrun_ledger.claim(run_id)
    assert second.acquired and second.number == 2
    assert opsrun_ledger.get(run_id).attempts == 2
    before = opsrun_ledger.get(run_id)
    for write in (
        lambda: opsrun_ledger.complete(first, {"total": 5}),
        lambda: opsrun_ledger.heartbeat(first),
        lambda: opsrun_ledger.release(first),
    ):
        with pytest.raises(LeaseLost):
            write()
    assert opsrun_ledger.get(run_id) == before  # the lost attempt changed nothing
    second.count(processed=10)
    done = opsrun_ledger.complete(second, {"total": 10})
    assert done.summary_counts == {"total": 10, "processed": 10, "failed": 0}
    assert done.attempts == 2


def test_fail_after_losing_the_lease_changes_nothing(
    opsrun_ledger: Ledger, opsrun_clock, run_id: int
) -> None:
    first = opsrun_ledger.claim(run_id)
    opsrun_clock.advance(LEASE + timedelta(seconds=1))
    assert opsrun_ledger.claim(run_id).acquired
    with pytest.raises(LeaseLost):
        opsrun_ledger.fail(first, RuntimeError("late"))
    assert opsrun_ledger.get(run_id).status is RunStatus.RUNNING


def test_heartbeat_extends_the_lease(opsrun_ledger: Ledger, opsrun_clock, run_id: int) -> None:
    attempt = opsrun_ledger.claim(run_id)
    opsrun_clock.advance(LEASE - timedelta(seconds=10))
    run = opsrun_ledger.heartbeat(attempt)
    assert run.lease_expires_at == opsrun_clock() + LEASE
    assert run.heartbeat_at == opsrun_clock()
    opsrun_clock.advance(timedelta(seconds=30))  # past the first lease, inside the extended one
    assert opsrun_ledger.claim(run_id).reason == "running"


def test_final_attempt_wins_after_release(opsrun_ledger: Ledger, run_id: int) -> None:
    first = opsrun_ledger.claim(run_id)
    first.count(processed=5)
    released = opsrun_ledger.release(first, RuntimeError("throttled, try later"))
    assert released.status is RunStatus.QUEUED and released.summary_counts is None
    second = opsrun_ledger.claim(run_id)
    assert second.number == 2
    second.set_counts(total=10)
    for _ in range(10):
        second.count(processed=1)
    done = opsrun_ledger.complete(second)
    assert done.summary_counts == {"total": 10, "processed": 10, "failed": 0}
    assert done.outcome is Outcome.SUCCEEDED and done.attempts == 2


def test_writes_after_finishing_raise_lease_lost(opsrun_ledger: Ledger, run_id: int) -> None:
    attempt = opsrun_ledger.claim(run_id)
    opsrun_ledger.complete(attempt, {"total": 1, "processed": 1})
    with pytest.raises(LeaseLost):
        opsrun_ledger.complete(attempt, {"total": 2, "processed": 2})
    assert opsrun_ledger.get(run_id).summary_counts == {"total": 1, "processed": 1, "failed": 0}


@pytest.mark.parametrize(
    ("counts", "outcome"),
    [
        ({"total": 10, "processed": 10, "failed": 0}, Outcome.SUCCEEDED),
        ({"total": 10, "processed": 10, "failed": 2}, Outcome.PARTIALLY_SUCCEEDED),
        ({"total": 10, "processed": 10, "failed": 10}, Outcome.FAILED),
        ({"total": 0}, Outcome.SUCCEEDED),
    ],
)
def test_outcome_is_derived_from_the_counts(
    opsrun_ledger: Ledger, run_id: int, counts, outcome
) -> None:
    done = opsrun_ledger.complete(opsrun_ledger.claim(run_id), counts)
    assert done.outcome is outcome and done.status is RunStatus.COMPLETED
    assert {"total", "processed", "failed"} <= set(done.summary_counts)
    assert done.completed_at is not None and done.completed_at >= done.started_at


def test_an_exception_fails_the_run_without_its_secret(opsrun_ledger: Ledger, run_id: int) -> None:
    attempt = opsrun_ledger.claim(run_id)
    attempt.count(processed=3)
    error = RuntimeError(
        "GET https://graph.example/v1 failed: Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2lnbmF0dXJl "
        "client_secret=hunter2hunter2"
    )
    done = opsrun_ledger.fail(attempt, error)
    assert done.outcome is Outcome.FAILED
    assert done.summary_counts == {"total": 3, "processed": 3, "failed": 0}
    [entry] = done.failure_summary
    assert entry["code"] == f"{FETCH}.failed"
    assert entry["message"].startswith("RuntimeError: ")
    assert "hunter2" not in entry["message"] and "eyJhbGci" not in entry["message"]
    assert "[REDACTED]" in entry["message"]


def test_item_failures_are_kept_on_partial_success(opsrun_ledger: Ledger, run_id: int) -> None:
    attempt = opsrun_ledger.claim(run_id)
    attempt.set_counts(total=3)
    attempt.count(processed=2)
    attempt.add_failure("directory.not_found", "assignment a3 gone; token=abc123secret")
    attempt.count(processed=1, failed=1)
    done = opsrun_ledger.complete(attempt)
    assert done.outcome is Outcome.PARTIALLY_SUCCEEDED
    assert done.failure_summary == [
        {"code": "directory.not_found", "message": "assignment a3 gone; token=[REDACTED]"}
    ]


@pytest.mark.parametrize(
    "counts",
    [
        {"total": -1},
        {"processed": 1.5},
        {"failed": "2"},
        {"processed": True},
        {"total": 2, "processed": 1, "failed": 2},
        {"total": 1, "processed": 2},
    ],
)
def test_bad_counts_are_refused_and_the_run_stays_claimed(
    opsrun_ledger: Ledger, run_id: int, counts
) -> None:
    attempt = opsrun_ledger.claim(run_id)
    with pytest.raises(InvalidInput):
        opsrun_ledger.complete(attempt, counts)
    run = opsrun_ledger.get(run_id)
    assert run.status is RunStatus.RUNNING and run.summary_counts is None
    assert (
        opsrun_ledger.complete(attempt, {"total": 1, "processed": 1}).status is RunStatus.COMPLETED
    )


def test_concurrent_claims_in_threads_acquire_once(opsrun_ledger: Ledger, run_id: int) -> None:
    n = 8
    barrier = threading.Barrier(n)
    results: list = [None] * n

    def worker(i: int) -> None:
        barrier.wait()
        results[i] = opsrun_ledger.claim(run_id)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(a.acquired for a in results) == 1
    assert {a.reason for a in results if not a.acquired} == {"running"}
