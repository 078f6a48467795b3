"""The reference app on Celery: its assignment jobs as Celery tasks, the reconcile on Celery beat.

One module that the producer (the demo, a web app) and the workers both import, as
``docs/celery.md`` asks: :func:`build` makes the Celery app on the broker from
``$OPSRUN_BROKER_URL`` (default ``redis://127.0.0.1:6379/0``), the :class:`ReferenceApp` whose
ledger consults :class:`~opsrun_plugins.celery.CeleryLiveness`, and registers

* ``opsrun.assignments.fetch`` and ``opsrun.assignments.restore`` (:func:`bind_operation`): a
  dispatch goes through the ledger (a duplicate never reaches the broker), each delivery claims its
  run; the directory's HTTP 429 (:class:`DirectoryThrottled`) releases the run for a Celery retry
  (exponential backoff, at most :data:`MAX_RETRIES` retries), any other error fails it at once;
* ``opsrun.reconcile_all`` (:func:`bind_reconcile`), which Celery beat sends every
  :data:`RECONCILE_EVERY` (``beat_schedule``).

The directory's access token never travels in a message: the message carries the tenant id, and
the worker asks the directory for a token per delivery (``resolve_kwargs``).

For the ``celery`` command, the module's ``app`` attribute is the Celery app built from the
environment (``$OPSRUN_DATABASE_URL``, ``$OPSRUN_BROKER_URL``) on first access::

    celery -A reference_app.celery_app beat -s /tmp/reference_app-beat
    celery -A reference_app.celery_app call opsrun.reconcile_all     # cron's alternative to beat

``python -m reference_app worker`` starts a worker (prefork) on the same app.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from types import TracebackType
from typing import Any

from celery import Celery, Task  # type: ignore[import-untyped]
from kombu.utils.url import maybe_sanitize_url
from sqlalchemy.engine import Engine

from opsrun_core import ConfigurationError
from opsrun_plugins.celery import CeleryLiveness, OpsrunTask, bind_operation, bind_reconcile

from .app import BROKER_URL_ENV, DEFAULT_BROKER_URL, DEFAULT_QUEUE, ReferenceApp, database_url
from .directory import DirectoryAdapter, DirectoryThrottled
from .identity import FETCH_TYPE, RESTORE_TYPE

__all__ = [
    "BROKER_URL_ENV",
    "DEFAULT_BROKER_URL",
    "DEFAULT_QUEUE",
    "MAX_RETRIES",
    "RECONCILE_EVERY",
    "RECONCILE_TASK",
    "BrokerUnavailable",
    "CeleryReferenceApp",
    "backoff",
    "broker_url",
    "build",
    "check_broker",
    "safe_broker_url",
]

#: retries of a throttled run: at most ``MAX_RETRIES + 1`` attempts, then ``directory.throttled``
MAX_RETRIES = 3
#: how often Celery beat sends the reconcile
RECONCILE_EVERY = timedelta(minutes=5)
#: the reconcile task's name (``celery call`` takes it)
RECONCILE_TASK = "opsrun.reconcile_all"
#: Redis redelivers a message a worker took and did not acknowledge after this long: well above
#: the assignment jobs' lease (4 minutes) and the longest retry countdown (5 minutes)
VISIBILITY_TIMEOUT_S = 3600.0
#: seconds the broker check waits for an answer
BROKER_CHECK_TIMEOUT_S = 5.0


class BrokerUnavailable(ConfigurationError):
    """No broker answers at the configured URL."""


def broker_url(explicit: str | None = None) -> str:
    """``explicit``, else ``$OPSRUN_BROKER_URL``, else :data:`DEFAULT_BROKER_URL`."""
    return explicit or os.environ.get(BROKER_URL_ENV) or DEFAULT_BROKER_URL


def safe_broker_url(url: str) -> str:
    """The broker URL with any password masked, for messages."""
    return str(maybe_sanitize_url(url))


def backoff(attempt: int) -> float:
    """Seconds before retrying a throttled attempt: 10, 20, 40, ... at most 300.

    Kept below :data:`VISIBILITY_TIMEOUT_S`, or Redis would redeliver the waiting message.
    """
    return float(min(300, 10 * 2 ** max(0, attempt - 1)))


@dataclass
class CeleryReferenceApp:
    """The reference app, its Celery app and the tasks bound on it (the same in every process)."""

    app: ReferenceApp
    celery: Celery
    queue: str
    broker_url: str
    fetch: OpsrunTask
    restore: OpsrunTask
    reconcile: Task

    def __enter__(self) -> CeleryReferenceApp:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def task(self, type_: str) -> OpsrunTask:
        """The task of an assignment job's operation type."""
        return {FETCH_TYPE: self.fetch, RESTORE_TYPE: self.restore}[type_]

    def close(self) -> None:
        """Release the broker connections, and the database engine if the app made it."""
        self.celery.close()
        self.app.close()


