"""What one benchmark step does, through opsrun and through the raw drivers.

A spec is ``"<workload>@<database key>"``. Each workload returns a ``step()`` that does one unit of
work and returns how many jobs (or dispatches) it completed. The raw workloads issue *the same SQL
text* as opsrun: they compile the ledger's own statements (:mod:`opsrun_core.sql`) for the driver's
dialect, and bind the same values, on an autocommit connection (psycopg 3) or in SQLite's
autocommit mode (stdlib sqlite3, WAL, ``synchronous = FULL``, the pragmas opsrun sets).

The operation is configured like the reference app's jobs: a 15-minute cooldown (so the dispatch
insert carries the cooldown guard) and an explicit lease (so ``claim`` needs no type lookup).
"""

from __future__ import annotations

import hashlib
import json
import secrets
import sqlite3
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

from opsrun_core import Disposition, Ledger, OperationSpec
from opsrun_core.db import SQLITE_BUSY_TIMEOUT_MS

TYPE = "bench.job"
WORKSPACE = "bench"
TENANT = "t1"
LEASE = timedelta(minutes=10)
COOLDOWN = timedelta(minutes=15)
COUNTS = {"total": 10, "processed": 10, "failed": 0}
SPEC = OperationSpec(TYPE, label="Benchmark job", cooldown=COOLDOWN, lease=LEASE)

Step = Callable[[], int]


class BenchError(RuntimeError):
    """A workload did not do what it measures (a benchmark bug, not a slow database)."""


class WorkerEnv:
    """One process's connections, built lazily per database and closed at the end."""

    def __init__(self, config: dict[str, Any], index: int) -> None:
        self.databases: dict[str, dict[str, Any]] = config["databases"]
        self.index = index
        self.prefix = f"p{index}-{secrets.token_hex(4)}"
        self._counter = 0
        self._ledgers: dict[str, Ledger] = {}
        self._raw: dict[str, RawStatements] = {}
        self._closers: list[Callable[[], None]] = []
        self._procrastinate: dict[str, Any] = {}

    def next_key(self) -> str:
        """An identity no other process or round uses."""
        self._counter += 1
        return f"{self.prefix}-{self._counter}"

    def ledger(self, db: str) -> Ledger:
        """The production default: ``Ledger(url)`` (server clock on Postgres, pool pre-ping)."""
        if db not in self._ledgers:
            ledger = Ledger(self.databases[db]["url"])
            ledger.catalog.register(SPEC)
            self._ledgers[db] = ledger
            self._closers.append(ledger.engine.dispose)
        return self._ledgers[db]

    def raw(self, db: str) -> RawStatements:
        if db not in self._raw:
            info = self.databases[db]
            if info["backend"] == "postgresql":
                raw: RawStatements = RawPostgres(info, self.ledger(db))
            else:
                raw = RawSqlite(info, self.ledger(db))
            self._raw[db] = raw
            self._closers.append(raw.close)
        return self._raw[db]

    def procrastinate_task(self, db: str) -> Any:
        if db not in self._procrastinate:
            from peer import procrastinate_task

            task, close = procrastinate_task(self.databases[db]["conninfo"])
            self._procrastinate[db] = task
            self._closers.append(close)
        return self._procrastinate[db]

    def workload(self, spec: str) -> Step:
        name, _, db = spec.partition("@")
        if name not in WORKLOADS:
            raise BenchError(f"unknown workload {name!r}; known: {sorted(WORKLOADS)}")
        if db not in self.databases:
            raise BenchError(f"unknown database {db!r} in spec {spec!r}")
        return WORKLOADS[name](self, db)

    def close(self) -> None:
        for close in reversed(self._closers):
            try:
                close()
            except Exception as exc:  # closing is best effort at the end of a run
                print(f"worker {self.index}: closing failed: {exc}")


# -- raw drivers, same SQL -----------------------------------------------------------------------

_STATEMENTS = ("insert_queued_cooldown", "insert_running_cooldown", "state", "claim", "finish")


