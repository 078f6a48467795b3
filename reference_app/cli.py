"""The app's command line: ``python -m reference_app seed|demo|dispatch|work|reconcile|worker``.

It shares the look of the ``opsrun`` command: the database is ``--database-url`` (given before or
after the command), else ``$OPSRUN_DATABASE_URL``, else an SQLite file ``reference_app.db`` in the
current directory; tables are plain and never wrap in a pipe; errors are one line on stderr,
``reference_app: error: ...``, never a traceback (unless ``OPSRUN_TRACEBACK=1``), with the same
exit codes: 0 success, 1 failure, 2 usage error, 3 not found, 4 database or configuration error.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import click
from sqlalchemy import inspect, select
from sqlalchemy.exc import SQLAlchemyError

from opsrun_core import (
    ConfigurationError,
    DatabaseError,
    InvalidInput,
    OpsrunError,
    PluginError,
    Run,
    RunNotFound,
    sanitize_message,
)
from opsrun_core.db import check_connection, safe_url
from opsrun_core.reconcile import ReconcileReport

from .app import (
    BROKER_URL_ENV,
    DATABASE_URL_ENV,
    DEFAULT_BROKER_URL,
    DEFAULT_DATABASE_URL,
    DEFAULT_QUEUE,
    ReferenceApp,
)
from .console import make_console, make_progress, mapping_table, runs_table
from .demo import DEFAULT_LATENCY, DemoReport, demo_directory, inject_faults, load_world, run_demo
from .directory import FakeDirectory
from .identity import ASSIGNMENT_TYPES
from .jobs import AssignmentJobError, JobMessage
from .models import AssignmentBackup, Policy, Tenant, Workspace
from .schema import DATABASE_SETTING
from .seed import DEFAULT_WORKSPACE_SLUG, seed
from .worker import DEFAULT_RETRIES, work

__all__ = [
    "EXIT_CONFIG",
    "EXIT_FAILED",
    "EXIT_NOT_FOUND",
    "EXIT_USAGE",
    "AppCliError",
    "cli",
    "main",
]

F = TypeVar("F", bound=Callable[..., Any])

PROG = "reference_app"
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_CONFIG = 4
#: set to 1 to let an unexpected error show its traceback (as for ``opsrun``)
ENV_TRACEBACK = "OPSRUN_TRACEBACK"
SEED_FIRST = "run `python -m reference_app seed` first"


class AppCliError(click.ClickException):
    """An error reported as one line, ``reference_app: error: ...``, with an exit code."""

    exit_code = EXIT_FAILED

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))

    def show(self, file: Any = None) -> None:
        click.echo(f"{PROG}: error: {self.format_message()}", file=file, err=file is None)


class _UsageFailure(AppCliError):
    exit_code = EXIT_USAGE


class _NotFound(AppCliError):
    exit_code = EXIT_NOT_FOUND


class _ConfigFailure(AppCliError):
    exit_code = EXIT_CONFIG


def _cli_error(exc: Exception) -> AppCliError:
    """The one-line error (and exit code) an exception ends a command with."""
    if isinstance(exc, RunNotFound):
        return _NotFound(str(exc))
    if isinstance(exc, (ConfigurationError, DatabaseError, PluginError)):
        return _ConfigFailure(str(exc))
    if isinstance(exc, InvalidInput):
        return _UsageFailure(str(exc))
    if isinstance(exc, (OpsrunError, AssignmentJobError)):
        return AppCliError(str(exc))
    if isinstance(exc, SQLAlchemyError):
        reason = type(getattr(exc, "orig", None) or exc).__name__
        return _ConfigFailure(
            f"the database refused a statement ({reason}); check --database-url / "
            f"{DATABASE_URL_ENV}, and that `python -m reference_app seed` has run"
        )
    return AppCliError(
        f"unexpected {type(exc).__name__}: {sanitize_message(exc, max_length=300)} "
        f"(set {ENV_TRACEBACK}=1 to see the traceback)"
    )


class _Group(click.Group):
    """Turns every error below it into one line and an exit code: never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except Exception as exc:
            if os.environ.get(ENV_TRACEBACK, "") not in ("", "0"):
                raise
            raise _cli_error(exc) from None


