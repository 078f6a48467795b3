"""The ``opsrun`` command line: look into the ledger, explain a dispatch, run the housekeeping.

::

    opsrun [--database-url URL] [-v] COMMAND ...
    python -m opsrun_core ...            # the same, without the console script

The database is ``--database-url``, else the environment variable ``OPSRUN_DATABASE_URL``, else
``sqlite:///opsrun.db`` (a file in the current directory). Passwords in it are never printed.

Commands
--------
``opsrun migrate``
    Apply the packaged migrations (idempotent; creates the SQLite file if needed) and print the
    revision the database is at.
``opsrun runs [FILTERS] [--limit N] [--json]``
    Runs newest first (50 unless ``--limit``), filtered by ``--type``, ``--workspace``,
    ``--tenant``, ``--status`` and ``--outcome`` (both repeatable) and ``--since``, which takes
    an ISO-8601 datetime (naive means UTC) or a duration back from now (``90s``, ``15m``, ``2h``,
    ``1d``, ``1w``, ``1h30m``).
    ``--json`` prints a JSON array of runs (timestamps ISO-8601) for scripts.
``opsrun show RUN_ID [--json]``
    One run with every field, its summary counts and its failure summary.
``opsrun why TYPE --workspace W [--tenant T] [--cooldown D] [KEY=VALUE | KEY:=JSON]... [--json]``
    What a dispatch of that identity would do right now, without writing anything: which active
    run blocks it (status, attempts, lease age and expiry), which completed run keeps it in
    cooldown and until when, or that it would create a new run. ``KEY=VALUE`` gives a string,
    ``KEY:=JSON`` a typed value (``policy_id:=42``, ``dry_run:=true``, ``ids:='[1,2]'``): the
    identity must hold exactly the values the host app dispatches, types included, or its
    fingerprint differs. The cooldown comes from the catalog, which host apps fill through their
    plugins' ``opsrun_register_operations`` (the command line loads the installed ``opsrun``
    plugins too); ``--cooldown`` says it when no plugin does.
``opsrun reconcile (--workspace W | --all) [--grace D] [--batch-size N] [--initiator NAME]``
    The housekeeping (``Ledger.reconcile``): finishes runs whose lease expired and queued runs never
    started, as a tracked ``ops.reconcile_adapter_runs`` run per workspace, and prints its counts.
    When another reconcile already holds the workspace, it says so and does nothing (exit 0).
    ``--all`` covers every workspace with active runs, with a progress bar on a terminal, and goes
    on past a workspace whose reconcile fails.

Exit codes
----------
====  ==========================================================================================
0     success, including "another reconcile was already running"
1     a reconcile failed (raised, or its run ended ``failed``), or an unexpected error
2     usage error: an unknown option, a missing argument, a malformed value
3     not found: no run with that id
4     database or configuration error: an invalid or unreachable ``--database-url``, no ledger
      there yet (run ``opsrun migrate``), a broken plugin, a statement the database refused
====  ==========================================================================================

Errors are one line on stderr, ``opsrun: error: ...``, never a traceback (set
``OPSRUN_TRACEBACK=1`` to see one for an unexpected error). ``-v`` shows the library's warnings and
progress logs on stderr, ``-vv`` its debug logs.

Embedding: a host app can run these commands with its own plugins or catalog by passing
``obj=CliState(plugin_manager=..., catalog=...)`` to ``cli.main()`` (or to click's ``CliRunner``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from enum import Enum
from pathlib import Path
from typing import Any, TextIO

import click
import pluggy
from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text
from sqlalchemy import Engine, select
from sqlalchemy.exc import SQLAlchemyError

from . import migrate
from .catalog import OperationCatalog, OperationSpec
from .db import check_connection, make_engine, safe_url
from .enums import Outcome, RunStatus
from .errors import (
    ConfigurationError,
    DatabaseError,
    InvalidInput,
    OpsrunError,
    PluginError,
    RunNotFound,
)
from .ledger import Ledger, scope_id
from .models import OperationRun
from .reconcile import DEFAULT_BATCH_SIZE, DEFAULT_GRACE, ReconcileError, ReconcileReport
from .sanitize import sanitize_message
from .sql import RUN_COLUMNS
from .values import ClaimDecision, Identity, Run

__all__ = [
    "DEFAULT_DATABASE_URL",
    "ENV_DATABASE_URL",
    "EXIT_CONFIG",
    "EXIT_FAILED",
    "EXIT_NOT_FOUND",
    "EXIT_OK",
    "EXIT_USAGE",
    "CliError",
    "CliState",
    "cli",
    "cli_error",
    "main",
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

#: width of tables when stdout is not a terminal (a pipe, a file, a test), so rows never wrap
PIPE_WIDTH = 200
DEFAULT_LIMIT = 50
COUNT_COLUMNS = ("total", "processed", "failed", "reconciled", "alive")

_STATUS_STYLE = {"queued": "dim", "running": "cyan", "completed": ""}
_OUTCOME_STYLE = {
    "pending": "dim",
    "succeeded": "green",
    "partially_succeeded": "yellow",
    "failed": "red",
    "cancelled": "magenta",
}


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


class _OpsrunGroup(click.Group):
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
        if require_ledger and _revision(self._ledger.engine) is None:
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


def _revision(engine: Engine) -> str | None:
    try:
        return migrate.current(engine)
    except SQLAlchemyError as exc:
        raise DatabaseError(
            f"cannot read the ledger's migration revision ({type(exc).__name__}); check {SETTING}"
        ) from exc


def _state(ctx: click.Context) -> CliState:
    state = ctx.find_object(CliState)
    assert state is not None, "the opsrun group creates the state"
    return state


# --------------------------------------------------------------------------- parameter types

_DURATION_PART = re.compile(r"(\d+)\s*([wdhms])", re.IGNORECASE)
_DURATION = re.compile(r"^\s*(?:\d+\s*[wdhms]\s*)+$", re.IGNORECASE)
_UNIT_SECONDS = {"w": 604800, "d": 86400, "h": 3600, "m": 60, "s": 1}


def parse_duration(text: str) -> timedelta:
    """``"15m"`` -> 15 minutes: units ``w d h m s``, combined as ``1h30m``; bare numbers: seconds.

    :raises ValueError: not a duration.
    """
    value = text.strip()
    if value.isdigit():
        return timedelta(seconds=int(value))
    if not _DURATION.match(value):
        raise ValueError(f"{text!r} is not a duration such as 30s, 15m, 2h, 1d, 1w or 1h30m")
    seconds = sum(int(n) * _UNIT_SECONDS[u.lower()] for n, u in _DURATION_PART.findall(value))
    return timedelta(seconds=seconds)


def parse_datetime(text: str) -> datetime:
    """An ISO-8601 datetime (``2026-01-01``, ``2026-01-01T12:00:00Z``); naive means UTC.

    :raises ValueError: not an ISO-8601 datetime.
    """
    value = text.strip()
    if value[-1:] in ("Z", "z"):
        value = value[:-1] + "+00:00"
    when = datetime.fromisoformat(value)
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when.astimezone(timezone.utc)


def _duration_option(
    ctx: click.Context, param: click.Parameter, value: str | None
) -> timedelta | None:
    if value is None:
        return None
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx=ctx, param=param) from None


def _since_option(
    ctx: click.Context, param: click.Parameter, value: str | None
) -> datetime | timedelta | None:
    """An ISO-8601 datetime, or a duration back from the ledger's now (a :class:`timedelta`)."""
    if value is None:
        return None
    try:
        return parse_duration(value)
    except ValueError:
        pass
    try:
        return parse_datetime(value)
    except ValueError:
        raise click.BadParameter(
            f"{value!r} is neither an ISO-8601 datetime (2026-01-01T12:00:00Z) nor a duration "
            "back from now (15m, 2h, 1d)",
            ctx=ctx,
            param=param,
        ) from None


