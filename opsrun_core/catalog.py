"""The operation catalog: what opsrun knows about each operation type.

Types are plain strings (``assignments.fetch``); the catalog is not a complete registry, so an
unknown type still works and still gets a readable label.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, fields, replace
from datetime import timedelta
from typing import Any

from .errors import InvalidInput

__all__ = [
    "DEFAULT_EXPECTED_DURATION",
    "DEFAULT_QUEUED_LIMIT",
    "RECONCILE_TYPE",
    "OperationCatalog",
    "OperationSpec",
    "fallback_label",
]

#: the housekeeping job's type (a string, not an enum member: DESIGN's catalog is open)
RECONCILE_TYPE = "ops.reconcile_adapter_runs"

#: expected duration of an operation the catalog does not know
DEFAULT_EXPECTED_DURATION = timedelta(minutes=5)
#: how long a queued run may wait before reconcile calls it never started, unless the spec says
DEFAULT_QUEUED_LIMIT = timedelta(hours=1)
#: a lease lasts this many expected durations unless the spec sets one
LEASE_FACTOR = 2
#: a lease never lasts less than this
MIN_LEASE = timedelta(seconds=30)

_TYPE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:\-]{0,199}$")


#: no duration setting may exceed this (now + setting must stay a representable timestamp)
MAX_SETTING = timedelta(days=36500)


def _positive(name: str, value: timedelta | None, *, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, timedelta) or not timedelta(0) < value <= MAX_SETTING:
        raise InvalidInput(
            f"OperationSpec.{name} must be a positive timedelta of at most 100 years, or None"
        )


@dataclass(frozen=True)
class OperationSpec:
    """What the ledger knows about one operation type.

    ``cooldown``: how long a successful run keeps answering new dispatches of its identity
    (``None``: no cooldown). ``lease``: how long a claim holds a run before another worker may take
    it over (``None``: ``LEASE_FACTOR`` x ``expected_duration``, at least 30 seconds).
    ``queued_limit``: how long a run may stay queued before reconcile finishes it as never started
    (``None``: one hour, or 2 x ``expected_duration`` if that is longer).
    """

    type: str
    label: str | None = None
    expected_duration: timedelta = DEFAULT_EXPECTED_DURATION
    cooldown: timedelta | None = None
    lease: timedelta | None = None
    queued_limit: timedelta | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.type, str) or not _TYPE_RE.match(self.type):
            raise InvalidInput(
                f"operation type {self.type!r} is not valid: use letters, digits and . _ - :"
                " (for example 'assignments.fetch'), at most 200 characters"
            )
        if self.label is not None and (not isinstance(self.label, str) or not self.label.strip()):
            raise InvalidInput("OperationSpec.label must be a non-empty string or None")
        _positive("expected_duration", self.expected_duration, allow_none=False)
        _positive("cooldown", self.cooldown)
        _positive("lease", self.lease)
        _positive("queued_limit", self.queued_limit)

    @property
    def display_label(self) -> str:
        return self.label or fallback_label(self.type)

    @property
    def lease_duration(self) -> timedelta:
        if self.lease is not None:
            return self.lease
        return max(MIN_LEASE, self.expected_duration * LEASE_FACTOR)

    @property
    def queued_timeout(self) -> timedelta:
        if self.queued_limit is not None:
            return self.queued_limit
        return max(DEFAULT_QUEUED_LIMIT, self.expected_duration * 2)


def fallback_label(type_: str) -> str:
    """A readable label for an unknown type: ``"assignments.fetch"`` -> ``"Assignments fetch"``."""
    words = [w for w in re.split(r"[._:\-\s]+", str(type_)) if w]
    if not words:
        return "Operation"
    text = " ".join(words)
    return text[0].upper() + text[1:]


_BUILTIN = (
    OperationSpec(
        RECONCILE_TYPE,
        label="Reconcile adapter runs",
        expected_duration=timedelta(minutes=2),
        lease=timedelta(minutes=10),
    ),
)


class OperationCatalog:
    """Maps operation types to :class:`OperationSpec` (thread-safe).

    ``ops.reconcile_adapter_runs`` is always there. Registering a type twice replaces its spec only
    when the specs are equal or ``replace=True``; otherwise it is an error, so two plugins cannot
    silently fight over one type.
    """

    def __init__(self, specs: Iterable[OperationSpec] = ()) -> None:
        self._specs: dict[str, OperationSpec] = {}
        self._lock = threading.Lock()
        for spec in (*_BUILTIN, *specs):
            self.register(spec, replace=True)

    def register(self, spec: OperationSpec, *, replace: bool = False) -> OperationSpec:
        if not isinstance(spec, OperationSpec):
            raise InvalidInput("OperationCatalog.register takes an OperationSpec")
        with self._lock:
            existing = self._specs.get(spec.type)
            if existing is not None and existing != spec and not replace:
                raise InvalidInput(
                    f"operation {spec.type!r} is already registered with other settings; "
                    "pass replace=True to change it"
                )
            self._specs[spec.type] = spec
        return spec

    def define(self, type_: str, **fields_: Any) -> OperationSpec:
        """Register a spec from keyword arguments (the fields of :class:`OperationSpec`)."""
        known = {f.name for f in fields(OperationSpec)} - {"type"}
        unknown = set(fields_) - known
        if unknown:
            raise InvalidInput(
                f"unknown operation setting(s) {sorted(unknown)}; known: {sorted(known)}"
            )
        existing = self.get(type_)
        spec = replace(existing, **fields_) if existing and fields_ else existing
        if spec is None:
            spec = OperationSpec(type_, **fields_)
        return self.register(spec, replace=True)

    def get(self, type_: str) -> OperationSpec | None:
        return self._specs.get(type_)

    def spec(self, type_: str) -> OperationSpec:
        """The spec of ``type_``, or a default one for a type the catalog does not know."""
        found = self._specs.get(type_)
        return found if found is not None else OperationSpec(type_)

    def label(self, type_: str) -> str:
        found = self._specs.get(type_)
        return found.display_label if found is not None else fallback_label(type_)

    def expected_duration(self, type_: str) -> timedelta:
        return self.spec(type_).expected_duration

    def __contains__(self, type_: object) -> bool:
        return type_ in self._specs

    def __iter__(self) -> Iterator[OperationSpec]:
        return iter(list(self._specs.values()))

    def __len__(self) -> int:
        return len(self._specs)
