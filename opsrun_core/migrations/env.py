"""Alembic environment of opsrun's packaged migrations.

Run through :func:`opsrun_core.migrate.upgrade` (or ``Ledger.upgrade()``), which hands over a live
connection in ``config.attributes["connection"]``. Our history lives in its own version table,
``opsrun_alembic_version``, and only our tables are compared, so it never collides with a host app's.
"""

from __future__ import annotations

from typing import Any

from alembic import context

from opsrun_core.migrate import VERSION_TABLE, include_object
from opsrun_core.models import metadata

config = context.config
connection = config.attributes.get("connection")
if connection is None:  # pragma: no cover - only reachable through a misconfigured alembic.ini
    raise RuntimeError(
        "opsrun migrations run on a connection: use Ledger(url).upgrade() or `opsrun migrate`"
    )

options: dict[str, Any] = dict(
    connection=connection,
    target_metadata=metadata,
    version_table=VERSION_TABLE,
    include_object=include_object,
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
)
context.configure(**options)
with context.begin_transaction():
    context.run_migrations()
