"""The fingerprint: canonical, stable across processes and key order, distinguishing, secret-free."""

from __future__ import annotations

import datetime as dt
import enum
import importlib
import json
import math
import os
import subprocess
import sys
import uuid
from collections.abc import Mapping
from decimal import Decimal
from pathlib import Path
from random import Random
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from opsrun_core.errors import FingerprintError, InvalidInput
from opsrun_core.fingerprint import (
    FINGERPRINT_KEY_ENV,
    FINGERPRINT_VERSION,
    MAX_DEPTH,
    canonical_identity,
    fingerprint,
    identity_digest,
    is_secret_key,
)

HEX = frozenset("0123456789abcdef")
WORKSPACE = uuid.UUID("7d0c2a5e-3f4b-4c8d-9e1f-0a2b3c4d5e6f")
SENTINEL = "SENTINEL-VALUE-4711"


class Color(enum.Enum):
    RED = "red"


class Level(enum.IntEnum):
    HIGH = 3


@pytest.fixture(autouse=True)
def _no_fingerprint_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """A key in the developer's environment must not change the pinned hashes."""
    monkeypatch.delenv(FINGERPRINT_KEY_ENV, raising=False)


def _fp(inputs: Mapping[str, Any], **overrides: Any) -> str:
    """The fingerprint of ``inputs`` in a default scope, with ``type``/scope overridable."""
    arguments: dict[str, Any] = {
        "type": "assignments.fetch",
        "workspace_id": "w1",
        "tenant_id": "t1",
    }
    arguments.update(overrides)
    type_ = arguments.pop("type")
    return fingerprint(type_, inputs=inputs, **arguments)


def _is_hex64(value: str) -> bool:
    return len(value) == 64 and set(value) <= HEX


# --- golden vectors ---------------------------------------------------------------------------
#
# Computed once by this implementation (the first two checked by hand with `sha256sum` and
# `openssl dgst -hmac`) and pinned. CHANGING ANY OF THEM IS A BREAKING CHANGE: every run already
# in a ledger would get a different fingerprint, so dedupe and cooldown would silently stop
# working across the upgrade. Bump FINGERPRINT_VERSION instead, and say so in the changelog.

GOLDEN = [
    pytest.param(
        "assignments.fetch",
        "w1",
        None,
        {},
        "a96b6258248c54cc0b3d32050db8a0123d068a1f2feda165deac4bc020b372aa",
        id="empty-inputs",
    ),
    pytest.param(
        "assignments.fetch",
        "w1",
        "t1",
        {"policy_id": "p-42"},
        "ba3dfb5eb98057e75820f1a68521b7fa3c9db7a0abce3203d9207fbba85ef43c",
        id="string-input",
    ),
    pytest.param(
        "assignments.restore",
        42,
        7,
        {"backup_id": 9001, "dry_run": False, "note": None},
        "b6498b473ad078144c887a2005907a908ada94877433a52cf9767ffc11c58bb1",
        id="int-scope-int-bool-none",
    ),
    pytest.param(
        "ops.reconcile_adapter_runs",
        WORKSPACE,
        None,
        {"run_uuid": uuid.UUID(int=1)},
        "a31c9fc3ca8e97dd7f4ddc0501f55ab3ae252c836fd91b12cca248f15e0ce7fc",
        id="uuid",
    ),
    pytest.param(
        "reports.build",
        "w1",
        "",
        {
            "since": dt.datetime(2024, 3, 1, 12, 30, tzinfo=dt.timezone(dt.timedelta(hours=2))),
            "day": dt.date(2024, 2, 29),
        },
        "28345414a8a914d5db5aecfeacb200394d3aa1502fed2d8458b4cf08098a7f16",
        id="datetime-date-empty-tenant",
    ),
    pytest.param(
        "billing.sync",
        "w1",
        "t1",
        {"amount": Decimal("1.50"), "ratio": 0.1, "zero": -0.0, "big": 2**70},
        "6e850427f7d9c5aa473fc02539dad8450fa94bae8c659b0c5456d0f48143052e",
        id="numbers",
    ),
    pytest.param(
        "tags.apply",
        "w1",
        "t1",
        {"tags": {"gamma", "alpha", "beta"}, "ids": frozenset({3, 1, 2}), "pair": (1, "a")},
        "d77aca00ce88d32251d6fea190bb0473e3b9aa33c6e635aa5ba5b609e6c61120",
        id="sets-and-tuple",
    ),
    pytest.param(
        "names.sync",
        "w1",
        "t1",
        {"city": "Zürich ☃", "emoji": "😀", "quote": 'a"b\\c\n'},
        "e2ecf3f64bef233785612902a7d01994d1df9a92f98c23a45bb8a76829a17159",
        id="unicode-and-escapes",
    ),
    pytest.param(
        "assignments.fetch",
        "w1",
        "t1",
        {
            "filter": {"ids": [3, 1, 2], "nested": {"deep": [{"x": 1}, {"y": [True, None]}]}},
            "limit": None,
        },
        "33871620a3438fcb1f99feaebf0f94658a747b28b9545b10cf109953962e44e3",
        id="nested",
    ),
    pytest.param(
        "enums.check",
        "w1",
        "t1",
        {"color": Color.RED, "level": Level.HIGH, "levels": [Level.HIGH]},
        "75817b866feea9b8146eb93fecfbc00f582c89bc5da346a8a3bb045bf495bcea",
        id="enums",
    ),
]


