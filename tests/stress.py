"""A stress run: N processes dispatching and executing random identities from a small pool.

::

    python -m tests.stress --processes 8 --seconds 60 --database-url postgresql+psycopg:///postgres
    python -m tests.stress --processes 4 --ops 200                     # a temporary SQLite file

Each process loops (for ``--seconds``, or ``--ops`` operations, whichever ends first) picking an
identity from a pool of ``--identities`` per operation type and doing one of:

* dispatch, then execute through the job layer (``Operation.execute``), where the job counts its
  items, fails some of them (``ctx.fail_item``), and sometimes raises (then the run is released
  for a retry or failed);
* dispatch + claim + execute in one go (``Operation.run_now``);
* dispatch, claim with a very short lease and walk away (an abandoned attempt, taken over later);
* reconcile the workspace with no grace (racing the takeovers of abandoned runs).

Two operation types share the pool: one without cooldown, one with a one-second cooldown. At the
end a ledger whose clock is a day ahead reconciles everything still active, and the run is checked:

* :func:`~opsrun_core.invariants.check_invariants` finds nothing, before and after that reconcile;
* every dispatch is accounted for: created + reused_active + reused_cooldown = dispatches, every
  created run is in the ledger and every run in the ledger was created by exactly one dispatch;
* each run's ``attempts`` equals the number of claims that acquired it (no claim lost or doubled);
* every execution that acquired its run completed it, failed it or released it (or was skipped
  without running); no run was finished by two workers; every run a worker finished carries
  exactly that worker's counts, outcome and failure codes (the final attempt's);
* after the final reconcile no run is active, and the ones it finished are exactly the ones no
  worker finished.

A Postgres URL gets a throwaway database created next to it and dropped afterwards (``--in-place``
uses the URL's database itself, in a workspace of its own). The figures are printed; the exit code
is 0 when every check passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing as mp
import queue
import random
import secrets
import sys
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

PLAIN = "stress.plain"
COOL = "stress.cool"
TYPES = (PLAIN, COOL)
#: the lease of a normal execution: far longer than any job here
LEASE = timedelta(seconds=60)
#: the lease of an abandoned attempt: it is up almost at once, for another worker to take over
ABANDON_LEASE = timedelta(milliseconds=300)
COOLDOWN = timedelta(seconds=1)
ITEM_FAILED = "stress.item_failed"
#: a fake secret each failed item's message carries; the ledger must never hold it
FAKE_SECRET = "hunter2-hunter2"
PRELOAD = [
    "opsrun_core.ledger",
    "opsrun_core.operation",
    "opsrun_plugins.dedupe",
    "opsrun_plugins.identity",
    "opsrun_plugins.tracking",
    "sqlalchemy.dialects.postgresql.psycopg",
    "sqlalchemy.dialects.sqlite.pysqlite",
]


@dataclass(frozen=True)
class StressConfig:
    """What one stress run does (see the module docstring)."""

    url: str
    workspace: str
    processes: int = 8
    ops: int | None = None
    seconds: float | None = None
    identities: int = 4
    fail_rate: float = 0.15
    abandon_rate: float = 0.1
    run_now_rate: float = 0.2
    reconcile_rate: float = 0.03
    seed: int = 0


@dataclass
class StressReport:
    """The figures of a stress run and what went wrong (``problems``: nothing, ideally)."""

    figures: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def format(self) -> str:
        width = max(len(name) for name in self.figures) if self.figures else 0
        lines = [f"{name.ljust(width)}  {value}" for name, value in self.figures.items()]
        if self.problems:
            lines.append(f"FAILED: {len(self.problems)} problem(s)")
            lines += [f"  - {problem}" for problem in self.problems]
        else:
            lines.append("OK: every check passed")
        return "\n".join(lines)


# -- the worker ------------------------------------------------------------------------------------


class StressFailure(Exception):
    """What a job raises on purpose."""


def _outcome(processed: int, failed: int) -> str:
    if processed > 0 and failed == processed:
        return "failed"
    return "partially_succeeded" if failed else "succeeded"


def worker(index: int, config: StressConfig) -> dict[str, Any]:
    """One process's loop; returns everything it did, as plain data."""
    from opsrun_core import LeaseLost, Ledger, OperationSpec

    # the library's warnings (a job released for retry, ...) are expected here by the thousand
    logging.getLogger("opsrun").addHandler(logging.NullHandler())
    rng = random.Random(config.seed * 1000 + index)
    ledger = Ledger(config.url)
    plans: dict[int, dict[str, Any]] = {}

    def job(
        ctx: Any, *, workspace_id: str, tenant_id: str, item: int, plan: dict[str, Any]
    ) -> None:
        plans[ctx.run.id] = plan  # this execution's plan: the final attempt's counts win
        ctx.set_counts(total=plan["n"])
        for i in range(plan["n"]):
            if i < plan["bad"]:
                ctx.fail_item(ITEM_FAILED, f"item {i} failed: password={FAKE_SECRET}")
            else:
                ctx.count(processed=1)
        if plan["raise"]:
            raise StressFailure(f"job of item {item} failed on purpose (token={FAKE_SECRET})")

    ops = {}
    for type_, cooldown in ((PLAIN, None), (COOL, COOLDOWN)):
        ledger.catalog.register(OperationSpec(type_, lease=LEASE, cooldown=cooldown))
        ops[type_] = ledger.operation(type_, identity=("item",))(job)

    report: dict[str, Any] = {
        "dispatch_calls": 0,
        "dispositions": Counter(),
        "dispatched_ids": {},  # disposition -> set of run ids
        "claims": Counter(),  # run id -> claims that acquired it
        "takeovers": 0,
        "executions": Counter(),  # completed / failed / released / skipped / lease_lost
        "abandoned": 0,
        "abandon_skipped": 0,
        "finished": {},  # run id -> (outcome, summary_counts, failure codes) by this worker
        "reconciles": Counter(),
        "operations": 0,
    }
    deadline = time.monotonic() + config.seconds if config.seconds else None

    def dispatched(disposition: str, run_id: int) -> None:
        report["dispositions"][disposition] += 1
        report["dispatched_ids"].setdefault(disposition, set()).add(run_id)

    def executed(result: Any) -> None:
        report["executions"][result.status] += 1
        if result.status == "skipped":
            return
        attempt = result.attempt
        report["claims"][attempt.run_id] += 1
        if attempt.number > 1:
            report["takeovers"] += 1
        if result.status in ("completed", "failed"):
            plan = plans[attempt.run_id]
            codes = [ITEM_FAILED] * plan["bad"]
            if result.status == "failed":
                codes.append(f"{result.run.type}.failed")
            outcome = "failed" if result.status == "failed" else _outcome(plan["n"], plan["bad"])
            counts = {"total": plan["n"], "processed": plan["n"], "failed": plan["bad"]}
            assert attempt.run_id not in report["finished"]
            report["finished"][attempt.run_id] = (outcome, counts, codes)

    def new_plan() -> dict[str, Any]:
        n = rng.randint(0, 4)
        return {
            "n": n,
            "bad": rng.randint(0, n) if rng.random() < 0.4 else 0,
            "raise": rng.random() < config.fail_rate,
        }

    while True:
        if config.ops is not None and report["operations"] >= config.ops:
            break
        if deadline is not None and time.monotonic() >= deadline:
            break
        report["operations"] += 1
        type_ = rng.choice(TYPES)
        item = rng.randrange(config.identities)
        call = {"workspace_id": config.workspace, "tenant_id": "t1", "item": item}
        roll = rng.random()
        try:
            if roll < config.reconcile_rate:
                rec = ledger.reconcile_report(config.workspace, grace=timedelta(0))
                report["reconciles"]["did_work" if rec.did_work else "skipped"] += 1
                continue
            report["dispatch_calls"] += 1
            if roll < config.reconcile_rate + config.run_now_rate:
                result = ops[type_].run_now(
                    retries_left=rng.choice((0, 1)), reraise=False, plan=new_plan(), **call
                )
                dispatched(result.dispatch.disposition.value, result.dispatch.run.id)
                executed(result)
                continue
            res = ops[type_].dispatch(**call)
            dispatched(res.disposition.value, res.run.id)
            if rng.random() < config.abandon_rate:
                attempt = ledger.claim(res.run.id, lease=ABANDON_LEASE)
                if attempt.acquired:
                    report["claims"][res.run.id] += 1
                    report["takeovers"] += int(attempt.number > 1)
                    report["abandoned"] += 1  # and walk away: no complete, no release
                else:
                    report["abandon_skipped"] += 1
                continue
            result = ops[type_].execute(
                res.run.id, retries_left=rng.choice((0, 1)), reraise=False, plan=new_plan(), **call
            )
            executed(result)
        except LeaseLost:
            report["executions"]["lease_lost"] += 1
    ledger.engine.dispose()
    return report


