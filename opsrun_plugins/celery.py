"""opsrun on Celery: operations as Celery tasks, and a reconcile liveness hook that asks Celery.

Install with ``pip install 'opsrun[celery]'``. This module is *not* an ``opsrun`` entry point
(Celery is optional, and the hook needs your Celery app): register :class:`CeleryLiveness` on the
ledger's plugin manager yourself.

::

    from celery import Celery
    from opsrun_core import Ledger, get_plugin_manager
    from opsrun_plugins.celery import CeleryLiveness, bind_operation, bind_reconcile

    app = Celery("proj", broker="redis://127.0.0.1:6379/0")
    ledger = Ledger(url, plugin_manager=get_plugin_manager(plugins=[CeleryLiveness(app)]))

    @ledger.operation("assignments.fetch", identity=("policy_id",))
    def fetch_assignments(ctx, *, workspace_id, tenant_id, policy_id, access_token): ...

    fetch_task = bind_operation(app, fetch_assignments, resolve_kwargs=add_access_token)
    reconcile_task = bind_reconcile(app, ledger)

    d = fetch_task.dispatch(workspace_id="w1", tenant_id="t1", policy_id="p1")
    d.disposition      # CREATED (a message was sent) or REUSED_* (nothing reached the broker)

What a bound task does, per delivery of its message:

* **claim** the run (:meth:`opsrun_core.Ledger.claim`); a completed run is skipped, and a run whose
  lease another worker holds is checked again when that lease expires (a Celery retry with a
  countdown), so a redelivery after a worker crash takes the run over exactly once;
* **call** the job function with the message's keyword arguments (after ``resolve_kwargs``);
* **complete** the run, or on an exception **release** it and ``self.retry()`` while attempts are
  left (``max_retries``, counted by the run's ``attempts`` in the database, so a crash-looping task
  cannot retry forever), or **fail** it on the last attempt.

Everything in the message (``workspace_id``, ``tenant_id`` and the job's keyword arguments) sits in
the broker, in clear text, until a worker acknowledges it: never put a secret there. Pass a
reference (``credential_id``) and resolve the secret in the worker with ``resolve_kwargs``;
dispatching a keyword argument whose name denotes a secret (``access_token``, ``password``, ...) is
refused unless ``allow_secret_kwargs=True``. See ``docs/celery.md``.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, cast

from celery import Celery, Task  # type: ignore[import-untyped]
from celery.signals import worker_process_init  # type: ignore[import-untyped]
from kombu.serialization import dumps as kombu_dumps

from opsrun_core import (
    ConfigurationError,
    Disposition,
    EnsureResult,
    InvalidInput,
    LeaseLost,
    OpsrunError,
    Run,
    RunNotFound,
    RunStatus,
    hookimpl,
    sanitize_message,
)
from opsrun_core.fingerprint import is_secret_key
from opsrun_core.operation import JobContext, Operation

if TYPE_CHECKING:
    from celery.result import AsyncResult  # type: ignore[import-untyped]
    from sqlalchemy.orm import Session

    from opsrun_core import Ledger

__all__ = [
    "CONTEXT_KEY",
    "CeleryDispatch",
    "CeleryLiveness",
    "OperationFailed",
    "OperationRetry",
    "OpsrunBinding",
    "OpsrunTask",
    "RunLeaseHeld",
    "bind_operation",
    "bind_reconcile",
    "celery_task_id",
]

log = logging.getLogger("opsrun.celery")

#: the key of a run's ``context`` that holds the id of the Celery task carrying it
CONTEXT_KEY = "celery_task_id"
#: the keyword argument of a bound task's message that names the run (the rest go to the job)
RUN_ID_KWARG = "opsrun_run_id"
#: a redelivery that finds the run held checks again this long after the lease expires
LEASE_MARGIN_S = 0.5
#: ... but never waits longer than this in one go (nor longer than half the broker's
#: ``visibility_timeout``, after which Redis or SQS would redeliver the waiting message)
MAX_LEASE_WAIT_S = 300.0
#: the session key under which messages wait for the caller's commit
_SESSION_KEY = "opsrun_celery_pending"

Countdown = float | Callable[[int], float]
KwargsResolver = Callable[[dict[str, Any]], Mapping[str, Any]]


# --------------------------------------------------------------------------- exceptions


class RunLeaseHeld(OpsrunError):
    """A delivery found its run held by another worker's lease; it checks again later.

    This is the ``exc`` of the Celery retry that waits for the lease (what Celery logs as the retry
    reason and passes to the ``task_retry`` signal); the job function was not called.
    """

    def __init__(self, run_id: int, countdown: float) -> None:
        super().__init__(
            f"run {run_id} is held by another worker's lease; checking again in {countdown:.1f} s "
            "(it is taken over if that lease expires, skipped if the run completes)"
        )
        self.run_id = run_id
        self.countdown = countdown

    def __reduce__(self) -> tuple[type[RunLeaseHeld], tuple[int, float]]:
        return (type(self), (self.run_id, self.countdown))  # Celery pickles a retry's reason


class OperationRetry(OpsrunError):
    """The job raised and its run was released for a retry (the ``exc`` of the Celery retry).

    The message is sanitized: Celery logs it and may store it in a result backend.
    """


class OperationFailed(OpsrunError):
    """The job raised on its last attempt and its run was recorded ``failed``.

    Raised from the task so that Celery marks it failed. The message is sanitized and the original
    exception is not chained: Celery logs tracebacks and may store them in a result backend, and
    the ledger's ``failure_summary`` already records the error, secret-free.
    """


# --------------------------------------------------------------------------- dispatch result


@dataclass(frozen=True)
class CeleryDispatch:
    """What :meth:`OpsrunTask.dispatch` did.

    ``result`` is the ledger's :class:`~opsrun_core.EnsureResult`. ``async_result`` is the
    task's ``AsyncResult`` when this call created the run (and so sent a message), ``None`` when it
    reused one (nothing reached the broker). ``on_commit`` is True when the message waits for the
    caller's session to commit (``session=``); a rollback drops it together with the run.
    """

    result: EnsureResult
    async_result: AsyncResult | None = None
    on_commit: bool = False

    @property
    def run(self) -> Run:
        return self.result.run

    @property
    def disposition(self) -> Disposition:
        return self.result.disposition

    @property
    def created(self) -> bool:
        """True when this call created the run (and a message went, or goes, to the broker)."""
        return self.result.created

    @property
    def task_id(self) -> str | None:
        """The Celery task id of the message this call sent, if any."""
        return None if self.async_result is None else str(self.async_result.id)


# --------------------------------------------------------------------------- the task


@dataclass(frozen=True)
class OpsrunBinding:
    """How a task runs its operation (the arguments of :func:`bind_operation`)."""

    operation: Operation
    max_retries: int
    retry_on: tuple[type[BaseException], ...]
    countdown: Countdown
    heartbeat_every: float | None
    resolve_kwargs: KwargsResolver | None
    allow_secret_kwargs: bool

    def retry_countdown(self, attempt_number: int) -> float:
        value = self.countdown(attempt_number) if callable(self.countdown) else self.countdown
        return max(0.0, float(value))


class OpsrunTask(Task):  # type: ignore[misc]
    """A Celery task that runs an opsrun operation (made by :func:`bind_operation`).

    Send it with :meth:`dispatch`, never with ``delay``/``apply_async`` directly: ``dispatch``
    creates (or reuses) the run first and only sends a message for a run it created.
    """

    opsrun_binding: OpsrunBinding

    @property
    def operation(self) -> Operation:
        return self.opsrun_binding.operation

    # -- the producer side ---------------------------------------------------------------------

    def dispatch(
        self,
        *,
        workspace_id: object,
        tenant_id: object | None = None,
        context: Mapping[str, Any] | None = None,
        initiator: str | None = None,
        session: Session | None = None,
        celery_options: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> CeleryDispatch:
        """Create or reuse the run of this call's identity; send a message only if created.

        Concurrent dispatches of one identity (threads, processes, hosts) create one run and send
        one message; the others get ``REUSED_ACTIVE`` (or ``REUSED_COOLDOWN``) and send nothing.
        The task id is stored in the run's ``context`` under :data:`CONTEXT_KEY`, which is how
        :class:`CeleryLiveness` finds the task of a run.

        :param kwargs: the job's keyword arguments (identity fields and the rest). They travel in
            the message, so they must be serializable with the task's serializer and must not be
            secrets (see the module docstring).
        :param session: join the caller's SQLAlchemy session: the run is inserted in its
            transaction and the message is sent after it commits (dropped if it rolls back), so a
            worker never receives a run it cannot see.
        :param celery_options: extra ``apply_async`` options (``queue``, ``priority``,
            ``countdown``, ...); ``task_id`` is chosen here.
        :raises InvalidInput: a keyword argument names a secret, or cannot be serialized.
        :raises Exception: the broker refused the message; the run this call created is then
            recorded ``failed`` (so the identity is free for the next dispatch) and the broker's
            error is raised again.
        """
        binding = self.opsrun_binding
        options = dict(celery_options or {})
        if "task_id" in options:
            raise InvalidInput(
                "dispatch() chooses the task id; leave task_id out of celery_options"
            )
        if not binding.allow_secret_kwargs:
            _refuse_secrets(kwargs, binding.operation.type)
        message = {"workspace_id": workspace_id, "tenant_id": tenant_id, **kwargs}
        self._check_serializable(message)
        task_id = str(uuid.uuid4())
        result = binding.operation.dispatch(
            workspace_id=workspace_id,
            tenant_id=tenant_id,
            context={**(context or {}), CONTEXT_KEY: task_id},
            initiator=initiator,
            session=session,
            **kwargs,
        )
        if not result.created:
            log.debug(
                "%s run %s reused (%s): no message sent",
                binding.operation.type,
                result.run.id,
                result.disposition.value,
            )
            return CeleryDispatch(result)
        message[RUN_ID_KWARG] = result.run.id

        def send() -> None:
            self._send(result.run, message, task_id, options)

        if session is None:
            send()
            return CeleryDispatch(result, self.AsyncResult(task_id))
        _after_commit(session, send)
        return CeleryDispatch(result, self.AsyncResult(task_id), on_commit=True)

    def _send(
        self, run: Run, message: dict[str, Any], task_id: str, options: dict[str, Any]
    ) -> None:
        try:
            self.apply_async(kwargs=message, task_id=task_id, **options)
        except Exception as exc:
            # The run exists but no message will ever carry it: record it failed now, so the
            # identity is free for the next dispatch instead of blocked until reconcile.
            self._abandon(run, exc)
            raise

    def _abandon(self, run: Run, error: Exception) -> None:
        ledger = self.operation.ledger
        reason = f"the broker refused the task message ({type(error).__name__}: {error})"
        try:
            attempt = ledger.claim(run.id, lease=self.operation.spec.lease_duration)
            if attempt.acquired:
                ledger.fail(attempt, RuntimeError(reason))
        except OpsrunError as exc:
            log.error(
                "%s run %s has no message and could not be recorded failed (%s); reconcile will "
                "finish it as never started",
                run.type,
                run.id,
                sanitize_message(exc, max_length=200),
            )

    def _check_serializable(self, message: dict[str, Any]) -> None:
        serializer = self.serializer or self.app.conf.task_serializer
        try:
            cast(Callable[..., Any], kombu_dumps)(message, serializer=serializer)
        except Exception as exc:
            raise InvalidInput(
                f"{self.operation.type}: the job's keyword arguments cannot be sent with the "
                f"{serializer!r} serializer ({type(exc).__name__}: {sanitize_message(exc)}); "
                "pass plain data (ids, strings, numbers) and load objects in the worker"
            ) from None

    # -- the worker side -----------------------------------------------------------------------

    def execute_delivery(self, run_id: int, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Run one delivery of the message for ``run_id`` (the body of the task).

        Returns a JSON-able dict: ``run_id``, ``status`` (``completed``, ``skipped`` or
        ``lease_lost``), ``outcome`` and ``reason``. Raises Celery's ``Retry`` to retry (after a
        release, or to wait for another worker's lease) and :class:`OperationFailed` when the last
        attempt failed.
        """
        binding = self.opsrun_binding
        operation = binding.operation
        ledger = operation.ledger
        attempt = ledger.claim(run_id, lease=operation.spec.lease_duration)
        if not attempt.acquired:
            reason: str = attempt.reason
            if reason == "running":
                reason = self._wait_for_lease(run_id)  # raises Retry while the run is active
            log.info("%s run %s skipped: %s", operation.type, run_id, reason)
            return _result(run_id, "skipped", reason=reason)
        ctx = JobContext(ledger, attempt)
        number = attempt.number
        beat = _Heartbeat(ctx, binding.heartbeat_every) if binding.heartbeat_every else None
        try:
            try:
                call = kwargs
                if binding.resolve_kwargs is not None:
                    call = dict(binding.resolve_kwargs(dict(kwargs)))
                operation.fn(ctx, **call)
            finally:
                if beat is not None:
                    beat.stop()
        except LeaseLost as exc:
            return self._lease_lost(run_id, exc)
        except Exception as exc:
            retry = isinstance(exc, binding.retry_on) and binding.max_retries + 1 - number > 0
            error = f"{type(exc).__name__}: {sanitize_message(exc, max_length=300)}"
            try:
                if retry:
                    ledger.release(attempt, exc)
                else:
                    ledger.fail(attempt, exc)
            except LeaseLost as lost:
                return self._lease_lost(run_id, lost)
        except BaseException:
            # interrupted (SystemExit, KeyboardInterrupt): give the run back for the redelivery
            if attempt.token is not None:
                ledger.release(attempt)
            raise
        else:
            try:
                run = ledger.complete(attempt)
            except LeaseLost as exc:
                return self._lease_lost(run_id, exc)
            return _result(run_id, "completed", outcome=run.outcome.value)
        # Outside the except block on purpose: what Celery raises, logs and may store from here on
        # carries the sanitized message only, not the original exception (nor its traceback).
        if retry:
            countdown = binding.retry_countdown(number)
            log.info(
                "%s run %s: attempt %s raised, released; retrying in %.1f s",
                operation.type,
                run_id,
                number,
                countdown,
            )
            raise self.retry(
                exc=OperationRetry(f"run {run_id}, attempt {number}: {error}"), countdown=countdown
            )
        log.warning("%s run %s failed on attempt %s: %s", operation.type, run_id, number, error)
        raise OperationFailed(f"{operation.type} run {run_id} failed on attempt {number}: {error}")

    def _wait_for_lease(self, run_id: int) -> str:
        """Retry when the lease that keeps this delivery out expires.

        Returns the reason to skip instead when the run finished (or vanished) meanwhile.
        """
        ledger = self.operation.ledger
        try:
            run = ledger.get(run_id)
        except RunNotFound:
            return "not_found"
        if run.status is RunStatus.COMPLETED:
            return "completed"
        if run.status is RunStatus.QUEUED:
            remaining = 0.0  # released meanwhile: claim it right away
        elif run.lease_expires_at is None:
            remaining = 0.0
        else:
            remaining = max(0.0, (run.lease_expires_at - ledger.now()).total_seconds())
        countdown = min(remaining + LEASE_MARGIN_S, self._max_wait())
        log.info(
            "%s run %s is held by another worker; checking again in %.1f s",
            run.type,
            run_id,
            countdown,
        )
        raise self.retry(exc=RunLeaseHeld(run_id, countdown), countdown=countdown)

    def _max_wait(self) -> float:
        options = self.app.conf.broker_transport_options or {}
        visibility = options.get("visibility_timeout")
        if isinstance(visibility, (int, float)) and visibility > 0:
            return max(0.1, min(MAX_LEASE_WAIT_S, visibility / 2))
        return MAX_LEASE_WAIT_S

    def _lease_lost(self, run_id: int, exc: LeaseLost) -> dict[str, Any]:
        log.warning(
            "%s run %s: this delivery lost its lease (%s); the run is another worker's now",
            self.operation.type,
            run_id,
            sanitize_message(exc, max_length=200),
        )
        return _result(run_id, "lease_lost", reason="lease_lost")


