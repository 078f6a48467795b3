"""Engines: turning a database URL into a SQLAlchemy engine set up for the ledger.

Bad URLs and unreachable servers become :class:`~opsrun_core.errors.ConfigurationError` naming the
setting to fix, never a stack trace from deep inside the driver. Passwords never reach a message.
"""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import Engine, create_engine, event, make_url
from sqlalchemy.engine import URL
from sqlalchemy.exc import ArgumentError, DisconnectionError, NoSuchModuleError, SQLAlchemyError

from .errors import ConfigurationError

__all__ = ["SQLITE_BUSY_TIMEOUT_MS", "check_connection", "make_engine", "safe_url"]

#: how long an SQLite writer waits for a lock before failing with "database is locked"
SQLITE_BUSY_TIMEOUT_MS = 5000


def safe_url(url: str | URL) -> str:
    """The URL as text with any password masked, for messages and report headers."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # a URL too broken to parse: say nothing of its content
        return "<unparseable URL>"


def make_engine(url: str | URL, *, setting: str = "the database URL", **kwargs: Any) -> Engine:
    """Build an engine for ``url``.

    ``postgresql://`` URLs get the psycopg 3 driver unless another is named. SQLite engines use WAL,
    a busy timeout of :data:`SQLITE_BUSY_TIMEOUT_MS` and ``BEGIN IMMEDIATE`` for write transactions
    so that concurrent writers queue instead of failing on lock upgrade.
    """
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError) as exc:
        raise ConfigurationError(
            f"{setting} is not a valid SQLAlchemy URL (expected e.g. 'sqlite:///opsrun.db' or "
            "'postgresql+psycopg://user@host/dbname'); fix the setting"
        ) from exc
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    try:
        if parsed.get_backend_name() == "sqlite":
            engine = create_engine(parsed, **kwargs)
            _configure_sqlite(engine)
        else:
            engine = create_engine(parsed, **kwargs)
            if not kwargs.get("pool_pre_ping"):
                _ping_when_idle(engine)
    except (NoSuchModuleError, ImportError) as exc:
        raise ConfigurationError(
            f"{setting} names a database driver that is not installed ({parsed.drivername!r}); "
            "install opsrun[postgres] for Postgres, or use an sqlite:/// URL"
        ) from exc
    except (ArgumentError, TypeError, ValueError) as exc:
        raise ConfigurationError(
            f"{setting} ({safe_url(parsed)}) cannot be used: {type(exc).__name__}; fix the setting"
        ) from exc
    return engine


def check_connection(engine: Engine, *, setting: str = "the database URL") -> None:
    """Connect once, raising :class:`ConfigurationError` naming ``setting`` if that fails."""
    try:
        with engine.connect():
            pass
    except SQLAlchemyError as exc:
        reason = type(getattr(exc, "orig", None) or exc).__name__
        raise ConfigurationError(
            f"cannot connect to {safe_url(engine.url)} ({reason}); check {setting}, and that the "
            "server is running and accepts this user"
        ) from exc


#: a pooled connection idle longer than this is pinged before use
PING_AFTER_IDLE_S = 10.0


def _ping_when_idle(engine: Engine) -> None:
    """Ping a pooled connection only when it sat idle (pre-ping would cost a round trip per call).

    A busy worker's connection is known good; one that sat idle may have been cut (server
    restart, idle timeout). A failed ping raises DisconnectionError, on which the pool replaces the
    connection. A connection cut while busy fails its statement once (a DatabaseError) and is
    discarded by SQLAlchemy, so the next call reconnects.
    """

    @event.listens_for(engine, "checkin")
    def _checkin(_dbapi_connection: Any, record: Any) -> None:
        record.info["opsrun_idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _checkout(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        since = record.info.get("opsrun_idle_since")
        if since is not None and time.monotonic() - since > PING_AFTER_IDLE_S:
            try:
                alive = engine.dialect.do_ping(dbapi_connection)
            except Exception as exc:
                raise DisconnectionError("idle connection failed its ping") from exc
            if not alive:
                raise DisconnectionError("idle connection failed its ping")


def _configure_sqlite(engine: Engine) -> None:
    # pysqlite's own transaction handling is off: we BEGIN ourselves, IMMEDIATE, so that two writers
    # never both hold a read lock and deadlock on the upgrade to a write lock.
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
            if engine.url.database not in (None, "", ":memory:"):
                cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute("PRAGMA synchronous = FULL")
            cursor.execute("PRAGMA foreign_keys = ON")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")