def parse_identity(items: Sequence[str]) -> dict[str, Any]:
    """``["policy_id=p1", "limit:=10"]`` -> ``{"policy_id": "p1", "limit": 10}``.

    :raises ValueError: an item without ``=``, an empty or repeated key, or bad JSON after ``:=``.
    """
    inputs: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"{item!r} is not KEY=VALUE or KEY:=JSON")
        typed = key.endswith(":")
        if typed:
            key = key[:-1]
        if not key:
            raise ValueError(f"{item!r} has an empty key")
        if key in inputs:
            raise ValueError(f"identity key {key!r} is given twice")
        if typed:
            try:
                inputs[key] = json.loads(raw)
            except ValueError:
                raise ValueError(
                    f'{item!r}: the value after := must be JSON (42, true, null, "text", [1, 2])'
                ) from None
        else:
            inputs[key] = raw
    return inputs


def _identity_argument(ctx: click.Context, param: click.Parameter, value: Any) -> dict[str, Any]:
    try:
        return parse_identity(list(value or ()))
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx=ctx, param=param) from None


# --------------------------------------------------------------------------- output helpers


def _console(*, err: bool = False) -> Console:
    """A rich console on stdout (or stderr); wide and plain when it is not a terminal."""
    stream: TextIO = sys.stderr if err else sys.stdout
    try:
        terminal = stream.isatty()
    except (AttributeError, ValueError):
        terminal = False
    return Console(
        file=stream,
        width=None if terminal else PIPE_WIDTH,
        highlight=False,
        soft_wrap=not terminal,
    )