def _result(
    run_id: int, status: str, *, outcome: str | None = None, reason: str | None = None
) -> dict[str, Any]:
    return {"run_id": run_id, "status": status, "outcome": outcome, "reason": reason}


def _task_body(self: OpsrunTask, opsrun_run_id: int, **kwargs: Any) -> dict[str, Any]:
    """Run one delivery of an opsrun operation's message (see :meth:`OpsrunTask.execute_delivery`)."""
    return self.execute_delivery(opsrun_run_id, kwargs)


class _Heartbeat:
    """Extends an attempt's lease every ``every`` seconds from a daemon thread, until stopped."""

    def __init__(self, ctx: JobContext, every: float) -> None:
        self._ctx = ctx
        self._every = every
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._loop, name=f"opsrun-heartbeat-{ctx.run.id}", daemon=True
        )
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self._every):
            try:
                self._ctx.heartbeat()
            except LeaseLost:
                log.warning("run %s lost its lease; heartbeats stop", self._ctx.attempt.run_id)
                return
            except Exception as exc:  # a database hiccup: try again next time
                log.warning(
                    "heartbeat of run %s failed: %s",
                    self._ctx.attempt.run_id,
                    sanitize_message(exc, max_length=200),
                )

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


# --------------------------------------------------------------------------- binding


