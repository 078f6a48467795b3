"""Code for the fault-injection tests (``tests/integration/test_faults.py``): worker processes to
kill, connections to cut, locks to hold, and the Postgres plumbing to find and restart a server.

Workers run in forkserver children (like :mod:`tests.workers`) and talk to the test through
queues: ``events`` (worker -> test) and ``commands`` (test -> worker). Every wait on either side is
bounded by :data:`WAIT_S`, so a broken test fails instead of hanging the suite; a worker that waits
"forever" to be killed gives up after :data:`WAIT_S` too.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import queue
import random
import shutil
import signal
import sqlite3
import subprocess
import time
import traceback
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

#: the longest any side waits for the other
WAIT_S = 120
#: the operation the fault tests run, with a lease that outlives any test (the server's clock)
FETCH = "faults.fetch"
LEASE = timedelta(minutes=10)
#: where a killed worker stops
STEPS = ("after_dispatch", "after_claim", "mid_job", "before_complete")
#: what a killed worker had counted when it died (never to be seen in the ledger)
DEAD_COUNTS = {"total": 7, "processed": 5, "failed": 1}
#: what the forkserver imports once, so each worker starts warm (``opsrun_core`` imports its
#: ledger lazily, so it is named; the first test to start the forkserver sets its preload)
PRELOAD = [
    "opsrun_core.ledger",
    "opsrun_core.operation",
    "opsrun_plugins.dedupe",
    "opsrun_plugins.identity",
    "opsrun_plugins.tracking",
    "sqlalchemy.dialects.postgresql.psycopg",
    "sqlalchemy.dialects.sqlite.pysqlite",
    "tests.faults",
]


# -- processes -----------------------------------------------------------------------------------


class Worker:
    """A forkserver child running ``target(*args, events, commands)``."""

    def __init__(self, target: Callable[..., Any], *args: Any) -> None:
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(PRELOAD)
        self.events = ctx.Queue()
        self.commands = ctx.Queue()
        self.process = ctx.Process(
            target=_entry, args=(target, args, self.events, self.commands), daemon=True
        )
        self.process.start()

    def event(self) -> Any:
        """The worker's next event; a worker that crashed raises its traceback here."""
        deadline = time.monotonic() + WAIT_S
        while True:
            try:
                item = self.events.get(timeout=0.2)
                break
            except queue.Empty:
                if not self.process.is_alive() and self.events.empty():
                    raise AssertionError(
                        f"the worker died (exit code {self.process.exitcode}) without a word"
                    ) from None
                if time.monotonic() > deadline:
                    raise AssertionError(f"the worker said nothing for {WAIT_S} s") from None
        if isinstance(item, tuple) and item and item[0] == "crashed":
            raise AssertionError(f"the worker crashed:\n{item[1]}")
        return item

    def send(self, command: Any) -> None:
        self.commands.put(command)

    def kill(self) -> None:
        """SIGKILL: no cleanup, no ``finally``, no goodbye to the database."""
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.join(timeout=WAIT_S)
        assert self.process.exitcode == -signal.SIGKILL

    def join(self) -> None:
        self.process.join(timeout=WAIT_S)
        if self.process.is_alive():
            self.process.kill()
            raise AssertionError("the worker did not finish")
        assert self.process.exitcode == 0, f"the worker exited with {self.process.exitcode}"

    def stop(self) -> None:
        """Make sure the process is gone (for ``finally``)."""
        if self.process.is_alive():
            self.process.kill()
            self.process.join(timeout=WAIT_S)


def _entry(target: Callable[..., Any], args: tuple[Any, ...], events: Any, commands: Any) -> None:
    try:
        target(*args, events, commands)
    except BaseException:
        events.put(("crashed", traceback.format_exc()))
        raise


def _hang(commands: Any) -> None:
    """Wait to be killed (bounded)."""
    with contextlib.suppress(queue.Empty):
        commands.get(timeout=WAIT_S)
    os._exit(3)  # never killed: the test broke; leave without touching the ledger


def _outcome(call: Callable[[], Any]) -> tuple[Any, ...]:
    """Run ``call``; describe what happened in picklable terms."""
    from opsrun_core import DatabaseError, OpsrunError

    try:
        return ("ok", call())
    except OpsrunError as exc:
        return ("error", type(exc).__name__, isinstance(exc, DatabaseError), str(exc))
    except Exception as exc:
        return ("untyped", type(exc).__name__, False, str(exc))


def _ledger(url: str) -> Any:
    """A worker's ledger: the server's clock, as a worker fleet uses."""
    from opsrun_core import Ledger, OperationSpec

    ledger = Ledger(url)
    ledger.catalog.register(OperationSpec(FETCH, lease=LEASE))
    return ledger


# -- (a) a worker killed at a step -----------------------------------------------------------------


