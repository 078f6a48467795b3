"""Stable, secret-free fingerprints of a job's identity.

A fingerprint is 64 lowercase hex characters: the SHA-256 of a canonical, versioned JSON document
holding the operation type, the scope and the identity inputs, or its HMAC-SHA-256 when a key is
configured (the ``key`` argument, else the ``OPSRUN_FINGERPRINT_KEY`` environment variable when it
is set and non-empty). A key stops anyone who reads the ledger from recovering low-entropy ids with
a dictionary; changing it changes every fingerprint.

The canonical document (version 1) is ``{"v": 1, "type": ..., "workspace_id": ..., "tenant_id": ...,
"inputs": ...}`` encoded with sorted keys, ``(",", ":")`` separators, ``ensure_ascii=False``, UTF-8.
Scope ids (``str``, ``int`` or ``UUID``; never ``bool``) are stored as strings; ``tenant_id`` may be
``None``. Input values are normalised before encoding:

* ``None``, ``bool``, ``int``, ``str``: as they are (``str`` must be encodable as UTF-8);
* ``float``: finite only; ``Decimal``: finite only, as ``str(value)``;
* ``UUID``: its canonical string; ``date``: ISO-8601; ``datetime``: aware only, in UTC, ISO-8601;
* ``Enum``: its value, normalised;
* ``list``/``tuple``: a list; ``set``/``frozenset``: a list sorted by the canonical JSON of each
  normalised element, duplicates (after normalisation) dropped;
* ``Mapping``: a dict with ``str`` keys only, none naming a secret (:func:`is_secret_key`).

Anything else (``bytes``, arbitrary objects, non-finite numbers, naive datetimes, containers nested
deeper than :data:`MAX_DEPTH`) raises :class:`~opsrun_core.errors.FingerprintError`, whose message
names the offending key path (``inputs.nested.accessToken``) and never the value.

Normalisation deliberately maps values to JSON: ``UUID(x)`` and ``str(UUID(x))`` (or
``Decimal("1")`` and ``"1"``) are the same identity, since the ledger stores the inputs as JSON.

Changing anything above changes fingerprints of existing runs (so dedupe across a deploy breaks):
it is a breaking change, which is why the document carries a version and golden tests pin it.
"""

from __future__ import annotations

import datetime as dt
import decimal
import enum
import hashlib
import hmac
import json
import math
import os
import re
import unicodedata
import uuid
from collections.abc import Mapping
from typing import Any, Final, NamedTuple, TypeAlias

from opsrun_core.errors import FingerprintError

__all__ = [
    "FINGERPRINT_KEY_ENV",
    "FINGERPRINT_VERSION",
    "MAX_DEPTH",
    "SECRET_KEY_SUFFIXES",
    "CanonicalIdentity",
    "JSONValue",
    "canonical_identity",
    "fingerprint",
    "identity_digest",
    "is_secret_key",
    "normalise_plain",
    "normalize_key_name",
]

#: Version of the canonical document; part of what is hashed.
FINGERPRINT_VERSION: Final = 1

#: Environment variable holding the HMAC key used when no ``key`` argument is given.
FINGERPRINT_KEY_ENV: Final = "OPSRUN_FINGERPRINT_KEY"

#: Deepest container nesting accepted; the ``inputs`` mapping itself is level 1.
MAX_DEPTH: Final = 32

#: Largest ``int`` accepted, in bits (about 1200 decimal digits): JSON libraries and databases
#: disagree beyond that, and Python refuses to print ints of more than 4300 digits.
_MAX_INT_BITS: Final = 4096

#: A key names a secret when its normalised form (:func:`normalize_key_name`) equals or ends with
#: one of these. Suffix matching catches ``github_token``, ``clientSecret``, ``db_password`` and
#: ``X-Api-Key`` while ``tokens_used``, ``session_count``, ``token_type``, ``policy_id`` or
#: ``secret_rotation_days`` pass, since their normalised names end in something else. The price is
#: a few refusals of harmless names that end the same way (``oauth``, ``bypass``, ``user_session``):
#: rename such a key (``oauth_provider``). Entries implied by shorter ones (``accesstoken`` by
#: ``token``) are listed for the reader. The sanitizer redacts ``key=value`` pairs by the same list.
SECRET_KEY_SUFFIXES: Final[tuple[str, ...]] = (
    # tokens
    "token", "accesstoken", "refreshtoken", "idtoken", "jwt", "bearer",
    # passwords
    "password", "passwords", "passwd", "pwd", "pass", "passphrase",
    # secrets and keys (a bare "key" is too common to refuse: cache_key, idempotency_key)
    "secret", "secrets", "clientsecret", "apikey", "privatekey", "secretkey", "accesskey",
    "accountkey", "signingkey", "encryptionkey",
    # credentials, headers, sessions, signatures
    "credential", "credentials", "authorization", "auth", "cookie", "cookies", "session",
    "sessionid", "signature", "sig",
)  # fmt: skip

JSONValue: TypeAlias = "bool | int | float | str | list[JSONValue] | dict[str, JSONValue] | None"

