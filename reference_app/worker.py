"""A worker pool: deliver job messages on threads, as a queue's workers would.

A delivery whose job raised is released by the ledger while it has retries left, and delivered
again (a queue's retry); the final attempt either completes or fails the run. Only errors that can
pass are retried (the directory's: throttling, a flaky call); an error of the job itself (a policy
that no longer exists) goes straight to a final attempt that fails the run. A delivery that finds
its run held by another worker, or already finished, is skipped by the ledger without calling the
job.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from opsrun_core import ExecutionResult, LeaseLost

from .app import ReferenceApp
from .directory import DirectoryError
from .jobs import JobMessage

__all__ = ["Delivery", "deliver", "work"]

#: deliveries of one message after the first when its job keeps raising (a queue's max retries)
DEFAULT_RETRIES = 2


@dataclass
class Delivery:
    """Every execution of one message, in order."""

    message: JobMessage
    results: list[ExecutionResult] = field(default_factory=list)
    #: the job found that another worker had taken its run over, and stopped
    lease_lost: bool = False

    @property
    def final(self) -> ExecutionResult | None:
        """The last execution (the one that completed, failed or skipped)."""
        return self.results[-1] if self.results else None

    @property
    def released(self) -> int:
        """How many executions raised and were given back for a retry."""
        return sum(1 for r in self.results if r.status == "released")


def deliver(
    app: ReferenceApp,
    message: JobMessage,
    *,
    retries: int = DEFAULT_RETRIES,
    backoff: Callable[[int], None] | None = None,
) -> Delivery:
    """Deliver ``message`` until it completes, fails, is skipped, or runs out of ``retries``.

    ``backoff(n)`` is called before the n-th redelivery (a real queue waits ``retry_after``).
    """
    delivery = Delivery(message)
    retries_left = retries
    while True:
        try:
            result = app.deliver(message, retries_left=retries_left)
        except LeaseLost:
            delivery.lease_lost = True
            return delivery
        delivery.results.append(result)
        if result.status != "released":
            return delivery
        retries_left = retries_left - 1 if isinstance(result.error, DirectoryError) else 0
        if backoff is not None:
            backoff(len(delivery.results))


def work(
    app: ReferenceApp,
    messages: Sequence[JobMessage],
    *,
    workers: int = 4,
    retries: int = DEFAULT_RETRIES,
    on_done: Callable[[Delivery], None] | None = None,
) -> list[Delivery]:
    """Deliver every message on a pool of ``workers`` threads; return the deliveries in order."""
    if workers < 1:
        raise ValueError("workers must be at least 1")

    def one(message: JobMessage) -> Delivery:
        delivery = deliver(app, message, retries=retries)
        if on_done is not None:
            on_done(delivery)
        return delivery

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="worker") as pool:
        return list(pool.map(one, messages))
