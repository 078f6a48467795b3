"""Real concurrency: several OS processes racing on one identity against Postgres."""

from __future__ import annotations

import pytest

from opsrun_core import Ledger
from tests.workers import claim_one, dispatch_one, race

pytestmark = pytest.mark.opsrun_backends("postgres")

N = 8


def test_processes_dispatching_one_identity_create_one_run(
    opsrun_database_url: str, opsrun_ledger: Ledger
) -> None:
    results = race(dispatch_one, N, opsrun_database_url, "assignments.fetch", {"policy_id": "p1"})
    created = [r for r in results if r[0] == "created"]
    assert len(created) == 1
    assert {run_id for _, run_id in results} == {created[0][1]}
    assert sorted(d for d, _ in results) == ["created"] + ["reused_active"] * (N - 1)
    assert len(opsrun_ledger.runs()) == 1


def test_processes_claiming_one_run_acquire_once(
    opsrun_database_url: str, opsrun_ledger: Ledger
) -> None:
    run = opsrun_ledger.ensure_run(
        "assignments.fetch", workspace_id="w1", identity={"policy_id": "p1"}
    ).run
    results = race(claim_one, N, opsrun_database_url, run.id)
    assert sum(acquired for acquired, _ in results) == 1
    assert {reason for acquired, reason in results if not acquired} == {"running"}
    assert opsrun_ledger.get(run.id).attempts == 1


def test_processes_reconciling_one_workspace_do_the_work_once(
    opsrun_database_url: str, opsrun_ledger: Ledger, opsrun_clock
) -> None:
    from datetime import timedelta

    from opsrun_core import RECONCILE_TYPE, Outcome
    from tests.workers import reconcile_one

    stale = [
        opsrun_ledger.ensure_run(
            "assignments.fetch", workspace_id="w1", identity={"policy_id": f"p{i}"}
        ).run.id
        for i in range(20)
    ]
    later = opsrun_clock.advance(timedelta(days=1)).isoformat()
    results = race(reconcile_one, N, opsrun_database_url, "w1", later)
    assert sum(1 for did_work, _, processed in results if did_work and processed) == 1
    tracked = opsrun_ledger.runs(type=RECONCILE_TYPE)
    assert sum(r.summary_counts["reconciled"] for r in tracked) == 20
    for run_id in stale:
        run = opsrun_ledger.get(run_id)
        assert run.outcome is Outcome.FAILED and len(run.failure_summary) == 1


def test_a_killed_worker_blocks_its_identity_until_reconcile_frees_it(
    opsrun_database_url: str,
) -> None:
    ledger = Ledger(opsrun_database_url)  # the server's clock, as a worker fleet would use
    try:
        _kill_and_reconcile(ledger, opsrun_database_url)
    finally:
        ledger.engine.dispose()


def _kill_and_reconcile(ledger: Ledger, opsrun_database_url: str) -> None:
    import os
    import signal
    from datetime import datetime, timedelta, timezone

    from opsrun_core import Disposition, ManualClock, Outcome, RunStatus
    from tests.workers import start_hanging_worker

    identity = {"policy_id": "p1"}
    run = ledger.ensure_run("assignments.fetch", workspace_id="w1", identity=identity).run
    worker = start_hanging_worker(opsrun_database_url, run.id)
    os.kill(worker.pid, signal.SIGKILL)
    worker.join(timeout=30)
    assert worker.exitcode == -signal.SIGKILL
    # the dead worker's claim still holds: the identity is blocked, a redelivery skips
    again = ledger.ensure_run("assignments.fetch", workspace_id="w1", identity=identity)
    assert again.disposition is Disposition.REUSED_ACTIVE and again.run.id == run.id
    assert ledger.claim(run.id).reason == "running"
    # later, reconcile (with a clock past the lease and the grace) finishes it ...
    later = Ledger(
        ledger.engine, clock=ManualClock(datetime.now(timezone.utc) + timedelta(hours=1))
    )
    done = later.reconcile("w1")
    assert done.summary_counts["reconciled"] == 1
    finished = ledger.get(run.id)
    assert finished.status is RunStatus.COMPLETED and finished.outcome is Outcome.FAILED
    assert finished.failure_summary[0]["code"] == "ops.run.lease_expired"
    # ... and the identity is dispatchable again
    assert ledger.ensure_run("assignments.fetch", workspace_id="w1", identity=identity).created