def bind_operation(
    app: Celery,
    operation: Operation,
    *,
    name: str | None = None,
    max_retries: int = 3,
    retry_on: type[BaseException] | Iterable[type[BaseException]] | None = None,
    countdown: Countdown = 10.0,
    acks_late: bool = True,
    heartbeat_every: float | None = None,
    resolve_kwargs: KwargsResolver | None = None,
    allow_secret_kwargs: bool = False,
    **task_options: Any,
) -> OpsrunTask:
    """Register a Celery task on ``app`` that runs ``operation`` (from ``@ledger.operation``).

    Call it where both the producer and the worker import it (the module that builds the app), so
    the task is registered in every process. Dispatch with ``task.dispatch(**kwargs)``.

    :param name: the task name; default ``"opsrun.<operation type>"``.
    :param max_retries: how many times a run is retried after an exception; a run gets at most
        ``max_retries + 1`` attempts, counted by its ``attempts`` in the ledger, so a takeover
        after a worker crash counts as one.
    :param retry_on: exception classes worth a retry; any other exception fails the run at once.
        Default: the operation's own ``retry_on`` (``@ledger.operation(..., retry_on=...)``).
    :param countdown: seconds before a retry, or a callable taking the number of the attempt that
        failed (1 for the first) and returning them, e.g. ``lambda n: min(300, 5 * 2 ** n)``.
        Keep it below the broker's ``visibility_timeout`` (Redis, SQS), which would otherwise
        redeliver the waiting message.
    :param acks_late: acknowledge the message after the task ran, and reject (requeue) it when the
        worker process dies mid-task (``reject_on_worker_lost``), so a crash is redelivered; the
        claim makes a redelivery safe. Turn off only if losing a crashed run is acceptable.
    :param heartbeat_every: extend the run's lease every this many seconds from a background
        thread while the job runs (choose well under the lease). Default: no thread; a long job
        calls ``ctx.heartbeat()`` itself, or relies on a lease longer than it ever runs.
    :param resolve_kwargs: called in the worker with the message's keyword arguments (a new dict,
        ``workspace_id`` and ``tenant_id`` included), returns the keyword arguments for the job:
        the place to turn a reference into a secret, e.g.
        ``lambda kw: {**kw, "access_token": vault.token_for(kw["tenant_id"])}``. An exception
        raised there counts as the job's.
    :param allow_secret_kwargs: allow dispatching keyword arguments whose names denote secrets
        (they then sit in the broker in clear text).
    :param task_options: other ``@app.task`` options (``queue``, ``rate_limit``, ``time_limit``,
        ``soft_time_limit``, ``ignore_result``, ``serializer``, ...).
    :raises ConfigurationError: another task already has this name on ``app``.
    """
    if not isinstance(operation, Operation):
        raise InvalidInput("bind_operation takes an Operation made by @ledger.operation(...)")
    if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
        raise InvalidInput("max_retries must be a non-negative int")
    if retry_on is None:
        retry_on = operation.retry_on
    retry_types = (retry_on,) if isinstance(retry_on, type) else tuple(retry_on)
    if not all(isinstance(t, type) and issubclass(t, BaseException) for t in retry_types):
        raise InvalidInput("retry_on takes exception classes, e.g. (TimeoutError, ConnectionError)")
    if not callable(countdown) and (
        isinstance(countdown, bool) or not isinstance(countdown, (int, float)) or countdown < 0
    ):
        raise InvalidInput("countdown must be a non-negative number of seconds or a callable")
    if heartbeat_every is not None and (
        isinstance(heartbeat_every, bool)
        or not isinstance(heartbeat_every, (int, float))
        or heartbeat_every <= 0
    ):
        raise InvalidInput("heartbeat_every must be a positive number of seconds or None")
    if heartbeat_every is not None and timedelta(seconds=heartbeat_every) >= (
        operation.spec.lease_duration
    ):
        raise InvalidInput(
            f"heartbeat_every ({heartbeat_every} s) must be shorter than the lease of "
            f"{operation.type} ({operation.spec.lease_duration}); pick a fraction of it"
        )
    for option in ("bind", "base", "max_retries", "reject_on_worker_lost", "opsrun_binding"):
        if option in task_options:
            raise InvalidInput(f"bind_operation sets {option!r} itself")
    binding = OpsrunBinding(
        operation=operation,
        max_retries=max_retries,
        retry_on=retry_types,
        countdown=countdown,
        heartbeat_every=float(heartbeat_every) if heartbeat_every is not None else None,
        resolve_kwargs=resolve_kwargs,
        allow_secret_kwargs=allow_secret_kwargs,
    )
    task_name = name or f"opsrun.{operation.type}"
    task = app.task(
        _task_body,
        name=task_name,
        base=OpsrunTask,
        bind=True,
        shared=False,  # registered on this app only, not on every app created later
        lazy=False,
        acks_late=acks_late,
        reject_on_worker_lost=acks_late,
        max_retries=None,  # opsrun bounds retries by the run's attempts
        opsrun_binding=binding,
        **task_options,
    )
    if not isinstance(task, OpsrunTask) or task.opsrun_binding is not binding:
        raise ConfigurationError(
            f"a task named {task_name!r} is already registered on {app.main!r}; "
            "pass bind_operation(..., name=...) to choose another"
        )
    _dispose_engine_after_fork(operation.ledger)
    return task