def _resolve_database(ctx: click.Context, _param: click.Parameter, value: str | None) -> str:
    """A command's ``--database-url``, else the one given before the command (or its default)."""
    if value:
        return value
    root = ctx.find_root().params.get("database_url")
    return str(root or os.environ.get(DATABASE_URL_ENV) or DEFAULT_DATABASE_URL)


def database_option(fn: F) -> F:
    """``--database-url`` after the command (``demo --database-url URL``), as before it."""
    return click.option(
        "--database-url",
        metavar="URL",
        callback=_resolve_database,
        help=f"SQLAlchemy URL of the app's database (else ${DATABASE_URL_ENV}, else "
        f"{DEFAULT_DATABASE_URL}).",
    )(fn)


def broker_option(fn: F) -> F:
    """``--broker-url``: the Celery broker (else ``$OPSRUN_BROKER_URL``, else local Redis)."""
    return click.option(
        "--broker-url",
        metavar="URL",
        envvar=BROKER_URL_ENV,
        help=f"Celery broker URL (else ${BROKER_URL_ENV}, else {DEFAULT_BROKER_URL}).",
    )(fn)


@contextmanager
def _app(database_url: str, **kwargs: Any) -> Iterator[ReferenceApp]:
    with ReferenceApp(database_url, **kwargs) as app:
        yield app


def _require_celery(command: str) -> None:
    """A clear error (exit code 4) when Celery is not installed."""
    try:
        import celery  # type: ignore[import-untyped]  # noqa: F401
    except ImportError:
        raise _ConfigFailure(
            f"{command} needs Celery and its Redis client: pip install 'opsrun[celery]'"
        ) from None


def _require_seeded(app: ReferenceApp) -> int:
    """The default workspace's id; a clear error if the database was never seeded."""
    if not inspect(app.engine).has_table("workspaces"):
        raise _ConfigFailure(f"the database has no reference-app tables; {SEED_FIRST}")
    with app.sessions() as session:
        workspace = session.scalar(
            select(Workspace.id).where(Workspace.slug == DEFAULT_WORKSPACE_SLUG)
        )
    if workspace is None:
        raise _ConfigFailure(f"the database has no default workspace; {SEED_FIRST}")
    return workspace


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--database-url",
    envvar=DATABASE_URL_ENV,
    default=DEFAULT_DATABASE_URL,
    show_default=True,
    show_envvar=True,
    metavar="URL",
    help="SQLAlchemy URL of the app's database, SQLite or Postgres "
    "(e.g. postgresql+psycopg://user@host/db).",
)
@click.option(
    "-v",
    "--verbose",
    count=True,
    help="Show opsrun's logs on stderr: -v warnings and progress, -vv debug.",
)
@click.pass_context
def cli(ctx: click.Context, database_url: str, verbose: int) -> None:
    """The opsrun reference app: assignment jobs of a device-management tool on an opsrun ledger.

    Start with `demo`: it seeds a fresh database, runs fetch and restore jobs on worker threads
    with duplicates, throttling, partial failures and a crashed worker, reconciles, and prints the
    ledger. `demo --celery` runs the jobs on Celery worker processes instead (Redis at
    OPSRUN_BROKER_URL); `worker` starts one.

    \b
    Exit codes:
      0  success
      1  a job or reconcile failed, or an unexpected error
      2  usage error
      3  not found: no policy or backup with that id
      4  database or configuration error: invalid or unreachable
         --database-url / OPSRUN_DATABASE_URL, not seeded yet, or no
         broker answers at --broker-url / OPSRUN_BROKER_URL

    Errors are one line on stderr: "reference_app: error: ...".
    """
    _route_logs(ctx, verbose)


def _route_logs(ctx: click.Context, verbose: int) -> None:
    """Keep opsrun's log records off stderr unless asked (-v): the commands report for themselves."""
    logger = logging.getLogger("opsrun")
    handler: logging.Handler
    previous = logger.level
    if verbose:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("opsrun: %(levelname)s: %(message)s"))
        level = logging.DEBUG if verbose > 1 else logging.INFO
        handler.setLevel(level)
        logger.setLevel(level)
    else:
        handler = logging.NullHandler()  # stops logging's last-resort handler printing to stderr
    logger.addHandler(handler)

    def restore() -> None:
        logger.removeHandler(handler)
        logger.setLevel(previous)

    ctx.call_on_close(restore)


