"""Built-in ``opsrun_claim``: the dedupe policy of DESIGN.md.

1. an active (queued or running) run of the identity is reused;
2. else, if the operation has a cooldown and the latest completed run of the identity
   ``succeeded`` or ``partially_succeeded`` within it, that run is reused;
3. else a new run is created. A failed latest run never starts a cooldown.
"""

from __future__ import annotations

from datetime import datetime

from opsrun_core import ClaimDecision, Identity, OperationSpec, Outcome, Run, hookimpl

__all__ = ["OPSRUN_INSERT_FIRST", "opsrun_claim"]

#: this policy is "create unless active or in cooldown", which the ledger's insert-first dispatch
#: statement encodes in SQL; the ledger then consults this hook only after a conflict
OPSRUN_INSERT_FIRST = True

_COOLDOWN_OUTCOMES = (Outcome.SUCCEEDED, Outcome.PARTIALLY_SUCCEEDED)


@hookimpl(trylast=True)
def opsrun_claim(
    spec: OperationSpec,
    identity: Identity,
    active: Run | None,
    latest_completed: Run | None,
    now: datetime,
) -> ClaimDecision:
    if active is not None:
        return ClaimDecision("reuse_active", run=active)
    if (
        spec.cooldown is not None
        and latest_completed is not None
        and latest_completed.outcome in _COOLDOWN_OUTCOMES
        and latest_completed.completed_at is not None
        and latest_completed.completed_at + spec.cooldown > now
    ):
        return ClaimDecision("reuse_cooldown", run=latest_completed)
    return ClaimDecision("create")
