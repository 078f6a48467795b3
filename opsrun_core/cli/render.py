"""How the command line prints: rich consoles and styles, human times, JSON for scripts.

On a terminal, tables fit its width; anywhere else (a pipe, a file, a test) they are
:data:`PIPE_WIDTH` wide and never wrap, so scripts can grep rows.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Mapping
from datetime import datetime, timedelta, timezone
from enum import Enum
from typing import Any, TextIO

import click
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from ..values import Run

__all__ = [
    "OUTCOME_STYLE",
    "PIPE_WIDTH",
    "STATUS_STYLE",
    "compact_json",
    "echo_json",
    "fmt_counts",
    "fmt_relative",
    "fmt_span",
    "fmt_when",
    "jsonable",
    "new_console",
    "run_json",
    "simple_table",
    "styled",
]

#: width of tables when stdout is not a terminal (a pipe, a file, a test), so rows never wrap
PIPE_WIDTH = 200

STATUS_STYLE = {"queued": "dim", "running": "cyan", "completed": ""}
OUTCOME_STYLE = {
    "pending": "dim",
    "succeeded": "green",
    "partially_succeeded": "yellow",
    "failed": "red",
    "cancelled": "magenta",
}


def new_console(*, err: bool = False) -> Console:
    """A rich console on stdout (or stderr); wide and plain when it is not a terminal."""
    stream: TextIO = sys.stderr if err else sys.stdout
    try:
        terminal = stream.isatty()
    except (AttributeError, ValueError):
        terminal = False
    return Console(
        file=stream,
        width=None if terminal else PIPE_WIDTH,
        highlight=False,
        soft_wrap=not terminal,
    )


def simple_table() -> Table:
    """The command line's table: a rule under the header, no outer edge or padding."""
    return Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)


def styled(value: str, styles: Mapping[str, str]) -> Text:
    """``value`` as literal text (never rich markup) in its style from ``styles``."""
    return Text(value, style=styles.get(value, ""))


# --------------------------------------------------------------------------- times and counts


def fmt_when(value: datetime | None) -> str:
    """``2026-01-01 12:00:00 UTC``, or ``-`` for none."""
    if value is None:
        return "-"
    return value.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def fmt_span(delta: timedelta) -> str:
    """A short human duration: ``2h 5m``, ``3m 20s``, ``329d 15h``."""
    seconds = int(abs(delta.total_seconds()))
    parts: list[str] = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size or (unit == "s" and not parts):
            parts.append(f"{seconds // size}{unit}")
            seconds %= size
        if len(parts) == 2:
            break
    return " ".join(parts)


def fmt_relative(value: datetime, now: datetime) -> str:
    """``in 5m``, ``2h 3m ago`` or ``now``."""
    delta = value - now
    if abs(delta) < timedelta(seconds=1):
        return "now"
    return f"in {fmt_span(delta)}" if delta > timedelta(0) else f"{fmt_span(delta)} ago"


def fmt_counts(counts: Mapping[str, Any] | None) -> str:
    """``total/processed/failed``, or ``-`` before the run completes."""
    if not counts:
        return "-"
    return "/".join(str(counts.get(key, "-")) for key in ("total", "processed", "failed"))


# --------------------------------------------------------------------------- JSON


def jsonable(value: Any) -> Any:
    """Datetimes as ISO-8601, enums as their value, timedeltas as seconds."""
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, timedelta):
        return value.total_seconds()
    return value


def run_json(run: Run, label: str) -> dict[str, Any]:
    """A run as a JSON object: every field, the catalog ``label`` after ``type``, ISO timestamps."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(run):
        out[f.name] = jsonable(getattr(run, f.name))
        if f.name == "type":
            out["label"] = label
    return out


def echo_json(data: Any) -> None:
    """Print ``data`` as indented JSON on stdout."""
    click.echo(json.dumps(data, indent=2, ensure_ascii=False, default=jsonable))


def compact_json(value: Any) -> str:
    """One-line, key-sorted JSON for a table cell; ``-`` for none."""
    if value is None:
        return "-"
    return json.dumps(value, ensure_ascii=False, sort_keys=True)