def build(
    database: str | Engine,
    *,
    broker: str | None = None,
    queue: str = DEFAULT_QUEUE,
    directory: DirectoryAdapter | None = None,
    retry_countdown: float | Callable[[int], float] | None = None,
) -> CeleryReferenceApp:
    """Build the reference app on Celery (see the module docstring).

    :param broker: the broker URL (default :func:`broker_url`).
    :param queue: where the tasks go, and the reconcile beat sends; a worker consumes it with
        ``--queue``.
    :param directory: the directory adapter (default: a :class:`FakeDirectory`).
    :param retry_countdown: seconds before a retry, or ``f(attempt) -> seconds``
        (default :func:`backoff`).
    """
    url = broker_url(broker)
    celery = Celery("reference_app", broker=url, set_as_current=False)
    celery.conf.update(
        task_default_queue=queue,
        task_ignore_result=True,  # the ledger is the record: no result backend
        worker_prefetch_multiplier=1,  # the jobs are long: do not hoard messages
        broker_transport_options={"visibility_timeout": VISIBILITY_TIMEOUT_S},
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=BROKER_CHECK_TIMEOUT_S,
        beat_schedule={
            "reference-app-reconcile": {"task": RECONCILE_TASK, "schedule": RECONCILE_EVERY},
        },
    )
    app = ReferenceApp(database, directory=directory, plugins=[CeleryLiveness(celery)])

    def add_access_token(kwargs: dict[str, Any]) -> dict[str, Any]:
        # called in the worker, per delivery, after the claim: the token never left this process
        return {**kwargs, "access_token": app.access_token(kwargs["tenant_id"])}

    countdown = backoff if retry_countdown is None else retry_countdown
    fetch, restore = (
        bind_operation(
            celery,
            job.operation,
            max_retries=MAX_RETRIES,
            retry_on=(DirectoryThrottled,),
            countdown=countdown,
            resolve_kwargs=add_access_token,
        )
        for job in (app.fetch, app.restore)
    )
    reconcile = bind_reconcile(celery, app.ledger, name=RECONCILE_TASK)
    return CeleryReferenceApp(app, celery, queue, url, fetch, restore, reconcile)


def check_broker(celery: Celery, *, timeout: float = BROKER_CHECK_TIMEOUT_S) -> None:
    """Connect to ``celery``'s broker once.

    :raises BrokerUnavailable: it did not answer; the message says what to do.
    """
    try:
        with celery.connection_for_write() as connection:
            connection.ensure_connection(max_retries=0, timeout=timeout)
    except Exception as exc:
        raise BrokerUnavailable(
            f"no broker answers at {safe_broker_url(str(celery.conf.broker_url))} "
            f"({type(exc).__name__}); start Redis (redis-server) or point --broker-url / "
            f"{BROKER_URL_ENV} at one"
        ) from None


_default: CeleryReferenceApp | None = None


def __getattr__(name: str) -> Any:
    """``app``: the Celery app built from the environment, for ``celery -A reference_app.celery_app``."""
    global _default
    if name != "app":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if _default is None:
        _default = build(database_url())
    return _default.celery
