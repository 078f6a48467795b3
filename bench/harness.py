"""Benchmark plumbing: throwaway databases, worker processes, rounds, medians, round-trip counters.

Nothing here knows what a job is; :mod:`workloads` does. A *spec* names a workload and the database
it runs on (``"opsrun-full@full"``); a :class:`WorkerPool` runs one spec at a time in N processes
for a fixed wall-clock window that starts at the same instant in every process, and reports the
summed rate. Rounds of different specs are interleaved, so that a burst of load on a shared machine
hits every spec alike, and medians are taken over rounds.
"""

from __future__ import annotations

import multiprocessing
import os
import platform
import re
import secrets
import sqlite3
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, event, make_url

from opsrun_core import Ledger
from opsrun_core.db import make_engine, safe_url

#: the maintenance database the throwaway ones are created from (libpq defaults: PGHOST, PGUSER,
#: the default socket, ...), as the pytest plugin does
DEFAULT_SERVER_URL = "postgresql+psycopg:///postgres"


# -- databases -----------------------------------------------------------------------------------


@dataclass
class Database:
    """One database a spec can run on: a throwaway Postgres database or a temporary SQLite file."""

    key: str
    backend: str  # "postgresql" or "sqlite"
    url: str  # SQLAlchemy URL (with password, for the workers)
    conninfo: str | None = None  # libpq connection string (Postgres)
    path: str | None = None  # file (SQLite)

    def as_config(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "backend": self.backend,
            "url": self.url,
            "conninfo": self.conninfo,
            "path": self.path,
        }


class Databases:
    """Creates (and finally drops) every database of one benchmark run.

    Postgres databases are named ``opsrun_bench_<random>_<key>`` and migrated with
    ``Ledger.upgrade()``; nothing here ever runs ANALYZE on an empty table (PERF_NOTES trap 6).
    """

    def __init__(self, server_url: str, *, synchronous_commit: str = "on") -> None:
        self.server_url = server_url
        #: "off" is a diagnostic: it takes the server's WAL flush out of every figure
        self.synchronous_commit = synchronous_commit
        self.run_id = secrets.token_hex(3)
        self.items: dict[str, Database] = {}
        self._server: Engine | None = None
        self._tmpdir: tempfile.TemporaryDirectory[str] | None = None

    @property
    def server(self) -> Engine:
        if self._server is None:
            self._server = make_engine(
                self.server_url, setting="--server-url", isolation_level="AUTOCOMMIT"
            )
        return self._server

    def postgres(self, key: str) -> Database:
        name = f"opsrun_bench_{self.run_id}_{key.replace('-', '_')}"
        with self.server.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
        url = make_url(self.server_url).set(database=name)
        if url.drivername in ("postgresql", "postgres"):
            url = url.set(drivername="postgresql+psycopg")
        if self.synchronous_commit != "on":
            options = url.query.get("options", "")
            setting = f"-c synchronous_commit={self.synchronous_commit}"
            url = url.update_query_dict({"options": f"{options} {setting}".strip()})
        db = Database(
            key=key,
            backend="postgresql",
            url=url.render_as_string(hide_password=False),
            conninfo=conninfo_of(url),
        )
        self.items[key] = db
        _migrate(db.url)
        return db

    def sqlite(self, key: str) -> Database:
        if self._tmpdir is None:
            self._tmpdir = tempfile.TemporaryDirectory(prefix="opsrun_bench_")
        path = str(Path(self._tmpdir.name) / f"{key}.sqlite3")
        db = Database(key=key, backend="sqlite", url=f"sqlite:///{path}", path=path)
        self.items[key] = db
        _migrate(db.url)
        return db

    def config(self) -> dict[str, dict[str, Any]]:
        return {key: db.as_config() for key, db in self.items.items()}

    def drop_all(self) -> None:
        for db in self.items.values():
            if db.backend != "postgresql":
                continue
            name = make_url(db.url).database
            try:
                with self.server.connect() as conn:
                    conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            except Exception as exc:  # report and go on dropping the others
                print(f"could not drop {name}: {exc}; drop it by hand", file=sys.stderr)
        if self._server is not None:
            self._server.dispose()
        if self._tmpdir is not None:
            self._tmpdir.cleanup()


def conninfo_of(url: Any) -> str:
    """A libpq connection string for a SQLAlchemy URL (empty parts stay libpq defaults)."""
    parts = {
        "host": url.host,
        "port": url.port,
        "user": url.username,
        "password": url.password,
        "dbname": url.database,
    }
    for key, value in url.query.items():
        parts[key] = value if isinstance(value, str) else value[-1]
    return " ".join(f"{k}='{_quote(str(v))}'" for k, v in parts.items() if v not in (None, ""))


def _quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace("'", "\\'")