_NOT_ALNUM = re.compile(r"[^0-9a-z]+")
_SURROGATE = re.compile("[\ud800-\udfff]")
_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_-]{0,63}")


class CanonicalIdentity(NamedTuple):
    """The canonical document that is hashed, and the normalised inputs it contains."""

    #: the UTF-8 bytes of the canonical JSON document
    canonical: bytes
    #: the normalised identity inputs (what the ledger stores in its ``identity`` column)
    inputs: dict[str, JSONValue]


def normalize_key_name(name: str) -> str:
    """Return ``name`` as compared against :data:`SECRET_KEY_SUFFIXES`.

    NFKC-folded (so full-width letters count), case-folded, and stripped of everything but ASCII
    letters and digits: ``accessToken``, ``Access-Token`` and ``ACCESS_TOKEN`` all become
    ``accesstoken``.
    """
    return _NOT_ALNUM.sub("", unicodedata.normalize("NFKC", name).casefold())


def is_secret_key(name: str) -> bool:
    """Whether a mapping key (or a ``key=value`` name) denotes a secret.

    True when the normalised name (:func:`normalize_key_name`) equals or ends with one of
    :data:`SECRET_KEY_SUFFIXES`: ``token``, ``github_token``, ``apiKey`` and ``X-Api-Key`` are
    secrets; ``tokens_used``, ``session_count`` and ``tenant_id`` are not.
    """
    return normalize_key_name(name).endswith(SECRET_KEY_SUFFIXES)


def canonical_identity(
    type: str,
    *,
    workspace_id: object,
    tenant_id: object | None = None,
    inputs: Mapping[str, object],
) -> CanonicalIdentity:
    """Normalise an identity and encode its canonical document (see the module docstring).

    :raises FingerprintError: when the type, a scope id or an input cannot be fingerprinted.
    """
    if not isinstance(type, str) or not type.strip():
        raise FingerprintError(
            "the operation type must be a non-empty string such as 'assignments.fetch'"
        )
    _check_text(type, "type")
    workspace = _scope_id(workspace_id, "workspace_id")
    if not workspace.strip():
        raise FingerprintError(
            "workspace_id must not be empty: every run belongs to a workspace; pass its id"
        )
    tenant = None if tenant_id is None else _scope_id(tenant_id, "tenant_id")
    if not isinstance(inputs, Mapping):
        raise FingerprintError(
            f"inputs must be a mapping of names to plain values, not a {_type_name(inputs)}"
        )
    normalised = _normalise_mapping(inputs, "inputs", 1)
    document = {
        "v": FINGERPRINT_VERSION,
        "type": type,
        "workspace_id": workspace,
        "tenant_id": tenant,
        "inputs": normalised,
    }
    return CanonicalIdentity(_dumps(document).encode("utf-8"), normalised)


def identity_digest(
    type: str,
    *,
    workspace_id: object,
    tenant_id: object | None = None,
    inputs: Mapping[str, object],
    key: bytes | str | None = None,
) -> tuple[str, dict[str, JSONValue]]:
    """Return the fingerprint and the normalised inputs, normalising only once.

    Arguments are those of :func:`fingerprint`.
    """
    identity = canonical_identity(
        type, workspace_id=workspace_id, tenant_id=tenant_id, inputs=inputs
    )
    secret = _resolve_key(key)
    if secret is None:
        digest = hashlib.sha256(identity.canonical).hexdigest()
    else:
        digest = hmac.new(secret, identity.canonical, hashlib.sha256).hexdigest()
    return digest, identity.inputs


def fingerprint(
    type: str,
    *,
    workspace_id: object,
    tenant_id: object | None = None,
    inputs: Mapping[str, object],
    key: bytes | str | None = None,
) -> str:
    """Return the fingerprint of an identity: 64 lowercase hex characters.

    :param type: the operation type, a non-empty string such as ``"assignments.fetch"``.
    :param workspace_id: the workspace scope: a non-blank ``str``, an ``int`` or a ``UUID``.
    :param tenant_id: the tenant scope (same types), or ``None`` for a workspace-scoped run;
        ``None`` and ``""`` are different identities.
    :param inputs: the identity inputs: plain data, no secret-named keys (see the module docstring).
    :param key: an HMAC key; when ``None``, ``OPSRUN_FINGERPRINT_KEY`` is used if set and non-empty,
        else the plain SHA-256 is returned.
    :raises FingerprintError: when something cannot be fingerprinted; the message names the key
        path, never the value.
    """
    return identity_digest(
        type, workspace_id=workspace_id, tenant_id=tenant_id, inputs=inputs, key=key
    )[0]


def _dumps(document: object) -> str:
    return json.dumps(
        document, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )


def _resolve_key(key: bytes | str | None) -> bytes | None:
    if key is None:
        key = os.environ.get(FINGERPRINT_KEY_ENV) or None
        if key is None:
            return None
        source = f"the {FINGERPRINT_KEY_ENV} environment variable"
    else:
        source = "the fingerprint key"
    if isinstance(key, str):
        try:
            # surrogateescape round-trips the raw bytes of an environment variable on POSIX
            key = key.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:
            raise FingerprintError(
                f"{source} cannot be encoded as UTF-8; pass the key as bytes"
            ) from None
    if not isinstance(key, bytes):
        raise FingerprintError(f"{source} must be bytes or str, not a {_type_name(key)}")
    if not key:
        raise FingerprintError(f"{source} is empty; pass a non-empty key, or None for no key")
    return key


def _scope_id(value: object, name: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, uuid.UUID)):
        raise FingerprintError(
            f"{name} must be a string, an int or a UUID, not a {_type_name(value)}; "
            "pass the id of the scope"
        )
    if isinstance(value, str):
        _check_text(value, name)
        return str.__str__(value)
    return str(int(value)) if isinstance(value, int) else str(value)


def _check_text(text: str, path: str) -> None:
    if "\x00" in text:
        raise FingerprintError(
            f"{path}: the string holds a NUL character, which Postgres cannot store; remove it"
        )
    if _SURROGATE.search(text):
        raise FingerprintError(
            f"{path}: the string holds a lone surrogate and cannot be encoded as UTF-8; "
            "decode the data that produced it properly"
        )


def _type_name(value: object) -> str:
    return type(value).__name__


def _child_path(path: str, key: str) -> str:
    if _PLAIN_KEY.fullmatch(key):
        return f"{path}.{key}"
    shown = key if len(key) <= 64 else key[:64] + "…"
    return f"{path}[{shown!r}]"


def normalise_plain(value: Mapping[Any, object], path: str) -> dict[str, JSONValue]:
    """Validate and normalise a mapping of plain data by the fingerprint's rules (no secret-named
    keys, no NaN, NUL or non-plain values); the ledger uses it for ``context`` too.

    :raises FingerprintError: naming the key path, never the value.
    """
    if not isinstance(value, Mapping):
        raise FingerprintError(f"{path} must be a mapping of names to plain values")
    return _normalise_mapping(value, path, 1)


def _normalise_mapping(value: Mapping[Any, object], path: str, depth: int) -> dict[str, JSONValue]:
    _check_depth(path, depth)
    result: dict[str, JSONValue] = {}
    for raw_key, item in value.items():
        if not isinstance(raw_key, str):
            raise FingerprintError(
                f"{path}: keys must be strings, found a {_type_name(raw_key)} key; "
                "convert the keys to strings"
            )
        key = str.__str__(raw_key)
        child = _child_path(path, key)
        _check_text(key, child)
        if is_secret_key(key):
            raise FingerprintError(
                f"{child}: the key names a secret, and this data is stored in the ledger; "
                "leave the secret out (pass a non-secret reference such as an id)"
            )
        if key in result:
            raise FingerprintError(f"{child}: the key appears twice; make the keys unique")
        result[key] = _normalise(item, child, depth)
    return result


def _normalise(value: object, path: str, depth: int) -> JSONValue:
    """Normalise one value found at ``path`` inside a container at nesting level ``depth``."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, enum.Enum):  # before int and str: IntEnum and StrEnum are both
        return _normalise(value.value, path, depth)
    if isinstance(value, int):
        if value.bit_length() > _MAX_INT_BITS:
            raise FingerprintError(
                f"{path}: the integer is too large (over {_MAX_INT_BITS} bits); pass it as a string"
            )
        return int(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise FingerprintError(f"{path}: NaN and infinite floats cannot be fingerprinted")
        return float(value)
    if isinstance(value, str):
        _check_text(value, path)
        return str.__str__(value)
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, dt.datetime):  # before date: a datetime is a date
        if value.utcoffset() is None:
            raise FingerprintError(
                f"{path}: a naive datetime is ambiguous; pass an aware one (tzinfo=timezone.utc)"
            )
        return value.astimezone(dt.timezone.utc).isoformat()
    if isinstance(value, dt.date):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        if not value.is_finite():
            raise FingerprintError(f"{path}: NaN and infinite Decimals cannot be fingerprinted")
        return str(value)
    if isinstance(value, Mapping):
        return _normalise_mapping(value, path, depth + 1)
    if isinstance(value, (list, tuple)):
        _check_depth(path, depth + 1)
        return [_normalise(item, f"{path}[{i}]", depth + 1) for i, item in enumerate(value)]
    if isinstance(value, (set, frozenset)):
        _check_depth(path, depth + 1)
        items = (_normalise(item, f"{path}[*]", depth + 1) for item in value)
        by_encoding = {_dumps(item): item for item in items}
        return [by_encoding[encoded] for encoded in sorted(by_encoding)]
    raise FingerprintError(
        f"{path}: a {_type_name(value)} is not plain data; pass None, bool, int, float, str, "
        "UUID, date, aware datetime, Decimal, Enum, or lists, sets and str-keyed mappings of them"
    )


def _check_depth(path: str, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise FingerprintError(
            f"{path}: nested deeper than {MAX_DEPTH} levels; flatten the identity inputs"
        )