@cli.command("seed")
@database_option
@click.option(
    "--fresh", is_flag=True, help="Drop and recreate every table first, the ledger's too."
)
def seed_command(database_url: str, fresh: bool) -> None:
    """Seed the database (safe to run twice).

    Adds the default workspace, the platform tenant, demo tenants with fresh UUID v4 external ids,
    their policies and backups; with --fresh every table is dropped and recreated first.
    """
    console = make_console()
    with _app(database_url) as app:
        report = seed(app.engine, fresh=fresh)
        with app.sessions() as session:
            tenants = list(session.scalars(select(Tenant).order_by(Tenant.id)))
    action = "Recreated and seeded" if fresh else "Seeded"
    console.print(
        f"{action} {safe_url(app.engine.url)}: 1 workspace, "
        f"{report.tenants} tenants, {report.policies} policies, {report.backups} backups "
        f"({report.added} rows added)"
    )
    console.print(
        mapping_table(
            "Tenants (external ids are fresh UUID v4s)",
            (
                (f"{t.id} {t.name}{' (platform)' if t.is_platform else ''}", t.external_id)
                for t in tenants
            ),
        )
    )


@cli.command("demo")
@database_option
@click.option("--json", "as_json", is_flag=True, help="Print the summary and runs as JSON.")
@click.option(
    "--celery",
    is_flag=True,
    help="Run the jobs on Celery worker processes on the broker (--broker-url) instead of "
    "threads. Postgres is recommended; an SQLite file works for the demo.",
)
@click.option(
    "--workers",
    type=click.IntRange(1, 32),
    help="Worker threads [default: 4]; with --celery, worker processes [default: 2].",
)
@click.option(
    "--latency",
    default=DEFAULT_LATENCY,
    show_default=True,
    type=click.FloatRange(0, 1),
    help="Seconds each directory call takes.",
)
@broker_option
@click.option(
    "--timeout",
    type=click.FloatRange(1, 3600),
    help="With --celery: seconds to wait for the workers to complete every run [default: 120].",
)
def demo_command(
    database_url: str,
    as_json: bool,
    celery: bool,
    workers: int | None,
    latency: float,
    broker_url: str | None,
    timeout: float | None,
) -> None:
    """Run the demo on a fresh database.

    Every table of the database is dropped and recreated, then the demo dispatches and works
    fetch and restore jobs and prints the ledger and a summary. With --celery the jobs go through
    the broker to Celery worker processes (`python -m reference_app worker`) that the demo starts
    and stops; a broker that does not answer is exit code 4, before the database is touched.
    """
    console = make_console(stderr=as_json)
    if celery:
        _require_celery("demo --celery")
        from .celery_demo import DEFAULT_TIMEOUT, DEFAULT_WORKERS, run_celery_demo

        report = run_celery_demo(
            database_url,
            console=console,
            broker=broker_url,
            workers=workers or DEFAULT_WORKERS,
            latency=latency,
            timeout=timeout or DEFAULT_TIMEOUT,
        )
    else:
        report = run_demo(database_url, console=console, workers=workers or 4, latency=latency)
    if as_json:
        click.echo(json.dumps(_demo_json(report), indent=2))
        return
    out = make_console()
    out.print()
    out.print(
        runs_table(
            report.runs,
            report.label,
            tenants=report.tenants,
            targets=report.targets,
            title="The ledger (operation_runs)",
        )
    )
    out.print()
    out.print(_summary_table(report.summary))


def _demo_json(report: DemoReport) -> dict[str, Any]:
    return {
        "database": report.database,
        "summary": report.summary,
        "runs": [_run_json(run) for run in report.runs],
    }


