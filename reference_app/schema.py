"""Creating and recreating the whole database: the app's tables and opsrun's ledger.

The ledger's table always comes from opsrun's packaged migrations (``opsrun_core.migrate``), never
from ``create_all``: that keeps its partial unique index and its version table exactly as the
library ships them. The app's own tables use ``create_all`` (see :mod:`reference_app.models`).
"""

from __future__ import annotations

from sqlalchemy.engine import Engine

from opsrun_core import migrate
from opsrun_core.db import check_connection

from .models import create_tables, drop_tables

__all__ = ["ensure_schema", "reset_schema"]

#: how the database setting is named in messages
DATABASE_SETTING = "--database-url / OPSRUN_DATABASE_URL"


def ensure_schema(engine: Engine) -> None:
    """Bring the schema up to date, keeping data: migrate the ledger, create missing tables."""
    check_connection(engine, setting=DATABASE_SETTING)
    migrate.upgrade(engine)
    create_tables(engine)


def reset_schema(engine: Engine) -> None:
    """Drop and recreate every table, the ledger's too (``migrate:fresh``).

    The app's tables are dropped first, then the ledger is migrated down to ``base`` and up again.
    """
    check_connection(engine, setting=DATABASE_SETTING)
    drop_tables(engine)
    migrate.downgrade(engine, "base")
    migrate.upgrade(engine)
    create_tables(engine)
