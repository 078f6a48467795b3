"""Fault injection with real processes, signals, connections and locks.

* a worker SIGKILLed at each step: the run is finished by reconcile, or taken over, exactly once;
  the identity is free again; the summary is the final attempt's;
* a worker's connection terminated (``pg_terminate_backend``) while its dispatch, claim or complete
  is in flight: a typed :class:`DatabaseError`, a retry that works, a consistent ledger;
* the Postgres server restarted under running workers (opt-in, see ``test_a_postgres_restart``);
* SQLite: a writer holding the database locked: dispatch fails clearly within the busy timeout,
  the file stays intact and the ledger unchanged.

After every fault the invariant checker must find nothing.
"""

from __future__ import annotations

import multiprocessing
import os
import secrets
import sqlite3
import threading
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from sqlalchemy import Engine, event, make_url, text
from sqlalchemy.orm import Session

from opsrun_core import (
    DatabaseError,
    Disposition,
    Ledger,
    ManualClock,
    OperationSpec,
    Outcome,
    RunStatus,
)
from opsrun_core.db import make_engine
from opsrun_core.invariants import check_invariants
from opsrun_core.reconcile import LEASE_EXPIRED, NEVER_STARTED
from tests import faults
from tests.faults import DEAD_COUNTS, FETCH, LEASE, STEPS, Worker

postgres_only = pytest.mark.opsrun_backends("postgres")
IDENTITY = {"policy_id": "p1"}
ZERO = {"total": 0, "processed": 0, "failed": 0}


def _ledger(engine: Engine, clock: Any = None) -> Ledger:
    ledger = Ledger(engine, clock=clock)
    ledger.catalog.register(OperationSpec(FETCH, lease=LEASE))
    return ledger


def _later(engine: Engine) -> Ledger:
    """A ledger whose clock is a day ahead: past every lease, grace and queued limit."""
    return _ledger(engine, ManualClock(datetime.now(timezone.utc) + timedelta(days=1)))


def _dispatch(ledger: Ledger) -> Any:
    return ledger.ensure_run(FETCH, workspace_id="w1", tenant_id="t1", identity=IDENTITY)


def _snapshot(engine: Engine) -> list[tuple[Any, ...]]:
    with engine.connect() as conn:
        return [
            tuple(row) for row in conn.execute(text("SELECT * FROM operation_runs ORDER BY id"))
        ]


# -- (a) SIGKILL at each step ---------------------------------------------------------------------


@postgres_only
@pytest.mark.parametrize("recovery", ["reconcile", "takeover"])
@pytest.mark.parametrize("step", STEPS)
def test_a_worker_killed_at_each_step_is_recovered_exactly_once(
    opsrun_database_url: str, opsrun_engine: Engine, step: str, recovery: str
) -> None:
    ledger = _ledger(opsrun_engine)  # the server's clock, like the worker's
    worker = Worker(faults.step_worker, opsrun_database_url, IDENTITY, step)
    try:
        _, run_id = worker.event()
        worker.kill()
    finally:
        worker.stop()

    dead = ledger.get(run_id)
    if step == "after_dispatch":
        assert dead.status is RunStatus.QUEUED and dead.attempts == 0
    else:
        assert dead.status is RunStatus.RUNNING and dead.attempts == 1
        # the dead worker's lease still holds: a redelivery skips
        assert ledger.claim(run_id, lease=LEASE).reason == "running"
    # and the identity is blocked by the dead worker's run
    blocked = _dispatch(ledger)
    assert blocked.disposition is Disposition.REUSED_ACTIVE and blocked.run.id == run_id
    assert check_invariants(ledger) == []

    later = _later(opsrun_engine)
    if recovery == "reconcile":
        first = later.reconcile_report("w1")
        assert first.did_work and first.run.summary_counts["reconciled"] == 1
        assert later.reconcile_report("w1").run.summary_counts["reconciled"] == 0
        run = ledger.get(run_id)
        assert run.status is RunStatus.COMPLETED and run.outcome is Outcome.FAILED
        code = NEVER_STARTED if step == "after_dispatch" else LEASE_EXPIRED
        assert [entry["code"] for entry in run.failure_summary] == [code]
        assert run.summary_counts == ZERO  # the reconciler's, never the dead attempt's
        assert run.attempts == dead.attempts
    else:
        takeover = later.claim(run_id, lease=LEASE)
        assert takeover.acquired and takeover.number == dead.attempts + 1
        assert later.claim(run_id, lease=LEASE).reason == "running"  # only once
        run = later.complete(takeover, {"total": 2, "processed": 2})
        assert run.summary_counts == {"total": 2, "processed": 2, "failed": 0}
        assert run.outcome is Outcome.SUCCEEDED and run.attempts == dead.attempts + 1
        assert later.reconcile_report("w1").run.summary_counts["reconciled"] == 0
    assert run.summary_counts != DEAD_COUNTS
    # the identity is free again: a new dispatch creates a new run
    fresh = _dispatch(ledger)
    assert fresh.created and fresh.run.id != run_id
    assert check_invariants(ledger) == []


