"""Procrastinate, the peer opsrun's dispatch is compared with (installed only in the bench env).

Its ``defer`` with a ``queueing_lock`` is the closest thing to opsrun's dispatch dedupe: one queued
job per lock, a second ``defer`` of the same lock raises ``AlreadyEnqueued``. It runs with its sync
psycopg connector on the same Postgres, in the benchmark's database, with its own schema.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def available() -> str | None:
    """Procrastinate's version, or None when it is not installed."""
    try:
        from importlib.metadata import version

        import procrastinate  # noqa: F401
    except ImportError:
        return None
    return version("procrastinate")


def _app(conninfo: str) -> Any:
    import procrastinate

    # one connection per process, like the ledger's engine in these loops; the pool's default
    # check (a ping per checkout) and transaction handling are procrastinate's own defaults
    connector = procrastinate.SyncPsycopgConnector(conninfo=conninfo, min_size=1, max_size=1)
    return procrastinate.App(connector=connector)


def apply_schema(conninfo: str) -> None:
    """Create procrastinate's tables and functions in the benchmark database."""
    app = _app(conninfo)
    app.open()
    try:
        app.schema_manager.apply_schema()
    finally:
        app.close()


def _bench_job(policy_id: str) -> None:  # never runs: the benchmark only defers
    pass


def procrastinate_task(conninfo: str) -> tuple[Any, Callable[[], None]]:
    """An open app's task to defer, and how to close the app."""
    app = _app(conninfo)
    app.open()
    task = app.task(name="bench_job", queue="bench")(_bench_job)
    return task, app.close
