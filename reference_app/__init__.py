"""The opsrun reference app: a host app that manages device-policy assignments for many tenants.

It is wired against opsrun the way a real app would be: its own tables beside the ledger's, a
directory adapter (a deterministic fake here), assignment fetch and restore jobs on
``@ledger.operation``, the scheduled housekeeping, a seeder and a command line. It runs from a
checkout, ``python -m reference_app demo`` being the place to start.

Modules: :mod:`~reference_app.models` (tables), :mod:`~reference_app.schema` (create and reset),
:mod:`~reference_app.directory` (the adapter and its fake), :mod:`~reference_app.identity`
(``assignment_job_fingerprint``), :mod:`~reference_app.plugin` (the app's opsrun plugin),
:mod:`~reference_app.jobs` (the jobs), :mod:`~reference_app.app` (wiring),
:mod:`~reference_app.worker` (a thread pool of workers), :mod:`~reference_app.seed`,
:mod:`~reference_app.demo`, :mod:`~reference_app.console` and :mod:`~reference_app.cli`; on Celery,
:mod:`~reference_app.celery_app` (the tasks, the beat schedule) and
:mod:`~reference_app.celery_demo` (``demo --celery``), imported only when used.
"""

from __future__ import annotations

from .app import ReferenceApp
from .directory import DirectoryAdapter, DirectoryThrottled, FakeDirectory
from .identity import FETCH_TYPE, RESTORE_TYPE, assignment_job_fingerprint
from .jobs import (
    COOLDOWN,
    FetchAssignmentsJob,
    JobMessage,
    ReconcileAdapterRunsJob,
    RestoreAssignmentsJob,
)
from .plugin import ReferenceAppPlugin
from .seed import seed

__all__ = [
    "COOLDOWN",
    "FETCH_TYPE",
    "RESTORE_TYPE",
    "DirectoryAdapter",
    "DirectoryThrottled",
    "FakeDirectory",
    "FetchAssignmentsJob",
    "JobMessage",
    "ReconcileAdapterRunsJob",
    "ReferenceApp",
    "ReferenceAppPlugin",
    "RestoreAssignmentsJob",
    "assignment_job_fingerprint",
    "seed",
]
