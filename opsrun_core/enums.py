"""The string enums of the ledger. Values are stored as plain text; CHECK constraints pin them."""

from __future__ import annotations

import enum

__all__ = ["ACTIVE_STATUSES", "Disposition", "Outcome", "RunStatus"]


class RunStatus(str, enum.Enum):
    """Where a run is in its life."""

    #: dispatched, waiting for a worker to claim it
    QUEUED = "queued"
    #: claimed by an attempt that holds a lease
    RUNNING = "running"
    #: finished; terminal
    COMPLETED = "completed"

    def __str__(self) -> str:
        return self.value


class Outcome(str, enum.Enum):
    """How a run ended (``pending`` until it does)."""

    #: not finished yet
    PENDING = "pending"
    #: every item processed without a failure
    SUCCEEDED = "succeeded"
    #: some items failed, some succeeded
    PARTIALLY_SUCCEEDED = "partially_succeeded"
    #: an exception, or every processed item failed
    FAILED = "failed"
    #: stopped on purpose before it finished
    CANCELLED = "cancelled"

    def __str__(self) -> str:
        return self.value


class Disposition(str, enum.Enum):
    """What a dispatch did."""

    #: a new run was inserted
    CREATED = "created"
    #: a queued or running run of the same identity was returned
    REUSED_ACTIVE = "reused_active"
    #: a run of the same identity succeeded inside the cooldown and was returned
    REUSED_COOLDOWN = "reused_cooldown"

    def __str__(self) -> str:
        return self.value


#: the statuses covered by the partial unique index (keep the SQL literal in sync: PERF_NOTES trap 3)
ACTIVE_STATUSES = (RunStatus.QUEUED.value, RunStatus.RUNNING.value)