def bind_reconcile(
    app: Celery,
    ledger: Ledger,
    *,
    name: str = "opsrun.reconcile_all",
    grace: timedelta | None = None,
    **task_options: Any,
) -> Task:
    """Register a Celery task that reconciles every workspace with active runs.

    Schedule it with Celery beat (``beat_schedule``); the ledger it runs on is yours, so the
    :class:`CeleryLiveness` you registered on it is consulted. Overlapping runs of it are safe: each
    workspace's reconcile is a tracked run that cannot overlap itself. Returns, per workspace,
    ``{"workspace_id", "run_id", "summary_counts"}``.
    """

    def reconcile_all() -> list[dict[str, Any]]:
        runs = ledger.reconcile_all(grace=grace, initiator="celery")
        return [
            {"workspace_id": r.workspace_id, "run_id": r.id, "summary_counts": r.summary_counts}
            for r in runs
        ]

    reconcile_all.__doc__ = "Reconcile every opsrun workspace that has active runs."
    _dispose_engine_after_fork(ledger)
    return app.task(reconcile_all, name=name, shared=False, lazy=False, **task_options)


_DISPOSED: weakref.WeakSet[Ledger] = weakref.WeakSet()
_DISPOSED_LOCK = threading.Lock()


def _dispose_engine_after_fork(ledger: Ledger) -> None:
    """Drop connections inherited from the parent in each prefork child (never share a socket)."""
    with _DISPOSED_LOCK:
        if ledger in _DISPOSED:
            return
        _DISPOSED.add(ledger)
    ref = weakref.ref(ledger)

    def dispose(**_: Any) -> None:
        target = ref()
        if target is not None:
            target.engine.dispose(close=False)

    worker_process_init.connect(dispose, weak=False)


