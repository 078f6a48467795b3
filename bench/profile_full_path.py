"""Where opsrun's full path spends its time, and what proposed library changes would gain.

``python bench/profile_full_path.py`` creates a throwaway database (like the main benchmark), then

1. profiles N full-path jobs (dispatch -> claim -> complete) in one process with cProfile and
   prints the time per component (psycopg including the wait for the server, SQLAlchemy, opsrun,
   pluggy, ...) and the top functions;
2. measures *experiments*: the same ledger with a change applied from the outside (monkeypatched
   here, never in the library), interleaved with the unchanged ledger and raw psycopg, reporting
   jobs/s, wire round trips and client CPU per job. They are the evidence for the changes proposed
   in ``bench/README.md``; once the library adopts one, its experiment measures nothing new.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import peer
from harness import DEFAULT_SERVER_URL, Database, Databases, WireTrace, table
from sqlalchemy import Connection, Engine, event
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.orm import Session
from workloads import COUNTS, LEASE, SPEC, TENANT, TYPE, WORKSPACE, WorkerEnv

from opsrun_core import Ledger
from opsrun_core.db import make_engine
from opsrun_core.sql import RUN_COLUMNS

Out = Callable[[str], None]

_COMPONENTS = (
    ("/psycopg/", "psycopg (incl. waiting for the server)"),
    ("psycopg", "psycopg (incl. waiting for the server)"),
    ("/sqlalchemy/", "SQLAlchemy"),
    ("/opsrun_core/fingerprint", "opsrun fingerprint"),
    ("/opsrun_core/", "opsrun_core"),
    ("/opsrun_plugins/", "opsrun_plugins (built-in hooks)"),
    ("/pluggy/", "pluggy"),
    ("/json/", "json"),
)


def _component(filename: str, function: str) -> str:
    where = f"{filename} {function}"
    for needle, name in _COMPONENTS:
        if needle in where:
            return name
    return "other (stdlib, builtins)"


def _full_job(ledger: Ledger, key: str) -> None:
    res = ledger.ensure_run(TYPE, workspace_id=WORKSPACE, tenant_id=TENANT, identity={"k": key})
    attempt = ledger.claim(res.run.id, lease=LEASE)
    ledger.complete(attempt, COUNTS)


def profile(url: str, *, jobs: int, out: Out) -> None:
    """cProfile (wall clock) of ``jobs`` full-path jobs through ``Ledger(url)``."""
    ledger = Ledger(url)
    ledger.catalog.register(SPEC)
    prefix = os.urandom(4).hex()
    try:
        for n in range(50):
            _full_job(ledger, f"{prefix}-warm-{n}")
        profiler = cProfile.Profile()
        wall, cpu = time.perf_counter(), time.process_time()
        profiler.enable()
        for n in range(jobs):
            _full_job(ledger, f"{prefix}-{n}")
        profiler.disable()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    finally:
        ledger.engine.dispose()
    stats = pstats.Stats(profiler)
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    total = sum(v[2] for v in raw.values())
    by_component: dict[str, float] = {}
    for (filename, _line, function), (_cc, _nc, tottime, _ct, _callers) in raw.items():
        name = _component(filename, function)
        by_component[name] = by_component.get(name, 0.0) + tottime
    out(
        f"\nProfile of {jobs} full-path jobs, one process (under cProfile: "
        f"{wall / jobs * 1e6:,.0f} us wall and {cpu / jobs * 1e6:,.0f} us CPU per job)\n"
    )
    out(
        table(
            ["component", "us/job", "share"],
            [
                [name, f"{seconds / jobs * 1e6:,.0f}", f"{seconds / total:.0%}"]
                for name, seconds in sorted(by_component.items(), key=lambda kv: -kv[1])
            ],
        )
    )
    top = sorted(raw.items(), key=lambda kv: -kv[1][2])[:15]
    out("\nTop functions by own time\n")
    out(
        table(
            ["function", "calls/job", "own us/job"],
            [
                [
                    f"{os.path.basename(filename)}:{line} {function}",
                    f"{nc / jobs:.1f}",
                    f"{tottime / jobs * 1e6:,.0f}",
                ]
                for (filename, line, function), (_cc, nc, tottime, _ct, _callers) in top
            ],
        )
    )


# -- experiments: proposed library changes, applied from the outside ------------------------------


def autocommit_connections(ledger: Ledger) -> None:
    """Proposed for ledger.py: run single-statement calls on an AUTOCOMMIT connection.

    Saves the BEGIN and COMMIT round trips of every ensure_run / claim / complete. Calls that join
    a caller's session keep that session's transaction.
    """
    autocommit = ledger.engine.execution_options(isolation_level="AUTOCOMMIT")
    original = ledger._connection

    @contextmanager
    def _connection(what: str, session: Session | None) -> Iterator[Connection]:
        if session is not None:
            with original(what, session) as conn:
                yield conn
            return
        with ledger._translate(what), autocommit.connect() as conn:
            yield conn

    ledger._connection = _connection  # type: ignore[method-assign]


def ping_when_idle(engine: Engine, idle_seconds: float = 10.0) -> None:
    """Proposed for db.py: ping a pooled connection only when it sat idle (instead of pre-ping).

    SQLAlchemy's pool retries the checkout with a fresh connection on DisconnectionError.
    """

    @event.listens_for(engine, "checkin")
    def _checkin(_dbapi: Any, record: Any) -> None:
        record.info["opsrun_idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _checkout(dbapi: Any, record: Any, _proxy: Any) -> None:
        since = record.info.get("opsrun_idle_since")
        if since is not None and time.monotonic() - since > idle_seconds:
            try:
                engine.dialect.do_ping(dbapi)
            except Exception as exc:
                raise DisconnectionError() from exc


class _Rows:
    def __init__(self, row: dict[str, Any] | None) -> None:
        self._row = row

    def mappings(self) -> _Rows:
        return self

    def first(self) -> dict[str, Any] | None:
        return self._row


class _DriverConnection:
    """A Connection whose hot statements run on the pooled psycopg connection directly."""

    def __init__(self, conn: Connection, plans: dict[int, tuple[str, frozenset[str]]]) -> None:
        self._conn = conn
        self._plans = plans

    def execute(self, statement: Any, params: Any = None) -> Any:
        plan = self._plans.get(id(statement))
        if plan is None:
            return self._conn.execute(statement, params)
        from psycopg.types.json import Jsonb

        sql, json_names = plan
        values = {
            k: Jsonb(v) if k in json_names and v is not None else v for k, v in params.items()
        }
        cursor = self._conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        try:
            row = cursor.execute(sql, values).fetchone()
        finally:
            cursor.close()
        return _Rows(None if row is None else dict(zip(RUN_COLUMNS, row, strict=True)))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


def driver_execution(ledger: Ledger) -> None:
    """Proposed for ledger.py/sql.py: run the hot statements (dispatch insert, claim, finish) as
    driver SQL rendered once, on the pooled DBAPI connection, building runs from tuples by position.

    Skips SQLAlchemy's per-execution work (cache key, parameter processing, result metadata built
    from ``cursor.description``: 19 psycopg Column objects per statement). Timestamps come back in
    the session time zone here; the library would convert them to UTC as UTCDateTime does.
    """
    json_names = frozenset({"identity", "context", "summary_counts", "failure_summary"})
    plans = {}
    for name in (
        "insert_queued",
        "insert_queued_cooldown",
        "insert_running",
        "insert_running_cooldown",
        "claim",
        "finish",
    ):
        statement = getattr(ledger._sql, name)
        compiled = statement.compile(dialect=ledger.engine.dialect)
        plans[id(statement)] = (compiled.string, json_names)
    original = ledger._connection

    @contextmanager
    def _connection(what: str, session: Session | None) -> Iterator[Connection]:
        with original(what, session) as conn:
            yield _DriverConnection(conn, plans)  # type: ignore[misc]

    ledger._connection = _connection  # type: ignore[method-assign]


def _variant(url: str, *, autocommit: bool, idle_ping: bool, driver: bool = False) -> Ledger:
    engine = make_engine(url, pool_pre_ping=not idle_ping)
    if idle_ping:
        ping_when_idle(engine)
    ledger = Ledger(engine)
    ledger.catalog.register(SPEC)
    if autocommit:
        autocommit_connections(ledger)
    if driver:
        driver_execution(ledger)
    return ledger


#: the raw path each kind is compared with (the inline target is against the 3-statement path)
_RAW = {
    "full": "raw-full",
    "inline": "raw-full",
    "dispatch": "raw-dispatch",
    "dispatch-dup": "raw-dispatch-dup",
}
_PEER = {"dispatch": "procrastinate-defer", "dispatch-dup": "procrastinate-defer-dup"}


def _ledger_step(ledger: Ledger, kind: str, keys: Iterator[str]) -> Callable[[], int]:
    def dispatch(key: str) -> None:
        ledger.ensure_run(TYPE, workspace_id=WORKSPACE, tenant_id=TENANT, identity={"k": key})

    def step() -> int:
        key = next(keys)
        if kind == "full":
            _full_job(ledger, key)
            return 1
        if kind == "inline":
            _, attempt = ledger.ensure_and_claim(
                TYPE, workspace_id=WORKSPACE, tenant_id=TENANT, identity={"k": key}
            )
            ledger.complete(attempt, COUNTS)
            return 1
        dispatch(key)
        if kind == "dispatch":
            return 1
        dispatch(key)  # the duplicate: conflict, then the identity's state
        return 2

    return step


def experiments(
    db: Database, *, kind: str = "full", rounds: int, jobs: int, out: Out, peer: bool = False
) -> dict[str, float]:
    """Interleaved rounds of the ledger as is, with each proposed change, and raw psycopg.

    ``kind``: ``full`` (dispatch -> claim -> complete), ``inline`` (ensure_and_claim -> complete,
    compared with the raw 3-statement path), ``dispatch`` (new identities) or
    ``dispatch-dup`` (every identity dispatched twice). With ``peer``, Procrastinate's defer runs
    beside them (its schema must be in ``db``).
    """
    url = db.url
    variants = {
        "as is (transaction + pre-ping)": _variant(url, autocommit=False, idle_ping=False),
        "autocommit": _variant(url, autocommit=True, idle_ping=False),
        "ping only when idle": _variant(url, autocommit=False, idle_ping=True),
        "autocommit + ping when idle": _variant(url, autocommit=True, idle_ping=True),
        "autocommit + idle ping + driver SQL": _variant(
            url, autocommit=True, idle_ping=True, driver=True
        ),
    }
    if kind == "dispatch-dup":
        best = _variant(url, autocommit=True, idle_ping=True, driver=True)
        # the claim hook's `now` without its own SELECT statement_timestamp() round trip
        best._now = lambda _conn: best.clock()  # type: ignore[method-assign]
        variants["... + no separate now() query"] = best
    env = WorkerEnv({"databases": {db.key: db.as_config()}}, 0)
    keys = (f"{os.urandom(4).hex()}-{n}" for n in range(10**9))
    steps = {name: _ledger_step(ledger, kind, keys) for name, ledger in variants.items()}
    if peer and kind in _PEER:
        steps["procrastinate defer"] = env.workload(f"{_PEER[kind]}@{db.key}")
    if kind == "inline":
        steps["raw inline (2 statements)"] = env.workload(f"raw-inline@{db.key}")
    raw_name = "raw psycopg (same SQL)"
    steps[raw_name] = env.workload(f"{_RAW[kind]}@{db.key}")
    trips: dict[str, float | None] = {}
    rates: dict[str, list[float]] = {name: [] for name in steps}
    cpus: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    try:
        for name in names:
            for _ in range(10):
                steps[name]()  # warm up: pool, psycopg's prepared statements
            if name not in variants and name != raw_name:
                continue  # procrastinate's pool and the extra raw path are not traced
            trace = WireTrace()
            detach = None
            if name in variants:
                detach = trace.attach_engine(variants[name].engine)
            else:
                trace.attach(env.raw(db.key).conn)
            done = sum(steps[name]() for _ in range(20))
            if detach is not None:
                detach()
            count = trace.count()
            trace.close()
            trips[name] = None if count is None else count / done
        for number in range(rounds):
            shift = number % len(names)
            for name in [*names[shift:], *names[:shift]]:
                wall, cpu = time.perf_counter(), time.process_time()
                done = sum(steps[name]() for _ in range(jobs))
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                rates[name].append(done / wall)
                cpus[name].append(cpu / done * 1e6)
    finally:
        env.close()
        for ledger in variants.values():
            ledger.engine.dispose()
    what = {
        "full": "full path",
        "inline": "inline path (raw = the 3-statement path)",
        "dispatch": "dispatch",
        "dispatch-dup": "dispatch, 50% duplicates",
    }
    out(f"\nExperiments: {what[kind]}, one process, {rounds} interleaved rounds of {jobs} steps\n")
    rows = []
    medians = {}
    for name in names:
        ratio = statistics.median(a / b for a, b in zip(rates[name], rates[raw_name], strict=True))
        medians[name] = ratio
        wire = trips.get(name)
        rows.append(
            [
                name,
                f"{statistics.median(rates[name]):,.0f}",
                f"{ratio:.2f}",
                "n/a" if wire is None else f"{wire:.1f}",
                f"{statistics.median(cpus[name]):,.0f}",
            ]
        )
    unit, units = ("job", "jobs") if kind in ("full", "inline") else ("dispatch", "dispatches")
    out(table(["variant", f"{units}/s", "vs raw", f"wire trips/{unit}", f"CPU us/{unit}"], rows))
    return medians


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--server-url", default=os.environ.get("OPSRUN_BENCH_SERVER_URL", DEFAULT_SERVER_URL)
    )
    p.add_argument("--jobs", type=int, default=1000, help="jobs profiled")
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds per experiment")
    p.add_argument("--round-jobs", type=int, default=200, help="jobs per experiment round")
    p.add_argument(
        "--synchronous-commit",
        choices=("on", "off"),
        default="on",
        help="'off' takes the server's fsync out of the figures (a diagnostic, not production)",
    )
    args = p.parse_args(argv)
    dbs = Databases(args.server_url, synchronous_commit=args.synchronous_commit)
    try:
        db = dbs.postgres("profile")
        has_peer = peer.available() is not None
        if has_peer:
            assert db.conninfo is not None
            peer.apply_schema(db.conninfo)
        profile(db.url, jobs=args.jobs, out=print)
        for kind in ("full", "inline", "dispatch", "dispatch-dup"):
            experiments(
                db, kind=kind, rounds=args.rounds, jobs=args.round_jobs, out=print, peer=has_peer
            )
    finally:
        dbs.drop_all()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
