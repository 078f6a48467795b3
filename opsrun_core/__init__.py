"""opsrun: a durable SQL ledger of background-job runs that makes duplicate work impossible.

The public API (see DESIGN.md): :class:`Ledger`, the enums, the values it returns, the catalog,
the fingerprint and sanitizer, the hook markers and the errors.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from .catalog import RECONCILE_TYPE, OperationCatalog, OperationSpec, fallback_label
from .clock import ManualClock, system_clock
from .enums import Disposition, Outcome, RunStatus
from .errors import (
    ConfigurationError,
    DatabaseError,
    DispatchRejected,
    FingerprintError,
    InvalidInput,
    LeaseLost,
    OpsrunError,
    PluginError,
    RunNotFound,
)
from .fingerprint import fingerprint
from .hookspecs import hookimpl, hookspec
from .plugins import get_plugin_manager
from .sanitize import sanitize_message
from .values import (
    Attempt,
    ClaimDecision,
    EnsureResult,
    FailureEntry,
    Identity,
    Run,
    Summary,
)

if TYPE_CHECKING:
    from .ledger import Explanation, Ledger
    from .operation import ExecutionResult, JobContext, Operation
    from .reconcile import ReconcileError, ReconcileReport

__version__ = "0.1.0"

# The ledger pulls in SQLAlchemy and Alembic: load it on first use, so that importing opsrun_core
# (the pytest plugin does, in every host app's test run) stays cheap.
_LAZY = {
    "Ledger": "ledger",
    "Explanation": "ledger",
    "ReconcileError": "reconcile",
    "ReconcileReport": "reconcile",
    "ExecutionResult": "operation",
    "JobContext": "operation",
    "Operation": "operation",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'opsrun_core' has no attribute {name!r}")
    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


__all__ = [
    "RECONCILE_TYPE",
    "Attempt",
    "ClaimDecision",
    "ConfigurationError",
    "DatabaseError",
    "DispatchRejected",
    "Disposition",
    "EnsureResult",
    "ExecutionResult",
    "Explanation",
    "FailureEntry",
    "FingerprintError",
    "Identity",
    "InvalidInput",
    "JobContext",
    "LeaseLost",
    "Ledger",
    "ManualClock",
    "Operation",
    "OperationCatalog",
    "OperationSpec",
    "OpsrunError",
    "Outcome",
    "PluginError",
    "ReconcileError",
    "ReconcileReport",
    "Run",
    "RunNotFound",
    "RunStatus",
    "Summary",
    "fallback_label",
    "fingerprint",
    "get_plugin_manager",
    "hookimpl",
    "hookspec",
    "sanitize_message",
    "system_clock",
]