def _run_json(run: Run) -> dict[str, Any]:
    return {
        "id": run.id,
        "type": run.type,
        "workspace_id": run.workspace_id,
        "tenant_id": run.tenant_id,
        "identity": run.identity,
        "status": run.status.value,
        "outcome": run.outcome.value,
        "attempts": run.attempts,
        "summary_counts": run.summary_counts,
        "failure_summary": run.failure_summary,
    }


def _pairs(mapping: dict[str, int]) -> str:
    return ", ".join(f"{key} {value}" for key, value in mapping.items() if value) or "none"


def _summary_table(summary: dict[str, Any]) -> Any:
    d = summary["dispatches"]
    deliveries = summary["deliveries"]
    items = summary["items"]
    rows = [
        ("runs created", f"{summary['runs_created']} ({summary['reconcile_runs']} reconcile)"),
        (
            "dispatches",
            f"{d['total']}: {d['created']} created, {d['reused_active']} reused active, "
            f"{d['reused_cooldown']} reused in cooldown",
        ),
        ("dispatches reused", summary["dispatches_reused"]),
        (
            "deliveries",
            f"{deliveries['total']}: {deliveries['completed']} completed, "
            f"{deliveries['failed']} failed, {deliveries['released']} released for retry, "
            f"{deliveries['skipped']} skipped, {deliveries['abandoned']} abandoned by a crash",
        ),
        (
            "skipped deliveries",
            f"{deliveries['skipped']} ({_pairs(summary['skipped_deliveries'])})",
        ),
        ("attempts", summary["attempts"]),
        ("outcomes", _pairs(summary["outcomes"])),
        ("failure codes", _pairs(summary["failure_codes"])),
        (
            "assignments (total/processed/failed)",
            f"{items['total']}/{items['processed']}/{items['failed']}",
        ),
    ]
    celery = summary.get("celery")
    if celery:
        waiting = celery["messages_waiting_before_workers"]
        rows += [
            (
                "messages sent to the broker",
                f"{celery['messages_sent']} for {celery['clicks']} clicks"
                + ("" if waiting is None else f" ({waiting} waiting before the workers started)"),
            ),
            (
                "Celery workers",
                f"{celery['workers']} on queue {celery['queue']}: "
                + _pairs(celery["deliveries_by_worker"])
                + " deliveries",
            ),
        ]
    return mapping_table("Summary", rows)


@cli.group("dispatch", cls=_Group)
def dispatch_group() -> None:
    """Dispatch assignment jobs.

    A dispatch of an identity that has a queued or running run reuses it; one that succeeded in
    the last 15 minutes is reused too (cooldown).
    """


def _print_dispatches(rows: Sequence[tuple[str, Any]]) -> None:
    console = make_console()
    for target, result in rows:
        style = "green" if result.created else "yellow"
        console.print(
            f"run {result.run.id:>4}  {result.run.type:<20} {target}: "
            f"[{style}]{result.disposition.value}[/] ({result.run.status.value})"
        )


@dispatch_group.command("fetch")
@database_option
@click.argument("policy_ids", nargs=-1, type=int)
@click.option("--all", "all_policies", is_flag=True, help="Every policy of the database.")
@click.option("--initiator", default="cli", show_default=True)
def dispatch_fetch(
    database_url: str, policy_ids: tuple[int, ...], all_policies: bool, initiator: str
) -> None:
    """Dispatch a fetch of each policy's assignments (POLICY_IDS, or --all)."""
    if not policy_ids and not all_policies:
        raise click.UsageError("name at least one POLICY_ID, or --all")
    with _app(database_url) as app:
        _require_seeded(app)
        with app.sessions() as session:
            query = select(Policy).order_by(Policy.id)
            if not all_policies:
                query = query.where(Policy.id.in_(policy_ids))
            policies = list(session.scalars(query))
        missing = set(policy_ids) - {p.id for p in policies}
        if missing:
            raise _NotFound(f"no policy with id {', '.join(map(str, sorted(missing)))}")
        rows = [
            (
                p.name,
                app.fetch.dispatch(
                    workspace_id=p.workspace_id,
                    tenant_id=p.tenant_id,
                    policy_id=p.id,
                    initiator=initiator,
                ),
            )
            for p in policies
        ]
    _print_dispatches(rows)


