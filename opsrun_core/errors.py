"""Every error opsrun raises derives from :class:`OpsrunError`.

Each message says what went wrong and what to do about it, and never carries a secret: values that
could be secret are never interpolated, only the names of keys or settings.
"""

from __future__ import annotations

__all__ = [
    "ConfigurationError",
    "DatabaseError",
    "DispatchRejected",
    "FingerprintError",
    "InvalidInput",
    "LeaseLost",
    "OpsrunError",
    "PluginError",
    "RunNotFound",
]


class OpsrunError(Exception):
    """Base class of every error raised by opsrun."""


class InvalidInput(OpsrunError, ValueError):
    """An argument of a public call is malformed (a bad count, an empty scope id, ...)."""


class FingerprintError(InvalidInput):
    """Identity inputs cannot be fingerprinted: not plain data, or a key that names a secret."""


class RunNotFound(OpsrunError, LookupError):
    """No run has the given id."""

    def __init__(self, run_id: object) -> None:
        self.run_id = run_id
        super().__init__(
            f"no operation run with id {run_id!r}; check the id (`opsrun runs` lists them)"
        )


class LeaseLost(OpsrunError):
    """The attempt no longer holds the run: its lease expired and another worker took over,
    or the run was finished (by reconcile, say). The attempt's write changed nothing; stop work."""


class ConfigurationError(OpsrunError):
    """A setting (database URL, plugin, catalog entry) is wrong; the message names the setting."""


class PluginError(OpsrunError):
    """A plugin returned something opsrun cannot use; the message names the hook."""


class DatabaseError(OpsrunError):
    """The database refused or dropped a statement; nothing was half-written (the transaction rolled
    back). Usually transient: retry the call, and check the database if it persists."""


class DispatchRejected(OpsrunError):
    """A claim policy (``opsrun_claim``) refused to create or reuse a run for this dispatch."""

    def __init__(self, type_: str, reason: str | None) -> None:
        self.type = type_
        self.reason = reason
        super().__init__(
            f"dispatch of {type_!r} was rejected by the claim policy: {reason or 'no reason given'}"
        )