def _when(value: datetime | None) -> str:
    if value is None:
        return "-"
    return value.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _span(delta: timedelta) -> str:
    """A short human duration: ``2h 5m``, ``3m 20s``, ``329d 15h``."""
    seconds = int(abs(delta.total_seconds()))
    parts: list[str] = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size or (unit == "s" and not parts):
            parts.append(f"{seconds // size}{unit}")
            seconds %= size
        if len(parts) == 2:
            break
    return " ".join(parts)


def _relative(value: datetime, now: datetime) -> str:
    delta = value - now
    if abs(delta) < timedelta(seconds=1):
        return "now"
    return f"in {_span(delta)}" if delta > timedelta(0) else f"{_span(delta)} ago"


def _counts(counts: Mapping[str, Any] | None) -> str:
    if not counts:
        return "-"
    return "/".join(str(counts.get(key, "-")) for key in ("total", "processed", "failed"))


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, timedelta):
        return value.total_seconds()
    return value


def run_json(run: Run, label: str) -> dict[str, Any]:
    """A run as a JSON object: every field, the catalog ``label`` after ``type``, ISO timestamps."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(run):
        out[f.name] = _jsonable(getattr(run, f.name))
        if f.name == "type":
            out["label"] = label
    return out


def _echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, ensure_ascii=False, default=_jsonable))


def _styled(value: str, styles: Mapping[str, str]) -> Text:
    return Text(value, style=styles.get(value, ""))


def _compact_json(value: Any) -> str:
    if value is None:
        return "-"
    return json.dumps(value, ensure_ascii=False, sort_keys=True)


# --------------------------------------------------------------------------- the group


@click.group(cls=_OpsrunGroup, context_settings={"help_option_names": ["-h", "--help"]})
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
    """Inspect the opsrun ledger of background-job runs, and run its housekeeping.

    The database is --database-url, else the environment variable OPSRUN_DATABASE_URL, else
    sqlite:///opsrun.db in the current directory. Create the ledger there with `opsrun migrate`.

    \b
    Exit codes (scripts can rely on them):
      0  success, including "another reconcile was already running"
      1  a reconcile failed, or an unexpected error
      2  usage error: unknown option, missing argument, malformed value
      3  not found: no run with that id
      4  database or configuration error: invalid or unreachable
         --database-url / OPSRUN_DATABASE_URL, no ledger yet (run
         `opsrun migrate`), a broken plugin

    Errors are one line on stderr: "opsrun: error: ...".
    """
    state = ctx.ensure_object(CliState)
    state.database_url = database_url
    ctx.call_on_close(state.close)
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


# --------------------------------------------------------------------------- migrate


@cli.command("migrate")
@click.pass_context
def migrate_command(ctx: click.Context) -> None:
    """Create or upgrade the ledger: apply the packaged migrations.

    Idempotent: running it on an up-to-date database changes nothing. The migrations keep their
    own version table (opsrun_alembic_version), apart from the host app's Alembic history.
    """
    ledger = _state(ctx).ledger(require_ledger=False)
    before = _revision(ledger.engine)
    ledger.upgrade()
    after = _revision(ledger.engine)
    where = safe_url(ledger.engine.url)
    if before == after:
        click.echo(f"{where} is already at revision {after}; nothing to do.")
    else:
        click.echo(f"Migrated {where} from {before or 'an empty database'} to revision {after}.")


# --------------------------------------------------------------------------- runs


@cli.command()
@click.option("--type", "type_", metavar="TYPE", help="Only this operation type.")
@click.option("--workspace", metavar="ID", help="Only this workspace.")
@click.option("--tenant", metavar="ID", help="Only this tenant.")
@click.option(
    "--status",
    type=click.Choice([s.value for s in RunStatus]),
    multiple=True,
    help="Only runs in this status; repeat for several.",
)
@click.option(
    "--outcome",
    type=click.Choice([o.value for o in Outcome]),
    multiple=True,
    help="Only runs with this outcome; repeat for several.",
)
@click.option(
    "--since",
    callback=_since_option,
    metavar="WHEN",
    help="Only runs created since WHEN: an ISO-8601 datetime (naive means UTC) or a duration "
    "back from now (90s, 15m, 2h, 1d, 1w).",
)
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    metavar="N",
    default=DEFAULT_LIMIT,
    show_default=True,
    help="At most this many runs.",
)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array for scripts.")
@click.pass_context
def runs(
    ctx: click.Context,
    type_: str | None,
    workspace: str | None,
    tenant: str | None,
    status: tuple[str, ...],
    outcome: tuple[str, ...],
    since: datetime | timedelta | None,
    limit: int,
    as_json: bool,
) -> None:
    """List runs, newest first.

    Columns: id, type and its catalog label, workspace, tenant, status, outcome, attempts,
    counts (total/processed/failed, once completed) and when it was created.
    """
    ledger = _state(ctx).ledger()
    if isinstance(since, timedelta):
        since = ledger.now() - since
    found = ledger.runs(
        type=type_,
        workspace_id=workspace,
        tenant_id=tenant,
        status=status or None,
        outcome=outcome or None,
        since=since,
        limit=limit,
    )
    if as_json:
        _echo_json([run_json(run, ledger.catalog.label(run.type)) for run in found])
        return
    console = _console()
    if not found:
        console.print("No runs match.")
        return
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    table.add_column("id", justify="right")
    table.add_column("type")
    table.add_column("label")
    table.add_column("workspace")
    table.add_column("tenant")
    table.add_column("status")
    table.add_column("outcome")
    table.add_column("attempts", justify="right")
    table.add_column("counts t/p/f", justify="right")
    table.add_column("created")
    for run in found:
        table.add_row(
            str(run.id),
            Text(run.type),
            Text(ledger.catalog.label(run.type)),
            Text(run.workspace_id),
            Text(run.tenant_id or "-"),
            _styled(run.status.value, _STATUS_STYLE),
            _styled(run.outcome.value, _OUTCOME_STYLE),
            str(run.attempts),
            _counts(run.summary_counts),
            _when(run.created_at),
        )
    console.print(table)


# --------------------------------------------------------------------------- show


@cli.command()
@click.argument("run_id", type=click.IntRange(min=1), metavar="RUN_ID")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object for scripts.")
@click.pass_context
def show(ctx: click.Context, run_id: int, as_json: bool) -> None:
    """Show one run: every field, its summary counts and its failure summary.

    Exits 3 when no run has that id.
    """
    ledger = _state(ctx).ledger()
    run = ledger.get(run_id)
    label = ledger.catalog.label(run.type)
    if as_json:
        _echo_json(run_json(run, label))
        return
    console = _console()
    title = Text(f"Run {run.id}: ", style="bold")
    title.append(f"{label} ({run.type})")
    console.print(title)
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="dim")
    grid.add_column()
    duration = (
        _span(run.completed_at - run.started_at)
        if run.completed_at is not None and run.started_at is not None
        else "-"
    )
    for name, value in (
        ("status", _styled(run.status.value, _STATUS_STYLE)),
        ("outcome", _styled(run.outcome.value, _OUTCOME_STYLE)),
        ("workspace", Text(run.workspace_id)),
        ("tenant", Text(run.tenant_id or "-")),
        ("attempts", Text(str(run.attempts))),
        ("initiator", Text(run.initiator or "-")),
        ("identity", Text(_compact_json(run.identity))),
        ("identity hash", Text(run.identity_hash)),
        ("context", Text(_compact_json(run.context))),
        ("created", Text(_when(run.created_at))),
        ("started", Text(_when(run.started_at))),
        ("heartbeat", Text(_when(run.heartbeat_at))),
        ("lease expires", Text(_when(run.lease_expires_at))),
        ("completed", Text(_when(run.completed_at))),
        ("updated", Text(_when(run.updated_at))),
        ("duration", Text(duration)),
    ):
        grid.add_row(name, value)
    console.print(grid)
    console.print()
    console.print(Text("Summary counts", style="bold"))
    if run.summary_counts:
        counts = Table.grid(padding=(0, 2))
        counts.add_column(style="dim")
        counts.add_column(justify="right")
        main_keys = [key for key in ("total", "processed", "failed") if key in run.summary_counts]
        others = sorted(key for key in run.summary_counts if key not in main_keys)
        for key in (*main_keys, *others):
            counts.add_row(Text(key), Text(str(run.summary_counts[key])))
        console.print(counts)
    else:
        console.print("  none yet (written when the run completes)")
    console.print()
    console.print(Text("Failures", style="bold"))
    if run.failure_summary:
        failures = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
        failures.add_column("code", no_wrap=True)
        failures.add_column("message", overflow="fold")
        for entry in run.failure_summary:
            failures.add_row(Text(str(entry.get("code", ""))), Text(str(entry.get("message", ""))))
        console.print(failures)
    else:
        console.print("  none")


# --------------------------------------------------------------------------- why


@dataclass(frozen=True)
class _Explanation:
    decision: ClaimDecision
    spec: OperationSpec
    #: where the cooldown came from: "catalog", "--cooldown" or "unregistered" (no spec)
    cooldown_source: str
    identity: Identity
    active: Run | None
    latest: Run | None
    now: datetime

    @property
    def cooldown_until(self) -> datetime | None:
        run = self.decision.run
        if (
            self.decision.action != "reuse_cooldown"
            or run is None
            or run.completed_at is None
            or self.spec.cooldown is None
        ):
            return None
        return run.completed_at + self.spec.cooldown


def _read_state(ledger: Ledger, type_: str, identity_hash: str) -> tuple[Run | None, Run | None]:
    """The identity's active run and latest completed run (a read; nothing is written)."""
    table = OperationRun.__table__
    columns = [table.c[name] for name in RUN_COLUMNS]
    same = (table.c.type == type_) & (table.c.identity_hash == identity_hash)
    active_query = select(*columns).where(
        same, table.c.status.in_([RunStatus.QUEUED.value, RunStatus.RUNNING.value])
    )
    latest_query = (
        select(*columns)
        .where(same, table.c.status == RunStatus.COMPLETED.value)
        .order_by(table.c.completed_at.desc(), table.c.id.desc())
        .limit(1)
    )
    with _translate("reading the identity's runs"), ledger.engine.connect() as conn:
        active = conn.execute(active_query).mappings().first()
        latest = conn.execute(latest_query).mappings().first()
    return (
        Run.from_row(active) if active is not None else None,
        Run.from_row(latest) if latest is not None else None,
    )