def _entry(index: int, config: StressConfig, results: Any) -> None:
    try:
        results.put((index, True, worker(index, config)))
    except BaseException:
        results.put((index, False, traceback.format_exc()))


# -- the run ---------------------------------------------------------------------------------------


def run_stress(config: StressConfig) -> StressReport:
    """Run the workers on ``config.url`` (migrated here), then reconcile and check everything."""
    from opsrun_core import Ledger

    if config.ops is None and config.seconds is None:
        raise ValueError("bound the run: give ops (per process) or seconds")
    setup = Ledger(config.url)
    try:
        setup.upgrade()
    finally:
        setup.engine.dispose()
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_entry, args=(i, config, results), daemon=True)
        for i in range(config.processes)
    ]
    started = time.monotonic()
    for proc in procs:
        proc.start()
    reports: list[dict[str, Any]] = []
    errors: list[str] = []
    limit = (config.seconds or 0) + 300 + (config.ops or 0)
    try:
        for _ in procs:
            try:
                index, ok, value = results.get(timeout=limit)
            except queue.Empty:
                errors.append(f"a worker did not report within {limit} s")
                break
            if ok:
                reports.append(value)
            else:
                errors.append(f"worker {index} crashed:\n{value}")
    finally:
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
    elapsed = time.monotonic() - started
    report = StressReport()
    report.problems += errors
    if not errors:
        _check(config, reports, elapsed, report)
    return report


