"""Bad input at every public entry point: a typed error naming the problem, and no trace left.

Every call here gets an :class:`OpsrunError` subclass (:class:`InvalidInput` for a malformed
argument, :class:`ConfigurationError` for a bad setting such as a URL, :class:`LeaseLost` for an
attempt that does not hold its run), whose message names the argument at fault, and the ledger is
byte-for-byte what it was before (a snapshot of ``SELECT * FROM operation_runs``). Hypothesis
supplies the bad values where a whole class of them should fail alike.

The gaps these tests found in the library are kept as regression tests at the end.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, text

from opsrun_core import (
    ConfigurationError,
    FingerprintError,
    InvalidInput,
    LeaseLost,
    Ledger,
    ManualClock,
    OperationSpec,
    OpsrunError,
    RunNotFound,
    RunStatus,
)
from opsrun_core.fingerprint import is_secret_key
from opsrun_core.values import Attempt

FETCH = "assignments.fetch"
LEASE = timedelta(minutes=4)

fixture_settings = settings(
    suppress_health_check=[HealthCheck.function_scoped_fixture],
    deadline=None,
    max_examples=40,
    database=None,
)


def _snapshot(engine: Engine) -> list[tuple[Any, ...]]:
    with engine.connect() as conn:
        return [
            tuple(row) for row in conn.execute(text("SELECT * FROM operation_runs ORDER BY id"))
        ]


class Populated:
    """A ledger holding one run in each state, and an attempt that holds the running one."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        ledger.catalog.register(OperationSpec(FETCH, lease=LEASE))
        self.queued = self.dispatch("queued")
        self.running = self.dispatch("running")
        self.attempt = ledger.claim(self.running)
        done = self.dispatch("done")
        ledger.complete(ledger.claim(done), {"total": 1, "processed": 1})
        self.before = _snapshot(ledger.engine)

    def dispatch(self, policy: str) -> int:
        return self.ledger.ensure_run(
            FETCH, workspace_id="w1", tenant_id="t1", identity={"policy_id": policy}
        ).run.id

    def unchanged(self) -> bool:
        return _snapshot(self.ledger.engine) == self.before


@pytest.fixture
def populated(request: pytest.FixtureRequest, opsrun_ledger: Ledger) -> Iterator[Populated]:
    state = Populated(opsrun_ledger)
    yield state
    if request.node.get_closest_marker("xfail") is None:  # a known bug may well write
        assert state.unchanged(), "a refused call changed the ledger"


def _refused(
    call: Callable[[], Any], error: type[OpsrunError] = InvalidInput, *, names: str | None = None
) -> OpsrunError:
    """Assert ``call()`` raises ``error`` (whose message names ``names``); return the error."""
    with pytest.raises(error) as caught:
        call()
    assert isinstance(caught.value, OpsrunError)
    if names is not None:
        assert names in str(caught.value), str(caught.value)
    return caught.value


def _ensure(ledger: Ledger, **overrides: Any) -> Any:
    kwargs: dict[str, Any] = {
        "workspace_id": "w1",
        "tenant_id": "t1",
        "identity": {"policy_id": "new"},
    }
    kwargs.update(overrides)
    type_ = kwargs.pop("type", FETCH)
    return ledger.ensure_run(type_, **kwargs)


def _each(cases: Any, check: Callable[..., Any]) -> None:
    """Run ``check(*case)`` for every case, naming the case that fails."""
    for case in cases:
        try:
            check(*case) if isinstance(case, tuple) else check(case)
        except (AssertionError, pytest.fail.Exception) as exc:
            pytest.fail(f"case {case!r}: {exc}", pytrace=False)


# -- operation types and scope ids --------------------------------------------------------------


def test_bad_operation_types(populated: Populated) -> None:
    _each(
        [None, "", 42, "has space", "x" * 201, "émoji✓", "a/b"],
        lambda bad: _refused(lambda: _ensure(populated.ledger, type=bad), names="operation type"),
    )


BAD_SCOPES = [
    ("workspace_id", None, "workspace_id is required"),
    ("workspace_id", "", "workspace_id must not be empty"),
    ("workspace_id", "   ", "workspace_id must not be empty"),
    ("workspace_id", True, "workspace_id must be a string, int or UUID, not bool"),
    ("workspace_id", b"w1", "not bytes"),
    ("workspace_id", 1.5, "not float"),
    ("workspace_id", "w" * 256, "workspace_id is longer than 255"),
    ("tenant_id", "", "tenant_id must not be empty"),
    ("tenant_id", False, "tenant_id must be a string, int or UUID, not bool"),
    ("tenant_id", "t" * 256, "tenant_id is longer than 255"),
]


