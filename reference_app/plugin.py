"""The app's opsrun plugin: assignment identities and the directory's own failure codes.

Registered on the app's ledger with ``get_plugin_manager(plugins=[ReferenceAppPlugin()])``, so it
is called before opsrun's built-ins; for anything it has no opinion on it returns ``None`` and the
built-ins decide.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from opsrun_core import FailureEntry, Identity, OperationSpec, Run, hookimpl

from .directory import DirectoryThrottled
from .identity import ASSIGNMENT_TYPES, assignment_job_fingerprint, assignment_job_identity

__all__ = ["THROTTLED", "ReferenceAppPlugin"]

#: failure code of a run that ended because the directory kept throttling it
THROTTLED = DirectoryThrottled.code


class ReferenceAppPlugin:
    """``opsrun_identity`` for assignment jobs and ``opsrun_fail`` for directory throttling."""

    @hookimpl
    def opsrun_identity(
        self,
        spec: OperationSpec,
        workspace_id: str,
        tenant_id: str | None,
        inputs: Mapping[str, Any],
    ) -> Identity | None:
        """Assignment jobs: :func:`assignment_job_fingerprint`; other types: no opinion."""
        if spec.type not in ASSIGNMENT_TYPES:
            return None
        identity = assignment_job_identity(spec.type, **inputs)
        digest = assignment_job_fingerprint(
            spec.type, workspace_id=workspace_id, tenant_id=tenant_id, **identity
        )
        return Identity(hash=digest, inputs=dict(identity))

    @hookimpl
    def opsrun_fail(
        self, spec: OperationSpec, run: Run, error: BaseException
    ) -> list[FailureEntry] | None:
        """HTTP 429 from the directory becomes ``directory.throttled``; other errors: no opinion.

        The directory's message carries the request's bearer token and the app's client secret;
        the ledger sanitizes every message a plugin returns before it is stored, and that is what
        keeps them out (the tests scan the whole database to prove it).
        """
        if isinstance(error, DirectoryThrottled):
            return [
                FailureEntry(
                    THROTTLED,
                    f"the directory kept throttling {spec.type} after {run.attempts} attempt(s): "
                    f"{error}",
                )
            ]
        return None