def step_worker(url: str, identity: dict[str, Any], stop_at: str, events: Any, cmds: Any) -> None:
    """Dispatch, claim, work, and stop (to be SIGKILLed) at ``stop_at``, one of :data:`STEPS`."""
    ledger = _ledger(url)
    run = ledger.ensure_run(FETCH, workspace_id="w1", tenant_id="t1", identity=identity).run
    if stop_at == "after_dispatch":
        events.put(("stopped", run.id))
        _hang(cmds)
    attempt = ledger.claim(run.id, lease=LEASE)
    assert attempt.acquired, attempt.reason
    if stop_at == "after_claim":
        events.put(("stopped", run.id))
        _hang(cmds)
    attempt.set_counts(total=DEAD_COUNTS["total"])
    attempt.count(processed=3)
    ledger.heartbeat(attempt)  # a write mid-job: the lease is extended, the counts stay in memory
    if stop_at == "mid_job":
        events.put(("stopped", run.id))
        _hang(cmds)
    attempt.count(processed=2, failed=1)
    assert attempt.counts == DEAD_COUNTS
    events.put(("stopped", run.id))  # before_complete: the job is done, complete() is next
    _hang(cmds)


def completing_worker(url: str, run_id: int, events: Any, commands: Any) -> None:
    """Claim, say so, wait for "go", then complete (the test holds the row lock by then)."""
    ledger = _ledger(url)
    attempt = ledger.claim(run_id, lease=LEASE)
    assert attempt.acquired, attempt.reason
    attempt.count(**DEAD_COUNTS)
    events.put(("claimed", run_id))
    commands.get(timeout=WAIT_S)
    ledger.complete(attempt)
    events.put(("completed", run_id))  # only if the test did not kill it first


# -- (b) connections terminated mid-statement -------------------------------------------------------


def call_twice(url: str, action: str, arg: Any, events: Any, commands: Any) -> None:
    """Do ``action`` (dispatch, claim or complete), report, then do it again and report.

    The first call is the one the test blocks and whose connection it terminates; the second is
    the caller's retry after the error.
    """
    ledger = _ledger(url)
    if action == "dispatch":
        commands.get(timeout=WAIT_S)  # "go": the test holds its lock now

        def call() -> Any:
            res = ledger.ensure_run(FETCH, workspace_id="w1", tenant_id="t1", identity=arg)
            return res.disposition.value, res.run.id

    elif action == "claim":
        commands.get(timeout=WAIT_S)

        def call() -> Any:
            attempt = ledger.claim(arg, lease=LEASE)
            return attempt.acquired, attempt.reason

    else:
        attempt = ledger.claim(arg, lease=LEASE)
        assert attempt.acquired, attempt.reason
        attempt.count(total=4, processed=4, failed=1)
        events.put(("claimed", arg))
        commands.get(timeout=WAIT_S)

        def call() -> Any:
            run = ledger.complete(attempt)
            return run.status.value, run.summary_counts

    events.put(("first", _outcome(call)))
    events.put(("second", _outcome(call)))
    ledger.engine.dispose()


def with_application_name(url: str, name: str) -> str:
    from sqlalchemy import make_url

    return (
        make_url(url)
        .update_query_dict({"application_name": name})
        .render_as_string(hide_password=False)
    )


def wait_for_lock_wait(engine: Any, application_name: str, worker: Worker) -> int:
    """The backend pid of ``application_name`` once its statement waits on a lock (bounded)."""
    from sqlalchemy import text

    query = text(
        "SELECT pid FROM pg_stat_activity WHERE application_name = :name "
        "AND state = 'active' AND wait_event_type = 'Lock'"
    )
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        with engine.connect() as conn:
            pid = conn.execute(query, {"name": application_name}).scalar()
        if pid is not None:
            return int(pid)
        if not worker.process.is_alive() or not worker.events.empty():
            raise AssertionError(f"the worker never blocked: {worker.event()!r}")
        time.sleep(0.02)
    raise AssertionError(f"no backend of {application_name} waited on a lock within {WAIT_S} s")


def wait_for_no_backend(engine: Any, application_name: str) -> None:
    """Wait (bounded) until no backend of ``application_name`` is left."""
    from sqlalchemy import text

    query = text("SELECT count(*) FROM pg_stat_activity WHERE application_name = :name")
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        with engine.connect() as conn:
            if conn.execute(query, {"name": application_name}).scalar() == 0:
                return
        time.sleep(0.02)
    raise AssertionError(f"the backend of {application_name} outlived its client")


def terminate(engine: Any, pid: int) -> None:
    from sqlalchemy import text

    with engine.connect() as conn:
        assert conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid}).scalar()


# -- (c) a Postgres restart ----------------------------------------------------------------------

#: set to 1 to let the suite restart the Postgres cluster it tests against (see test_faults.py)
ALLOW_RESTART_ENV = "OPSRUN_ALLOW_PG_RESTART"
#: "VERSION NAME" of that cluster, when it cannot be found by port (e.g. "15 main")
CLUSTER_ENV = "OPSRUN_PG_CLUSTER"
POOL = 6