class RawStatements:
    """The ledger's hot statements compiled for the driver, executed without SQLAlchemy."""

    def __init__(self, ledger: Ledger) -> None:
        self.compiled = {
            name: getattr(ledger._sql, name).compile(dialect=ledger.engine.dialect)
            for name in _STATEMENTS
        }
        self.conn: Any = None
        #: statements executed so far (the round-trip count of the raw paths)
        self.executed = 0

    def execute(self, name: str, values: dict[str, Any]) -> list[Any]:
        raise NotImplementedError

    def values(self, key: str, run_id: int = 0, token: str | None = None) -> dict[str, Any]:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class RawPostgres(RawStatements):
    """psycopg 3, autocommit: one round trip per statement."""

    def __init__(self, info: dict[str, Any], ledger: Ledger) -> None:
        import psycopg
        from psycopg.types.json import Jsonb

        super().__init__(ledger)
        self._jsonb = Jsonb
        self.conn = psycopg.connect(info["conninfo"], autocommit=True)
        self.sql = {name: (c.string, tuple(c.params)) for name, c in self.compiled.items()}

    def execute(self, name: str, values: dict[str, Any]) -> list[Any]:
        sql, names = self.sql[name]
        self.executed += 1
        return self.conn.execute(sql, {k: values[k] for k in names}).fetchall()

    def values(self, key: str, run_id: int = 0, token: str | None = None) -> dict[str, Any]:
        return {
            "type": TYPE,
            "workspace_id": WORKSPACE,
            "tenant_id": TENANT,
            "identity_hash": hashlib.sha256(key.encode()).hexdigest(),
            "identity": self._jsonb({"policy_id": key}),
            "context": None,
            "initiator": None,
            "cooldown": COOLDOWN,
            "lease": LEASE,
            "id": run_id,
            "token": token,
            "outcome": "succeeded",
            "summary_counts": self._jsonb(COUNTS),
            "failure_summary": None,
        }

    def close(self) -> None:
        self.conn.close()


class RawSqlite(RawStatements):
    """stdlib sqlite3 in autocommit mode: every statement is its own durable transaction."""

    def __init__(self, info: dict[str, Any], ledger: Ledger) -> None:
        super().__init__(ledger)
        self.conn = sqlite3.connect(info["path"], isolation_level=None)
        self.conn.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        self.conn.execute("PRAGMA journal_mode = WAL")
        self.conn.execute("PRAGMA synchronous = FULL")
        self.sql = {
            name: (c.string, tuple(c.positiontup or ())) for name, c in self.compiled.items()
        }

    def execute(self, name: str, values: dict[str, Any]) -> list[Any]:
        sql, order = self.sql[name]
        self.executed += 1
        # fetchall: the implicit transaction commits when the statement is stepped to its end
        return self.conn.execute(sql, tuple(values[k] for k in order)).fetchall()

    def values(self, key: str, run_id: int = 0, token: str | None = None) -> dict[str, Any]:
        now = datetime.now(timezone.utc).replace(tzinfo=None)
        return {
            "type": TYPE,
            "workspace_id": WORKSPACE,
            "tenant_id": TENANT,
            "identity_hash": hashlib.sha256(key.encode()).hexdigest(),
            "identity": json.dumps({"policy_id": key}),
            "context": None,
            "initiator": None,
            "now": _sqlite_ts(now),
            "cooldown_since": _sqlite_ts(now - COOLDOWN),
            "lease_expires_at": _sqlite_ts(now + LEASE),
            "id": run_id,
            "token": token,
            "outcome": "succeeded",
            "summary_counts": json.dumps(COUNTS),
            "failure_summary": None,
        }

    def close(self) -> None:
        self.conn.close()


def _sqlite_ts(value: datetime) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S.%f")  # what SQLAlchemy's SQLite DateTime binds


# -- workloads -----------------------------------------------------------------------------------


def opsrun_full(env: WorkerEnv, db: str) -> Step:
    """dispatch -> claim -> complete with summary counts: 3 statements."""
    ledger = env.ledger(db)

    def step() -> int:
        res = ledger.ensure_run(
            TYPE, workspace_id=WORKSPACE, tenant_id=TENANT, identity={"policy_id": env.next_key()}
        )
        attempt = ledger.claim(res.run.id, lease=LEASE)
        if not attempt.acquired:
            raise BenchError(f"claim of a fresh run skipped: {attempt.reason}")
        ledger.complete(attempt, COUNTS)
        return 1

    return step