def _refuse_secrets(kwargs: Mapping[str, Any], type_: str, path: str = "") -> None:
    for key, value in kwargs.items():
        if isinstance(key, str) and is_secret_key(key):
            raise InvalidInput(
                f"{type_}: keyword argument {path}{key!r} names a secret, and it would sit in the "
                "broker in clear text; pass a reference (e.g. credential_id) and resolve the "
                "secret in the worker with bind_operation(..., resolve_kwargs=...), or pass "
                "allow_secret_kwargs=True if the broker is trusted with it"
            )
        if isinstance(value, Mapping):
            _refuse_secrets(value, type_, f"{path}{key}.")


def _after_commit(session: Session, send: Callable[[], None]) -> None:
    """Call ``send`` once ``session`` commits; forget it if the session rolls back."""
    from sqlalchemy import event

    pending: list[Callable[[], None]] | None = session.info.get(_SESSION_KEY)
    if pending is None:
        pending = []
        session.info[_SESSION_KEY] = pending

        def after_commit(sess: Session) -> None:
            sends = list(pending)
            pending.clear()
            for item in sends:
                item()

        def after_rollback(sess: Session) -> None:
            pending.clear()

        event.listen(session, "after_commit", after_commit)
        event.listen(session, "after_rollback", after_rollback)
    pending.append(send)


