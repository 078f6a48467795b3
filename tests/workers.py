"""Code that runs in other OS processes during tests (spawned, so it must be importable).

:func:`race` starts ``n`` processes that wait on one barrier and then call ``target(index, *args)``
at the same moment; it returns their results in index order and re-raises a child's failure.
"""

from __future__ import annotations

import multiprocessing as mp
import traceback
from collections.abc import Callable
from typing import Any

#: a race that has not finished by then is a failed test, not a hung suite
RACE_TIMEOUT_S = 120


def _entry(target: Callable[..., Any], barrier: Any, queue: Any, index: int, args: tuple) -> None:
    try:
        barrier.wait(timeout=RACE_TIMEOUT_S)
        queue.put((index, True, target(index, *args)))
    except BaseException:
        queue.put((index, False, traceback.format_exc()))


def race(target: Callable[..., Any], n: int, *args: Any) -> list[Any]:
    # forkserver: children fork from a clean server process that imported opsrun once (spawn would
    # re-import SQLAlchemy in every child; fork would copy the test process's connections)
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(
        ["opsrun_core", "opsrun_core.ledger", "opsrun_plugins.dedupe", "tests.workers"]
    )
    barrier = ctx.Barrier(n)
    queue = ctx.Queue()
    procs = [ctx.Process(target=_entry, args=(target, barrier, queue, i, args)) for i in range(n)]
    for proc in procs:
        proc.start()
    return collect(procs, queue, timeout=RACE_TIMEOUT_S, what="racing")


def collect(procs: list[Any], queue: Any, *, timeout: float, what: str) -> list[Any]:
    """Gather ``(index, ok, value)`` from each started process, join them (killing stragglers) and
    re-raise any child's failure; results come back in index order."""
    results: dict[int, Any] = {}
    errors = []
    try:
        for _ in procs:
            index, ok, value = queue.get(timeout=timeout)
            if ok:
                results[index] = value
            else:
                errors.append(f"process {index}:\n{value}")
    finally:
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
    if errors:
        raise AssertionError(f"a {what} process failed:\n" + "\n".join(errors))
    return [results[i] for i in range(len(procs))]


# -- targets -------------------------------------------------------------------------------------


def dispatch_one(index: int, url: str, type_: str, identity: dict) -> tuple[str, int]:
    from opsrun_core import Ledger

    ledger = Ledger(url)
    try:
        res = ledger.ensure_run(type_, workspace_id="w1", tenant_id="t1", identity=identity)
        return res.disposition.value, res.run.id
    finally:
        ledger.engine.dispose()


def claim_one(index: int, url: str, run_id: int) -> tuple[bool, str]:
    from opsrun_core import Ledger

    ledger = Ledger(url)
    try:
        attempt = ledger.claim(run_id)
        return attempt.acquired, attempt.reason
    finally:
        ledger.engine.dispose()


def reconcile_one(index: int, url: str, workspace: str, now_iso: str) -> tuple[bool, int, int]:
    """Reconcile ``workspace`` with a clock frozen at ``now_iso``; (did_work, run id, processed)."""
    from datetime import datetime

    from opsrun_core import Ledger, ManualClock

    ledger = Ledger(url, clock=ManualClock(datetime.fromisoformat(now_iso)))
    try:
        report = ledger.reconcile_report(workspace)
        counts = report.run.summary_counts or {}
        return report.did_work, report.run.id, counts.get("processed", 0)
    finally:
        ledger.engine.dispose()


def claim_and_hang(url: str, run_id: int, ready: Any) -> None:
    """Claim the run, say so, then hang until killed (a worker that will crash mid-job)."""
    import time

    from opsrun_core import Ledger

    ledger = Ledger(url)
    attempt = ledger.claim(run_id)
    ready.put(attempt.acquired)
    while True:
        time.sleep(1)


def start_hanging_worker(url: str, run_id: int) -> Any:
    """Start :func:`claim_and_hang` in a new process; return it once it holds the claim."""
    ctx = mp.get_context("forkserver")
    ready = ctx.Queue()
    proc = ctx.Process(target=claim_and_hang, args=(url, run_id, ready))
    proc.start()
    acquired = ready.get(timeout=RACE_TIMEOUT_S)
    if not acquired:
        proc.kill()
        raise AssertionError("the hanging worker could not claim its run")
    return proc
