"""Clocks: where a ledger's timestamps come from.

A clock is any zero-argument callable returning an aware UTC :class:`~datetime.datetime`.
By default a ledger on Postgres lets the database server stamp time (so workers on different hosts
agree) and a ledger on SQLite uses :func:`system_clock`. :class:`ManualClock` freezes time for tests.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import datetime, timedelta, timezone

from .errors import InvalidInput

__all__ = ["Clock", "ManualClock", "system_clock"]

Clock = Callable[[], datetime]


def system_clock() -> datetime:
    """The process clock, as an aware UTC datetime."""
    return datetime.now(timezone.utc)


class ManualClock:
    """A frozen clock that moves only when told to (thread-safe).

    >>> clock = ManualClock(datetime(2026, 1, 1, tzinfo=timezone.utc))
    >>> clock.advance(timedelta(minutes=16))
    datetime.datetime(2026, 1, 1, 0, 16, tzinfo=datetime.timezone.utc)
    """

    def __init__(self, start: datetime | None = None) -> None:
        start = start if start is not None else system_clock().replace(microsecond=0)
        self._now = _require_aware(start)
        self._lock = threading.Lock()

    def __call__(self) -> datetime:
        with self._lock:
            return self._now

    def advance(self, delta: timedelta) -> datetime:
        """Move the clock forward by ``delta`` (never backward) and return the new time."""
        if not isinstance(delta, timedelta) or delta < timedelta(0):
            raise InvalidInput("ManualClock.advance takes a non-negative timedelta")
        with self._lock:
            self._now = self._now + delta
            return self._now

    def set(self, when: datetime) -> datetime:
        """Jump to ``when`` (an aware datetime)."""
        with self._lock:
            self._now = _require_aware(when)
            return self._now

    def __repr__(self) -> str:
        return f"ManualClock({self._now.isoformat()})"


def _require_aware(when: datetime) -> datetime:
    if not isinstance(when, datetime) or when.tzinfo is None or when.utcoffset() is None:
        raise InvalidInput(
            "a clock needs an aware datetime (for example datetime.now(timezone.utc))"
        )
    return when.astimezone(timezone.utc)
