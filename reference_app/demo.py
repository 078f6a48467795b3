"""The demo: ``python -m reference_app demo``, the README's main job.

In a few seconds, on an SQLite file (or the database given), it plays what a day of an operations
team looks like and what the ledger makes of it:

1. seeds a fresh database (every table dropped and recreated);
2. dispatches a fetch for every policy and a restore for some, users clicking twice on two of them
   (the duplicate click reuses the active run; its message is still queued);
3. a worker takes one message and dies mid-run (it never completes, fails nor releases its run);
4. a pool of worker threads delivers every queued message, the directory throttling two policies
   (one recovers on a retry, one never does and fails with ``directory.throttled``) and failing some
   assignments (partial success); duplicates and the dead worker's redelivered message skip;
5. a message is redelivered after its run completed: skipped;
6. a user clicks again within 15 minutes: the completed run is reused (cooldown);
7. time moves past the dead worker's lease and ``ReconcileAdapterRunsJob`` finishes its run;
8. the user dispatches that fetch again: a new run, which succeeds;

then prints the ledger as a table and a summary. The summary is the demo's own bookkeeping of what
dispatch and execute returned, not a query of the ledger, so the tests can check one against the
other.

The ledger's clock is the real clock plus an offset the demo moves (:class:`ShiftedClock`), so the
dead worker's lease can expire without waiting for it.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from rich.console import Console
from sqlalchemy import select
from sqlalchemy.engine import Engine

from opsrun_core import Attempt, Disposition, EnsureResult, Run, fallback_label, system_clock
from opsrun_core.db import safe_url
from opsrun_core.reconcile import DEFAULT_GRACE, ReconcileReport

from .app import ReferenceApp
from .console import failure_codes, make_progress
from .directory import FakeDirectory
from .identity import ASSIGNMENT_TYPES, FETCH_TYPE
from .jobs import AssignmentJobError, JobMessage
from .models import AssignmentBackup, Policy, Tenant, Workspace
from .seed import DEFAULT_WORKSPACE_SLUG, seed
from .worker import Delivery, deliver, work

__all__ = [
    "DIRECTORY_SEED",
    "DemoRecord",
    "DemoReport",
    "DemoWorld",
    "ShiftedClock",
    "demo_directory",
    "inject_faults",
    "load_world",
    "run_demo",
]

#: seconds each directory call takes in the demo
DEFAULT_LATENCY = 0.003
#: seeds the fake directory's per-policy data
DIRECTORY_SEED = 2026


class ShiftedClock:
    """The real clock plus an offset that only grows: how the demo lets time pass (thread-safe)."""

    def __init__(self) -> None:
        self._offset = timedelta(0)
        self._lock = threading.Lock()

    def __call__(self) -> datetime:
        with self._lock:
            return system_clock() + self._offset

    def advance(self, delta: timedelta) -> None:
        """Move time forward by ``delta``."""
        if delta < timedelta(0):
            raise ValueError("time only moves forward")
        with self._lock:
            self._offset += delta


@dataclass
class DemoRecord:
    """The demo's bookkeeping of what the ledger answered, call by call."""

    dispatches: Counter[str] = field(default_factory=Counter)
    created: set[int] = field(default_factory=set)
    deliveries: Counter[str] = field(default_factory=Counter)
    skipped: Counter[str] = field(default_factory=Counter)
    attempts: int = 0
    abandoned: int = 0
    reconcile_runs: set[int] = field(default_factory=set)
    #: the last state of each run that a call returned
    final: dict[int, Run] = field(default_factory=dict)
    #: what each run works on, for the table
    targets: dict[int, str] = field(default_factory=dict)

    def dispatched(self, result: EnsureResult, target: str) -> EnsureResult:
        self.dispatches[result.disposition.value] += 1
        if result.disposition is Disposition.CREATED:
            self.created.add(result.run.id)
        self.targets.setdefault(result.run.id, target)
        return result

    def abandoned_claim(self, attempt: Attempt) -> None:
        self.deliveries["abandoned"] += 1
        self.abandoned += 1
        if attempt.acquired:
            self.attempts += 1

    def delivered(self, delivery: Delivery) -> None:
        for result in delivery.results:
            self.deliveries[result.status] += 1
            if result.status == "skipped":
                self.skipped[result.reason or "unknown"] += 1
            else:
                self.attempts += 1
            if result.run is not None and result.status != "skipped":
                self.final[result.run.id] = result.run
        if delivery.lease_lost:
            self.deliveries["lease_lost"] += 1

    def reconciled(self, report: ReconcileReport) -> None:
        if report.did_work:
            self.reconcile_runs.add(report.run.id)
            self.created.add(report.run.id)
            self.attempts += 1
        self.final[report.run.id] = report.run
        self.targets.setdefault(report.run.id, "workspace")

    def summary(self) -> dict[str, Any]:
        """Runs created, dispatches reused, skipped deliveries, outcomes, failure codes, items."""
        finals = list(self.final.values())
        codes: Counter[str] = Counter()
        items: Counter[str] = Counter()
        for run in finals:
            codes.update(failure_codes(run))
            if run.type in ASSIGNMENT_TYPES and run.summary_counts:
                for key in ("total", "processed", "failed"):
                    items[key] += int(run.summary_counts.get(key, 0))
        dispatches = {d.value: self.dispatches[d.value] for d in Disposition}
        return {
            "runs_created": len(self.created),
            "reconcile_runs": len(self.reconcile_runs),
            "dispatches": {"total": sum(dispatches.values()), **dispatches},
            "dispatches_reused": dispatches["reused_active"] + dispatches["reused_cooldown"],
            "deliveries": {
                "total": sum(self.deliveries.values()),
                **{k: self.deliveries[k] for k in ("completed", "failed", "released", "skipped")},
                "abandoned": self.abandoned,
            },
            "skipped_deliveries": dict(sorted(self.skipped.items())),
            "attempts": self.attempts,
            "outcomes": dict(sorted(Counter(run.outcome.value for run in finals).items())),
            "failure_codes": dict(sorted(codes.items())),
            "items": {key: items[key] for key in ("total", "processed", "failed")},
        }