@pytest.mark.parametrize(("type_", "workspace_id", "tenant_id", "inputs", "expected"), GOLDEN)
def test_golden_vectors(
    type_: str, workspace_id: object, tenant_id: object, inputs: dict[str, Any], expected: str
) -> None:
    actual = fingerprint(type_, workspace_id=workspace_id, tenant_id=tenant_id, inputs=inputs)
    assert actual == expected


def test_canonical_document_is_pinned() -> None:
    identity = canonical_identity(
        "assignments.fetch",
        workspace_id="w1",
        tenant_id="t1",
        inputs={"policy_id": "p-42", "n": 1, "é": [1.5, None]},
    )
    assert identity.canonical == (
        b'{"inputs":{"n":1,"policy_id":"p-42","\xc3\xa9":[1.5,null]},'
        b'"tenant_id":"t1","type":"assignments.fetch","v":1,"workspace_id":"w1"}'
    )
    assert FINGERPRINT_VERSION == 1


def test_golden_hmac() -> None:
    # checked with: printf '%s' '<canonical>' | openssl dgst -sha256 -hmac opsrun-test-key
    assert (
        _fp({"policy_id": "p-42"}, key=b"opsrun-test-key")
        == "34e5059ffd95e5bdb3e1e1a9078104ae693ad4ec030c2bd7f5df8dd673fc9659"
    )


def test_normalised_inputs_are_what_was_hashed() -> None:
    inputs = {
        "since": dt.datetime(2024, 3, 1, 12, 30, tzinfo=dt.timezone(dt.timedelta(hours=2))),
        "day": dt.date(2024, 2, 29),
        "tags": {"gamma", "alpha", "beta"},
        "pair": (1, "a"),
        "amount": Decimal("1.50"),
        "id": uuid.UUID(int=1),
        "color": Color.RED,
        "level": Level.HIGH,
    }
    expected = {
        "since": "2024-03-01T10:30:00+00:00",
        "day": "2024-02-29",
        "tags": ["alpha", "beta", "gamma"],
        "pair": [1, "a"],
        "amount": "1.50",
        "id": "00000000-0000-0000-0000-000000000001",
        "color": "red",
        "level": 3,
    }
    identity = canonical_identity("t", workspace_id="w1", inputs=inputs)
    assert identity.inputs == expected
    assert type(identity.inputs["level"]) is int  # the plain value, not the IntEnum
    assert json.loads(identity.canonical)["inputs"] == expected
    digest, stored = identity_digest("t", workspace_id="w1", inputs=inputs)
    assert stored == expected
    assert digest == fingerprint("t", workspace_id="w1", inputs=inputs)