def find_cluster(port: int) -> tuple[str, str] | None:
    """(version, name) of the local ``pg_lsclusters`` cluster on ``port``, or None."""
    named = os.environ.get(CLUSTER_ENV, "").split()
    if len(named) == 2:
        return named[0], named[1]
    if shutil.which("pg_lsclusters") is None:
        return None
    listing = subprocess.run(
        ["pg_lsclusters", "--no-header"], capture_output=True, text=True, timeout=30, check=False
    )
    for line in listing.stdout.splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[2] == str(port):
            return fields[0], fields[1]
    return None


def pg_ctlcluster(version: str, name: str, action: str) -> None:
    subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", version, name, action],
        check=True,
        capture_output=True,
        timeout=WAIT_S,
    )


def cluster_online(version: str, name: str) -> bool:
    listing = subprocess.run(
        ["pg_lsclusters", "--no-header", version, name],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return "online" in listing.stdout


def wait_until_answering(engine: Any) -> None:
    """Wait (bounded) until ``engine`` can run a statement again."""
    from sqlalchemy.exc import SQLAlchemyError

    deadline = time.monotonic() + WAIT_S
    while True:
        try:
            with engine.connect() as conn:
                conn.exec_driver_sql("SELECT 1")
            return
        except SQLAlchemyError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _retrying(call: Callable[[], Any], stats: dict[str, int]) -> Any:
    """``call()``, retried on :class:`DatabaseError` (a restart in progress) for up to WAIT_S."""
    from opsrun_core import DatabaseError

    deadline = time.monotonic() + WAIT_S
    while True:
        try:
            return call()
        except DatabaseError:
            stats["database_errors"] += 1
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def restart_worker(
    url: str, index: int, ops_after: int, restarted: Any, events: Any, commands: Any
) -> None:
    """Dispatch, claim and complete identities of a small pool until ``ops_after`` operations
    have run after ``restarted`` was set; report everything it did."""
    from opsrun_core import LeaseLost

    ledger = _ledger(url)
    rng = random.Random(index)
    stats = {"dispatches": 0, "database_errors": 0, "ambiguous_completes": 0, "skipped": 0}
    dispositions: dict[str, int] = {}
    created: list[int] = []
    completed: dict[int, dict[str, int]] = {}
    done = after = 0
    while after < ops_after and done < 10_000:
        if done == 2:
            events.put(("warm", index))
        if restarted.is_set():
            after += 1
        done += 1
        identity = {"n": rng.randrange(POOL)}
        res = _retrying(
            lambda identity=identity: ledger.ensure_run(
                FETCH, workspace_id="w1", tenant_id="t1", identity=identity
            ),
            stats,
        )
        stats["dispatches"] += 1
        dispositions[res.disposition.value] = dispositions.get(res.disposition.value, 0) + 1
        if res.created:
            created.append(res.run.id)
        attempt = _retrying(lambda run_id=res.run.id: ledger.claim(run_id, lease=LEASE), stats)
        if not attempt.acquired:
            stats["skipped"] += 1
            continue
        counts = {"total": done, "processed": done, "failed": 0}
        errors_before = stats["database_errors"]
        try:
            _retrying(
                lambda attempt=attempt, counts=counts: ledger.complete(attempt, counts), stats
            )
        except LeaseLost:
            # complete() committed but its answer was lost with the connection: the retry finds
            # the run finished. It must be finished with exactly these counts.
            assert stats["database_errors"] > errors_before
            run = _retrying(lambda run_id=attempt.run_id: ledger.get(run_id), stats)
            assert run.summary_counts == counts, (run.summary_counts, counts)
            stats["ambiguous_completes"] += 1
        completed[attempt.run_id] = counts
    ledger.engine.dispose()
    events.put(("done", index, stats, dispositions, created, completed))


# -- (d) SQLite: a writer holding the database -----------------------------------------------------


def hold_sqlite_lock(path: str, events: Any, commands: Any) -> None:
    """Open the file with plain sqlite3, ``BEGIN IMMEDIATE``, write a row, and hold the lock until
    told to "commit" or "rollback" (or until killed)."""
    conn = sqlite3.connect(path, isolation_level=None, timeout=WAIT_S)
    conn.execute("BEGIN IMMEDIATE")
    now = datetime.now(timezone.utc).replace(tzinfo=None).isoformat(sep=" ")
    conn.execute(
        "INSERT INTO operation_runs (type, workspace_id, identity_hash, identity, status, outcome,"
        " attempts, created_at, updated_at) VALUES ('faults.holder', 'w1', ?, '{}', 'queued',"
        " 'pending', 0, ?, ?)",
        ("f" * 64, now, now),
    )
    events.put(("locked",))
    command = commands.get(timeout=WAIT_S)
    conn.execute("COMMIT" if command == "commit" else "ROLLBACK")
    conn.close()
    events.put(("released", command))