def _check(
    config: StressConfig, reports: list[dict[str, Any]], elapsed: float, report: StressReport
) -> None:
    from sqlalchemy import make_url

    from opsrun_core import RECONCILE_TYPE, Ledger, ManualClock
    from opsrun_core.invariants import check_invariants, format_violations

    problems = report.problems
    dispositions: Counter[str] = Counter()
    claims: Counter[int] = Counter()
    executions: Counter[str] = Counter()
    reconciles: Counter[str] = Counter()
    finished: dict[int, tuple[str, dict[str, int], list[str]]] = {}
    dispatched: dict[str, set[int]] = {}
    for r in reports:
        dispositions.update(r["dispositions"])
        claims.update(r["claims"])
        executions.update(r["executions"])
        reconciles.update(r["reconciles"])
        for disposition, ids in r["dispatched_ids"].items():
            dispatched.setdefault(disposition, set()).update(ids)
        for run_id, result in r["finished"].items():
            if run_id in finished:
                problems.append(f"run {run_id} was finished by two workers")
            finished[run_id] = result
    operations = sum(r["operations"] for r in reports)
    dispatch_calls = sum(r["dispatch_calls"] for r in reports)
    dispatches = sum(dispositions.values())
    created = dispositions["created"]

    ledger = Ledger(config.url)
    try:
        violations = check_invariants(ledger)
        if violations:
            problems.append("invariants during the run:\n" + format_violations(violations))
        later = Ledger(ledger.engine, clock=ManualClock(ledger.now() + timedelta(days=1)))
        final = later.reconcile(config.workspace)
        violations = check_invariants(ledger)
        if violations:
            problems.append("invariants after the reconcile:\n" + format_violations(violations))
        runs = {
            run.id: run
            for run in ledger.runs(workspace_id=config.workspace)
            if run.type != RECONCILE_TYPE
        }
    finally:
        ledger.engine.dispose()

    # every dispatch accounted for
    if dispatches != dispatch_calls:
        problems.append(f"{dispatch_calls} dispatches made, {dispatches} returned a disposition")
    if dispatch_calls + sum(reconciles.values()) != operations:
        problems.append(f"{operations} operations, {dispatch_calls} dispatches and reconciles")
    created_ids = dispatched.get("created", set())
    if len(created_ids) != created:
        problems.append(f"{created} CREATED dispositions but {len(created_ids)} distinct runs")
    if created_ids != set(runs):
        missing = sorted(created_ids - set(runs))[:5]
        stray = sorted(set(runs) - created_ids)[:5]
        problems.append(f"created runs and ledger rows differ (missing {missing}, stray {stray})")
    reused = dispatched.get("reused_active", set()) | dispatched.get("reused_cooldown", set())
    if not reused <= set(runs):
        problems.append(f"reused runs not in the ledger: {sorted(reused - set(runs))[:5]}")
    # each acquired claim raised attempts by exactly one
    for run_id, run in runs.items():
        if run.attempts != claims[run_id]:
            problems.append(f"run {run_id}: {run.attempts} attempts, {claims[run_id]} claims")
    # what workers finished is exactly what they did; the rest was finished by reconcile
    for run_id, (outcome, counts, codes) in finished.items():
        run = runs.get(run_id)
        if run is None:
            continue
        stored_codes = [entry["code"] for entry in run.failure_summary or []]
        if (run.outcome.value, run.summary_counts, stored_codes) != (outcome, counts, codes):
            problems.append(
                f"run {run_id}: stored {run.outcome.value} {run.summary_counts} {stored_codes}, "
                f"its worker finished it {outcome} {counts} {codes}"
            )
    leaked = [run_id for run_id, run in runs.items() if FAKE_SECRET in repr(run.failure_summary)]
    if leaked:
        problems.append(f"a secret reached the failure summary of runs {leaked[:5]}")
    by_reconcile: Counter[str] = Counter()
    for run_id, run in runs.items():
        if run.is_active:
            problems.append(f"run {run_id} is still {run.status.value} after the final reconcile")
        elif run_id not in finished:
            codes = [entry["code"] for entry in run.failure_summary or []]
            if len(codes) != 1 or not codes[0].startswith("ops.run."):
                problems.append(f"run {run_id} finished by nobody known: {codes}")
            else:
                by_reconcile[codes[0]] += 1
    if final.summary_counts is None:
        problems.append("the final reconcile has no summary counts")

    f = report.figures
    f["database"] = make_url(config.url).get_backend_name()
    f["processes"] = config.processes
    f["seed"] = config.seed
    f["elapsed"] = f"{elapsed:.1f} s"
    f["operations"] = operations
    f["operations/s"] = f"{operations / elapsed:.0f}" if elapsed else "-"
    f["dispatches"] = dispatches
    for name in ("created", "reused_active", "reused_cooldown"):
        f[f"  {name}"] = dispositions[name]
    f["claims acquired"] = sum(claims.values())
    f["  retries and takeovers"] = sum(r["takeovers"] for r in reports)
    f["  abandoned"] = sum(r["abandoned"] for r in reports)
    f["abandons skipped"] = sum(r["abandon_skipped"] for r in reports)
    for name in ("completed", "failed", "released", "skipped", "lease_lost"):
        f[f"executions {name}"] = executions[name]
    f["reconciles (did work / skipped)"] = f"{reconciles['did_work']} / {reconciles['skipped']}"
    f["finished by reconcile"] = dict(by_reconcile) or 0
    f["runs in the ledger"] = len(runs)
    f["invariant violations"] = 0 if not any("invariants" in p for p in problems) else "see below"
    if executions["lease_lost"]:
        problems.append(f"{executions['lease_lost']} executions lost their lease")


