"""``opsrun check``: verify the stored runs keep the ledger's invariants (exit 1 if not).

The rules and the reading are :func:`opsrun_core.invariants.check_invariants`'s; this module prints
its violations as a table or JSON and turns "any violation" into exit code 1.
"""

from __future__ import annotations

import click
from rich.text import Text
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError

from ..errors import DatabaseError
from ..invariants import DEFAULT_BATCH_SIZE, RULES, Violation, check_invariants
from ..ledger import Ledger
from ..models import OperationRun
from ..sanitize import sanitize_message
from .app import EXIT_FAILED, cli, state
from .render import echo_json, new_console, simple_table

__all__ = ["check"]


class _CheckCommand(click.Command):
    """Lists the rules (name and meaning) after the options in ``opsrun check --help``."""

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Rules"):
            formatter.write_dl(list(RULES.items()))
        super().format_epilog(ctx, formatter)


@cli.command(cls=_CheckCommand)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    metavar="N",
    default=DEFAULT_BATCH_SIZE,
    show_default=True,
    help="Runs read per transaction.",
)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object for scripts.")
@click.pass_context
def check(ctx: click.Context, batch_size: int, as_json: bool) -> None:
    """Check that every stored run keeps the ledger's invariants.

    Only reads, never repairs: safe against a live ledger while workers write. Prints one row per
    violation (run id, rule, what is wrong; never a stored message or identity value) and exits 1
    when there is any, 0 when the ledger is consistent. Look at a run with `opsrun show RUN_ID`.

    --json prints {"runs_checked": N, "violations": [{"run_id", "rule", "detail"}, ...]}.
    """
    ledger = state(ctx).ledger()
    # counted first: every run that exists now is among those the check then reads
    checked = _count_runs(ledger)
    violations = check_invariants(ledger, batch_size=batch_size)
    if as_json:
        echo_json({"runs_checked": checked, "violations": [v.as_dict() for v in violations]})
    else:
        _print_check(violations, checked)
    if violations:
        ctx.exit(EXIT_FAILED)


def _count_runs(ledger: Ledger) -> int:
    """How many runs the ledger holds (a count over the primary key)."""
    query = select(func.count()).select_from(OperationRun.__table__)
    try:
        with ledger.engine.connect() as conn:
            return int(conn.execute(query).scalar_one())
    except SQLAlchemyError as exc:
        orig = getattr(exc, "orig", None) or exc
        raise DatabaseError(
            f"counting the ledger's runs failed ({type(orig).__name__}: "
            f"{sanitize_message(orig, max_length=200)}); check the database and that "
            "`opsrun migrate` has run"
        ) from exc


def _print_check(violations: list[Violation], checked: int) -> None:
    console = new_console()
    runs = f"{checked} run" + ("" if checked == 1 else "s")
    if not violations:
        console.print(f"No invariant violations in {runs}: the ledger is consistent.")
        return
    table = simple_table()
    table.add_column("run", justify="right")
    table.add_column("rule", no_wrap=True)
    table.add_column("detail", overflow="fold")
    for violation in violations:
        table.add_row(str(violation.run_id), Text(violation.rule), Text(violation.detail))
    console.print(table)
    noun = "violation" if len(violations) == 1 else "violations"
    rules = ", ".join(sorted({v.rule for v in violations}))
    console.print(
        f"{len(violations)} invariant {noun} in {runs} ({rules}); see `opsrun show RUN_ID`",
        markup=False,
    )