@dataclass(frozen=True)
class DemoReport:
    """What the demo did: its summary, the ledger at the end, and names to show."""

    database: str
    summary: dict[str, Any]
    runs: list[Run]
    tenants: dict[str, str]
    targets: dict[int, str]
    labels: dict[str, str]

    def label(self, type_: str) -> str:
        """The catalog label of an operation type."""
        return self.labels.get(type_) or fallback_label(type_)


@dataclass(frozen=True)
class DemoWorld:
    """The seeded workspace as the demo sees it: tenants by slug, policies by (slug, platform)."""

    workspace_id: int
    tenants: dict[str, Tenant]
    policies: dict[tuple[str, str], Policy]
    backups: dict[int, AssignmentBackup]

    def policy(self, tenant: str, platform: str) -> Policy:
        return self.policies[(tenant, platform)]


def load_world(app: ReferenceApp, workspace_id: int | None = None) -> DemoWorld:
    """Read the seeded world (``workspace_id``: default, the default workspace)."""
    with app.sessions() as session:
        if workspace_id is None:
            workspace_id = session.scalar(
                select(Workspace.id).where(Workspace.slug == DEFAULT_WORKSPACE_SLUG)
            )
            if workspace_id is None:
                raise AssignmentJobError(
                    "the database has no default workspace; run `python -m reference_app seed`"
                )
        tenants = {t.slug: t for t in session.scalars(select(Tenant).order_by(Tenant.id))}
        slugs = {t.id: t.slug for t in tenants.values()}
        policies = {
            (slugs[p.tenant_id], p.platform): p
            for p in session.scalars(select(Policy).order_by(Policy.id))
        }
        backups = {b.policy_id: b for b in session.scalars(select(AssignmentBackup))}
    return DemoWorld(workspace_id, tenants, policies, backups)


def demo_directory(*, latency: float = DEFAULT_LATENCY) -> FakeDirectory:
    """The demo's fake directory: the same data in every process (a fixed seed), no faults yet."""
    return FakeDirectory(seed=DIRECTORY_SEED, latency=latency)


def inject_faults(directory: FakeDirectory, world: DemoWorld) -> None:
    """The directory's bad day: throttling (once on contoso's iOS reads, for good on fabrikam's
    Windows restores), two unreadable fabrikam iOS assignments, and a deleted group in northwind's
    Windows backup.

    The state lives in the directory object, so each process has its own: a worker process (each
    prefork child) throttles contoso's iOS reads once for itself.
    """
    directory.throttle(
        world.policy("contoso", "ios").external_id, times=1, after=2, operation="read_assignment"
    )
    directory.throttle(
        world.policy("fabrikam", "windows").external_id, times=None, operation="apply_assignment"
    )
    directory.corrupt(world.policy("fabrikam", "ios").external_id, 2)
    northwind_windows = world.policy("northwind", "windows")
    gone = next(
        item["target_id"]
        for item in world.backups[northwind_windows.id].items
        if item["target_id"] is not None
    )
    directory.delete_group(gone)


