"""The job-facing layer: ``@ledger.operation`` and what it gives a job function.

::

    @ledger.operation("assignments.fetch", identity=("policy_id",), cooldown=timedelta(minutes=15))
    def fetch_assignments(ctx, *, workspace_id, tenant_id, policy_id, access_token):
        for item in api.assignments(policy_id, access_token):
            ...
            ctx.count(processed=1)

    res = fetch_assignments.dispatch(workspace_id="w1", tenant_id="t1", policy_id="p1",
                                     access_token=token)        # token never reaches the ledger
    fetch_assignments.execute(res.run.id, workspace_id="w1", tenant_id="t1", policy_id="p1",
                              access_token=token)

Only the declared identity fields are fingerprinted and stored; every other keyword argument
reaches the function and nothing else.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from .catalog import OperationSpec
from .errors import InvalidInput, LeaseLost, PluginError
from .sanitize import sanitize_message
from .values import Attempt, EnsureResult, Run

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from .ledger import Ledger

__all__ = ["ExecutionResult", "JobContext", "Operation"]

log = logging.getLogger("opsrun")

_SCOPE = ("workspace_id", "tenant_id")


class JobContext:
    """What a job function receives first: its run, its attempt, and ways to report progress."""

    def __init__(self, ledger: Ledger, attempt: Attempt) -> None:
        assert attempt.run is not None
        self.ledger = ledger
        self.attempt = attempt

    @property
    def run(self) -> Run:
        assert self.attempt.run is not None
        return self.attempt.run

    def count(self, **increments: int) -> None:
        """Add to this attempt's counts: ``ctx.count(processed=1)``, ``ctx.count(processed=1,
        failed=1)`` for an item that failed."""
        self.attempt.count(**increments)

    def set_counts(self, **values: int) -> None:
        """Set counts outright, typically ``ctx.set_counts(total=len(items))`` up front."""
        self.attempt.set_counts(**values)

    def fail_item(self, code: str, message: object) -> None:
        """Record a failed item (counted as processed and failed) with a stable code."""
        self.attempt.add_failure(code, message)
        self.attempt.count(processed=1, failed=1)

    def heartbeat(self) -> None:
        """Extend the lease of a long job. :raises LeaseLost: stop, another worker has the run."""
        self.ledger.heartbeat(self.attempt)


@dataclass(frozen=True)
class ExecutionResult:
    """What ``execute`` / ``run_now`` did.

    ``status``: ``completed`` (the run finished; see ``run.outcome``), ``failed`` (the job raised on
    its last attempt), ``released`` (the job raised and was given back for a retry), ``skipped``
    (the run was not claimable: ``reason`` says why, the function was not called).
    """

    status: Literal["completed", "failed", "released", "skipped"]
    run: Run | None
    attempt: Attempt
    value: Any = None
    reason: str | None = None
    dispatch: EnsureResult | None = None
    error: BaseException | None = None

    @property
    def skipped(self) -> bool:
        return self.status == "skipped"


class Operation:
    """A job function bound to a ledger and an operation type (made by ``Ledger.operation``)."""

    def __init__(
        self,
        ledger: Ledger,
        type_: str,
        fn: Callable[..., Any],
        *,
        identity: Sequence[str],
        retry_on: tuple[type[BaseException], ...] = (Exception,),
    ) -> None:
        if not isinstance(retry_on, tuple) or not all(
            isinstance(t, type) and issubclass(t, BaseException) for t in retry_on
        ):
            raise InvalidInput("retry_on takes a tuple of exception classes, e.g. (Throttled,)")
        self.retry_on = retry_on
        if isinstance(identity, str):
            identity = (identity,)
        fields = tuple(identity)
        for name in fields:
            if not isinstance(name, str) or not name:
                raise InvalidInput(
                    "identity takes the names of keyword arguments, e.g. ('policy_id',)"
                )
            if name in _SCOPE:
                raise InvalidInput(
                    f"{name!r} is part of every run's scope already; leave it out of identity="
                )
        self.ledger = ledger
        self.type = type_
        self.fn = fn
        self.identity_fields = fields
        self.__name__ = getattr(fn, "__name__", type_)
        self.__doc__ = getattr(fn, "__doc__", None)

    def __repr__(self) -> str:
        return f"<opsrun operation {self.type!r} identity={self.identity_fields}>"

    @property
    def spec(self) -> OperationSpec:
        return self.ledger.catalog.spec(self.type)

    def identity_of(self, kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """The declared identity fields of a call (nothing else)."""
        missing = [name for name in self.identity_fields if name not in kwargs]
        if missing:
            raise InvalidInput(
                f"{self.type}: identity field(s) {missing} missing from the call; pass them as "
                "keyword arguments"
            )
        return {name: kwargs[name] for name in self.identity_fields}

    def dispatch(
        self,
        *,
        workspace_id: object,
        tenant_id: object | None = None,
        context: Mapping[str, Any] | None = None,
        initiator: str | None = None,
        session: Session | None = None,
        **kwargs: Any,
    ) -> EnsureResult:
        """Create or reuse the run for this call's identity (dispatch-time dedupe)."""
        return self.ledger.ensure_run(
            self.type,
            workspace_id=workspace_id,
            tenant_id=tenant_id,
            identity=self.identity_of(kwargs),
            context=context,
            initiator=initiator,
            session=session,
        )

    def execute(
        self, run_id: int, *, retries_left: int = 0, reraise: bool = True, **kwargs: Any
    ) -> ExecutionResult:
        """Claim the run and call the function; then complete, fail or release the run.

        A run that cannot be claimed (another worker holds it, or it is completed) is skipped and
        the function is not called. When the function raises one of ``retry_on``, the run is released while
        ``retries_left > 0``, and failed otherwise; the exception is then raised again so the queue
        sees it (with ``reraise=False`` it is returned in ``ExecutionResult.error`` instead).
        ``LeaseLost`` from inside the job propagates without touching the run.
        """
        if isinstance(retries_left, bool) or not isinstance(retries_left, int) or retries_left < 0:
            raise InvalidInput("retries_left must be a non-negative int")
        attempt = self.ledger.claim(run_id, lease=self.spec.lease_duration)
        return self._run(attempt, retries_left, reraise, kwargs, dispatch=None)

    def run_now(
        self,
        *,
        workspace_id: object,
        tenant_id: object | None = None,
        context: Mapping[str, Any] | None = None,
        initiator: str | None = None,
        retries_left: int = 0,
        reraise: bool = True,
        **kwargs: Any,
    ) -> ExecutionResult:
        """Dispatch, claim and execute in one go (schedulers, cron): two statements when new."""
        result, attempt = self.ledger.ensure_and_claim(
            self.type,
            workspace_id=workspace_id,
            tenant_id=tenant_id,
            identity=self.identity_of(kwargs),
            context=context,
            initiator=initiator,
        )
        # the scope reaches the function as the caller gave it (a workspace job has no tenant_id)
        scope = {"workspace_id": workspace_id}
        if tenant_id is not None:
            scope["tenant_id"] = tenant_id
        call = {**scope, **kwargs}
        return self._run(attempt, retries_left, reraise, call, dispatch=result)

    def _run(
        self,
        attempt: Attempt,
        retries_left: int,
        reraise: bool,
        kwargs: Mapping[str, Any],
        *,
        dispatch: EnsureResult | None,
    ) -> ExecutionResult:
        if not attempt.acquired:
            log.info("%s run %s skipped: %s", self.type, attempt.run_id, attempt.reason)
            return ExecutionResult(
                "skipped", attempt.run, attempt, reason=attempt.reason, dispatch=dispatch
            )
        ctx = JobContext(self.ledger, attempt)
        try:
            value = self.fn(ctx, **kwargs)
        except LeaseLost:
            raise
        except Exception as exc:
            status: Literal["failed", "released"]
            if retries_left > 0 and isinstance(exc, self.retry_on):
                status, run = "released", self.ledger.release(attempt, exc)
                log.info("%s run %s released for retry (%s left)", self.type, run.id, retries_left)
            else:
                status, run = "failed", self.ledger.fail(attempt, exc)
                log.warning(
                    "%s run %s failed: %s", self.type, run.id, sanitize_message(exc, max_length=200)
                )
            if reraise:
                raise
            return ExecutionResult(status, run, attempt, dispatch=dispatch, error=exc)
        except BaseException:
            # interrupted (KeyboardInterrupt, SystemExit, a worker's soft kill): give the run back
            if attempt.token is not None:
                self.ledger.release(attempt)
            raise
        try:
            run = self.ledger.complete(attempt)
        except (InvalidInput, PluginError) as exc:
            # counts the job left inconsistent: record that as the failure, not a stuck run
            run = self.ledger.fail(attempt, exc)
            if reraise:
                raise
            return ExecutionResult("failed", run, attempt, dispatch=dispatch, error=exc)
        return ExecutionResult("completed", run, attempt, value=value, dispatch=dispatch)