def test_bad_scope_ids(populated: Populated) -> None:
    _each(
        BAD_SCOPES,
        lambda field, bad, names: _refused(
            lambda: _ensure(populated.ledger, **{field: bad}), names=names
        ),
    )


scope_ids = st.one_of(
    st.booleans(),
    st.floats(),
    st.binary(),
    st.text(alphabet=" \t\n\r\x0b\x0c\u00a0\u2003", max_size=5),
    st.text(min_size=256, max_size=300),
)


@fixture_settings
@given(bad=scope_ids, field=st.sampled_from(["workspace_id", "tenant_id"]))
def test_any_bad_scope_id_is_refused(populated: Populated, bad: Any, field: str) -> None:
    _refused(lambda: _ensure(populated.ledger, **{field: bad}), names=field)


def test_scope_ids_of_the_documented_types_are_stored_as_strings(opsrun_ledger: Ledger) -> None:
    for good in (42, uuid.UUID(int=7), "w-1"):
        assert _ensure(opsrun_ledger, workspace_id=good).run.workspace_id == str(good)


# -- identity, context, initiator -----------------------------------------------------------------

non_plain = st.one_of(
    st.binary(min_size=1),
    st.sampled_from([math.nan, math.inf, -math.inf]),
    st.builds(object),
    st.datetimes(timezones=st.none()),  # naive
    st.complex_numbers(allow_nan=False),
    st.integers(min_value=2**4097, max_value=2**4200),
)


@fixture_settings
@given(bad=non_plain, key=st.from_regex(r"\A[a-z]{1,8}(_id)?\Z"), nested=st.booleans())
def test_identity_values_that_are_not_plain_data(
    populated: Populated, bad: Any, key: str, nested: bool
) -> None:
    if is_secret_key(key):
        key = "policy_id"
    identity = {"outer": {key: bad}} if nested else {key: bad}
    error = _refused(lambda: _ensure(populated.ledger, identity=identity), FingerprintError)
    path = f"inputs.outer.{key}" if nested else f"inputs.{key}"
    assert path in str(error)
    if isinstance(bad, bytes) and len(bad) > 3:
        assert repr(bad) not in str(error)  # the value is never echoed


@fixture_settings
@given(
    secret=st.sampled_from(
        ["token", "access_token", "password", "secret", "client_secret", "Authorization", "api_key"]
    ),
    value=st.text(alphabet="0123456789", min_size=6, max_size=10),
)
def test_identity_keys_naming_a_secret(populated: Populated, secret: str, value: str) -> None:
    error = _refused(
        lambda: _ensure(populated.ledger, identity={"policy_id": "p", secret: value}),
        FingerprintError,
        names="names a secret",
    )
    assert value not in str(error)