@postgres_only
def test_a_worker_killed_while_its_complete_is_in_flight_leaves_the_run_running(
    opsrun_database_url: str, opsrun_engine: Engine
) -> None:
    """The kill lands while ``complete``'s UPDATE waits on a row lock. The ledger runs single
    statements in autocommit on Postgres, so the server may still finish the UPDATE the client
    sent before it died: the run is then completed with that attempt's counts, exactly once.
    Otherwise nothing of the attempt is kept and the run is taken over. Both are consistent."""
    ledger = _ledger(opsrun_engine)
    run_id = _dispatch(ledger).run.id
    name = f"opsrun-fault-{secrets.token_hex(4)}"
    url = faults.with_application_name(opsrun_database_url, name)
    worker = Worker(faults.completing_worker, url, run_id)
    try:
        assert worker.event() == ("claimed", run_id)
        with opsrun_engine.begin() as conn:
            conn.execute(
                text("SELECT id FROM operation_runs WHERE id = :id FOR UPDATE"), {"id": run_id}
            )
            worker.send("go")
            faults.wait_for_lock_wait(opsrun_engine, name, worker)
            worker.kill()
        faults.wait_for_no_backend(opsrun_engine, name)
    finally:
        worker.stop()
    run = ledger.get(run_id)
    assert check_invariants(ledger) == []
    assert run.attempts == 1
    if run.status is RunStatus.COMPLETED:
        expected = faults.DEAD_COUNTS["processed"]
        assert run.summary_counts["processed"] == expected
        assert not _later(opsrun_engine).claim(run_id, lease=LEASE).acquired
    else:
        assert run.status is RunStatus.RUNNING and run.summary_counts is None
        taken = _later(opsrun_engine).claim(run_id, lease=LEASE)
        assert taken.acquired and taken.number == 2


# -- (b) connections terminated mid-statement ------------------------------------------------------


def _terminated(
    opsrun_database_url: str,
    opsrun_engine: Engine,
    action: str,
    arg: Any,
    hold: Callable[[Any], None],
    *,
    release: Callable[[Any], None],
) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """Run ``action`` in a worker, block it behind ``hold(conn)``, terminate its backend, then
    ``release(conn)``; return the worker's first (terminated) and second (retried) outcomes."""
    name = f"opsrun-fault-{secrets.token_hex(4)}"
    url = faults.with_application_name(opsrun_database_url, name)
    worker = Worker(faults.call_twice, url, action, arg)
    try:
        if action == "complete":
            assert worker.event() == ("claimed", arg)
        with opsrun_engine.connect() as conn:
            tx = conn.begin()
            try:
                hold(conn)
                worker.send("go")
                pid = faults.wait_for_lock_wait(opsrun_engine, name, worker)
                faults.terminate(opsrun_engine, pid)
                label, first = worker.event()
                assert label == "first"
            finally:
                if tx.is_active:
                    release(conn)
        label, second = worker.event()
        assert label == "second"
        worker.join()
    finally:
        worker.stop()
    return first, second


def _assert_clear_database_error(outcome: tuple[Any, ...], what: str) -> None:
    kind, name, is_database_error, message = outcome
    assert (kind, name, is_database_error) == ("error", "DatabaseError", True), outcome
    assert message.startswith(f"{what} failed in the database (")
    assert "retry it" in message
    assert "terminat" in message.lower()  # the server's reason reaches the message


def _row_lock(run_id: int) -> Callable[[Any], None]:
    def hold(conn: Any) -> None:
        conn.execute(
            text("SELECT id FROM operation_runs WHERE id = :id FOR UPDATE"), {"id": run_id}
        )

    return hold


@postgres_only
def test_dispatch_whose_connection_is_terminated(
    opsrun_database_url: str, opsrun_engine: Engine
) -> None:
    ledger = _ledger(opsrun_engine)
    blocker: dict[str, Any] = {}

    def hold(conn: Any) -> None:
        # an uncommitted dispatch of the same identity: the worker's insert waits on its index entry
        session = blocker["session"] = Session(bind=conn)
        blocker["run"] = ledger.ensure_run(
            FETCH, workspace_id="w1", tenant_id="t1", identity=IDENTITY, session=session
        ).run

    def release(conn: Any) -> None:
        blocker["session"].close()
        conn.rollback()  # the blocking dispatch never happened

    first, second = _terminated(
        opsrun_database_url, opsrun_engine, "dispatch", IDENTITY, hold, release=release
    )
    _assert_clear_database_error(first, "dispatch")
    kind, (disposition, run_id) = second
    assert (kind, disposition) == ("ok", "created")
    assert [run.id for run in ledger.runs()] == [run_id]
    assert run_id != blocker["run"].id
    assert check_invariants(ledger) == []


