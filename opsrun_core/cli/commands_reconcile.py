"""``opsrun reconcile``: the housekeeping, one tracked run per workspace, with its counts."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import click
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.text import Text

from ..enums import Outcome
from ..ledger import Ledger
from ..reconcile import DEFAULT_BATCH_SIZE, DEFAULT_GRACE, ReconcileError, ReconcileReport
from .app import EXIT_FAILED, CliError, cli, state
from .parse import duration_option
from .render import OUTCOME_STYLE, fmt_when, new_console, simple_table, styled

__all__ = ["COUNT_COLUMNS", "reconcile"]

#: the reconcile run's summary counts, in the order the table shows them
COUNT_COLUMNS = ("total", "processed", "failed", "reconciled", "alive")


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
    callback=duration_option,
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
    ledger = state(ctx).ledger()
    if workspace is not None:
        results = [_reconcile_one(ledger, workspace, grace, batch_size, initiator, single=True)]
    else:
        workspaces = ledger.active_workspaces()
        if not workspaces:
            new_console().print("No workspace has active runs; nothing to reconcile.")
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
    err = new_console(err=True)
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
    console = new_console()
    table = simple_table()
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
                styled("failed", OUTCOME_STYLE),
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
                styled(run.outcome.value, OUTCOME_STYLE),
                *("-" for _ in COUNT_COLUMNS),
            )
            notes.append(
                f"workspace {result.workspace}: another reconcile is already running (run "
                f"{run.id}, {run.status.value}, started {fmt_when(run.started_at)}); it does the "
                "work, nothing was done here"
            )
            continue
        counts = run.summary_counts or {}
        table.add_row(
            Text(result.workspace),
            str(run.id),
            Text("done"),
            styled(run.outcome.value, OUTCOME_STYLE),
            *(str(counts.get(name, 0)) for name in COUNT_COLUMNS),
        )
    console.print(table)
    for note in notes:
        console.print(Text(note))