@contextmanager
def _translate(what: str) -> Iterator[None]:
    try:
        yield
    except SQLAlchemyError as exc:
        reason = type(getattr(exc, "orig", None) or exc).__name__
        raise DatabaseError(
            f"{what} failed in the database ({reason}); check {SETTING} and that `opsrun migrate` "
            "has run"
        ) from exc


@cli.command()
@click.argument("operation_type", metavar="TYPE")
@click.argument(
    "identity",
    nargs=-1,
    metavar="[KEY=VALUE | KEY:=JSON]...",
    callback=_identity_argument,
)
@click.option("--workspace", required=True, metavar="ID", help="The dispatch's workspace.")
@click.option("--tenant", metavar="ID", help="The dispatch's tenant (omit: workspace-scoped).")
@click.option(
    "--cooldown",
    callback=_duration_option,
    metavar="DURATION",
    help="The operation's cooldown (15m, 2h; 0 for none), in place of the catalog's, which "
    "knows only operations that installed plugins register.",
)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object for scripts.")
@click.pass_context
def why(
    ctx: click.Context,
    operation_type: str,
    identity: dict[str, Any],
    workspace: str,
    tenant: str | None,
    cooldown: timedelta | None,
    as_json: bool,
) -> None:
    """Explain what a dispatch of TYPE with this identity would do right now.

    Writes nothing. It computes the identity's fingerprint as a dispatch does, reads the identity's
    active run and latest completed run, and asks the claim policy, then says which active run
    blocks a new one (status, attempts, lease age and expiry), which completed run keeps it in
    cooldown and until when, or that a dispatch would create a new run.

    \b
    Identity inputs, exactly as the host app dispatches them:
      KEY=VALUE    a string:        policy_id=p1
      KEY:=JSON    a typed value:   policy_id:=42  dry_run:=true  ids:='[1, 2]'
    A value of another type (42 against "42") is another fingerprint.

    The cooldown comes from the operation catalog: host apps register their operations through a
    plugin's opsrun_register_operations hook (installed plugins of the "opsrun" entry-point group
    load here too). Without one, give the operation's cooldown with --cooldown.
    """
    ledger = _state(ctx).ledger()
    spec = ledger.catalog.spec(operation_type)
    source = "catalog" if operation_type in ledger.catalog else "unregistered"
    if cooldown is not None:
        spec = dataclasses.replace(spec, cooldown=cooldown if cooldown > timedelta(0) else None)
        source = "--cooldown"
    workspace_id = scope_id(workspace, name="--workspace")
    tenant_id = scope_id(tenant, name="--tenant", nullable=True)
    assert workspace_id is not None
    ident = ledger.pm.hook.opsrun_identity(
        spec=spec, workspace_id=workspace_id, tenant_id=tenant_id, inputs=identity
    )
    if not isinstance(ident, Identity):
        raise PluginError(
            "no plugin answered opsrun_identity with an Identity; is the built-in 'identity' "
            "plugin blocked (OPSRUN_DISABLE_PLUGINS)?"
        )
    active, latest = _read_state(ledger, spec.type, ident.hash)
    now = ledger.now()
    decision = ledger.pm.hook.opsrun_claim(
        spec=spec, identity=ident, active=active, latest_completed=latest, now=now
    )
    if not isinstance(decision, ClaimDecision):
        raise PluginError(
            "no plugin answered opsrun_claim with a ClaimDecision; is the built-in 'dedupe' "
            "plugin blocked (OPSRUN_DISABLE_PLUGINS)?"
        )
    explained = _Explanation(decision, spec, source, ident, active, latest, now)
    if as_json:
        _echo_json(_why_json(ledger, explained, workspace_id, tenant_id))
    else:
        _print_why(ledger, explained, workspace_id, tenant_id)


