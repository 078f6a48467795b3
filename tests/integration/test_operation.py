"""The job-facing layer: @ledger.operation with dispatch, execute and run_now."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import text

from opsrun_core import Disposition, InvalidInput, LeaseLost, Ledger, Outcome, RunStatus

TOKEN = "eyJhbGciOiJSUzI1NiJ9.eyJhdWQiOiJncmFwaCJ9.c2VjcmV0LXNpZ25hdHVyZS12YWx1ZQ"


class Throttled(Exception):
    pass


@pytest.fixture
def calls() -> list[dict]:
    return []


@pytest.fixture
def fetch(opsrun_ledger: Ledger, calls: list[dict]):
    @opsrun_ledger.operation(
        "assignments.fetch", identity=("policy_id",), cooldown=timedelta(minutes=15)
    )
    def fetch_assignments(
        ctx, *, workspace_id, tenant_id, policy_id, access_token, items=3, fail=()
    ):
        calls.append({"run": ctx.run.id, "attempt": ctx.attempt.number, "token": access_token})
        if "raise" in fail:
            raise Throttled(f"429 Too Many Requests; Authorization: Bearer {access_token}")
        ctx.set_counts(total=items)
        for i in range(items):
            if i in fail:
                ctx.fail_item("directory.assignment_failed", f"assignment {i} refused")
            else:
                ctx.count(processed=1)
        ctx.heartbeat()
        return f"fetched {policy_id}"

    return fetch_assignments


def _kwargs(**extra):
    return {
        "workspace_id": "w1",
        "tenant_id": "t1",
        "policy_id": "p1",
        "access_token": TOKEN,
        **extra,
    }


def test_dispatch_then_execute_completes_with_counts(fetch, calls) -> None:
    res = fetch.dispatch(**_kwargs())
    assert res.created and res.run.identity == {"policy_id": "p1"}
    out = fetch.execute(res.run.id, **_kwargs())
    assert out.status == "completed" and out.value == "fetched p1"
    assert out.run.summary_counts == {"total": 3, "processed": 3, "failed": 0}
    assert out.run.outcome is Outcome.SUCCEEDED
    assert calls == [{"run": res.run.id, "attempt": 1, "token": TOKEN}]


def test_duplicate_dispatch_and_redelivery_run_the_work_once(fetch, calls) -> None:
    first = fetch.dispatch(**_kwargs())
    second = fetch.dispatch(**_kwargs())
    assert second.disposition is Disposition.REUSED_ACTIVE and second.run.id == first.run.id
    assert fetch.execute(first.run.id, **_kwargs()).status == "completed"
    redelivered = fetch.execute(first.run.id, **_kwargs())
    assert redelivered.skipped and redelivered.reason == "completed"
    assert len(calls) == 1


def test_execute_while_another_worker_holds_the_run_skips(fetch, opsrun_ledger, calls) -> None:
    run = fetch.dispatch(**_kwargs()).run
    holder = opsrun_ledger.claim(run.id)
    out = fetch.execute(run.id, **_kwargs())
    assert out.skipped and out.reason == "running" and calls == []
    opsrun_ledger.release(holder)


def test_a_job_that_raises_is_released_while_retries_remain(fetch, opsrun_ledger, calls) -> None:
    run = fetch.dispatch(**_kwargs()).run
    with pytest.raises(Throttled):
        fetch.execute(run.id, retries_left=2, **_kwargs(fail=("raise",)))
    assert opsrun_ledger.get(run.id).status is RunStatus.QUEUED
    out = fetch.execute(run.id, retries_left=1, reraise=False, **_kwargs(fail=("raise",)))
    assert out.status == "released" and isinstance(out.error, Throttled)
    done = fetch.execute(run.id, **_kwargs(items=4))
    assert done.run.attempts == 3
    assert done.run.summary_counts == {"total": 4, "processed": 4, "failed": 0}
    assert [c["attempt"] for c in calls] == [1, 2, 3]


def test_a_job_that_raises_on_its_last_attempt_fails_without_the_token(
    fetch, opsrun_ledger
) -> None:
    run = fetch.dispatch(**_kwargs()).run
    out = fetch.execute(run.id, reraise=False, **_kwargs(fail=("raise",)))
    assert out.status == "failed"
    failed = opsrun_ledger.get(run.id)
    assert failed.outcome is Outcome.FAILED
    assert failed.failure_summary[0]["code"] == "assignments.fetch.failed"
    assert "Throttled" in failed.failure_summary[0]["message"]
    assert TOKEN not in str(failed.failure_summary)


def test_item_failures_make_a_partial_success(fetch) -> None:
    out = fetch.run_now(**_kwargs(items=4, fail=(1, 3)))
    assert out.run.outcome is Outcome.PARTIALLY_SUCCEEDED
    assert out.run.summary_counts == {"total": 4, "processed": 4, "failed": 2}
    assert [e["code"] for e in out.run.failure_summary] == ["directory.assignment_failed"] * 2


def test_run_now_dispatches_claims_and_runs_then_honours_the_cooldown(
    fetch, opsrun_clock, calls
) -> None:
    first = fetch.run_now(**_kwargs())
    assert first.status == "completed" and first.dispatch.disposition is Disposition.CREATED
    assert first.run.attempts == 1
    opsrun_clock.advance(timedelta(minutes=5))
    again = fetch.run_now(**_kwargs())
    assert again.skipped and again.dispatch.disposition is Disposition.REUSED_COOLDOWN
    assert again.reason == "completed" and len(calls) == 1
    opsrun_clock.advance(timedelta(minutes=11))
    assert fetch.run_now(**_kwargs()).dispatch.created


def test_the_token_reaches_the_function_and_never_the_database(
    fetch, opsrun_ledger, opsrun_engine
) -> None:
    fetch.run_now(**_kwargs())
    fetch.run_now(**_kwargs(policy_id="p2", fail=("raise",)), reraise=False)
    fetch.dispatch(**_kwargs(policy_id="p3"))
    with opsrun_engine.connect() as conn:
        rows = conn.execute(text("SELECT * FROM operation_runs")).mappings().all()
    assert len(rows) == 3
    dump = repr([dict(r) for r in rows])
    assert TOKEN not in dump and "eyJhbGci" not in dump
    assert all("access_token" not in str(r["identity"]) for r in rows)


def test_a_missing_identity_field_is_a_clear_error(fetch, opsrun_ledger) -> None:
    with pytest.raises(InvalidInput, match="policy_id"):
        fetch.dispatch(workspace_id="w1", tenant_id="t1", access_token=TOKEN)
    assert opsrun_ledger.runs() == []


def test_scope_names_cannot_be_identity_fields(opsrun_ledger) -> None:
    with pytest.raises(InvalidInput, match="scope"):
        opsrun_ledger.operation("x.y", identity=("tenant_id",))(lambda ctx: None)


def test_a_job_that_lost_its_lease_stops_without_writing(
    opsrun_ledger: Ledger, opsrun_clock
) -> None:
    @opsrun_ledger.operation("slow.job", identity=("n",), lease=timedelta(minutes=1))
    def slow(ctx, *, workspace_id, n):  # a workspace job: no tenant_id reaches it
        opsrun_clock.advance(timedelta(minutes=2))
        takeover = opsrun_ledger.claim(ctx.run.id)  # another worker takes the expired lease
        assert takeover.acquired
        ctx.heartbeat()  # raises LeaseLost

    with pytest.raises(LeaseLost):
        slow.run_now(workspace_id="w1", n=1)
    [run] = opsrun_ledger.runs(type="slow.job")
    assert run.status is RunStatus.RUNNING and run.attempts == 2


def test_an_error_outside_retry_on_fails_at_once(opsrun_ledger: Ledger) -> None:
    @opsrun_ledger.operation("picky.job", identity=("n",), retry_on=(Throttled,))
    def picky(ctx, *, workspace_id, n):
        raise (Throttled("later") if n == 1 else KeyError("permanent"))

    released = picky.run_now(workspace_id="w1", n=1, retries_left=3, reraise=False)
    failed = picky.run_now(workspace_id="w1", n=2, retries_left=3, reraise=False)
    assert released.status == "released" and released.run.status is RunStatus.QUEUED
    assert failed.status == "failed" and failed.run.outcome is Outcome.FAILED
    with pytest.raises(InvalidInput):
        opsrun_ledger.operation("x.y", retry_on=[KeyError])(lambda ctx: None)


def test_inconsistent_counts_fail_the_run_instead_of_leaving_it_claimed(
    opsrun_ledger: Ledger,
) -> None:
    @opsrun_ledger.operation("bad.counts", identity=("n",))
    def bad(ctx, *, workspace_id, n):
        ctx.set_counts(total=1)
        ctx.count(processed=3)  # more processed than total

    out = bad.run_now(workspace_id="w1", n=1, reraise=False)
    assert out.status == "failed" and isinstance(out.error, InvalidInput)
    assert out.run.status is RunStatus.COMPLETED and out.run.outcome is Outcome.FAILED
    assert out.run.failure_summary[0]["code"] == "bad.counts.failed"


def test_an_initiator_that_holds_a_credential_is_refused(opsrun_ledger: Ledger) -> None:
    with pytest.raises(InvalidInput, match="initiator"):
        opsrun_ledger.ensure_run(
            "x.y", workspace_id="w1", initiator="Bearer eyJhbGciOiJIUzI1NiJ9.e30.c2ln"
        )
    assert (
        opsrun_ledger.ensure_run("x.y", workspace_id="w1", initiator="user:42").run.initiator
        == "user:42"
    )
