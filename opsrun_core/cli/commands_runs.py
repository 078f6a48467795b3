"""``opsrun runs`` and ``opsrun show``: list runs, and look at one run in full."""

from __future__ import annotations

from datetime import datetime, timedelta

import click
from rich.table import Table
from rich.text import Text

from ..enums import Outcome, RunStatus
from .app import cli, state
from .parse import since_option
from .render import (
    OUTCOME_STYLE,
    STATUS_STYLE,
    compact_json,
    echo_json,
    fmt_counts,
    fmt_span,
    fmt_when,
    new_console,
    run_json,
    simple_table,
    styled,
)

__all__ = ["DEFAULT_LIMIT", "runs", "show"]

DEFAULT_LIMIT = 50


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
    callback=since_option,
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
    ledger = state(ctx).ledger()
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
        echo_json([run_json(run, ledger.catalog.label(run.type)) for run in found])
        return
    console = new_console()
    if not found:
        console.print("No runs match.")
        return
    table = simple_table()
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
            styled(run.status.value, STATUS_STYLE),
            styled(run.outcome.value, OUTCOME_STYLE),
            str(run.attempts),
            fmt_counts(run.summary_counts),
            fmt_when(run.created_at),
        )
    console.print(table)


@cli.command()
@click.argument("run_id", type=click.IntRange(min=1), metavar="RUN_ID")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object for scripts.")
@click.pass_context
def show(ctx: click.Context, run_id: int, as_json: bool) -> None:
    """Show one run: every field, its summary counts and its failure summary.

    Exits 3 when no run has that id.
    """
    ledger = state(ctx).ledger()
    run = ledger.get(run_id)
    label = ledger.catalog.label(run.type)
    if as_json:
        echo_json(run_json(run, label))
        return
    console = new_console()
    title = Text(f"Run {run.id}: ", style="bold")
    title.append(f"{label} ({run.type})")
    console.print(title)
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="dim")
    grid.add_column()
    duration = (
        fmt_span(run.completed_at - run.started_at)
        if run.completed_at is not None and run.started_at is not None
        else "-"
    )
    for name, value in (
        ("status", styled(run.status.value, STATUS_STYLE)),
        ("outcome", styled(run.outcome.value, OUTCOME_STYLE)),
        ("workspace", Text(run.workspace_id)),
        ("tenant", Text(run.tenant_id or "-")),
        ("attempts", Text(str(run.attempts))),
        ("initiator", Text(run.initiator or "-")),
        ("identity", Text(compact_json(run.identity))),
        ("identity hash", Text(run.identity_hash)),
        ("context", Text(compact_json(run.context))),
        ("created", Text(fmt_when(run.created_at))),
        ("started", Text(fmt_when(run.started_at))),
        ("heartbeat", Text(fmt_when(run.heartbeat_at))),
        ("lease expires", Text(fmt_when(run.lease_expires_at))),
        ("completed", Text(fmt_when(run.completed_at))),
        ("updated", Text(fmt_when(run.updated_at))),
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
        failures = simple_table()
        failures.add_column("code", no_wrap=True)
        failures.add_column("message", overflow="fold")
        for entry in run.failure_summary:
            failures.add_row(Text(str(entry.get("code", ""))), Text(str(entry.get("message", ""))))
        console.print(failures)
    else:
        console.print("  none")
