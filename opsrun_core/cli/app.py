"""The ``opsrun`` group: its settings, the state the commands share, and errors as exit codes.

Every command module registers itself on :data:`cli`; nothing below the group prints a traceback
(:class:`OpsrunGroup` turns each error into one ``opsrun: error: ...`` line and an exit code).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import pluggy
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from .. import migrate
from ..catalog import OperationCatalog
from ..db import check_connection, make_engine, safe_url
from ..errors import (
    ConfigurationError,
    DatabaseError,
    InvalidInput,
    OpsrunError,
    PluginError,
    RunNotFound,
)
from ..ledger import Ledger
from ..sanitize import sanitize_message

__all__ = [
    "DEFAULT_DATABASE_URL",
    "ENV_DATABASE_URL",
    "ENV_TRACEBACK",
    "EXIT_CONFIG",
    "EXIT_FAILED",
    "EXIT_NOT_FOUND",
    "EXIT_OK",
    "EXIT_USAGE",
    "SETTING",
    "CliError",
    "CliState",
    "OpsrunGroup",
    "cli",
    "cli_error",
    "main",
    "revision",
    "state",
]

#: where the command line finds its database when neither the option nor the variable is set
DEFAULT_DATABASE_URL = "sqlite:///opsrun.db"
ENV_DATABASE_URL = "OPSRUN_DATABASE_URL"
#: how messages name the database setting
SETTING = f"--database-url / {ENV_DATABASE_URL}"
#: set to 1 to let an unexpected error show its traceback
ENV_TRACEBACK = "OPSRUN_TRACEBACK"

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_CONFIG = 4


# --------------------------------------------------------------------------- errors


class CliError(click.ClickException):
    """An error the command line reports as one line, ``opsrun: error: ...``; exit code 1."""

    exit_code = EXIT_FAILED

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))

    def show(self, file: Any = None) -> None:
        click.echo(f"opsrun: error: {self.format_message()}", file=file, err=file is None)


class _UsageFailure(CliError):
    exit_code = EXIT_USAGE


class _NotFound(CliError):
    exit_code = EXIT_NOT_FOUND


class _ConfigFailure(CliError):
    exit_code = EXIT_CONFIG


def cli_error(error: OpsrunError) -> CliError:
    """The one-line error an :class:`OpsrunError` ends the command with (see the exit codes)."""
    message = str(error)
    if isinstance(error, RunNotFound):
        return _NotFound(message)
    if isinstance(error, (ConfigurationError, DatabaseError, PluginError)):
        return _ConfigFailure(message)
    if isinstance(error, InvalidInput):
        return _UsageFailure(message)
    return CliError(message)


class OpsrunGroup(click.Group):
    """Turns every error below it into one line and an exit code: never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except OpsrunError as exc:
            raise cli_error(exc) from None
        except Exception as exc:
            if os.environ.get(ENV_TRACEBACK, "") not in ("", "0"):
                raise
            raise CliError(
                f"unexpected {type(exc).__name__}: {sanitize_message(exc, max_length=300)} "
                f"(set {ENV_TRACEBACK}=1 to see the traceback)"
            ) from None


# --------------------------------------------------------------------------- state


@dataclass
class CliState:
    """What the commands work on: the database URL and, for embedding, a plugin manager or catalog.

    The ledger is opened on first use and its engine disposed when the command ends.
    """

    database_url: str = DEFAULT_DATABASE_URL
    plugin_manager: pluggy.PluginManager | None = None
    catalog: OperationCatalog | None = None
    _ledger: Ledger | None = field(default=None, init=False, repr=False)

    def ledger(self, *, require_ledger: bool = True) -> Ledger:
        """The ledger on ``database_url``, connected and checked.

        :param require_ledger: fail with "run `opsrun migrate` first" if the database has no
            ledger yet (everything but ``migrate`` wants one).
        :raises ConfigurationError: an invalid or unreachable URL, or no ledger there.
        """
        if self._ledger is None:
            engine = make_engine(self.database_url, setting=SETTING)
            try:
                if require_ledger:
                    _require_sqlite_file(engine)
                check_connection(engine, setting=SETTING)
                self._ledger = Ledger(
                    engine, plugin_manager=self.plugin_manager, catalog=self.catalog
                )
            except BaseException:
                engine.dispose()
                raise
        if require_ledger and revision(self._ledger.engine) is None:
            raise ConfigurationError(
                f"{safe_url(self._ledger.engine.url)} has no opsrun ledger yet; run `opsrun "
                f"migrate` first, or point {SETTING} at the ledger's database"
            )
        return self._ledger

    def close(self) -> None:
        if self._ledger is not None:
            self._ledger.engine.dispose()
            self._ledger = None


