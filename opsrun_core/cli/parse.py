"""What the command line's arguments mean: durations, datetimes and ``KEY=VALUE`` identities.

The ``parse_*`` functions raise :class:`ValueError`; the ``*_option`` callbacks turn that into
click's usage error (exit 2) naming the parameter.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone
from typing import Any

import click

__all__ = [
    "duration_option",
    "identity_argument",
    "parse_datetime",
    "parse_duration",
    "parse_identity",
    "since_option",
]

_DURATION_PART = re.compile(r"(\d+)\s*([wdhms])", re.IGNORECASE)
_DURATION = re.compile(r"^\s*(?:\d+\s*[wdhms]\s*)+$", re.IGNORECASE)
_UNIT_SECONDS = {"w": 604800, "d": 86400, "h": 3600, "m": 60, "s": 1}


def parse_duration(text: str) -> timedelta:
    """``"15m"`` -> 15 minutes: units ``w d h m s``, combined as ``1h30m``; bare numbers: seconds.

    :raises ValueError: not a duration.
    """
    value = text.strip()
    if value.isdigit():
        return timedelta(seconds=int(value))
    if not _DURATION.match(value):
        raise ValueError(f"{text!r} is not a duration such as 30s, 15m, 2h, 1d, 1w or 1h30m")
    seconds = sum(int(n) * _UNIT_SECONDS[u.lower()] for n, u in _DURATION_PART.findall(value))
    return timedelta(seconds=seconds)


def parse_datetime(text: str) -> datetime:
    """An ISO-8601 datetime (``2026-01-01``, ``2026-01-01T12:00:00Z``); naive means UTC.

    :raises ValueError: not an ISO-8601 datetime.
    """
    value = text.strip()
    if value[-1:] in ("Z", "z"):
        value = value[:-1] + "+00:00"
    when = datetime.fromisoformat(value)
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when.astimezone(timezone.utc)


def parse_identity(items: Sequence[str]) -> dict[str, Any]:
    """``["policy_id=p1", "limit:=10"]`` -> ``{"policy_id": "p1", "limit": 10}``.

    :raises ValueError: an item without ``=``, an empty or repeated key, or bad JSON after ``:=``.
    """
    inputs: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"{item!r} is not KEY=VALUE or KEY:=JSON")
        typed = key.endswith(":")
        if typed:
            key = key[:-1]
        if not key:
            raise ValueError(f"{item!r} has an empty key")
        if key in inputs:
            raise ValueError(f"identity key {key!r} is given twice")
        if typed:
            try:
                inputs[key] = json.loads(raw)
            except ValueError:
                raise ValueError(
                    f'{item!r}: the value after := must be JSON (42, true, null, "text", [1, 2])'
                ) from None
        else:
            inputs[key] = raw
    return inputs


# --------------------------------------------------------------------------- click callbacks


def duration_option(
    ctx: click.Context, param: click.Parameter, value: str | None
) -> timedelta | None:
    """A duration option (``--grace``, ``--cooldown``)."""
    if value is None:
        return None
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx=ctx, param=param) from None


def since_option(
    ctx: click.Context, param: click.Parameter, value: str | None
) -> datetime | timedelta | None:
    """An ISO-8601 datetime, or a duration back from the ledger's now (a :class:`timedelta`)."""
    if value is None:
        return None
    try:
        return parse_duration(value)
    except ValueError:
        pass
    try:
        return parse_datetime(value)
    except ValueError:
        raise click.BadParameter(
            f"{value!r} is neither an ISO-8601 datetime (2026-01-01T12:00:00Z) nor a duration "
            "back from now (15m, 2h, 1d)",
            ctx=ctx,
            param=param,
        ) from None


def identity_argument(ctx: click.Context, param: click.Parameter, value: Any) -> dict[str, Any]:
    """The ``KEY=VALUE | KEY:=JSON`` arguments of ``why`` as one identity mapping."""
    try:
        return parse_identity(list(value or ()))
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx=ctx, param=param) from None