# --------------------------------------------------------------------------- liveness


def celery_task_id(run: Run) -> str | None:
    """The id of the Celery task that carries ``run`` (from its ``context``), or None."""
    value = (run.context or {}).get(CONTEXT_KEY)
    return value if isinstance(value, str) and value else None


class CeleryLiveness:
    """The ``opsrun_is_alive`` hook for runs dispatched by :meth:`OpsrunTask.dispatch`.

    Register it on the ledger that reconciles::

        ledger = Ledger(url, plugin_manager=get_plugin_manager(plugins=[CeleryLiveness(app)]))

    For a candidate run it asks the workers (a ``ping``, then ``inspect().active()``,
    ``reserved()`` and ``scheduled()`` of those that answered) whether the run's task is on one of
    them: ``True`` (reconcile leaves the run alone) when it is; ``None`` (no opinion: reconcile
    judges by time) when it is not, when no worker answers within ``timeout`` seconds, or on any
    error. It never answers ``False``: a message can wait in the broker where no worker sees it.

    The workers' answer is cached for ``cache_for`` seconds, so one reconcile sweep over many
    candidates asks once. ``destination`` limits the question to some workers (node names).
    """

    def __init__(
        self,
        app: Celery,
        *,
        timeout: float = 1.0,
        cache_for: float = 10.0,
        destination: list[str] | None = None,
    ) -> None:
        self.app = app
        self.timeout = timeout
        self.cache_for = cache_for
        self.destination = destination
        self._lock = threading.Lock()
        self._cached: tuple[float, frozenset[str] | None] | None = None

    def __repr__(self) -> str:
        return f"<CeleryLiveness app={self.app.main!r} timeout={self.timeout}>"

    @hookimpl
    def opsrun_is_alive(self, run: Run) -> bool | None:
        task_id = celery_task_id(run)
        if task_id is None:
            return None
        known = self.task_ids()
        if known is None or task_id not in known:
            return None
        log.info("run %s is alive: its task %s is on a worker", run.id, task_id)
        return True

    def task_ids(self) -> frozenset[str] | None:
        """Ids of the tasks the workers hold (active, reserved, scheduled); None if none answer."""
        with self._lock:
            now = time.monotonic()
            if self._cached is not None and now - self._cached[0] < self.cache_for:
                return self._cached[1]
            ids = self._ask()
            self._cached = (time.monotonic(), ids)
            return ids

    def _ask(self) -> frozenset[str] | None:
        try:
            # who is there: the one call that waits the whole timeout (for workers that are late)
            pongs = self.app.control.ping(destination=self.destination, timeout=self.timeout)
            names = sorted({name for reply in pongs or () for name in reply})
            if not names:
                return None
            # ... then ask exactly them, returning as soon as each of them has answered
            inspect = self.app.control.inspect(
                destination=names, timeout=self.timeout, limit=len(names)
            )
            ids: set[str] = set()
            for method in ("active", "reserved", "scheduled"):
                replies = getattr(inspect, method)() or {}
                for tasks in cast(dict[str, Any], replies).values():
                    for entry in tasks or ():
                        # scheduled() wraps each task: {"eta": ..., "request": {...}}
                        request = entry.get("request", entry) if isinstance(entry, dict) else {}
                        if isinstance(request, dict) and request.get("id"):
                            ids.add(str(request["id"]))
            return frozenset(ids)
        except Exception as exc:
            log.warning(
                "could not ask the Celery workers whether runs are alive: %s",
                sanitize_message(exc, max_length=200),
            )
            return None