def opsrun_inline(env: WorkerEnv, db: str) -> Step:
    """``run_now``'s path: ensure_and_claim (one statement when new) -> complete: 2 statements."""
    ledger = env.ledger(db)

    def step() -> int:
        _, attempt = ledger.ensure_and_claim(
            TYPE, workspace_id=WORKSPACE, tenant_id=TENANT, identity={"policy_id": env.next_key()}
        )
        if not attempt.acquired:
            raise BenchError(f"inline claim of a fresh run skipped: {attempt.reason}")
        ledger.complete(attempt, COUNTS)
        return 1

    return step


def opsrun_dispatch(duplicates: bool) -> Callable[[WorkerEnv, str], Step]:
    """Dispatch only; with ``duplicates`` every identity is dispatched twice (50% duplicates)."""

    def make(env: WorkerEnv, db: str) -> Step:
        ledger = env.ledger(db)

        def dispatch(key: str) -> Disposition:
            return ledger.ensure_run(
                TYPE, workspace_id=WORKSPACE, tenant_id=TENANT, identity={"policy_id": key}
            ).disposition

        def step() -> int:
            key = env.next_key()
            if dispatch(key) is not Disposition.CREATED:
                raise BenchError("a fresh identity was not created")
            if not duplicates:
                return 1
            if dispatch(key) is not Disposition.REUSED_ACTIVE:
                raise BenchError("a duplicate dispatch did not reuse the active run")
            return 2

        return step

    return make


def raw_full(env: WorkerEnv, db: str) -> Step:
    """The same three statements, raw."""
    raw = env.raw(db)

    def step() -> int:
        token = secrets.token_hex(16)
        rows = raw.execute("insert_queued_cooldown", raw.values(env.next_key()))
        values = raw.values("", rows[0][0], token)
        if not raw.execute("claim", values):
            raise BenchError("raw claim of a fresh run changed nothing")
        raw.execute("finish", values)
        return 1

    return step


def raw_inline(env: WorkerEnv, db: str) -> Step:
    """The inline path's two statements, raw (for reference)."""
    raw = env.raw(db)

    def step() -> int:
        token = secrets.token_hex(16)
        rows = raw.execute("insert_running_cooldown", raw.values(env.next_key(), 0, token))
        raw.execute("finish", raw.values("", rows[0][0], token))
        return 1

    return step


def raw_dispatch(duplicates: bool) -> Callable[[WorkerEnv, str], Step]:
    """The dispatch insert raw; a duplicate conflicts and reads the identity's state, as opsrun."""

    def make(env: WorkerEnv, db: str) -> Step:
        raw = env.raw(db)

        def step() -> int:
            values = raw.values(env.next_key())
            if not raw.execute("insert_queued_cooldown", values):
                raise BenchError("a fresh identity was not created")
            if not duplicates:
                return 1
            if raw.execute("insert_queued_cooldown", values):
                raise BenchError("a duplicate insert created a second active run")
            if not raw.execute("state", values):
                raise BenchError("the state query found no active run")
            return 2

        return step

    return make


def procrastinate_defer(duplicates: bool) -> Callable[[WorkerEnv, str], Step]:
    """Procrastinate's ``defer`` with a queueing lock per job; duplicates raise AlreadyEnqueued."""

    def make(env: WorkerEnv, db: str) -> Step:
        from procrastinate.exceptions import AlreadyEnqueued

        task = env.procrastinate_task(db)

        def step() -> int:
            key = env.next_key()
            task.configure(queueing_lock=key).defer(policy_id=key)
            if not duplicates:
                return 1
            try:
                task.configure(queueing_lock=key).defer(policy_id=key)
            except AlreadyEnqueued:
                return 2
            raise BenchError("procrastinate deferred a duplicate queueing lock")

        return step

    return make


WORKLOADS: dict[str, Callable[[WorkerEnv, str], Step]] = {
    "opsrun-full": opsrun_full,
    "raw-full": raw_full,
    "opsrun-inline": opsrun_inline,
    "raw-inline": raw_inline,
    "opsrun-dispatch": opsrun_dispatch(duplicates=False),
    "raw-dispatch": raw_dispatch(duplicates=False),
    "opsrun-dispatch-dup": opsrun_dispatch(duplicates=True),
    "raw-dispatch-dup": raw_dispatch(duplicates=True),
    "procrastinate-defer": procrastinate_defer(duplicates=False),
    "procrastinate-defer-dup": procrastinate_defer(duplicates=True),
}