# --- stable ------------------------------------------------------------------------------------


def test_equal_across_key_order() -> None:
    forward = {"a": 1, "b": {"x": [1, 2], "y": {"p": None, "q": "s"}}, "c": "z"}
    backward = {"c": "z", "b": {"y": {"q": "s", "p": None}, "x": [1, 2]}, "a": 1}
    assert list(forward) != list(backward)
    assert _fp(forward) == _fp(backward)


def test_same_instant_in_any_timezone_is_the_same_identity() -> None:
    utc = dt.datetime(2024, 3, 1, 10, 30, tzinfo=dt.timezone.utc)
    paris = utc.astimezone(dt.timezone(dt.timedelta(hours=1)))
    assert _fp({"since": utc}) == _fp({"since": paris})


def test_scope_ids_are_stored_as_strings() -> None:
    assert _fp({}, workspace_id=42, tenant_id=7) == _fp({}, workspace_id="42", tenant_id="7")
    assert _fp({}, workspace_id=WORKSPACE) == _fp({}, workspace_id=str(WORKSPACE))


#: Computes ``result``; run in this process and in subprocesses with other hash seeds.
_SET_INPUT_CODE = """
import uuid
from opsrun_core.fingerprint import fingerprint
result = fingerprint(
    "tags.apply",
    workspace_id="w1",
    tenant_id=None,
    inputs={
        "tags": {"alpha", "beta", "gamma", "delta", "epsilon", "zeta"},
        "mixed": frozenset({1, "1", None, 2.5, uuid.UUID(int=7)}),
        "by_name": {"k%d" % i: i for i in range(20)},
    },
)
"""


