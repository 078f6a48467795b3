"""A stateful property test: Hypothesis drives the ledger through random sequences of dispatch,
claim, heartbeat, complete, fail, release, clock advances and reconcile, and after every step
compares it with a small in-memory model and runs the invariant checker.

The model is the specification in miniature (DESIGN "Semantics that must hold"): one active run
per identity, cooldown after success only, claims of queued runs or expired leases only, every
write fenced by the lease, final attempt's counts, reconcile finishing exactly the stale runs.

Every rule moves the frozen clock one second first, so no two completions share a timestamp and
"the latest completed run" is never a tie. Each example starts from an empty table (the fixture's
database is per test, and Hypothesis reuses it across examples).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import pytest
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    multiple,
    precondition,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy import Engine

from opsrun_core import (
    RECONCILE_TYPE,
    Disposition,
    LeaseLost,
    Ledger,
    ManualClock,
    OperationSpec,
    Outcome,
    RunStatus,
)
from opsrun_core.invariants import check_invariants
from opsrun_core.pytest_plugin import FROZEN_AT
from opsrun_core.reconcile import DEFAULT_GRACE, LEASE_EXPIRED, NEVER_STARTED

PLAIN = "sm.plain"
COOL = "sm.cool"
LEASE = timedelta(minutes=5)
COOLDOWN = timedelta(minutes=10)
QUEUED_LIMIT = timedelta(minutes=30)
TICK = timedelta(seconds=1)
ZERO = {"total": 0, "processed": 0, "failed": 0}
ACTIONS = ["heartbeat", "complete", "fail", "release"]

IDENTITIES = [
    (type_, workspace, policy)
    for type_ in (PLAIN, COOL)
    for workspace in ("w1", "w2")
    for policy in ("p1", "p2")
]
ADVANCES = [
    timedelta(minutes=1),
    LEASE - TICK,  # just inside a lease
    LEASE + timedelta(seconds=10),  # past a lease, inside reconcile's grace
    LEASE + DEFAULT_GRACE + TICK,  # past lease and grace
    COOLDOWN,
    QUEUED_LIMIT + TICK,
    timedelta(hours=2),
]

SETTINGS = settings(
    max_examples=25,
    stateful_step_count=30,
    deadline=None,
    database=None,  # examples are cheap to find again; keep nothing in the checkout
)


@dataclass
class ModelRun:
    id: int
    key: tuple[str, str, str]
    created_at: datetime
    #: when it last became queued: created, or released for a retry (reconcile measures from it)
    queued_since: datetime | None = None
    status: str = "queued"
    outcome: str = "pending"
    attempts: int = 0
    lease_expires_at: datetime | None = None
    holder: int | None = None  # serial of the attempt holding the lease
    started_at: datetime | None = None
    completed_at: datetime | None = None
    summary_counts: dict[str, int] | None = None
    failure_codes: list[str] | None = None

    @property
    def type(self) -> str:
        return self.key[0]

    @property
    def workspace(self) -> str:
        return self.key[1]


@dataclass
class Handle:
    """An attempt the machine holds (possibly one that has long lost its run)."""

    serial: int
    run_id: int
    attempt: Any = field(repr=False)


def _outcome(processed: int, failed: int) -> str:
    if processed > 0 and failed == processed:
        return "failed"
    return "partially_succeeded" if failed else "succeeded"


counts_strategy = st.integers(0, 5).flatmap(
    lambda processed: st.tuples(
        st.just(processed), st.integers(0, processed), st.integers(processed, processed + 3)
    )
)


def _machine(engine: Engine) -> type[RuleBasedStateMachine]:
    clock = ManualClock(FROZEN_AT)
    ledger = Ledger(engine, clock=clock)
    for type_, cooldown in ((PLAIN, None), (COOL, COOLDOWN)):
        ledger.catalog.register(
            OperationSpec(type_, lease=LEASE, cooldown=cooldown, queued_limit=QUEUED_LIMIT)
        )
    clean = (
        "TRUNCATE operation_runs RESTART IDENTITY"
        if engine.dialect.name == "postgresql"
        else "DELETE FROM operation_runs"
    )

    class LedgerMachine(RuleBasedStateMachine):
        runs = Bundle("runs")
        attempts = Bundle("attempts")

        def __init__(self) -> None:
            super().__init__()
            self.model: dict[int, ModelRun] = {}
            self.serials = 0
            self.reconciles = 0
            self.handles: list[Handle] = []

        @initialize()
        def empty_ledger(self) -> None:
            with engine.begin() as conn:
                conn.exec_driver_sql(clean)
            clock.set(FROZEN_AT)

        # -- helpers ---------------------------------------------------------------------------

        def now(self) -> datetime:
            return clock.advance(TICK)

        def active(self, key: tuple[str, str, str]) -> ModelRun | None:
            found = [m for m in self.model.values() if m.key == key and m.status != "completed"]
            assert len(found) <= 1
            return found[0] if found else None

        def latest_completed(self, key: tuple[str, str, str]) -> ModelRun | None:
            done = [m for m in self.model.values() if m.key == key and m.status == "completed"]
            return max(done, key=lambda m: m.completed_at or FROZEN_AT) if done else None

        def holds(self, handle: Handle) -> ModelRun | None:
            m = self.model[handle.run_id]
            return m if m.status == "running" and m.holder == handle.serial else None

        # -- rules -----------------------------------------------------------------------------

        @rule(target=runs, key=st.sampled_from(IDENTITIES))
        def dispatch(self, key: tuple[str, str, str]) -> int:
            now = self.now()
            type_, workspace, policy = key
            res = ledger.ensure_run(
                type_, workspace_id=workspace, tenant_id="t1", identity={"policy_id": policy}
            )
            event(f"dispatch: {res.disposition.value}")
            active = self.active(key)
            latest = self.latest_completed(key)
            if active is not None:
                assert res.disposition is Disposition.REUSED_ACTIVE
                assert res.run.id == active.id
            elif (
                type_ == COOL
                and latest is not None
                and latest.outcome in ("succeeded", "partially_succeeded")
                and latest.completed_at is not None
                and latest.completed_at + COOLDOWN > now
            ):
                assert res.disposition is Disposition.REUSED_COOLDOWN
                assert res.run.id == latest.id
            else:
                assert res.disposition is Disposition.CREATED
                assert res.run.id not in self.model
                self.model[res.run.id] = ModelRun(res.run.id, key, created_at=now)
            return res.run.id

        @rule(target=attempts, run_id=runs)
        def claim(self, run_id: int) -> Any:
            now = self.now()
            attempt = ledger.claim(run_id)
            event(f"claim: {attempt.reason}" + (" (takeover)" if attempt.number > 1 else ""))
            m = self.model[run_id]
            claimable = m.status == "queued" or (
                m.status == "running"
                and m.lease_expires_at is not None
                and m.lease_expires_at <= now
            )
            if not claimable:
                assert not attempt.acquired
                assert attempt.reason == ("completed" if m.status == "completed" else "running")
                return multiple()
            assert attempt.acquired and attempt.reason == "acquired"
            self.serials += 1
            m.status, m.attempts, m.holder = "running", m.attempts + 1, self.serials
            m.lease_expires_at = now + LEASE
            m.started_at = m.started_at or now
            assert attempt.number == m.attempts
            handle = Handle(self.serials, run_id, attempt)
            self.handles.append(handle)
            return handle

        @rule(handle=attempts, action=st.sampled_from(ACTIONS), counts=counts_strategy)
        def work(self, handle: Handle, action: str, counts: tuple[int, int, int]) -> None:
            """What a worker does with an attempt it believes it holds (often long lost)."""
            self.act(handle, action, counts)

        @precondition(lambda self: any(self.holds(h) for h in self.handles))
        @rule(index=st.integers(0, 10), action=st.sampled_from(ACTIONS), counts=counts_strategy)
        def work_on_a_held_run(self, index: int, action: str, counts: tuple[int, int, int]) -> None:
            """What a worker does with an attempt that still holds its run."""
            held = [h for h in self.handles if self.holds(h)]
            self.act(held[index % len(held)], action, counts)

        def act(self, handle: Handle, action: str, counts: tuple[int, int, int]) -> None:
            now = self.now()
            m = self.holds(handle)
            event(f"{action}: {'held' if m else 'lease lost'}")
            call = getattr(self, f"_{action}")
            if m is None:
                with pytest.raises(LeaseLost):
                    call(handle, counts)
                return
            call(handle, counts)
            if action == "heartbeat":
                m.lease_expires_at = now + LEASE
            elif action == "release":
                m.status, m.holder, m.lease_expires_at = "queued", None, None
                m.queued_since = now
            else:
                processed, failed, total = counts if action == "complete" else (0, 0, 0)
                m.status = "completed"
                m.outcome = _outcome(processed, failed) if action == "complete" else "failed"
                m.summary_counts = {"total": total, "processed": processed, "failed": failed}
                m.failure_codes = [f"{m.type}.failed"] if action == "fail" else None
                m.completed_at, m.holder, m.lease_expires_at = now, None, None

        def _heartbeat(self, handle: Handle, counts: tuple[int, int, int]) -> None:
            run = ledger.heartbeat(handle.attempt)
            assert run.lease_expires_at == clock() + LEASE

        def _complete(self, handle: Handle, counts: tuple[int, int, int]) -> None:
            processed, failed, total = counts
            handle.attempt.count(processed=processed, failed=failed)
            run = ledger.complete(handle.attempt, {"total": total})
            assert run.outcome.value == _outcome(processed, failed)

        def _fail(self, handle: Handle, counts: tuple[int, int, int]) -> None:
            ledger.fail(handle.attempt, RuntimeError("boom"))

        def _release(self, handle: Handle, counts: tuple[int, int, int]) -> None:
            handle.attempt.count(processed=1)  # dropped: the final attempt's counts win
            ledger.release(handle.attempt, RuntimeError("retry"))

        def has_active_runs(self) -> bool:
            return any(m.status != "completed" for m in self.model.values())

        @precondition(lambda self: self.model)
        @rule(delta=st.sampled_from(ADVANCES))
        def advance(self, delta: timedelta) -> None:
            clock.advance(delta)

        @precondition(lambda self: self.has_active_runs())
        @rule(workspace=st.sampled_from(["w1", "w2"]))
        def reconcile(self, workspace: str) -> None:
            now = self.now()
            stale: list[tuple[ModelRun, str]] = []
            for m in self.model.values():
                if m.workspace != workspace:
                    continue
                if (
                    m.status == "running"
                    and m.lease_expires_at is not None
                    and m.lease_expires_at <= now - DEFAULT_GRACE
                ):
                    stale.append((m, LEASE_EXPIRED))
                elif (
                    m.status == "queued" and (m.queued_since or m.created_at) <= now - QUEUED_LIMIT
                ):
                    stale.append((m, NEVER_STARTED))
            report = ledger.reconcile_report(workspace)
            event(f"reconcile: {min(len(stale), 2)}+ stale runs finished")
            self.reconciles += 1
            assert report.did_work
            counts = report.run.summary_counts
            assert counts is not None
            assert counts["reconciled"] == counts["total"] == len(stale)
            for m, code in stale:
                m.status, m.outcome, m.summary_counts = "completed", "failed", dict(ZERO)
                m.failure_codes = [code]
                m.completed_at, m.holder, m.lease_expires_at = now, None, None

        # -- after every step ------------------------------------------------------------------

        @invariant()
        def ledger_is_consistent(self) -> None:
            assert check_invariants(engine) == []

        @invariant()
        def ledger_matches_the_model(self) -> None:
            runs = ledger.runs()
            ours = {run.id: run for run in runs if run.type != RECONCILE_TYPE}
            assert set(ours) == set(self.model)
            for run_id, m in self.model.items():
                run = ours[run_id]
                assert run.status is RunStatus(m.status), run_id
                assert run.outcome is Outcome(m.outcome), run_id
                assert run.attempts == m.attempts, run_id
                assert run.lease_expires_at == m.lease_expires_at, run_id
                assert run.started_at == m.started_at, run_id
                assert run.completed_at == m.completed_at, run_id
                assert run.summary_counts == m.summary_counts, run_id
                codes = [f["code"] for f in run.failure_summary or []] or None
                assert codes == m.failure_codes, run_id
            housekeeping = [run for run in runs if run.type == RECONCILE_TYPE]
            assert len(housekeeping) == self.reconciles
            assert all(run.outcome is Outcome.SUCCEEDED for run in housekeeping)

    return LedgerMachine


def test_the_ledger_follows_its_model(opsrun_engine: Engine) -> None:
    run_state_machine_as_test(_machine(opsrun_engine), settings=SETTINGS)