def _migrate(url: str) -> None:
    engine = make_engine(url)
    try:
        Ledger(engine).upgrade()
    finally:
        engine.dispose()


# -- worker processes ----------------------------------------------------------------------------


@dataclass(frozen=True)
class RoundResult:
    """One spec over one window, summed over the processes."""

    spec: str
    jobs: int
    rate: float  # jobs per second, the sum of each process's own rate
    cpu_us_per_job: float  # client CPU (user + system) of the worker processes per job


class WorkerError(RuntimeError):
    pass


class WorkerPool:
    """N worker processes (spawned, so each builds its own engines and connections)."""

    def __init__(self, processes: int, config: dict[str, Any]) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.size = processes
        self._pipes = []
        self._procs = []
        for index in range(processes):
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=_worker_main, args=(child, config, index), name=f"bench-worker-{index}"
            )
            proc.start()
            child.close()
            self._pipes.append(parent)
            self._procs.append(proc)
        self._collect("started")

    def run(self, spec: str, duration: float) -> RoundResult:
        for pipe in self._pipes:
            pipe.send(("prepare", spec))
        self._collect("prepare")
        start = time.monotonic() + 0.05
        for pipe in self._pipes:
            pipe.send(("run", spec, start, start + duration))
        replies = self._collect("run")
        jobs = sum(r[0] for r in replies)
        rate = sum(r[0] / r[1] for r in replies if r[1] > 0)
        cpu = sum(r[2] for r in replies)
        return RoundResult(spec, jobs, rate, cpu / jobs * 1e6 if jobs else float("nan"))

    def close(self) -> None:
        for pipe in self._pipes:
            with suppress(OSError):
                pipe.send(("stop",))
        for proc in self._procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.terminate()
                proc.join()

    def _collect(self, what: str) -> list[Any]:
        replies = []
        for index, pipe in enumerate(self._pipes):
            if not pipe.poll(300):
                raise WorkerError(f"worker {index} did not answer {what} within 300 s")
            status, *payload = pipe.recv()
            if status != "ok":
                raise WorkerError(f"worker {index} failed in {what}:\n{payload[0]}")
            replies.append(payload[0] if payload else None)
        return replies

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _worker_main(pipe: Any, config: dict[str, Any], index: int) -> None:
    from workloads import WorkerEnv  # the bench directory is on the spawned child's sys.path

    env = WorkerEnv(config, index)
    steps: dict[str, Callable[[], int]] = {}
    try:
        pipe.send(("ok", None))
        while True:
            message = pipe.recv()
            try:
                if message[0] == "stop":
                    return
                if message[0] == "prepare":
                    spec = message[1]
                    if spec not in steps:
                        steps[spec] = env.workload(spec)
                    for _ in range(5):  # warm the connection, psycopg's prepared statements
                        steps[spec]()
                    pipe.send(("ok", None))
                elif message[0] == "run":
                    _, spec, start, end = message
                    pipe.send(("ok", _timed(steps[spec], start, end)))
            except Exception:
                pipe.send(("error", traceback.format_exc()))
    finally:
        env.close()


def _timed(step: Callable[[], int], start: float, end: float) -> tuple[int, float, float]:
    """Run ``step`` from ``start`` until ``end`` (monotonic clock, shared by the processes)."""
    delay = start - time.monotonic()
    if delay > 0:
        time.sleep(delay)
    cpu0 = time.process_time()
    jobs = 0
    now = time.monotonic()
    while now < end:
        jobs += step()
        now = time.monotonic()
    return jobs, now - start, time.process_time() - cpu0


# -- rounds and medians --------------------------------------------------------------------------


@dataclass
class Series:
    """Every round of one spec at one process count."""

    spec: str
    processes: int
    rounds: list[RoundResult] = field(default_factory=list)

    @property
    def rates(self) -> list[float]:
        return [r.rate for r in self.rounds]

    @property
    def median(self) -> float:
        return statistics.median(self.rates)

    @property
    def cpu_us(self) -> float:
        return statistics.median(r.cpu_us_per_job for r in self.rounds)


def interleaved(
    pool: WorkerPool,
    specs: Sequence[str],
    *,
    rounds: int,
    duration: float,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Series]:
    """Run every spec once per round, in an order that rotates from round to round."""
    series = {spec: Series(spec, pool.size) for spec in specs}
    for number in range(rounds):
        shift = number % len(specs)
        for spec in [*specs[shift:], *specs[:shift]]:
            result = pool.run(spec, duration)
            series[spec].rounds.append(result)
            if progress is not None:
                progress(
                    f"  {pool.size:>2} proc  round {number + 1}/{rounds}  {spec:<28} "
                    f"{result.rate:>9,.0f} jobs/s"
                )
    return series


