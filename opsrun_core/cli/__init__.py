"""The ``opsrun`` command line: look into the ledger, explain a dispatch, check it, clean up.

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
    What a dispatch of that identity would do right now, without writing anything
    (``Ledger.explain``): which active run blocks it (status, attempts, lease age and expiry),
    which completed run keeps it in cooldown and until when, or that it would create a new run.
    ``KEY=VALUE`` gives a string, ``KEY:=JSON`` a typed value (``policy_id:=42``,
    ``dry_run:=true``, ``ids:='[1,2]'``): the identity must hold exactly the values the host app
    dispatches, types included, or its fingerprint differs. The cooldown comes from the catalog,
    which host apps fill through their plugins' ``opsrun_register_operations`` (the command line
    loads the installed ``opsrun`` plugins too); ``--cooldown`` says it when no plugin does.
``opsrun check [--batch-size N] [--json]``
    Check every stored run against the ledger's invariants (:mod:`opsrun_core.invariants`: one
    active run per identity, completed runs with an outcome, summary counts and timestamps,
    sanitized failure summaries, leases that match the status). Prints one row per violation
    (run id, rule, detail) or that there are none in N runs; ``--json`` prints
    ``{"runs_checked": N, "violations": [...]}``. Exits 1 when there is any violation. Only
    reads: safe against a live ledger.
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
1     a reconcile failed (raised, or its run ended ``failed``), ``check`` found violations, or an
      unexpected error
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

Layout: :mod:`.app` holds the group, its settings and the error-to-exit-code mapping;
:mod:`.parse` the argument types; :mod:`.render` the tables, times and JSON; each
``commands_*`` module one command (``runs`` and ``show`` share one) and registers it on the group
when this package is imported.
"""

from __future__ import annotations

# the command modules register their commands on `cli` when imported
from . import (
    commands_check,  # noqa: F401
    commands_migrate,  # noqa: F401
    commands_reconcile,  # noqa: F401
    commands_runs,  # noqa: F401
    commands_why,  # noqa: F401
)
from .app import (
    DEFAULT_DATABASE_URL,
    ENV_DATABASE_URL,
    EXIT_CONFIG,
    EXIT_FAILED,
    EXIT_NOT_FOUND,
    EXIT_OK,
    EXIT_USAGE,
    CliError,
    CliState,
    cli,
    cli_error,
    main,
)

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