@dispatch_group.command("restore")
@database_option
@click.argument("backup_ids", nargs=-1, type=int, required=True)
@click.option("--initiator", default="cli", show_default=True)
def dispatch_restore(database_url: str, backup_ids: tuple[int, ...], initiator: str) -> None:
    """Dispatch a restore of each backup (BACKUP_IDS) into its policy."""
    with _app(database_url) as app:
        _require_seeded(app)
        rows = []
        for backup_id in backup_ids:
            with app.sessions() as session:
                backup = session.get(AssignmentBackup, backup_id)
                policy = None if backup is None else session.get(Policy, backup.policy_id)
            if backup is None or policy is None:
                raise _NotFound(f"no backup with id {backup_id}")
            result = app.restore.dispatch(
                workspace_id=policy.workspace_id,
                tenant_id=policy.tenant_id,
                policy_id=policy.id,
                backup_id=backup.id,
                initiator=initiator,
            )
            rows.append((f"{policy.name} ← backup {backup.id}", result))
    _print_dispatches(rows)


@cli.command("work")
@database_option
@click.option(
    "--workers", default=4, show_default=True, type=click.IntRange(1, 32), help="Worker threads."
)
@click.option(
    "--retries",
    default=DEFAULT_RETRIES,
    show_default=True,
    type=click.IntRange(0, 10),
    help="Redeliveries of a message whose job raised.",
)
@click.option(
    "--failure-rate",
    default=0.1,
    show_default=True,
    type=click.FloatRange(0, 1),
    help="Share of assignments the fake directory fails.",
)
def work_command(database_url: str, workers: int, retries: int, failure_rate: float) -> None:
    """Execute queued assignment runs on worker threads."""
    console = make_console()
    directory = FakeDirectory(item_failure_rate=failure_rate, missing_group_rate=failure_rate)
    with _app(database_url, directory=directory) as app:
        _require_seeded(app)
        queued = [
            run
            for run in app.ledger.runs(status="queued")
            if run.type in ASSIGNMENT_TYPES and run.tenant_id is not None
        ]
        if not queued:
            console.print("nothing queued: dispatch jobs first (`dispatch fetch --all`)")
            return
        messages = [JobMessage.for_run(run) for run in sorted(queued, key=lambda r: r.id)]
        with make_progress(console) as progress:
            task = progress.add_task(f"{workers} workers delivering", total=len(messages))
            deliveries = work(
                app,
                messages,
                workers=workers,
                retries=retries,
                on_done=lambda _d: progress.advance(task),
            )
        runs = [app.ledger.get(m.run_id) for m in messages]
        tenants, targets = app.display_names(runs)
        console.print(
            runs_table(runs, app.ledger.catalog.label, tenants=tenants, targets=targets, title=None)
        )
        statuses: dict[str, int] = {}
        for delivery in deliveries:
            for result in delivery.results:
                statuses[result.status] = statuses.get(result.status, 0) + 1
        console.print(f"{len(messages)} messages delivered: {_pairs(statuses)}")


@cli.command("reconcile")
@database_option
@click.option("--workspace", "workspace_id", help="Workspace id (default: the default workspace).")
@click.option("--all", "all_workspaces", is_flag=True, help="Every workspace with active runs.")
def reconcile_command(database_url: str, workspace_id: str | None, all_workspaces: bool) -> None:
    """Run the housekeeping (ReconcileAdapterRunsJob).

    It finishes runs whose worker vanished (lease expired) or that never started, and is itself
    tracked as an ops.reconcile_adapter_runs run.
    """
    if workspace_id and all_workspaces:
        raise click.UsageError("--workspace and --all exclude each other")
    console = make_console()
    with _app(database_url) as app:
        if all_workspaces:
            reports = app.reconcile.handle_all(initiator="cli")
        else:
            target = workspace_id or _require_seeded(app)
            reports = [app.reconcile.handle(target, initiator="cli")]
    if not reports:
        console.print("no workspace has active runs: nothing to reconcile")
    for report in reports:
        console.print(_reconcile_line(report))


