"""The ledger's invariants, checked against what is actually stored (``opsrun check``).

:func:`check_invariants` reads ``operation_runs`` and returns one :class:`Violation` per broken
rule; an empty list means the ledger is consistent. It only reads, never repairs, so it is safe to
run against a live ledger while workers write (every rule concerns one row, or one statement's
view of the active rows, so a concurrent write can never make it report a false violation).

The rules (``Violation.rule`` is the name on the left):

``duplicate_active``
    At most one active (``queued`` or ``running``) run per ``(type, identity_hash)``. The partial
    unique index ``uq_operation_runs_active_identity`` forbids this; the checker queries for it
    anyway, since an index can be dropped, disabled or never migrated. One violation per run of an
    offending identity, naming the others.
``completed_pending``
    A ``completed`` run has an outcome other than ``pending``.
``summary_counts``
    A ``completed`` run's ``summary_counts`` is a JSON object holding ``total``, ``processed``
    and ``failed``, each a non-negative int (not a bool, not a float).
``timestamps``
    A ``completed`` run has ``completed_at``, and ``completed_at >= started_at`` when it started.
``failure_summary``
    ``failure_summary`` (on any run, when not null) is a list of objects whose ``code`` is a
    non-empty string and whose ``message`` is a string that :func:`~opsrun_core.sanitize_message`
    leaves unchanged (so no secret, control character or overlong text reached the ledger).
``running_lease``
    A ``running`` run holds a lease: ``lease_token`` and ``lease_expires_at`` are both set.
``queued_lease``
    A ``queued`` run holds no lease: ``lease_token`` and ``lease_expires_at`` are both null.
``unreadable``
    A JSON column that does not decode (only possible when something other than opsrun wrote it).

Rows are streamed in batches of ``batch_size`` ordered by id (keyset pagination on the primary
key), each batch its own short transaction, so the checker's memory and lock footprint do not
grow with the table.

The command line wires it in a few lines::

    violations = check_invariants(ledger)
    click.echo(format_violations(violations))
    sys.exit(1 if violations else 0)
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Final

from sqlalchemy import Connection, Engine, Integer, Text, bindparam, cast, select, text
from sqlalchemy.exc import SQLAlchemyError

from .db import make_engine
from .errors import ConfigurationError, DatabaseError, InvalidInput
from .models import ACTIVE_PREDICATE, OperationRun
from .sanitize import sanitize_message
from .values import COUNT_KEYS

if TYPE_CHECKING:
    from .ledger import Ledger

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "RULES",
    "Violation",
    "check_invariants",
    "format_violations",
]

#: rows read per batch (one short transaction each)
DEFAULT_BATCH_SIZE: Final = 500

#: every rule the checker applies, with a one-line description (for ``opsrun check --help``)
RULES: Final[Mapping[str, str]] = {
    "duplicate_active": "at most one queued-or-running run per (type, identity_hash)",
    "completed_pending": "a completed run has an outcome other than 'pending'",
    "summary_counts": "a completed run's summary_counts holds total, processed, failed "
    "as non-negative ints",
    "timestamps": "a completed run has completed_at, and completed_at >= started_at",
    "failure_summary": "failure_summary entries have a non-empty code and a sanitized message",
    "running_lease": "a running run holds a lease (lease_token and lease_expires_at)",
    "queued_lease": "a queued run holds no lease",
    "unreadable": "JSON columns decode",
}


@dataclass(frozen=True)
class Violation:
    """One broken rule: which run, which rule (a key of :data:`RULES`), and what is wrong.

    ``detail`` never carries a stored message or identity value (they could be secrets), only
    column names, ids, types and counts.
    """

    run_id: int
    rule: str
    detail: str

    def __str__(self) -> str:
        return f"run {self.run_id}: {self.rule}: {self.detail}"

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (for ``opsrun check --json``)."""
        return {"run_id": self.run_id, "rule": self.rule, "detail": self.detail}


