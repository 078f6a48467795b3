"""``opsrun why``: what a dispatch of an identity would do right now, and why.

The answer is :meth:`Ledger.explain <opsrun_core.Ledger.explain>`'s (the same identity hook, state
read and claim policy a dispatch uses); this module only chooses the cooldown and prints.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import click
from rich.text import Text

from ..catalog import OperationCatalog
from ..enums import Outcome, RunStatus
from ..ledger import Explanation, Ledger, scope_id
from .app import cli, state
from .parse import duration_option, identity_argument
from .render import compact_json, echo_json, fmt_relative, fmt_span, fmt_when, new_console, run_json

__all__ = ["cooldown_until", "why"]


@cli.command()
@click.argument("operation_type", metavar="TYPE")
@click.argument(
    "identity",
    nargs=-1,
    metavar="[KEY=VALUE | KEY:=JSON]...",
    callback=identity_argument,
)
@click.option("--workspace", required=True, metavar="ID", help="The dispatch's workspace.")
@click.option("--tenant", metavar="ID", help="The dispatch's tenant (omit: workspace-scoped).")
@click.option(
    "--cooldown",
    callback=duration_option,
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
    ledger = state(ctx).ledger()
    source = _cooldown_source(ledger.catalog, operation_type, cooldown)
    # validated here so a bad value is named by its option, not by the API's argument
    workspace_id = scope_id(workspace, name="--workspace")
    tenant_id = scope_id(tenant, name="--tenant", nullable=True)
    assert workspace_id is not None
    explained = ledger.explain(
        operation_type, workspace_id=workspace_id, tenant_id=tenant_id, identity=identity
    )
    if as_json:
        echo_json(_why_json(ledger, explained, source, workspace_id, tenant_id))
    else:
        _print_why(ledger, explained, source, workspace_id, tenant_id)


def _cooldown_source(catalog: OperationCatalog, type_: str, cooldown: timedelta | None) -> str:
    """Where the cooldown comes from: ``"catalog"``, ``"--cooldown"`` or ``"unregistered"``.

    ``Ledger.explain`` takes the spec from the ledger's catalog, so ``--cooldown`` registers the
    type there (replacing the cooldown of a registered spec, keeping its other fields). The
    catalog belongs to this command's ledger; a host that embeds the command line and passes its
    own ``CliState(catalog=...)`` sees the change in that catalog too.
    """
    if cooldown is None:
        catalog.spec(type_)  # an invalid type fails here, as before a dispatch, naming the rules
        return "catalog" if type_ in catalog else "unregistered"
    catalog.define(type_, cooldown=cooldown if cooldown > timedelta(0) else None)
    return "--cooldown"


def cooldown_until(ex: Explanation) -> datetime | None:
    """When the completed run that answers a ``reuse_cooldown`` stops answering; else ``None``."""
    run = ex.decision.run
    if (
        ex.decision.action != "reuse_cooldown"
        or run is None
        or run.completed_at is None
        or ex.spec.cooldown is None
    ):
        return None
    return run.completed_at + ex.spec.cooldown


def _why_json(
    ledger: Ledger, ex: Explanation, source: str, workspace_id: str, tenant_id: str | None
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
        "cooldown_source": source,
        "decision": ex.decision.action,
        "reason": ex.decision.reason,
        "run": run_json(run, ledger.catalog.label(run.type)) if run is not None else None,
        "active_run_id": ex.active.id if ex.active is not None else None,
        "latest_completed_run_id": (
            ex.latest_completed.id if ex.latest_completed is not None else None
        ),
        "cooldown_until": cooldown_until(ex),
        "lease_expired": (lease <= ex.now) if lease is not None else None,
    }


def _print_why(
    ledger: Ledger, ex: Explanation, source: str, workspace_id: str, tenant_id: str | None
) -> None:
    console = new_console()
    scope = f"workspace {workspace_id}" + (f", tenant {tenant_id}" if tenant_id else "")
    head = Text(f"{ex.spec.type}", style="bold")
    head.append(f" ({ledger.catalog.label(ex.spec.type)}) in {scope}", style="")
    console.print(head)
    console.print(Text(f"identity {compact_json(ex.identity.inputs)}  hash {ex.identity.hash}"))
    console.print(Text(_cooldown_line(ex, source)))
    console.print(Text(f"now {fmt_when(ex.now)}"))
    console.print()
    verdict, lines = _verdict(ex)
    console.print(verdict)
    for line in lines:
        console.print(Text(f"  {line}"))


def _cooldown_line(ex: Explanation, source: str) -> str:
    if ex.spec.cooldown is not None:
        return f"cooldown {fmt_span(ex.spec.cooldown)} (from {source})"
    if source == "--cooldown":
        return "cooldown none (from --cooldown)"
    if source == "catalog":
        return "cooldown none (from the catalog)"
    return (
        "cooldown none (the operation is not in the catalog; give --cooldown if the host app "
        "sets one)"
    )


def _verdict(ex: Explanation) -> tuple[Text, list[str]]:
    """The headline of the decision and the lines that explain it."""
    action = ex.decision.action
    if action == "reuse_active":
        return _reuse_active(ex)
    if action == "reuse_cooldown":
        return _reuse_cooldown(ex)
    if action == "create":
        return _create(ex)
    verdict = Text("A dispatch now would be REJECTED by the claim policy.", style="bold red")
    return verdict, [f"reason: {ex.decision.reason or 'none given'}"]


def _reuse_active(ex: Explanation) -> tuple[Text, list[str]]:
    run, now = ex.decision.run, ex.now
    assert run is not None
    verdict = Text("A dispatch now would REUSE the active ", style="bold yellow")
    verdict.append(f"run {run.id}: it blocks a new run.")
    lines = [
        f"run {run.id}: {run.status.value}, {run.attempts} attempt(s), created "
        f"{fmt_when(run.created_at)} ({fmt_relative(run.created_at, now)})"
    ]
    if run.status is RunStatus.QUEUED:
        lines.append("queued: no worker has claimed it yet")
        return verdict, lines
    if run.heartbeat_at is not None:
        lines.append(
            f"lease age {fmt_span(now - run.heartbeat_at)} (taken or last renewed "
            f"{fmt_when(run.heartbeat_at)})"
        )
    expires = run.lease_expires_at
    if expires is None:
        lines.append("lease: none recorded")
    elif expires > now:
        lines.append(f"lease expires {fmt_when(expires)} ({fmt_relative(expires, now)})")
    else:
        lines.append(
            f"lease expired {fmt_when(expires)} ({fmt_relative(expires, now)}): its worker is "
            "probably gone; the next claim takes it over, or "
            f"`opsrun reconcile --workspace {run.workspace_id}` finishes it"
        )
    return verdict, lines


def _reuse_cooldown(ex: Explanation) -> tuple[Text, list[str]]:
    run, now = ex.decision.run, ex.now
    assert run is not None
    verdict = Text("A dispatch now would REUSE completed ", style="bold yellow")
    verdict.append(f"run {run.id}: the identity is in cooldown.")
    lines = [
        f"run {run.id}: {run.outcome.value}, completed {fmt_when(run.completed_at)}"
        + (f" ({fmt_relative(run.completed_at, now)})" if run.completed_at else "")
    ]
    until = cooldown_until(ex)
    if until is not None:
        lines.append(f"cooldown until {fmt_when(until)} ({fmt_relative(until, now)})")
    else:
        lines.append("a claim policy plugin keeps it in cooldown")
    return verdict, lines


def _create(ex: Explanation) -> tuple[Text, list[str]]:
    verdict = Text("A dispatch now would CREATE a new run.", style="bold green")
    lines: list[str] = []
    if ex.active is not None:
        lines.append(f"a claim policy plugin chose to create despite active run {ex.active.id}")
    latest = ex.latest_completed
    if latest is None:
        none_active = ", and none is active" if ex.active is None else ""
        lines.append(f"no run of this identity has completed yet{none_active}")
        return verdict, lines
    done = (
        f"latest completed run {latest.id} ({latest.outcome.value}, "
        f"{fmt_when(latest.completed_at)})"
    )
    if latest.outcome in (Outcome.FAILED, Outcome.CANCELLED):
        lines.append(f"{done}: a {latest.outcome.value} run starts no cooldown")
    elif ex.spec.cooldown is None:
        lines.append(f"{done}: the operation has no cooldown")
    elif latest.completed_at is not None:
        ended = latest.completed_at + ex.spec.cooldown
        lines.append(
            f"{done}: its cooldown ended {fmt_when(ended)} ({fmt_relative(ended, ex.now)})"
        )
    else:
        lines.append(done)
    return verdict, lines
