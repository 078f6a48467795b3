"""``opsrun migrate``: create or upgrade the ledger's schema."""

from __future__ import annotations

import click

from ..db import safe_url
from .app import cli, revision, state

__all__ = ["migrate_command"]


@cli.command("migrate")
@click.pass_context
def migrate_command(ctx: click.Context) -> None:
    """Create or upgrade the ledger: apply the packaged migrations.

    Idempotent: running it on an up-to-date database changes nothing. The migrations keep their
    own version table (opsrun_alembic_version), apart from the host app's Alembic history.
    """
    ledger = state(ctx).ledger(require_ledger=False)
    before = revision(ledger.engine)
    ledger.upgrade()
    after = revision(ledger.engine)
    where = safe_url(ledger.engine.url)
    if before == after:
        click.echo(f"{where} is already at revision {after}; nothing to do.")
    else:
        click.echo(f"Migrated {where} from {before or 'an empty database'} to revision {after}.")