def check_invariants(
    source: Ledger | Engine | Connection | str, *, batch_size: int = DEFAULT_BATCH_SIZE
) -> list[Violation]:
    """Check every rule of this module over the whole ledger; ``[]`` means consistent.

    :param source: a :class:`~opsrun_core.Ledger`, an :class:`~sqlalchemy.Engine`, a database URL,
        or a :class:`~sqlalchemy.Connection` (then the check runs inside that connection's
        transaction and sees its uncommitted writes; nothing is committed or rolled back).
    :param batch_size: rows read per batch.
    :returns: the violations, duplicates first, then row by row in id order.
    :raises DatabaseError: the database refused a read (e.g. no ledger there: run the migrations).
    :raises ConfigurationError: ``source`` is not one of the accepted kinds, or a bad URL.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidInput("batch_size must be a positive int")
    with _bind(source) as connect:
        violations = _duplicates(connect)
        after = 0
        while True:
            rows = _batch(connect, after, batch_size)
            for row in rows:
                violations.extend(_check_row(row))
            if len(rows) < batch_size:
                return violations
            after = rows[-1]["id"]


def format_violations(violations: list[Violation]) -> str:
    """Human-readable report: one line per violation and a count, or a line saying all is well."""
    if not violations:
        return "ledger consistent: no invariant violations"
    lines = [str(v) for v in violations]
    rules = sorted({v.rule for v in violations})
    noun = "violation" if len(violations) == 1 else "violations"
    lines.append(f"{len(violations)} invariant {noun} ({', '.join(rules)})")
    return "\n".join(lines)


# -- reading ----------------------------------------------------------------------------------

#: opens one short transaction (or hands out the caller's connection)
_Connect = Callable[[], AbstractContextManager[Connection]]


@contextmanager
def _bind(source: object) -> Iterator[_Connect]:
    """Yield a factory of short transactions on ``source`` (or of its one caller's connection)."""
    from .ledger import Ledger

    owned: Engine | None = None
    if isinstance(source, Ledger):
        engine: Engine | None = source.engine
    elif isinstance(source, Engine):
        engine = source
    elif isinstance(source, str):
        owned = engine = make_engine(source)
    elif isinstance(source, Connection):
        engine = None
    else:
        raise ConfigurationError(
            "check_invariants takes a Ledger, a SQLAlchemy Engine or Connection, or a database "
            f"URL, not {type(source).__name__}"
        )

    @contextmanager
    def connect() -> Iterator[Connection]:
        try:
            if engine is None:
                assert isinstance(source, Connection)
                yield source
            else:
                with engine.begin() as conn:
                    yield conn
        except SQLAlchemyError as exc:
            orig = getattr(exc, "orig", None) or exc
            raise DatabaseError(
                f"the invariant check could not read operation_runs ({type(orig).__name__}: "
                f"{sanitize_message(orig, max_length=200)}); check the database URL and that "
                "`opsrun migrate` has run"
            ) from exc

    try:
        yield connect
    finally:
        if owned is not None:
            owned.dispose()


# Relies on uq_operation_runs_active_identity when it exists (an index-only scan of active rows);
# still correct, as a sequential scan, when it was dropped, which is exactly when it matters.
_DUPLICATES = text(
    f"""
SELECT type, identity_hash, id FROM operation_runs
WHERE {ACTIVE_PREDICATE} AND (type, identity_hash) IN (
    SELECT type, identity_hash FROM operation_runs WHERE {ACTIVE_PREDICATE}
    GROUP BY type, identity_hash HAVING COUNT(*) > 1
)
ORDER BY type, identity_hash, id
"""
)

_TABLE = OperationRun.__table__
_JSON_COLUMNS = ("summary_counts", "failure_summary")
# JSON columns are read as text and decoded here, so one undecodable value is a violation of its
# row rather than an exception that stops the whole check.
_ROWS = (
    select(
        _TABLE.c.id,
        _TABLE.c.status,
        _TABLE.c.outcome,
        *(cast(_TABLE.c[name], Text).label(name) for name in _JSON_COLUMNS),
        _TABLE.c.lease_token,
        _TABLE.c.lease_expires_at,
        _TABLE.c.started_at,
        _TABLE.c.completed_at,
    )
    .where(_TABLE.c.id > bindparam("after", type_=Integer))
    .order_by(_TABLE.c.id)
    .limit(bindparam("batch_size", type_=Integer))
)


def _duplicates(connect: _Connect) -> list[Violation]:
    with connect() as conn:
        rows = conn.execute(_DUPLICATES).all()
    groups: dict[tuple[str, str], list[int]] = {}
    for type_, identity_hash, run_id in rows:
        groups.setdefault((type_, identity_hash), []).append(run_id)
    violations = []
    for (type_, identity_hash), ids in groups.items():
        for run_id in ids:
            others = ", ".join(str(i) for i in ids if i != run_id)
            violations.append(
                Violation(
                    run_id,
                    "duplicate_active",
                    f"{len(ids)} active runs of {type_!r} identity {identity_hash[:12]}…; "
                    f"also run(s) {others}",
                )
            )
    return violations


def _batch(connect: _Connect, after: int, batch_size: int) -> list[Mapping[str, Any]]:
    with connect() as conn:
        result = conn.execute(_ROWS, {"after": after, "batch_size": batch_size})
        return [dict(row) for row in result.mappings()]


# -- the row rules ------------------------------------------------------------------------------


class _Unreadable(Exception):
    pass


def _decode(raw: object) -> Any:
    if raw is None:
        return None
    if not isinstance(raw, str):
        return raw  # a driver that already decoded it
    try:
        return json.loads(raw)
    except ValueError:
        raise _Unreadable() from None


def _check_row(row: Mapping[str, Any]) -> list[Violation]:
    run_id: int = row["id"]
    status: str = row["status"]
    out: list[Violation] = []

    def violation(rule: str, detail: str) -> None:
        out.append(Violation(run_id, rule, detail))

    decoded: dict[str, Any] = {}
    for name in _JSON_COLUMNS:
        try:
            decoded[name] = _decode(row[name])
        except _Unreadable:
            violation("unreadable", f"{name} is not valid JSON")
            decoded[name] = _Unreadable

    if status == "completed":
        if row["outcome"] == "pending":
            violation("completed_pending", "completed with outcome 'pending'")
        counts = decoded["summary_counts"]
        if counts is not _Unreadable:
            problem = _counts_problem(counts)
            if problem:
                violation("summary_counts", problem)
        completed_at: datetime | None = row["completed_at"]
        started_at: datetime | None = row["started_at"]
        if completed_at is None:
            violation("timestamps", "completed without completed_at")
        elif started_at is not None and completed_at < started_at:
            violation(
                "timestamps",
                f"completed_at {completed_at.isoformat()} is before "
                f"started_at {started_at.isoformat()}",
            )
    elif status == "running":
        missing = [name for name in ("lease_token", "lease_expires_at") if row[name] is None]
        if missing:
            violation("running_lease", f"running without a lease ({' and '.join(missing)} null)")
    elif status == "queued":
        held = [name for name in ("lease_token", "lease_expires_at") if row[name] is not None]
        if held:
            violation("queued_lease", f"queued but holds a lease ({' and '.join(held)} set)")

    failures = decoded["failure_summary"]
    if failures is not None and failures is not _Unreadable:
        for problem in _failure_problems(failures):
            violation("failure_summary", problem)
    return out


def _counts_problem(counts: object) -> str | None:
    if counts is None:
        return "completed without summary_counts"
    if not isinstance(counts, dict):
        return f"summary_counts is a JSON {_json_kind(counts)}, not an object"
    problems = []
    for key in COUNT_KEYS:
        if key not in counts or counts[key] is None:
            problems.append(f"{key} missing")
            continue
        value = counts[key]
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append(f"{key} is a JSON {_json_kind(value)}, not an int")
        elif value < 0:
            problems.append(f"{key} is negative ({value})")
    return "summary_counts: " + "; ".join(problems) if problems else None


def _failure_problems(failures: object) -> list[str]:
    if not isinstance(failures, list):
        return [f"failure_summary is a JSON {_json_kind(failures)}, not a list"]
    problems = []
    for index, entry in enumerate(failures):
        where = f"failure_summary[{index}]"
        if not isinstance(entry, dict):
            problems.append(f"{where} is a JSON {_json_kind(entry)}, not an object")
            continue
        code = entry.get("code")
        if not isinstance(code, str) or not code.strip():
            problems.append(f"{where}.code is missing or empty")
        message = entry.get("message")
        if not isinstance(message, str):
            problems.append(f"{where}.message is a JSON {_json_kind(message)}, not a string")
        elif sanitize_message(message) != message:
            # never show the message: it is exactly what the sanitizer would have removed
            problems.append(f"{where}.message is not sanitized ({len(message)} characters)")
    return problems


def _json_kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"