def _why_json(
    ledger: Ledger, ex: _Explanation, workspace_id: str, tenant_id: str | None
) -> dict[str, Any]:
    run = ex.decision.run
    lease = run.lease_expires_at if run is not None else None
    return {
        "type": ex.spec.type,
        "workspace_id": workspace_id,
        "tenant_id": tenant_id,
        "identity": ex.identity.inputs,
        "identity_hash": ex.identity.hash,
        "now": ex.now,
        "cooldown_seconds": ex.spec.cooldown,
        "cooldown_source": ex.cooldown_source,
        "decision": ex.decision.action,
        "reason": ex.decision.reason,
        "run": run_json(run, ledger.catalog.label(run.type)) if run is not None else None,
        "active_run_id": ex.active.id if ex.active is not None else None,
        "latest_completed_run_id": ex.latest.id if ex.latest is not None else None,
        "cooldown_until": ex.cooldown_until,
        "lease_expired": (lease <= ex.now) if lease is not None else None,
    }


def _print_why(ledger: Ledger, ex: _Explanation, workspace_id: str, tenant_id: str | None) -> None:
    console = _console()
    now = ex.now
    scope = f"workspace {workspace_id}" + (f", tenant {tenant_id}" if tenant_id else "")
    head = Text(f"{ex.spec.type}", style="bold")
    head.append(f" ({ledger.catalog.label(ex.spec.type)}) in {scope}", style="")
    console.print(head)
    console.print(Text(f"identity {_compact_json(ex.identity.inputs)}  hash {ex.identity.hash}"))
    if ex.spec.cooldown is not None:
        console.print(Text(f"cooldown {_span(ex.spec.cooldown)} (from {ex.cooldown_source})"))
    elif ex.cooldown_source == "--cooldown":
        console.print(Text("cooldown none (from --cooldown)"))
    elif ex.cooldown_source == "catalog":
        console.print(Text("cooldown none (from the catalog)"))
    else:
        console.print(
            Text(
                "cooldown none (the operation is not in the catalog; give --cooldown if the host "
                "app sets one)"
            )
        )
    console.print(Text(f"now {_when(now)}"))
    console.print()
    action = ex.decision.action
    run = ex.decision.run
    lines: list[str] = []
    if action == "reuse_active":
        assert run is not None
        verdict = Text("A dispatch now would REUSE the active ", style="bold yellow")
        verdict.append(f"run {run.id}: it blocks a new run.")
        lines.append(
            f"run {run.id}: {run.status.value}, {run.attempts} attempt(s), created "
            f"{_when(run.created_at)} ({_relative(run.created_at, now)})"
        )
        if run.status is RunStatus.QUEUED:
            lines.append("queued: no worker has claimed it yet")
        else:
            if run.heartbeat_at is not None:
                lines.append(
                    f"lease age {_span(now - run.heartbeat_at)} (taken or last renewed "
                    f"{_when(run.heartbeat_at)})"
                )
            expires = run.lease_expires_at
            if expires is None:
                lines.append("lease: none recorded")
            elif expires > now:
                lines.append(f"lease expires {_when(expires)} ({_relative(expires, now)})")
            else:
                lines.append(
                    f"lease expired {_when(expires)} ({_relative(expires, now)}): its worker is "
                    "probably gone; the next claim takes it over, or "
                    f"`opsrun reconcile --workspace {run.workspace_id}` finishes it"
                )
    elif action == "reuse_cooldown":
        assert run is not None
        verdict = Text("A dispatch now would REUSE completed ", style="bold yellow")
        verdict.append(f"run {run.id}: the identity is in cooldown.")
        lines.append(
            f"run {run.id}: {run.outcome.value}, completed {_when(run.completed_at)}"
            + (f" ({_relative(run.completed_at, now)})" if run.completed_at else "")
        )
        until = ex.cooldown_until
        if until is not None:
            lines.append(f"cooldown until {_when(until)} ({_relative(until, now)})")
        else:
            lines.append("a claim policy plugin keeps it in cooldown")
    elif action == "create":
        verdict = Text("A dispatch now would CREATE a new run.", style="bold green")
        if ex.active is not None:
            lines.append(f"a claim policy plugin chose to create despite active run {ex.active.id}")
        latest = ex.latest
        if latest is None:
            none_active = ", and none is active" if ex.active is None else ""
            lines.append(f"no run of this identity has completed yet{none_active}")
        else:
            done = (
                f"latest completed run {latest.id} ({latest.outcome.value}, "
                f"{_when(latest.completed_at)})"
            )
            if latest.outcome in (Outcome.FAILED, Outcome.CANCELLED):
                lines.append(f"{done}: a {latest.outcome.value} run starts no cooldown")
            elif ex.spec.cooldown is None:
                lines.append(f"{done}: the operation has no cooldown")
            elif latest.completed_at is not None:
                ended = latest.completed_at + ex.spec.cooldown
                lines.append(f"{done}: its cooldown ended {_when(ended)} ({_relative(ended, now)})")
            else:
                lines.append(done)
    else:
        verdict = Text("A dispatch now would be REJECTED by the claim policy.", style="bold red")
        lines.append(f"reason: {ex.decision.reason or 'none given'}")
    console.print(verdict)
    for line in lines:
        console.print(Text(f"  {line}"))


