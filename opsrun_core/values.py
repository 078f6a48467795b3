"""Plain values that cross opsrun's boundaries: runs read back, hook results, dispatch and claim results.

They are frozen dataclasses (except :class:`Attempt`, which collects an attempt's counts), detached
from any session, so they are safe to pass between threads and to pickle.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal

from .enums import Disposition, Outcome, RunStatus
from .errors import InvalidInput
from .sanitize import sanitize_message

if TYPE_CHECKING:
    from sqlalchemy import RowMapping

__all__ = [
    "COUNT_KEYS",
    "Attempt",
    "ClaimDecision",
    "EnsureResult",
    "FailureEntry",
    "Identity",
    "Run",
    "Summary",
    "validate_counts",
]

_HASH_RE = re.compile(r"[0-9a-f]{64}")

#: the keys every completed run's ``summary_counts`` holds
COUNT_KEYS = ("total", "processed", "failed")


@dataclass(frozen=True)
class Run:
    """A run as read from the ledger: a detached, read-only value."""

    id: int
    type: str
    workspace_id: str
    tenant_id: str | None
    identity_hash: str
    identity: dict[str, Any]
    status: RunStatus
    outcome: Outcome
    summary_counts: dict[str, Any] | None
    failure_summary: list[dict[str, Any]] | None
    context: dict[str, Any] | None
    initiator: str | None
    attempts: int
    lease_expires_at: datetime | None
    heartbeat_at: datetime | None
    created_at: datetime
    started_at: datetime | None
    completed_at: datetime | None
    updated_at: datetime

    @property
    def is_active(self) -> bool:
        return self.status in (RunStatus.QUEUED, RunStatus.RUNNING)

    @classmethod
    def from_row(cls, row: Mapping[str, Any] | RowMapping) -> Run:
        return cls(
            id=row["id"],
            type=row["type"],
            workspace_id=row["workspace_id"],
            tenant_id=row["tenant_id"],
            identity_hash=row["identity_hash"],
            identity=dict(row["identity"] or {}),
            status=RunStatus(row["status"]),
            outcome=Outcome(row["outcome"]),
            summary_counts=row["summary_counts"],
            failure_summary=row["failure_summary"],
            context=row["context"],
            initiator=row["initiator"],
            attempts=row["attempts"],
            lease_expires_at=row["lease_expires_at"],
            heartbeat_at=row["heartbeat_at"],
            created_at=row["created_at"],
            started_at=row["started_at"],
            completed_at=row["completed_at"],
            updated_at=row["updated_at"],
        )


@dataclass(frozen=True)
class EnsureResult:
    """What a dispatch returned: the run and how it was obtained."""

    run: Run
    disposition: Disposition

    @property
    def created(self) -> bool:
        return self.disposition is Disposition.CREATED


@dataclass(frozen=True)
class Identity:
    """Result of ``opsrun_identity``: the fingerprint and the (non-secret) inputs that were hashed."""

    hash: str
    inputs: dict[str, Any]

    def __post_init__(self) -> None:
        if not isinstance(self.hash, str) or not _HASH_RE.fullmatch(self.hash):
            raise InvalidInput("an Identity hash must be 64 lowercase hex characters")


ClaimAction = Literal["create", "reuse_active", "reuse_cooldown", "reject"]


@dataclass(frozen=True)
class ClaimDecision:
    """Result of ``opsrun_claim``: what a dispatch should do.

    ``run`` is the run to hand back for the two ``reuse_*`` actions; ``reason`` explains a rejection.
    """

    action: ClaimAction
    run: Run | None = None
    reason: str | None = None

    def __post_init__(self) -> None:
        if self.action not in ("create", "reuse_active", "reuse_cooldown", "reject"):
            raise InvalidInput(f"unknown claim action {self.action!r}")
        if self.action.startswith("reuse") and self.run is None:
            raise InvalidInput(f"a {self.action!r} claim decision needs the run to reuse")


@dataclass(frozen=True)
class FailureEntry:
    """One entry of a run's ``failure_summary``: a stable code and a (sanitized) message."""

    code: str
    message: str

    def as_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


@dataclass(frozen=True)
class Summary:
    """Result of ``opsrun_summarize``: the ``summary_counts`` to store and the outcome."""

    counts: dict[str, int]
    outcome: Outcome


def validate_counts(counts: Mapping[str, Any], *, where: str) -> dict[str, int]:
    """Check that counts are non-negative ints (``bool`` is not a count); return a plain dict."""
    if not isinstance(counts, Mapping):
        raise InvalidInput(f"{where}: counts must be a mapping of name to non-negative int")
    clean: dict[str, int] = {}
    for key, value in counts.items():
        if not isinstance(key, str) or not key:
            raise InvalidInput(f"{where}: count names must be non-empty strings")
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidInput(f"{where}: count {key!r} must be an int, got {type(value).__name__}")
        if value < 0:
            raise InvalidInput(f"{where}: count {key!r} must be >= 0, got {value}")
        clean[key] = value
    return clean


@dataclass
class Attempt:
    """One execution of a run, holding the lease (``token``) that fences its writes.

    Counts and per-item failures live here until ``complete``/``fail`` writes them; a released or
    taken-over attempt's counts are simply dropped (final attempt wins).
    """

    run_id: int
    acquired: bool
    reason: Literal["acquired", "not_found", "running", "completed"]
    run: Run | None = None
    token: str | None = None
    lease: timedelta | None = None
    counts: dict[str, int] = field(default_factory=dict)
    failures: list[FailureEntry] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @property
    def number(self) -> int:
        """Which attempt this is (1 for the first execution)."""
        return self.run.attempts if self.run is not None else 0

    def count(self, **increments: int) -> None:
        """Add to the attempt's counts, e.g. ``attempt.count(processed=1, failed=1)``."""
        clean = validate_counts(increments, where="count()")
        with self._lock:
            for key, value in clean.items():
                self.counts[key] = self.counts.get(key, 0) + value

    def set_counts(self, **values: int) -> None:
        """Set counts outright, e.g. ``attempt.set_counts(total=10)``."""
        clean = validate_counts(values, where="set_counts()")
        with self._lock:
            self.counts.update(clean)

    def add_failure(self, code: str, message: object) -> None:
        """Record a per-item failure (kept even when the run ends partially succeeded).

        The message is sanitized when written.
        """
        if not isinstance(code, str) or not code.strip():
            raise InvalidInput(
                "a failure code must be a non-empty string such as 'directory.throttled'"
            )
        with self._lock:
            # sanitize now: it never raises, whatever __str__ of the message does
            self.failures.append(FailureEntry(code=code, message=sanitize_message(message)))