def _reconcile_line(report: ReconcileReport) -> str:
    run = report.run
    if not report.did_work:
        return (
            f"workspace {run.workspace_id}: another reconcile holds it (run {run.id}, "
            f"{run.status.value}); nothing done"
        )
    counts = run.summary_counts or {}
    return (
        f"workspace {run.workspace_id}: run {run.id} {run.outcome.value}: "
        f"{counts.get('total', 0)} stale, {counts.get('processed', 0)} processed, "
        f"{counts.get('failed', 0)} failed"
    )


@cli.command("worker")
@database_option
@broker_option
@click.option(
    "--concurrency",
    "-c",
    type=click.IntRange(1, 64),
    help="Pool processes (prefork) [default: the number of CPUs].",
)
@click.option(
    "--queue",
    "-Q",
    default=DEFAULT_QUEUE,
    show_default=True,
    help="The queue to consume (the tasks and the reconcile go to it).",
)
@click.option(
    "--hostname",
    "-n",
    help="The worker's node name [default: celery@HOST]; two workers on one host need two.",
)
@click.option(
    "--loglevel",
    "-l",
    default="INFO",
    show_default=True,
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
)
@click.option(
    "--beat",
    "-B",
    is_flag=True,
    help="Also run Celery beat in this worker, sending the reconcile every 5 minutes "
    "(development; in production run one `celery -A reference_app.celery_app beat`).",
)
@click.option(
    "--retry-countdown",
    type=click.FloatRange(0, 300),
    help="Seconds before retrying a throttled job [default: 10, 20, 40 s].",
)
@click.option(
    "--directory",
    "directory_kind",
    default="fake",
    show_default=True,
    type=click.Choice(["fake", "demo"]),
    help="The fake directory, as is or with the demo's throttling and failures.",
)
@click.option(
    "--latency",
    default=DEFAULT_LATENCY,
    show_default=True,
    type=click.FloatRange(0, 1),
    help="Seconds each directory call takes.",
)
@click.option("--delivery-log", type=click.Path(dir_okay=False), hidden=True)
@click.option("--exit-with-parent", is_flag=True, hidden=True)
def worker_command(
    database_url: str,
    broker_url: str | None,
    concurrency: int | None,
    queue: str,
    hostname: str | None,
    loglevel: str,
    beat: bool,
    retry_countdown: float | None,
    directory_kind: str,
    latency: float,
    delivery_log: str | None,
    exit_with_parent: bool,
) -> None:
    """Start a Celery worker (prefork) on the broker, against the database.

    It executes the fetch and restore jobs dispatched through the Celery tasks of
    reference_app.celery_app (`demo --celery` does) and the reconcile Celery beat sends. Stop it
    with Ctrl-C or SIGTERM: a warm shutdown, running jobs finish first. The broker and the
    database are checked first: either unreachable is exit code 4.
    """
    _require_celery("worker")
    from .celery_app import build as build_celery_app
    from .celery_app import check_broker
    from .celery_demo import exit_with_parent as watch_parent
    from .celery_demo import record_deliveries

    directory = demo_directory(latency=latency)
    capp = build_celery_app(
        database_url,
        broker=broker_url,
        queue=queue,
        directory=directory,
        retry_countdown=retry_countdown,
    )
    check_connection(capp.app.engine, setting=DATABASE_SETTING)
    check_broker(capp.celery)
    if directory_kind == "demo":
        inject_faults(directory, load_world(capp.app))
    if delivery_log:
        record_deliveries(capp, delivery_log)
    if exit_with_parent:
        watch_parent()
    argv = [
        "worker",
        "--pool=prefork",
        f"--loglevel={loglevel.upper()}",
        f"--queues={queue}",
        "--without-gossip",  # no cluster events to share, no clock sync at startup to wait for
        "--without-mingle",
    ]
    if concurrency:
        argv.append(f"--concurrency={concurrency}")
    if hostname:
        argv.append(f"--hostname={hostname}")
    if beat:
        argv.append("--beat")
    capp.celery.worker_main(argv)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``python -m reference_app``; exits with the command's code."""
    cli.main(args=list(argv) if argv is not None else None, prog_name="python -m reference_app")