@postgres_only
def test_claim_whose_connection_is_terminated(
    opsrun_database_url: str, opsrun_engine: Engine
) -> None:
    ledger = _ledger(opsrun_engine)
    run_id = _dispatch(ledger).run.id
    first, second = _terminated(
        opsrun_database_url,
        opsrun_engine,
        "claim",
        run_id,
        _row_lock(run_id),
        release=lambda conn: conn.commit(),
    )
    _assert_clear_database_error(first, "claim")
    assert second == ("ok", (True, "acquired"))
    run = ledger.get(run_id)
    assert run.status is RunStatus.RUNNING and run.attempts == 1  # the cut claim left no trace
    assert check_invariants(ledger) == []


@postgres_only
def test_complete_whose_connection_is_terminated(
    opsrun_database_url: str, opsrun_engine: Engine
) -> None:
    ledger = _ledger(opsrun_engine)
    run_id = _dispatch(ledger).run.id
    first, second = _terminated(
        opsrun_database_url,
        opsrun_engine,
        "complete",
        run_id,
        _row_lock(run_id),
        release=lambda conn: conn.commit(),
    )
    _assert_clear_database_error(first, "complete")
    counts = {"total": 4, "processed": 4, "failed": 1}
    assert second == ("ok", ("completed", counts))  # the retry still holds the lease
    run = ledger.get(run_id)
    assert run.outcome is Outcome.PARTIALLY_SUCCEEDED and run.summary_counts == counts
    assert run.attempts == 1
    assert check_invariants(ledger) == []


# -- (c) a Postgres restart ------------------------------------------------------------------------


def _restart_target(url: str) -> tuple[str, str]:
    """The cluster to restart, or a skip saying why this test does not run."""
    if os.environ.get(faults.ALLOW_RESTART_ENV) != "1":
        pytest.skip(
            f"restarts the Postgres server; opt in with {faults.ALLOW_RESTART_ENV}=1 "
            "(never on a server other sessions are using: their connections are cut too)"
        )
    if os.environ.get("PYTEST_XDIST_WORKER"):
        pytest.skip("restarts the Postgres server: not under pytest-xdist (it cuts other workers)")
    parsed = make_url(url)
    if parsed.host not in (None, "", "localhost", "127.0.0.1", "::1"):
        pytest.skip(f"the test server {parsed.host} is not local; cannot restart it")
    cluster = faults.find_cluster(parsed.port or 5432)
    if cluster is None:
        pytest.skip(
            f"no local pg_ctlcluster cluster serves port {parsed.port or 5432}; "
            f"name it with {faults.CLUSTER_ENV}='VERSION NAME'"
        )
    return cluster


@postgres_only
@pytest.mark.slow
def test_a_postgres_restart_under_running_workers_loses_nothing(
    opsrun_database_url: str, opsrun_engine: Engine
) -> None:
    """Opt-in (``OPSRUN_ALLOW_PG_RESTART=1``): it restarts the local cluster serving the tests
    (found by port in ``pg_lsclusters``, or named by ``OPSRUN_PG_CLUSTER="15 main"``) with
    ``pg_ctlcluster --skip-systemctl-redirect VERSION NAME restart``.

    Safe for the rest of this session in any order: a restart is a clean shutdown, so every
    throwaway database and its committed data survive; engines (this session's included) drop
    their dead pooled connections through ``pool_pre_ping``; and the test waits for the server
    to answer again before it returns, restarting it if it is left down. It is not safe for
    *other* sessions on the same server, whose in-flight statements fail: hence the opt-in.
    """
    version, name = _restart_target(opsrun_database_url)
    ledger = _ledger(opsrun_engine)
    ctx = multiprocessing.get_context("forkserver")
    restarted = ctx.Event()
    workers = [
        Worker(faults.restart_worker, opsrun_database_url, index, 15, restarted)
        for index in range(4)
    ]
    try:
        for worker in workers:
            assert worker.event()[0] == "warm"
        faults.pg_ctlcluster(version, name, "restart")
        restarted.set()
        reports = [worker.event() for worker in workers]
        for worker in workers:
            worker.join()
    finally:
        for worker in workers:
            worker.stop()
        if not faults.cluster_online(version, name):
            faults.pg_ctlcluster(version, name, "start")
        faults.wait_until_answering(opsrun_engine)

    print("restart figures:", [report[2] for report in reports])  # shown with -s or on failure
    dispatches = sum(report[2]["dispatches"] for report in reports)
    by_disposition: dict[str, int] = {}
    for report in reports:
        for disposition, count in report[3].items():
            by_disposition[disposition] = by_disposition.get(disposition, 0) + count
    assert sum(by_disposition.values()) == dispatches
    runs = {run.id: run for run in ledger.runs()}
    created = [run_id for report in reports for run_id in report[4]]
    assert len(created) == len(set(created))
    assert set(created) <= set(runs)  # every run a worker created is there
    completed = {run_id: counts for report in reports for run_id, counts in report[5].items()}
    assert sum(len(report[5]) for report in reports) == len(completed)  # none completed twice
    for run_id, counts in completed.items():
        assert runs[run_id].status is RunStatus.COMPLETED
        assert runs[run_id].summary_counts == counts  # the completing worker's counts, intact
    assert check_invariants(ledger) == []
    # a claim whose answer was lost in the restart leaves a running run: reconcile finishes it
    _later(opsrun_engine).reconcile("w1")
    assert ledger.runs(type=FETCH, status=["queued", "running"]) == []
    assert check_invariants(ledger) == []


