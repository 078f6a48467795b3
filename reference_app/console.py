"""Terminal output in the look of the ``opsrun`` command: rich consoles, plain tables, outcomes.

The same conventions as ``opsrun_core.cli.render``: on a terminal, output fits its width and
progress bars are drawn; anywhere else (a pipe, a file, a test) output is :data:`PIPE_WIDTH` wide
and never wraps, tables have a rule under the header and no outer edge, and progress bars stay out
of the way.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TextIO

from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from opsrun_core import Run

__all__ = [
    "OUTCOME_STYLE",
    "PIPE_WIDTH",
    "failure_codes",
    "fmt_counts",
    "make_console",
    "make_progress",
    "mapping_table",
    "runs_table",
    "simple_table",
]

#: width of the output when it is not a terminal, so rows never wrap
PIPE_WIDTH = 200

#: how each outcome (and the status of a run still active) is coloured
OUTCOME_STYLE = {
    "pending": "dim",
    "succeeded": "green",
    "partially_succeeded": "yellow",
    "failed": "red",
    "cancelled": "magenta",
    "queued": "dim",
    "running": "cyan",
}


def make_console(*, stderr: bool = False) -> Console:
    """A rich console on stdout (or stderr); wide and unwrapped when it is not a terminal."""
    stream: TextIO = sys.stderr if stderr else sys.stdout
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


def make_progress(console: Console) -> Progress:
    """A progress bar that is drawn on a terminal and stays silent anywhere else."""
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=not console.is_terminal,
    )


def simple_table(title: str | None = None, *, show_header: bool = True) -> Table:
    """The command line's table: a rule under the header, no outer edge or padding."""
    return Table(
        title=title,
        title_justify="left",
        title_style="bold",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        show_edge=False,
        show_header=show_header,
    )


def fmt_counts(counts: Mapping[str, Any] | None) -> str:
    """``total/processed/failed``, or ``-`` before the run completes."""
    if not counts:
        return "-"
    return "/".join(str(counts.get(key, "-")) for key in ("total", "processed", "failed"))


def failure_codes(run: Run) -> Counter[str]:
    """How many failure entries of each code a run has."""
    return Counter(str(entry.get("code")) for entry in run.failure_summary or ())


def runs_table(
    runs: Iterable[Run],
    label: Callable[[str], str],
    *,
    tenants: Mapping[str, str] | None = None,
    targets: Mapping[int, str] | None = None,
    title: str | None = None,
) -> Table:
    """The runs as a table: operation, scope, outcome, attempts, counts, failure codes.

    :param label: operation type -> label (``ledger.catalog.label``).
    :param tenants: tenant id -> display name (the raw id is shown otherwise).
    :param targets: run id -> what the run worked on (its identity is shown otherwise).
    """
    table = simple_table(title)
    table.add_column("run", justify="right")
    table.add_column("operation")
    table.add_column("tenant")
    table.add_column("target")
    table.add_column("outcome")
    table.add_column("att.", justify="right")
    table.add_column("t/p/f", justify="right")
    table.add_column("failure codes")
    for run in runs:
        codes = ", ".join(
            f"{code} ×{n}" if n > 1 else code for code, n in sorted(failure_codes(run).items())
        )
        tenant = "-" if run.tenant_id is None else (tenants or {}).get(run.tenant_id, run.tenant_id)
        target = (targets or {}).get(run.id) or _identity_text(run.identity) or "workspace"
        outcome = run.outcome.value if run.status.value == "completed" else run.status.value
        table.add_row(
            str(run.id),
            label(run.type),
            tenant,
            target,
            Text(outcome, style=OUTCOME_STYLE.get(outcome, "")),
            str(run.attempts),
            fmt_counts(run.summary_counts),
            codes or "-",
        )
    return table


def mapping_table(title: str, rows: Iterable[tuple[str, Any]]) -> Table:
    """A two-column table of names and values, without a header."""
    table = simple_table(title, show_header=False)
    table.add_column("what")
    table.add_column("value")
    for name, value in rows:
        table.add_row(name, str(value))
    return table


def _identity_text(identity: Mapping[str, Any]) -> str:
    return " ".join(f"{key}={value}" for key, value in sorted(identity.items()))