def _require_sqlite_file(engine: Engine) -> None:
    """Refuse to create an empty SQLite file just to read from it."""
    url = engine.url
    path = url.database
    if url.get_backend_name() != "sqlite" or not path or path == ":memory:":
        return
    if path.startswith("file:") or str(url.query.get("uri", "")).lower() in ("true", "1"):
        return
    if not Path(path).exists():
        raise ConfigurationError(
            f"no SQLite database at {path}; run `opsrun migrate` first to create the ledger "
            f"there, or point {SETTING} at the ledger's database"
        )


def revision(engine: Engine) -> str | None:
    """The ledger's migration revision, ``None`` when the database has no ledger yet."""
    try:
        return migrate.current(engine)
    except SQLAlchemyError as exc:
        raise DatabaseError(
            f"cannot read the ledger's migration revision ({type(exc).__name__}); check {SETTING}"
        ) from exc


def state(ctx: click.Context) -> CliState:
    """The :class:`CliState` the group put on the context."""
    found = ctx.find_object(CliState)
    assert found is not None, "the opsrun group creates the state"
    return found


# --------------------------------------------------------------------------- the group


@click.group(cls=OpsrunGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--database-url",
    envvar=ENV_DATABASE_URL,
    default=DEFAULT_DATABASE_URL,
    show_default=True,
    show_envvar=True,
    metavar="URL",
    help="SQLAlchemy URL of the ledger's database, e.g. postgresql+psycopg://user@host/db.",
)
@click.option(
    "-v",
    "--verbose",
    count=True,
    help="Show the library's logs on stderr: -v warnings and progress, -vv debug.",
)
@click.version_option(package_name="opsrun", prog_name="opsrun")
@click.pass_context
def cli(ctx: click.Context, database_url: str, verbose: int) -> None:
    """Inspect the opsrun ledger of background-job runs, check it, and run its housekeeping.

    The database is --database-url, else the environment variable OPSRUN_DATABASE_URL, else
    sqlite:///opsrun.db in the current directory. Create the ledger there with `opsrun migrate`;
    `opsrun check` verifies the stored runs keep the ledger's invariants.

    \b
    Exit codes (scripts can rely on them):
      0  success, including "another reconcile was already running"
      1  a reconcile failed, `opsrun check` found violations, or an
         unexpected error
      2  usage error: unknown option, missing argument, malformed value
      3  not found: no run with that id
      4  database or configuration error: invalid or unreachable
         --database-url / OPSRUN_DATABASE_URL, no ledger yet (run
         `opsrun migrate`), a broken plugin

    Errors are one line on stderr: "opsrun: error: ...".
    """
    found = ctx.ensure_object(CliState)
    found.database_url = database_url
    ctx.call_on_close(found.close)
    _route_logs(ctx, verbose)


def _route_logs(ctx: click.Context, verbose: int) -> None:
    """Keep the library's log records off stderr unless asked (-v): errors are ours to report."""
    logger = logging.getLogger("opsrun")
    handler: logging.Handler
    if verbose:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("opsrun: %(levelname)s: %(message)s"))
        level = logging.DEBUG if verbose > 1 else logging.INFO
        handler.setLevel(level)
        previous = logger.level
        logger.setLevel(level)
    else:
        handler = logging.NullHandler()  # stops logging's last-resort handler printing to stderr
        previous = logger.level
    logger.addHandler(handler)

    def restore() -> None:
        logger.removeHandler(handler)
        logger.setLevel(previous)

    ctx.call_on_close(restore)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``opsrun`` script and ``python -m opsrun_core``; exits with its code.

    The commands are registered on :data:`cli` when :mod:`opsrun_core.cli` is imported (which
    importing this module always does first).
    """
    cli.main(args=list(argv) if argv is not None else None)