# -- (d) SQLite: a writer holding the database -----------------------------------------------------

sqlite_only = pytest.mark.opsrun_backends("sqlite")


def _short_busy_timeout(url: str, milliseconds: int) -> Engine:
    engine = make_engine(url)

    @event.listens_for(engine, "connect")
    def _busy(dbapi_connection: Any, _record: Any) -> None:  # after the library's own listener
        dbapi_connection.execute(f"PRAGMA busy_timeout = {milliseconds}")

    return engine


def _bounded(call: Callable[[], Any]) -> Any:
    """``call()`` in a thread that must finish within WAIT_S; its result or its exception."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = call()
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout=faults.WAIT_S)
    assert not thread.is_alive(), "the call did not return within its bound"
    if "error" in box:
        raise box["error"]
    return box["value"]


def _integrity(path: str) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute("PRAGMA integrity_check").fetchall()
    finally:
        conn.close()


@sqlite_only
@pytest.mark.parametrize("holder_ends", ["rollback", "killed"])
def test_sqlite_dispatch_against_a_held_write_lock_fails_clearly(
    opsrun_database_url: str, holder_ends: str
) -> None:
    path = make_url(opsrun_database_url).database
    assert path is not None
    engine = _short_busy_timeout(opsrun_database_url, 200)
    try:
        ledger = _ledger(engine)
        existing = _dispatch(ledger).run.id  # the file is in WAL mode from here on
        before = _snapshot(engine)
        holder = Worker(faults.hold_sqlite_lock, path)
        try:
            assert holder.event() == ("locked",)
            with pytest.raises(DatabaseError) as caught:
                _bounded(
                    lambda: ledger.ensure_run(
                        FETCH, workspace_id="w1", tenant_id="t1", identity={"policy_id": "p2"}
                    )
                )
            message = str(caught.value)
            assert message.startswith("dispatch failed in the database (OperationalError: ")
            assert "database is locked" in message and "retry it" in message
            if holder_ends == "killed":
                holder.kill()  # mid-transaction, its row written but never committed
            else:
                holder.send("rollback")
                assert holder.event() == ("released", "rollback")
                holder.join()
        finally:
            holder.stop()
        assert _integrity(path) == [("ok",)]
        assert _snapshot(engine) == before  # the ledger is unchanged, the holder's row gone
        assert check_invariants(engine) == []
        # and the lock is gone with its holder: dispatch works again
        assert _dispatch(ledger).run.id == existing
        assert ledger.ensure_run(FETCH, workspace_id="w1", identity={"policy_id": "p2"}).created
    finally:
        engine.dispose()


@sqlite_only
def test_sqlite_dispatch_waits_for_a_writer_that_commits(opsrun_database_url: str) -> None:
    """With the default busy timeout, a dispatch that meets a held lock waits for it (or comes
    after it: either way, no error and no lost write)."""
    path = make_url(opsrun_database_url).database
    assert path is not None
    ledger = _ledger(make_engine(opsrun_database_url))
    try:
        _dispatch(ledger)
        holder = Worker(faults.hold_sqlite_lock, path)
        try:
            assert holder.event() == ("locked",)
            result: dict[str, Any] = {}
            thread = threading.Thread(
                target=lambda: result.update(
                    res=ledger.ensure_run(FETCH, workspace_id="w1", identity={"policy_id": "p3"})
                ),
                daemon=True,
            )
            thread.start()
            holder.send("commit")
            assert holder.event() == ("released", "commit")
            thread.join(timeout=faults.WAIT_S)
            assert not thread.is_alive()
            holder.join()
        finally:
            holder.stop()
        assert result["res"].created
        assert sorted(run.type for run in ledger.runs()) == [FETCH, FETCH, "faults.holder"]
        assert _integrity(path) == [("ok",)]
        assert check_invariants(ledger) == []
    finally:
        ledger.engine.dispose()