def run_demo(
    database: str | Engine,
    *,
    console: Console,
    workers: int = 4,
    latency: float = DEFAULT_LATENCY,
) -> DemoReport:
    """Play the demo on ``database`` (dropping and recreating its tables); print the story."""
    clock = ShiftedClock()
    directory = demo_directory(latency=latency)
    record = DemoRecord()
    step = iter(range(1, 100))

    def say(text: str) -> None:
        console.print(f"[bold cyan]{next(step):>2}.[/] {text}")

    with ReferenceApp(database, directory=directory, clock=clock) as app:
        where = safe_url(app.engine.url)
        console.print(f"[bold]opsrun reference app demo[/] on {where}")
        seeded = seed(app.engine, fresh=True)
        say(
            f"seeded a fresh database: 1 workspace, {seeded.tenants} tenants (1 platform), "
            f"{seeded.policies} policies, {seeded.backups} backups"
        )
        world = load_world(app, seeded.workspace_id)
        ws = world.workspace_id

        # the directory's bad day, injected up front
        inject_faults(directory, world)
        contoso_windows = world.policy("contoso", "windows")
        crash_victim = world.policy("northwind", "android")

        names = {t.id: t.name for t in world.tenants.values()}

        def fetch(policy: Policy) -> EnsureResult:
            result = app.fetch.dispatch(
                workspace_id=ws, tenant_id=policy.tenant_id, policy_id=policy.id, initiator="user:1"
            )
            return record.dispatched(result, policy.name)

        def restore(policy: Policy) -> EnsureResult:
            backup = world.backups[policy.id]
            result = app.restore.dispatch(
                workspace_id=ws,
                tenant_id=policy.tenant_id,
                policy_id=policy.id,
                backup_id=backup.id,
                initiator="user:1",
            )
            return record.dispatched(result, f"{policy.name} ← backup {backup.id}")

        # 2. users click: every click enqueues a message carrying the run id dispatch returned
        queue: list[JobMessage] = []
        for policy in world.policies.values():
            queue.append(JobMessage.for_run(fetch(policy).run))
            if policy is contoso_windows:
                queue.append(JobMessage.for_run(fetch(policy).run))  # a double click
        for slug in ("contoso", "fabrikam", "northwind"):
            policy = world.policy(slug, "windows")
            queue.append(JobMessage.for_run(restore(policy).run))
            if slug == "contoso":
                queue.append(JobMessage.for_run(restore(policy).run))  # a double click
        reused = record.dispatches[Disposition.REUSED_ACTIVE.value]
        say(
            f"dispatched {len(record.created)} runs from {len(queue)} clicks: "
            f"{reused} duplicate clicks reused the active run"
        )

        # 3. a worker takes the crash victim's message, starts, and its process is killed
        victim = next(
            m for m in queue if m.type == FETCH_TYPE and m.policy_id == str(crash_victim.id)
        )
        attempt = app.ledger.claim(victim.run_id)
        record.abandoned_claim(attempt)
        directory.list_assignments(
            tenant=world.tenants["northwind"].external_id,
            policy=crash_victim.external_id,
            access_token=app.access_token(crash_victim.tenant_id),
        )
        say(
            f"a worker crashed mid-run holding run {victim.run_id} "
            f"({names[crash_victim.tenant_id]}, {crash_victim.name}); its message is redelivered"
        )

        # 4. the pool delivers every message, the dead worker's included
        progress = make_progress(console)
        with progress:
            task = progress.add_task(f"{workers} workers delivering", total=len(queue))
            deliveries = work(
                app, queue, workers=workers, on_done=lambda _d: progress.advance(task)
            )
        for delivery in deliveries:
            record.delivered(delivery)
        d = record.deliveries
        say(
            f"{workers} worker threads delivered {len(queue)} messages: "
            f"{d['completed']} completed, {d['failed']} failed, "
            f"{d['released']} released for a retry (HTTP 429), "
            f"{d['skipped']} skipped (duplicates, the crashed worker's run)"
        )

        # 5. a message delivered again after its run completed
        first = next(
            m for m in queue if m.type == FETCH_TYPE and m.policy_id == str(contoso_windows.id)
        )
        late = deliver(app, first)
        record.delivered(late)
        assert late.final is not None
        say(
            f"a message for run {first.run_id} was redelivered: "
            f"{late.final.status} ({late.final.reason})"
        )

        # 6. a user clicks again within the cooldown
        again = fetch(contoso_windows)
        say(
            f"a user fetched {contoso_windows.name} again: {again.disposition.value} run "
            f"{again.run.id} (it succeeded less than 15 minutes ago)"
        )

        # 7. time passes beyond the dead worker's lease; the scheduled housekeeping runs
        lease = app.ledger.catalog.spec(FETCH_TYPE).lease_duration
        wait = lease + DEFAULT_GRACE + timedelta(seconds=30)
        clock.advance(wait)
        report = app.reconcile.handle(ws)
        record.reconciled(report)
        finished = app.ledger.get(victim.run_id)
        record.final[finished.id] = finished
        codes = ", ".join(sorted(failure_codes(finished))) or "-"
        counts = report.run.summary_counts or {}
        say(
            f"{int(wait.total_seconds() // 60)} minutes later ReconcileAdapterRunsJob (run "
            f"{report.run.id}) found {counts.get('total', 0)} stale run(s) and finished run "
            f"{finished.id}: {finished.outcome.value} ({codes})"
        )

        # 8. the crash victim's identity is free again: a new run does the work
        retry = fetch(crash_victim)
        redo = deliver(app, JobMessage.for_run(retry.run))
        record.delivered(redo)
        assert redo.final is not None and redo.final.run is not None
        say(
            f"the user fetched {crash_victim.name} again: {retry.disposition.value} run "
            f"{retry.run.id}, {redo.final.run.outcome.value}"
        )

        runs = sorted(app.ledger.runs(), key=lambda r: r.id)
        tenants = {str(t.id): t.slug for t in world.tenants.values()}
        labels = {spec.type: spec.display_label for spec in app.ledger.catalog}
        return DemoReport(where, record.summary(), runs, tenants, dict(record.targets), labels)