def paired_ratio(a: Series, b: Series) -> float:
    """Median over rounds of a's rate / b's rate in the same round (the two ran side by side)."""
    return statistics.median(x / y for x, y in zip(a.rates, b.rates, strict=True) if y > 0)


# -- round trips ---------------------------------------------------------------------------------


@dataclass
class TripCount:
    """Statements (SQLAlchemy cursor executions) and wire round trips of some jobs."""

    jobs: int
    statements: int
    wire: int | None  # None when libpq tracing is not available

    @property
    def statements_per_job(self) -> float:
        return self.statements / self.jobs

    @property
    def wire_per_job(self) -> float | None:
        return None if self.wire is None else self.wire / self.jobs


class WireTrace:
    """Counts the client's round trips on psycopg connections from libpq's protocol trace.

    Every simple ``Query`` message (``BEGIN``, ``COMMIT``, the pool's ping) and every ``Sync`` (the
    end of one extended-protocol statement) waits for the server's ReadyForQuery: one round trip.
    Each traced connection writes to its own temporary file.
    """

    _MESSAGE = re.compile(r"\tF\t\d+\t(\w+)")

    def __init__(self) -> None:
        self._traced: list[tuple[Any, int, str]] = []
        self._paths: list[str] = []
        self.available = True

    def attach(self, dbapi_connection: Any) -> None:
        if any(c is dbapi_connection for c, _, _ in self._traced):
            return
        fd, path = tempfile.mkstemp(prefix="opsrun_bench_trace_")
        self._paths.append(path)
        try:
            dbapi_connection.pgconn.trace(fd)
        except Exception:  # a libpq without PQtrace: say n/a rather than guess
            os.close(fd)
            self.available = False
            return
        self._traced.append((dbapi_connection, fd, path))

    def attach_engine(self, engine: Engine) -> Callable[[], None]:
        def on_checkout(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
            self.attach(dbapi_connection)

        event.listen(engine, "checkout", on_checkout)
        with engine.connect():  # traces the pooled connection before the first counted checkout
            pass
        return lambda: event.remove(engine, "checkout", on_checkout)

    def count(self) -> int | None:
        """Round trips since the connections were attached; stops tracing them."""
        total = 0
        for conn, fd, path in self._traced:
            with suppress(Exception):
                conn.pgconn.untrace()  # flushes libpq's buffer
            with suppress(OSError):
                os.close(fd)
            with open(path, encoding="utf-8", errors="replace") as fh:
                messages = self._MESSAGE.findall(fh.read())
            total += sum(1 for m in messages if m in ("Query", "Sync"))
        self._traced.clear()
        return total if self.available else None

    def close(self) -> None:
        for path in self._paths:
            with suppress(OSError):
                os.unlink(path)


@contextmanager
def statement_counter(engine: Engine) -> Iterator[list[int]]:
    """Counts SQLAlchemy cursor executions on ``engine`` (``counter[0]``).

    Transaction control that SQLite's engine issues itself (``BEGIN IMMEDIATE``) is not counted;
    on Postgres the driver sends BEGIN and COMMIT without a cursor (see :class:`WireTrace`).
    """
    counter = [0]

    def count(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if not statement.lstrip().upper().startswith(("BEGIN", "COMMIT", "ROLLBACK")):
            counter[0] += 1

    event.listen(engine, "before_cursor_execute", count)
    try:
        yield counter
    finally:
        event.remove(engine, "before_cursor_execute", count)


# -- the machine ---------------------------------------------------------------------------------


def machine_description(server: Engine | None) -> dict[str, str]:
    """nproc, CPU model, Postgres, Python, SQLAlchemy, psycopg and SQLite versions."""
    import psycopg
    import sqlalchemy

    cpu = platform.processor() or "unknown"
    with suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as fh:
        for line in fh:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    postgres = "n/a"
    if server is not None:
        with suppress(Exception), server.connect() as conn:
            postgres = conn.exec_driver_sql("SHOW server_version").scalar_one()
    load = "n/a"
    with suppress(OSError):
        load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return {
        "nproc": str(os.cpu_count()),
        "cpu": cpu,
        "postgres": postgres,
        "python": platform.python_version(),
        "sqlalchemy": sqlalchemy.__version__,
        "psycopg": psycopg.__version__,
        "sqlite": sqlite3.sqlite_version,
        "load average": load,
        "server": safe_url(server.url) if server is not None else "n/a",
    }


def fmt_rate(value: float) -> str:
    return f"{value:,.0f}"


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A plain-text table (also valid Markdown)."""
    text_rows = [[str(c) for c in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in text_rows)]) for i, h in enumerate(headers)]
    lines = [
        "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |",
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
    ]
    lines += [
        "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"
        for row in text_rows
    ]
    return "\n".join(lines)
