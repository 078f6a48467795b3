"""The identity of an assignment job: stable, secret-free, built on :func:`opsrun_core.fingerprint`.

A fetch is identified by its tenant and policy, a restore by its tenant, policy and the backup being
restored. Ids are normalised to strings (``7`` and ``"7"`` are one identity), and nothing else, in
particular no token, can become part of an identity: unknown keys are refused.
"""

from __future__ import annotations

from opsrun_core import InvalidInput, fingerprint

__all__ = [
    "ASSIGNMENT_TYPES",
    "FETCH_TYPE",
    "RESTORE_TYPE",
    "assignment_job_fingerprint",
    "assignment_job_identity",
]

#: operation type of :class:`reference_app.jobs.FetchAssignmentsJob`
FETCH_TYPE = "assignments.fetch"
#: operation type of :class:`reference_app.jobs.RestoreAssignmentsJob`
RESTORE_TYPE = "assignments.restore"
#: the identity fields of each assignment job, beyond its tenant scope
IDENTITY_FIELDS: dict[str, tuple[str, ...]] = {
    FETCH_TYPE: ("policy_id",),
    RESTORE_TYPE: ("policy_id", "backup_id"),
}
ASSIGNMENT_TYPES = tuple(IDENTITY_FIELDS)


def _id(name: str, value: object) -> str:
    if value is None or isinstance(value, (bool, float, bytes)):
        raise InvalidInput(f"{name} must be an id (an int or a string), not {value!r}")
    text = str(value).strip()
    if not text:
        raise InvalidInput(f"{name} must not be empty")
    return text


def assignment_job_identity(type: str, **inputs: object) -> dict[str, str]:
    """The identity inputs of an assignment job: exactly its fields, as strings.

    >>> assignment_job_identity("assignments.restore", policy_id=7, backup_id="3")
    {'policy_id': '7', 'backup_id': '3'}

    :raises InvalidInput: an unknown type, a missing field or any other key.
    """
    fields = IDENTITY_FIELDS.get(type)
    if fields is None:
        raise InvalidInput(f"{type!r} is not an assignment job; use one of {ASSIGNMENT_TYPES}")
    missing = [name for name in fields if inputs.get(name) is None]
    extra = sorted(set(inputs) - set(fields))
    if missing or extra:
        raise InvalidInput(
            f"the identity of {type} is {', '.join(fields)}"
            + (f"; missing {', '.join(missing)}" if missing else "")
            + (f"; unexpected {', '.join(extra)} (never pass tokens as identity)" if extra else "")
        )
    return {name: _id(name, inputs[name]) for name in fields}


def assignment_job_fingerprint(
    type: str,
    *,
    workspace_id: object,
    tenant_id: object,
    policy_id: object,
    backup_id: object | None = None,
) -> str:
    """The fingerprint (64 hex characters) of an assignment job's identity.

    It is the very hash the ledger stores in ``identity_hash`` for the job's runs (the app's
    ``opsrun_identity`` plugin computes it with this function), so it can be used to find them.

    :raises InvalidInput: no tenant (assignment jobs are tenant-scoped), or bad ids.
    """
    if tenant_id is None:
        raise InvalidInput(f"{type} runs are tenant-scoped; pass the tenant_id")
    inputs: dict[str, object] = {"policy_id": policy_id}
    if type == RESTORE_TYPE or backup_id is not None:
        inputs["backup_id"] = backup_id
    return fingerprint(
        type,
        workspace_id=_id("workspace_id", workspace_id),
        tenant_id=_id("tenant_id", tenant_id),
        inputs=assignment_job_identity(type, **inputs),
    )