def _fingerprint_in_subprocess(hash_seed: str) -> str:
    # not `import opsrun_core.fingerprint as m`: the package exports the function under that name
    module = importlib.import_module("opsrun_core.fingerprint")
    package_root = Path(str(module.__file__)).parent.parent
    env = {k: v for k, v in os.environ.items() if k != FINGERPRINT_KEY_ENV}
    env["PYTHONHASHSEED"] = hash_seed
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(package_root), env.get("PYTHONPATH", "")) if p
    )
    completed = subprocess.run(
        [sys.executable, "-c", _SET_INPUT_CODE + "print(result)"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return completed.stdout.strip()


def test_equal_across_hash_seeds_and_processes() -> None:
    results = {seed: _fingerprint_in_subprocess(seed) for seed in ("0", "12345")}
    assert _is_hex64(results["0"])
    assert results["0"] == results["12345"]
    here: dict[str, Any] = {}
    exec(_SET_INPUT_CODE, here)
    assert here["result"] == results["0"]


def test_sets_are_sorted_and_deduplicated_after_normalisation() -> None:
    identity = canonical_identity(
        "t", workspace_id="w", inputs={"s": {uuid.UUID(int=2), str(uuid.UUID(int=2)), 1, "1"}}
    )
    # sorted by canonical JSON: '"0000..."' < '"1"' < '1'
    assert identity.inputs["s"] == ["00000000-0000-0000-0000-000000000002", "1", 1]


# --- distinguishing ------------------------------------------------------------------------------


def test_differs_by_type() -> None:
    assert _fp({}, type="assignments.fetch") != _fp({}, type="assignments.restore")


def test_differs_by_workspace() -> None:
    assert _fp({}, workspace_id="w1") != _fp({}, workspace_id="w2")


@pytest.mark.parametrize(("one", "other"), [(None, ""), ("t1", "t2"), (None, "t1"), ("", " ")])
def test_differs_by_tenant(one: str | None, other: str | None) -> None:
    assert _fp({}, tenant_id=one) != _fp({}, tenant_id=other)


def test_scope_is_not_confused_with_inputs() -> None:
    assert _fp({}, workspace_id="w1", tenant_id=None) != _fp(
        {"tenant_id": None}, workspace_id="w1", tenant_id=None
    )


@pytest.mark.parametrize(
    ("one", "other"),
    [
        ("p-1", "p-2"),
        (1, 2),
        (1, "1"),
        (1, 1.0),
        (0.0, -0.0),
        (True, 1),
        (False, None),
        (None, "None"),
        ([1, 2], [2, 1]),
        ([1], 1),
        ({"a": 1}, {"a": 2}),
        (Decimal("1.5"), Decimal("1.50")),
        (dt.date(2024, 1, 1), dt.date(2024, 1, 2)),
        ({"x"}, {"x", "y"}),
        ("a", "a "),
        ("é", "e\u0301"),
    ],
)
def test_differs_by_each_input_value(one: object, other: object) -> None:
    assert _fp({"policy": one}) != _fp({"policy": other})


def test_differs_by_input_name() -> None:
    assert _fp({"policy_id": "p"}) != _fp({"backup_id": "p"})


# --- keys ------------------------------------------------------------------------------------


def test_hmac_key_gives_a_different_hash() -> None:
    plain = _fp({"policy_id": "p-42"})
    keyed = _fp({"policy_id": "p-42"}, key=b"k1")
    assert _is_hex64(keyed)
    assert keyed != plain
    assert keyed != _fp({"policy_id": "p-42"}, key=b"k2")
    assert keyed == _fp({"policy_id": "p-42"}, key="k1")


def test_env_key_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    plain = _fp({"policy_id": "p-42"})
    monkeypatch.setenv(FINGERPRINT_KEY_ENV, "k1")
    assert _fp({"policy_id": "p-42"}) == _fp({"policy_id": "p-42"}, key=b"k1") != plain
    # an explicit key wins over the environment
    assert _fp({"policy_id": "p-42"}, key=b"k2") != _fp({"policy_id": "p-42"})


def test_empty_env_key_means_no_key(monkeypatch: pytest.MonkeyPatch) -> None:
    plain = _fp({"policy_id": "p-42"})
    monkeypatch.setenv(FINGERPRINT_KEY_ENV, "")
    assert _fp({"policy_id": "p-42"}) == plain


@pytest.mark.parametrize("key", [b"", ""])
def test_empty_explicit_key_is_refused(key: bytes | str) -> None:
    with pytest.raises(FingerprintError, match="empty"):
        _fp({}, key=key)


# --- refused -----------------------------------------------------------------------------------


class Opaque:
    def __repr__(self) -> str:
        return SENTINEL

    __str__ = __repr__


def _nested(depth: int) -> dict[str, Any]:
    """``inputs`` whose containers nest ``depth`` levels, ``inputs`` itself included."""
    value: dict[str, Any] = {"leaf": 1}
    for _ in range(depth - 1):
        value = {"n": value}
    return value


def _cycle() -> list[Any]:
    loop: list[Any] = []
    loop.append(loop)
    return loop


REFUSED_INPUTS = [
    pytest.param({"v": SENTINEL.encode()}, id="bytes"),
    pytest.param({"v": bytearray(SENTINEL.encode())}, id="bytearray"),
    pytest.param({"v": Opaque()}, id="object"),
    pytest.param({"v": [1, Opaque()]}, id="object-in-list"),
    pytest.param({"v": complex(1, 2)}, id="complex"),
    pytest.param({"v": dt.time(12, 0)}, id="time"),
    pytest.param({"v": math.nan}, id="nan"),
    pytest.param({"v": math.inf}, id="inf"),
    pytest.param({"v": -math.inf}, id="-inf"),
    pytest.param({"v": Decimal("NaN")}, id="decimal-nan"),
    pytest.param({"v": Decimal("sNaN")}, id="decimal-snan"),
    pytest.param({"v": Decimal("-Infinity")}, id="decimal-inf"),
    pytest.param({"v": dt.datetime(2024, 1, 1, 12, 0)}, id="naive-datetime"),
    pytest.param({"v": {1: SENTINEL}}, id="int-key"),
    pytest.param({"v": {(1, 2): SENTINEL}}, id="tuple-key"),
    pytest.param({"v": "a\ud800" + SENTINEL}, id="lone-surrogate"),
    pytest.param({"k\udfff": 1}, id="lone-surrogate-in-key"),
    pytest.param({"v": 1 << 5000}, id="huge-int"),
    pytest.param(_nested(MAX_DEPTH + 1), id="too-deep"),
    pytest.param({"v": _cycle()}, id="cycle"),
    pytest.param({"v": range(3)}, id="range"),
    pytest.param({"v": iter([1])}, id="iterator"),
]


@pytest.mark.parametrize("inputs", REFUSED_INPUTS)
def test_refused_values(inputs: dict[Any, Any]) -> None:
    with pytest.raises(FingerprintError) as caught:
        _fp(inputs)
    assert SENTINEL not in str(caught.value)
    assert "inputs" in str(caught.value)  # names where the problem is
    assert isinstance(caught.value, InvalidInput)


def test_depth_limit_is_inclusive() -> None:
    assert _is_hex64(_fp(_nested(MAX_DEPTH)))
    deepest_list: Any = 1
    for _ in range(MAX_DEPTH - 1):
        deepest_list = [deepest_list]
    assert _is_hex64(_fp({"v": deepest_list}))
    with pytest.raises(FingerprintError, match="deeper"):
        _fp({"v": [deepest_list]})


@pytest.mark.parametrize(
    "inputs", [[("a", 1)], None, "a=1", 5], ids=["pairs", "none", "str", "int"]
)
def test_inputs_must_be_a_mapping(inputs: Any) -> None:
    with pytest.raises(FingerprintError, match="mapping"):
        fingerprint("t", workspace_id="w", inputs=inputs)


@pytest.mark.parametrize("workspace_id", ["", "   ", "\t\n", None, True, False, 1.5, b"w1", ["w1"]])
def test_refused_workspace_ids(workspace_id: object) -> None:
    with pytest.raises(FingerprintError, match="workspace_id"):
        fingerprint("t", workspace_id=workspace_id, inputs={})


@pytest.mark.parametrize("tenant_id", [True, 1.5, b"t1", object()])
def test_refused_tenant_ids(tenant_id: object) -> None:
    with pytest.raises(FingerprintError, match="tenant_id"):
        fingerprint("t", workspace_id="w", tenant_id=tenant_id, inputs={})


@pytest.mark.parametrize("type_", ["", "  ", None, 5, b"t"])
def test_refused_types(type_: Any) -> None:
    with pytest.raises(FingerprintError, match="type"):
        fingerprint(type_, workspace_id="w", inputs={})


SECRET_KEYS = [
    "token",
    "access_token",
    "accessToken",
    "Access-Token",
    "ACCESS_TOKEN",
    "refresh_token",
    "id_token",
    "github_token",
    "client_secret",
    "clientSecret",
    "secret",
    "password",
    "db_password",
    "passwd",
    "pwd",
    "passphrase",
    "api_key",
    "apiKey",
    "X-Api-Key",
    "private_key",
    "credential",
    "credentials",
    "authorization",
    "Proxy-Authorization",
    "auth",
    "cookie",
    "Set-Cookie",
    "session",
    "session_id",
    "bearer",
    "signature",
    "aws_secret_access_key",
    "AccountKey",
    "db_pass",
    "jwt",
    "ｔｏｋｅｎ",  # full-width letters
]


@pytest.mark.parametrize("key", SECRET_KEYS)
def test_secret_keys_are_refused_at_the_top(key: str) -> None:
    with pytest.raises(FingerprintError) as caught:
        _fp({"policy_id": "p", key: SENTINEL})
    message = str(caught.value)
    assert SENTINEL not in message
    assert "secret" in message


@pytest.mark.parametrize("key", SECRET_KEYS)
def test_secret_keys_are_refused_at_depth(key: str) -> None:
    inputs = {"outer": {"items": [{"ok": 1}, {key: {"inner": SENTINEL}}]}}
    with pytest.raises(FingerprintError) as caught:
        _fp(inputs)
    message = str(caught.value)
    assert SENTINEL not in message
    assert message.startswith("inputs.outer.items[1]")


def test_secret_key_error_names_the_path() -> None:
    with pytest.raises(FingerprintError) as caught:
        _fp({"nested": {"accessToken": SENTINEL}})
    assert str(caught.value).startswith("inputs.nested.accessToken:")
    assert SENTINEL not in str(caught.value)


def test_path_of_an_unusual_key_is_quoted() -> None:
    with pytest.raises(FingerprintError) as caught:
        _fp({"a b": [{"token": SENTINEL}]})
    assert str(caught.value).startswith("inputs['a b'][0].token:")


def test_secret_words_as_values_are_fine() -> None:
    assert _is_hex64(_fp({"kind": "token", "auth_method": "password"}))


ALLOWED_KEYS = [
    "policy_id",
    "tenant_id",
    "backup_id",
    "session_count",
    "tokens_used",
    "token_type",
    "token_expires_at",
    "secret_rotation_days",
    "password_policy",
    "author",
    "authority",
    "oauth_provider",
    "keyboard",
    "key",
    "monkey",
    "cache_key",
    "idempotency_key",
]


@pytest.mark.parametrize("key", ALLOWED_KEYS)
def test_lookalike_keys_are_allowed(key: str) -> None:
    assert not is_secret_key(key)
    assert _is_hex64(_fp({key: "v"}))


@pytest.mark.parametrize("key", SECRET_KEYS)
def test_is_secret_key(key: str) -> None:
    assert is_secret_key(key)


# --- any JSON-like input ---------------------------------------------------------------------

_ANY_TEXT = st.text(alphabet=st.characters(codec=None, exclude_categories=()), max_size=8)
_KEYS = _ANY_TEXT | st.sampled_from(["policy_id", "token", "accessToken", "tokens_used", "n"])
_JSON_LIKE = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | _ANY_TEXT,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(_KEYS, children, max_size=4),
    max_leaves=25,
)


def _must_refuse(value: object) -> bool:
    """An independent statement of what is refused among JSON-like values."""
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, str):
        return "\x00" in value or any(0xD800 <= ord(c) <= 0xDFFF for c in value)
    if isinstance(value, list):
        return any(_must_refuse(item) for item in value)
    if isinstance(value, dict):
        return any(
            is_secret_key(key) or _must_refuse(key) or _must_refuse(item)
            for key, item in value.items()
        )
    return False


@given(st.dictionaries(_KEYS, _JSON_LIKE, max_size=5))
def test_any_json_like_input_hashes_or_is_refused(inputs: dict[str, Any]) -> None:
    try:
        digest = _fp(inputs)
    except FingerprintError:
        assert _must_refuse(inputs)
    else:
        assert not _must_refuse(inputs)
        assert _is_hex64(digest)


@given(st.dictionaries(st.text(max_size=8), _JSON_LIKE, max_size=5), st.randoms())
def test_hash_ignores_insertion_order(inputs: dict[str, Any], random: Random) -> None:
    keys = list(inputs)
    random.shuffle(keys)
    reordered = {key: inputs[key] for key in keys}
    try:
        expected = _fp(inputs)
    except FingerprintError:
        with pytest.raises(FingerprintError):
            _fp(reordered)
    else:
        assert _fp(reordered) == expected