# -- command line ----------------------------------------------------------------------------------


def _throwaway_postgres(url: str) -> tuple[str, Any]:
    """Create a database next to ``url``'s; return its URL and a function that drops it."""
    from sqlalchemy import make_url

    from opsrun_core.db import make_engine

    server = make_engine(url, isolation_level="AUTOCOMMIT")
    name = f"opsrun_stress_{secrets.token_hex(4)}"
    with server.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')

    def drop() -> None:
        with server.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        server.dispose()

    return make_url(url).set(database=name).render_as_string(hide_password=False), drop


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.stress", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--database-url", help="default: a temporary SQLite file")
    parser.add_argument("--processes", type=int, default=8)
    parser.add_argument("--seconds", type=float, help="run for this long (default 10 s)")
    parser.add_argument("--ops", type=int, help="operations per process")
    parser.add_argument("--identities", type=int, default=4, help="pool size per type")
    parser.add_argument("--fail-rate", type=float, default=0.15)
    parser.add_argument("--abandon-rate", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument(
        "--in-place",
        action="store_true",
        help="Postgres: use the URL's database itself (default: a throwaway one next to it)",
    )
    args = parser.parse_args(argv)
    seconds = args.seconds if args.seconds is not None or args.ops is not None else 10.0
    seed = args.seed if args.seed is not None else random.randrange(10**6)
    drop = None
    with tempfile.TemporaryDirectory(prefix="opsrun-stress-") as tmp:
        url = args.database_url or f"sqlite:///{Path(tmp) / 'stress.sqlite3'}"
        if url.startswith("postgres") and not args.in_place:
            url, drop = _throwaway_postgres(url)
        try:
            config = StressConfig(
                url=url,
                workspace=f"stress-{secrets.token_hex(3)}",
                processes=args.processes,
                ops=args.ops,
                seconds=seconds,
                identities=args.identities,
                fail_rate=args.fail_rate,
                abandon_rate=args.abandon_rate,
                seed=seed,
            )
            report = run_stress(config)
        finally:
            if drop is not None:
                drop()
    print(report.format())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