# --------------------------------------------------------------------------- reconcile


@dataclass(frozen=True)
class _WorkspaceResult:
    workspace: str
    report: ReconcileReport | None
    error: ReconcileError | None = None

    @property
    def failed(self) -> bool:
        if self.error is not None:
            return True
        assert self.report is not None
        return self.report.did_work and self.report.run.outcome is Outcome.FAILED


@cli.command()
@click.option("--workspace", metavar="ID", help="Reconcile this workspace.")
@click.option("--all", "all_", is_flag=True, help="Reconcile every workspace that has active runs.")
@click.option(
    "--grace",
    callback=_duration_option,
    default=f"{int(DEFAULT_GRACE.total_seconds())}s",
    show_default=True,
    metavar="DURATION",
    help="A lease must have expired this long ago before its run counts as stale.",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    metavar="N",
    default=DEFAULT_BATCH_SIZE,
    show_default=True,
    help="Candidates per transaction.",
)
@click.option(
    "--initiator",
    default="cli",
    show_default=True,
    metavar="NAME",
    help="Recorded as the reconcile run's initiator (e.g. scheduler).",
)
@click.pass_context
def reconcile(
    ctx: click.Context,
    workspace: str | None,
    all_: bool,
    grace: timedelta,
    batch_size: int,
    initiator: str,
) -> None:
    """Finish stale runs: the housekeeping, tracked as an ops.reconcile_adapter_runs run.

    Give exactly one of --workspace ID or --all. Running runs whose lease expired more than
    --grace ago end failed with code ops.run.lease_expired; queued runs never started within
    their operation's limit end failed with ops.run.never_started; a plugin that can see the job
    system may say a run is still alive. Prints, per workspace, the counts: total candidates,
    processed, failed (could not be judged or changed meanwhile), reconciled, alive.

    Safe to run from cron or several schedulers at once: the database lets one reconcile of a
    workspace work at a time; another one says "already running", does nothing and exits 0.
    Exits 1 when a reconcile fails (its run is recorded failed); --all goes on with the other
    workspaces first.
    """
    if (workspace is None) == (not all_):
        raise click.UsageError("give exactly one of --workspace ID or --all", ctx=ctx)
    ledger = _state(ctx).ledger()
    if workspace is not None:
        results = [_reconcile_one(ledger, workspace, grace, batch_size, initiator, single=True)]
    else:
        workspaces = ledger.active_workspaces()
        if not workspaces:
            _console().print("No workspace has active runs; nothing to reconcile.")
            return
        results = _reconcile_all(ledger, workspaces, grace, batch_size, initiator)
    _print_reconcile(results)
    failed = [r for r in results if r.failed]
    for result in failed:
        if result.error is not None:
            CliError(str(result.error)).show()
        else:
            assert result.report is not None
            run = result.report.run
            CliError(
                f"reconcile of workspace {result.workspace!r} could not finish its stale runs "
                f"(run {run.id} ended failed); see `opsrun show {run.id}`, and -v for why"
            ).show()
    if failed:
        ctx.exit(EXIT_FAILED)


