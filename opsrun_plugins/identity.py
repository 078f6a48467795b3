"""Built-in ``opsrun_identity``: the versioned fingerprint of :func:`opsrun_core.fingerprint`.

The stored identity is the normalised inputs that were hashed (never secrets: secret-named keys are
refused with ``FingerprintError``). A fingerprint key (``OPSRUN_FINGERPRINT_KEY``) turns the hash into
an HMAC so that low-entropy ids cannot be recovered from it by a dictionary.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from opsrun_core import Identity, OperationSpec, hookimpl
from opsrun_core.fingerprint import identity_digest

__all__ = ["opsrun_identity"]


@hookimpl(trylast=True)
def opsrun_identity(
    spec: OperationSpec, workspace_id: str, tenant_id: str | None, inputs: Mapping[str, Any]
) -> Identity:
    digest, normalised = identity_digest(
        spec.type, workspace_id=workspace_id, tenant_id=tenant_id, inputs=inputs
    )
    return Identity(hash=digest, inputs=normalised)
