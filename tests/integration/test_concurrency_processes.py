"""Real concurrency: several OS processes racing on one identity against Postgres."""

from __future__ import annotations

import pytest

from opsrun_core import Ledger
from tests.workers import claim_one, dispatch_one, race

pytestmark = [pytest.mark.opsrun_backends("postgres"), pytest.mark.slow]

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