def _deep(levels: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(levels):
        value = {"a": value}
    return value


DEEP = _deep(40)


MALFORMED_IDENTITIES = [
    (["policy_id", "p1"], "identity must be a mapping"),
    ("policy_id=p1", "identity must be a mapping"),
    ({1: "p1"}, "keys must be strings"),
    (DEEP, "nested deeper"),
]
BAD_CONTEXTS = [
    (["a"], "context must be a mapping"),
    ({"access_token": "x"}, "names a secret"),
    ({"nested": {"password": "x"}}, "context.nested.password: the key names a secret"),
    ({"when": datetime(2026, 1, 1)}, "context.when: a naive datetime"),
    ({"raw": b"bytes"}, "context.raw: a bytes is not plain data"),
    ({1: "x"}, "keys must be strings"),
    ({"ratio": float("nan")}, "context.ratio: NaN"),
]


def test_malformed_identities_contexts_and_initiators(populated: Populated) -> None:
    ledger = populated.ledger
    _each(
        MALFORMED_IDENTITIES,
        lambda identity, names: _refused(lambda: _ensure(ledger, identity=identity), names=names),
    )
    _each(
        BAD_CONTEXTS,
        lambda context, names: _refused(lambda: _ensure(ledger, context=context), names=names),
    )
    _each(
        [42, b"user:1", ["user:1"]],
        lambda initiator: _refused(lambda: _ensure(ledger, initiator=initiator), names="initiator"),
    )


# -- run ids ------------------------------------------------------------------------------------

bad_run_ids = st.one_of(
    st.integers(max_value=0),
    st.booleans(),
    st.none(),
    st.floats(),
    st.text(max_size=5),
    st.builds(uuid.uuid4),
    st.decimals(allow_nan=False),
)


@fixture_settings
@given(bad=bad_run_ids)
def test_bad_run_ids(populated: Populated, bad: Any) -> None:
    ledger = populated.ledger
    _refused(lambda: ledger.claim(bad), names="run id")
    _refused(lambda: ledger.claim(bad, lease=LEASE), names="run id")
    _refused(lambda: ledger.get(bad), names="run id")


# -- leases -------------------------------------------------------------------------------------


@fixture_settings
@given(
    bad=st.one_of(
        st.timedeltas(max_value=timedelta(0)),
        st.integers(),
        st.floats(),
        st.text(max_size=4),
    )
)
def test_bad_lease_lengths(populated: Populated, bad: Any) -> None:
    _refused(lambda: populated.ledger.claim(populated.queued, lease=bad), names="lease")


@pytest.mark.parametrize("field", ["lease", "cooldown", "queued_limit", "expected_duration"])
@pytest.mark.parametrize("bad", [timedelta(0), timedelta(seconds=-1), 30, "1m"])
def test_bad_durations_in_an_operation_spec(field: str, bad: Any) -> None:
    _refused(lambda: OperationSpec(FETCH, **{field: bad}), names=field)


# -- counts and failure entries ---------------------------------------------------------------------

bad_count_values = st.one_of(
    st.integers(max_value=-1),
    st.booleans(),
    st.floats(),
    st.text(max_size=3),
    st.none(),
    st.decimals(allow_nan=False),
)


@fixture_settings
@given(
    key=st.sampled_from(["total", "processed", "failed", "skipped"]),
    bad=bad_count_values,
    how=st.sampled_from(["complete", "count", "set_counts"]),
)
def test_bad_counts(populated: Populated, key: str, bad: Any, how: str) -> None:
    attempt = populated.attempt
    counts_before = dict(attempt.counts)
    if how == "complete":
        call: Callable[[], Any] = lambda: populated.ledger.complete(attempt, {key: bad})  # noqa: E731
    else:
        call = lambda: getattr(attempt, how)(**{key: bad})  # noqa: E731
    _refused(call, names=repr(key))
    assert attempt.counts == counts_before  # nothing half-applied
    assert attempt.token is not None  # the attempt still holds its run


MALFORMED_COUNTS = [
    ({"processed": 3, "failed": 4}, "cannot exceed processed"),
    ({"total": 2, "processed": 3}, "cannot exceed total"),
    ({"": 1}, "count names must be non-empty strings"),
    ({1: 1}, "count names must be non-empty strings"),
    ([("total", 1)], "counts must be a mapping"),
]


def test_inconsistent_or_malformed_counts_at_completion(populated: Populated) -> None:
    _each(
        MALFORMED_COUNTS,
        lambda counts, names: _refused(
            lambda: populated.ledger.complete(populated.attempt, counts), names=names
        ),
    )
    assert populated.ledger.get(populated.running).status is RunStatus.RUNNING


def test_bad_failure_codes(populated: Populated) -> None:
    _each(
        ["", "   ", "\n\t", None, 42, b"x.failed", ["x"]],
        lambda code: _refused(
            lambda: populated.attempt.add_failure(code, "message"), names="failure code"
        ),
    )
    assert populated.attempt.failures == []


def test_a_bad_call_leaves_the_attempt_usable(opsrun_ledger: Ledger) -> None:
    """After every refusal above, the same attempt still completes its run normally."""
    state = Populated(opsrun_ledger)
    attempt = state.attempt
    for call in (
        lambda: attempt.count(processed=-1),
        lambda: attempt.add_failure("", "x"),
        lambda: opsrun_ledger.complete(attempt, {"processed": 2, "failed": 3}),
    ):
        _refused(call)
    assert state.unchanged()
    run = opsrun_ledger.complete(attempt, {"total": 1, "processed": 1})
    assert run.summary_counts == {"total": 1, "processed": 1, "failed": 0}


# -- attempts -------------------------------------------------------------------------------------


def test_attempt_methods_refuse_what_is_not_a_held_attempt(populated: Populated) -> None:
    ledger = populated.ledger
    skipped = ledger.claim(populated.running)  # held by populated.attempt: a skip
    assert not skipped.acquired

    def check(method: str) -> None:
        args = ("boom",) if method == "fail" else ()
        call = getattr(ledger, method)
        _refused(lambda: call(populated.running, *args), names="Attempt")
        _refused(lambda: call(skipped, *args), LeaseLost, names="does not hold")
        # a wrong lease token (a forged or stale attempt) is fenced off by the database
        forged = Attempt(
            run_id=populated.running,
            acquired=True,
            reason="acquired",
            run=populated.attempt.run,
            token="0" * 32,
            lease=LEASE,
        )
        _refused(lambda: call(forged, *args), LeaseLost, names="lost its lease")

    _each(["heartbeat", "complete", "fail", "release"], check)


# -- reads and housekeeping -------------------------------------------------------------------------


BAD_FILTERS = [
    ({"status": "done"}, "unknown status"),
    ({"status": ["queued", "bogus"]}, "unknown status"),
    ({"outcome": "ok"}, "unknown outcome"),
    ({"limit": 0}, "limit"),
    ({"limit": True}, "limit"),
    ({"since": datetime(2026, 1, 1)}, "aware"),
    ({"workspace_id": ""}, "workspace_id"),
]
BAD_RECONCILES = [
    ({"grace": timedelta(seconds=-1)}, "grace"),
    ({"grace": 30}, "grace"),
    ({"batch_size": 0}, "batch_size"),
    ({"batch_size": True}, "batch_size"),
    ({"workspace_id": ""}, "workspace_id"),
    ({"workspace_id": None}, "workspace_id"),
]


def test_bad_run_filters_and_reconcile_arguments(populated: Populated) -> None:
    ledger = populated.ledger
    _each(BAD_FILTERS, lambda kwargs, names: _refused(lambda: ledger.runs(**kwargs), names=names))

    def reconcile(kwargs: dict[str, Any], names: str) -> None:
        kwargs = {"workspace_id": "w1", **kwargs}
        workspace = kwargs.pop("workspace_id")
        _refused(lambda: ledger.reconcile(workspace, **kwargs), names=names)

    _each(BAD_RECONCILES, reconcile)


# -- the job layer ------------------------------------------------------------------------------


def test_bad_operation_declarations_and_calls(populated: Populated) -> None:
    ledger = populated.ledger
    _refused(lambda: ledger.operation(FETCH, identity=("policy_id",), colour="red"), names="colour")
    _refused(lambda: ledger.operation(FETCH, identity=("workspace_id",))(lambda ctx: None))
    _refused(lambda: ledger.operation(FETCH, identity=("",))(lambda ctx: None))

    @ledger.operation(FETCH, identity=("policy_id",))
    def fetch(ctx: Any, *, workspace_id: str, tenant_id: str, policy_id: str) -> None:
        raise AssertionError("never called")

    _refused(lambda: fetch.dispatch(workspace_id="w1", tenant_id="t1"), names="policy_id")
    for bad in (-1, True, 1.5):
        _refused(lambda bad=bad: fetch.execute(populated.queued, retries_left=bad), names="retries")
    _refused(lambda: fetch.execute("1", policy_id="p"), names="run id")


# -- clocks and URLs ------------------------------------------------------------------------------


def test_bad_clocks(populated: Populated) -> None:
    clock = ManualClock(datetime(2026, 1, 1, tzinfo=timezone.utc))
    _refused(lambda: clock.advance(timedelta(seconds=-1)), names="non-negative")
    _refused(lambda: clock.set(datetime(2026, 1, 1)), names="aware")
    _refused(lambda: ManualClock(datetime(2026, 1, 1)), names="aware")
    engine = populated.ledger.engine
    _refused(lambda: Ledger(engine, clock=5), ConfigurationError, names="clock")  # type: ignore[arg-type]
    naive = Ledger(engine, clock=lambda: datetime(2026, 1, 1))
    _refused(lambda: _ensure(naive), ConfigurationError, names="naive")
    _refused(lambda: naive.claim(populated.queued), ConfigurationError, names="naive")


@pytest.mark.parametrize(
    "url",
    [
        "",
        "not a url",
        "://nothing",
        "mysql+nosuchdriver://u@h/db",
        "oracle://u@h/db",
        "postgresql+nosuchdriver://u@h/db",
    ],
)
def test_bad_database_urls(url: str) -> None:
    _refused(lambda: Ledger(url), ConfigurationError)


@pytest.mark.parametrize("database", [None, 42, b"sqlite://", ["sqlite://"]])
def test_a_database_that_is_neither_url_nor_engine(database: Any) -> None:
    _refused(
        lambda: Ledger(database), ConfigurationError, names="URL string or a SQLAlchemy Engine"
    )


def test_unreachable_databases_name_the_url_without_its_password(tmp_path: Any) -> None:
    for url in (
        "postgresql+psycopg://opsrun:s3cr3t-pw@127.0.0.1:1/nowhere?connect_timeout=2",
        f"sqlite:///{tmp_path}/no/such/dir/ledger.sqlite3",
    ):
        ledger = Ledger(url)
        try:
            error = _refused(ledger.upgrade, ConfigurationError, names="cannot connect")
            assert "s3cr3t-pw" not in str(error)
        finally:
            ledger.engine.dispose()


@settings(deadline=None, max_examples=60, database=None)
@given(url=st.text(max_size=40))
def test_any_text_as_a_url_is_a_ledger_or_a_configuration_error(url: str) -> None:
    try:
        ledger = Ledger(url)
    except ConfigurationError:
        return
    ledger.engine.dispose()  # a valid URL: nothing connects until the ledger is used


# -- regressions: each was a gap these tests found (fixed in 491c2b9) -------------------------------


def test_scope_ids_of_other_types_are_refused(populated: Populated) -> None:
    """A list, a dict or an object() used to become a workspace id through str()."""
    _each(
        [["w1"], {"id": "w1"}, object()],
        lambda bad: _refused(
            lambda: _ensure(populated.ledger, workspace_id=bad),
            names="workspace_id must be a string, int or UUID",
        ),
    )


NUL_CASES = [
    ({"workspace_id": "w\x00"}, "workspace_id"),
    ({"tenant_id": "t\x00"}, "tenant_id"),
    ({"identity": {"policy_id": "p\x001"}}, "inputs.policy_id"),
    ({"identity": {"policy\x00id": "p1"}}, "inputs"),
    ({"initiator": "user:\x00"}, "initiator"),
]


def test_nul_characters_are_refused_as_invalid_input(populated: Populated) -> None:
    """Postgres cannot store NUL in text or jsonb: it used to surface as a DatabaseError there
    (and be stored on SQLite); now both refuse it up front, naming the argument."""
    _each(
        NUL_CASES,
        lambda overrides, names: _refused(
            lambda: _ensure(populated.ledger, **overrides), names=names
        ),
    )


def test_run_ids_beyond_any_stored_id_are_simply_not_found(populated: Populated) -> None:
    """Ids past the int4 column used to fail as DatabaseError (Postgres) or OverflowError."""
    ledger = populated.ledger

    def check(run_id: int) -> None:
        _refused(lambda: ledger.get(run_id), RunNotFound, names=str(run_id))
        assert ledger.claim(run_id, lease=LEASE).reason == "not_found"
        assert ledger.claim(run_id).reason == "not_found"

    _each([2**31 - 1, 2**31, 2**63, 2**64], check)


def test_a_lease_too_long_to_represent_is_refused(populated: Populated) -> None:
    """now + lease used to overflow (OverflowError, or a DatabaseError with the server clock)."""
    ledger = populated.ledger
    _each(
        [timedelta.max, timedelta(days=10**8), timedelta(days=36501)],
        lambda lease: _refused(lambda: ledger.claim(populated.queued, lease=lease), names="lease"),
    )
    populated.ledger.release(ledger.claim(populated.queued, lease=timedelta(days=36500)))
    populated.before = _snapshot(ledger.engine)  # claimed and released: attempts went up by one


def test_an_unprintable_failure_message_is_kept_safely() -> None:
    """add_failure used to call str(message) at once and let its exception escape."""

    class Unprintable:
        def __str__(self) -> str:
            raise RuntimeError("no")

    attempt = Attempt(run_id=1, acquired=True, reason="acquired")
    attempt.add_failure("item.failed", Unprintable())
    assert attempt.failures[0].message == "<unprintable Unprintable>"