def _reconcile_one(
    ledger: Ledger,
    workspace: str,
    grace: timedelta,
    batch_size: int,
    initiator: str,
    *,
    single: bool = False,
) -> _WorkspaceResult:
    try:
        report = ledger.reconcile_report(
            workspace, grace=grace, batch_size=batch_size, initiator=initiator
        )
    except ReconcileError as exc:
        if single:
            raise
        return _WorkspaceResult(workspace, None, exc)
    return _WorkspaceResult(report.run.workspace_id, report)


def _reconcile_all(
    ledger: Ledger, workspaces: list[str], grace: timedelta, batch_size: int, initiator: str
) -> list[_WorkspaceResult]:
    err = _console(err=True)
    results = []
    with Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=True,
        disable=not err.is_terminal,
    ) as progress:
        task = progress.add_task("reconciling", total=len(workspaces))
        for workspace in workspaces:
            progress.update(task, description=f"workspace {workspace}")
            results.append(_reconcile_one(ledger, workspace, grace, batch_size, initiator))
            progress.advance(task)
    return results


def _print_reconcile(results: list[_WorkspaceResult]) -> None:
    console = _console()
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    table.add_column("workspace")
    table.add_column("run", justify="right")
    table.add_column("result")
    table.add_column("outcome")
    for name in COUNT_COLUMNS:
        table.add_column(name, justify="right")
    notes: list[str] = []
    for result in results:
        if result.error is not None:
            run = result.error.run
            table.add_row(
                Text(result.workspace),
                str(run.id) if run is not None else "-",
                Text("error", style="red"),
                _styled("failed", _OUTCOME_STYLE),
                *("-" for _ in COUNT_COLUMNS),
            )
            continue
        assert result.report is not None
        run = result.report.run
        if not result.report.did_work:
            table.add_row(
                Text(result.workspace),
                str(run.id),
                Text("already running", style="yellow"),
                _styled(run.outcome.value, _OUTCOME_STYLE),
                *("-" for _ in COUNT_COLUMNS),
            )
            notes.append(
                f"workspace {result.workspace}: another reconcile is already running (run "
                f"{run.id}, {run.status.value}, started {_when(run.started_at)}); it does the "
                "work, nothing was done here"
            )
            continue
        counts = run.summary_counts or {}
        table.add_row(
            Text(result.workspace),
            str(run.id),
            Text("done"),
            _styled(run.outcome.value, _OUTCOME_STYLE),
            *(str(counts.get(name, 0)) for name in COUNT_COLUMNS),
        )
    console.print(table)
    for note in notes:
        console.print(Text(note))


# --------------------------------------------------------------------------- entry point


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``opsrun`` script and ``python -m opsrun_core``; exits with its code."""
    cli.main(args=list(argv) if argv is not None else None)
