"""The reference app end to end, on SQLite and Postgres (issue 6, "Tests that must exist").

Seeding, durable summaries of fetch and restore (and retries that do not double-count), dedupe of
both jobs, the 15-minute cooldown, throttling without a secret anywhere in the database, and the
housekeeping tracked through the app's own ``ReconcileAdapterRunsJob``.
"""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass
from datetime import timedelta

import pytest
from click.testing import CliRunner
from sqlalchemy import JSON, Engine, String, Text, func, inspect, select, text
from sqlalchemy import column as sql_column
from sqlalchemy import table as sql_table

from opsrun_core import (
    RECONCILE_TYPE,
    Disposition,
    ExecutionResult,
    ManualClock,
    Outcome,
    RunStatus,
    hookimpl,
)
from opsrun_core.reconcile import DEFAULT_GRACE, LEASE_EXPIRED, ReconcileError
from reference_app.app import ReferenceApp
from reference_app.cli import cli
from reference_app.directory import FakeDirectory
from reference_app.identity import FETCH_TYPE, RESTORE_TYPE, assignment_job_fingerprint
from reference_app.jobs import JobMessage
from reference_app.models import AssignmentBackup, Policy, PolicyAssignment, metadata
from reference_app.seed import seed
from reference_app.worker import deliver

THROTTLED = "directory.throttled"
RECONCILE_FAILED = "ops.reconcile_adapter_runs.failed"


# --------------------------------------------------------------------------- helpers


def text_columns(engine: Engine) -> list[tuple[str, str]]:
    """Every (table, column) of the database that can hold text: strings, JSON, JSONB."""
    found = []
    inspector = inspect(engine)
    for table in inspector.get_table_names():
        for col in inspector.get_columns(table):
            kind = col["type"]
            if isinstance(kind, (String, Text, JSON)) or type(kind).__name__ in ("JSONB", "JSON"):
                found.append((table, col["name"]))
    return found


def columns_containing(engine: Engine, needle: str) -> list[str]:
    """``table.column`` of every text or JSON column, in every table, where ``needle`` occurs."""
    hits = []
    with engine.connect() as conn:
        for table, name in text_columns(engine):
            col = sql_column(name)
            query = (
                select(func.count())
                .select_from(sql_table(table, col))
                .where(func.cast(col, Text).contains(needle, autoescape=True))
            )
            if conn.execute(query).scalar_one():
                hits.append(f"{table}.{name}")
    return hits


def clean_app_tables(engine: Engine) -> None:
    """Empty the app's tables (Postgres keeps them across tests in the session's database)."""
    metadata.create_all(engine)
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            names = ", ".join(t.name for t in metadata.sorted_tables)
            conn.execute(text(f"TRUNCATE {names} RESTART IDENTITY CASCADE"))
        else:
            for table in reversed(metadata.sorted_tables):
                conn.execute(table.delete())


@dataclass(frozen=True)
class World:
    """What the seed made that the tests work on."""

    workspace_id: int
    policy: Policy
    other_policy: Policy
    backup: AssignmentBackup


@pytest.fixture
def directory() -> FakeDirectory:
    return FakeDirectory(seed=11, client_secret="cs~Q8f_h2kLmXyZ-very-secret-value")


@pytest.fixture
def app(opsrun_engine: Engine, opsrun_clock: ManualClock, directory: FakeDirectory) -> ReferenceApp:
    return ReferenceApp(opsrun_engine, clock=opsrun_clock, directory=directory)


@pytest.fixture
def world(app: ReferenceApp) -> World:
    clean_app_tables(app.engine)
    report = seed(app.engine, rng=random.Random(42))
    with app.sessions() as session:
        policies = list(
            session.scalars(
                select(Policy)
                .where(Policy.tenant_id != report.platform_tenant_id)
                .order_by(Policy.id)
            )
        )
        backup = session.scalars(
            select(AssignmentBackup).where(AssignmentBackup.policy_id == policies[0].id)
        ).one()
    return World(report.workspace_id, policies[0], policies[1], backup)


def fetch(app: ReferenceApp, policy: Policy):
    return app.fetch.dispatch(
        workspace_id=policy.workspace_id, tenant_id=policy.tenant_id, policy_id=policy.id
    )


def restore(app: ReferenceApp, backup: AssignmentBackup, policy: Policy):
    return app.restore.dispatch(
        workspace_id=policy.workspace_id,
        tenant_id=policy.tenant_id,
        policy_id=policy.id,
        backup_id=backup.id,
    )


def assert_counts_complete(counts: dict | None) -> None:
    assert counts is not None
    for key in ("total", "processed", "failed"):
        assert isinstance(counts[key], int) and counts[key] >= 0, key


# --------------------------------------------------------------------------- seeding


def test_seed_fresh_gives_uuid4_external_ids_in_the_default_workspace(
    opsrun_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the very first UUID the seeder will draw from this rng: if it ever used INTUNE_TENANT_ID,
    # or did not steer clear of it, a tenant would end up with it
    first_draw = uuid.UUID(int=random.Random(7).getrandbits(128), version=4)
    monkeypatch.setenv("INTUNE_TENANT_ID", str(first_draw))

    report = seed(opsrun_engine, fresh=True, rng=random.Random(7))

    with opsrun_engine.connect() as conn:
        [(workspace_id, slug)] = conn.execute(text("SELECT id, slug FROM workspaces")).all()
        tenants = conn.execute(
            text("SELECT id, workspace_id, external_id, is_platform FROM tenants")
        ).all()
        policies = conn.execute(
            text("SELECT workspace_id, tenant_id, external_id FROM policies")
        ).all()
        backups = conn.execute(text("SELECT workspace_id FROM assignment_backups")).all()
    assert slug == "default" and report.workspace_id == workspace_id
    assert len(tenants) == 4 and len(policies) == 10 and len(backups) == 10
    external_ids = [uuid.UUID(str(row.external_id)) for row in tenants]
    assert all(value.version == 4 for value in external_ids)
    assert first_draw not in external_ids
    assert len(set(external_ids)) == len(external_ids)
    assert all(uuid.UUID(str(row.external_id)).version == 4 for row in policies)
    assert {row.workspace_id for row in tenants} == {workspace_id}
    assert {row.workspace_id for row in policies} == {workspace_id}
    assert {row.workspace_id for row in backups} == {workspace_id}
    [platform] = [row for row in tenants if row.is_platform]
    assert platform.workspace_id == workspace_id and platform.id == report.platform_tenant_id


def test_seeding_twice_works_fresh_or_not(
    opsrun_database_url: str, opsrun_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("INTUNE_TENANT_ID", str(uuid.uuid4()))
    runner = CliRunner()

    def run(*args: str) -> str:
        result = runner.invoke(cli, ["seed", "--database-url", opsrun_database_url, *args])
        assert result.exit_code == 0, result.output
        return result.output

    def snapshot() -> tuple[int, ...]:
        with opsrun_engine.connect() as conn:
            counts = tuple(
                conn.execute(text(f"SELECT count(*) FROM {name}")).scalar_one()
                for name in ("workspaces", "tenants", "policies", "assignment_backups")
            )
            ids = {str(v) for v in conn.execute(text("SELECT external_id FROM tenants")).scalars()}
        return counts, ids

    run("--fresh")
    first_counts, first_ids = snapshot()
    assert first_counts == (1, 4, 10, 10)
    run("--fresh")
    second_counts, second_ids = snapshot()
    assert second_counts == first_counts and not second_ids & first_ids  # fresh UUIDs again
    assert "0 rows added" in run() and "0 rows added" in run()
    assert snapshot() == (second_counts, second_ids)


# --------------------------------------------------------------------------- summaries


def test_fetch_summary_counts_survive_a_retry_without_double_counting(
    app: ReferenceApp, world: World, directory: FakeDirectory
) -> None:
    policy = world.policy.external_id
    n = len(directory.assignments_of(policy))
    directory.corrupt(policy, 1)  # the first assignment cannot be read
    # attempt 1 reads two assignments (one of them fails), then the directory says 429
    directory.throttle(policy, times=1, after=2, operation="read_assignment")

    delivery = deliver(app, JobMessage.for_run(fetch(app, world.policy).run), retries=1)

    assert [r.status for r in delivery.results] == ["released", "completed"]
    run = app.ledger.get(delivery.results[0].attempt.run_id)
    assert_counts_complete(run.summary_counts)
    assert run.summary_counts == {"total": n, "processed": n, "failed": 1}
    assert run.attempts == 2 and run.outcome is Outcome.PARTIALLY_SUCCEEDED
    assert [e["code"] for e in run.failure_summary] == ["directory.assignment_unreadable"]
    with app.sessions() as session:
        stored = session.scalar(
            select(func.count()).where(PolicyAssignment.policy_id == world.policy.id)
        )
    assert stored == n - 1


def test_restore_summary_counts_survive_a_retry_without_double_counting(
    app: ReferenceApp, world: World, directory: FakeDirectory
) -> None:
    items = world.backup.items
    gone = items[0]["target_id"]
    directory.delete_group(gone)  # the first item's group no longer exists
    directory.throttle(world.policy.external_id, times=1, after=2, operation="apply_assignment")

    message = JobMessage.for_run(restore(app, world.backup, world.policy).run)
    delivery = deliver(app, message, retries=1)

    assert [r.status for r in delivery.results] == ["released", "completed"]
    run = app.ledger.get(message.run_id)
    assert_counts_complete(run.summary_counts)
    assert run.summary_counts == {"total": len(items), "processed": len(items), "failed": 1}
    assert run.attempts == 2 and run.outcome is Outcome.PARTIALLY_SUCCEEDED
    assert [e["code"] for e in run.failure_summary] == ["directory.target_not_found"]


# --------------------------------------------------------------------------- dedupe and cooldown


def _duplicate_during_the_run(
    app: ReferenceApp, directory: FakeDirectory, message: JobMessage, operation: str
) -> tuple[ExecutionResult, list[ExecutionResult]]:
    """Deliver ``message``; while its job is inside the directory, deliver it a second time."""
    inner: list[ExecutionResult] = []

    def second_delivery(call) -> None:
        if call.operation == operation and not inner:
            inner.append(app.deliver(message))

    directory.on_call = second_delivery
    try:
        outer = app.deliver(message)
    finally:
        directory.on_call = None
    return outer, inner


def test_fetch_dispatched_twice_runs_once(
    app: ReferenceApp, world: World, directory: FakeDirectory
) -> None:
    first, second = fetch(app, world.policy), fetch(app, world.policy)
    assert first.disposition is Disposition.CREATED
    assert second.disposition is Disposition.REUSED_ACTIVE and second.run.id == first.run.id

    outer, [inner] = _duplicate_during_the_run(
        app, directory, JobMessage.for_run(second.run), "list_assignments"
    )

    assert outer.status == "completed"
    assert inner.status == "skipped" and inner.reason == "running"
    assert directory.calls[("list_assignments", world.policy.external_id)] == 1
    late = app.deliver(JobMessage.for_run(first.run))  # a redelivered message
    assert late.status == "skipped" and late.reason == "completed"
    run = app.ledger.get(first.run.id)
    assert run.attempts == 1 and run.status is RunStatus.COMPLETED
    assert len(app.ledger.runs(type=FETCH_TYPE)) == 1


def test_restore_dispatched_twice_runs_once(
    app: ReferenceApp, world: World, directory: FakeDirectory
) -> None:
    first = restore(app, world.backup, world.policy)
    second = restore(app, world.backup, world.policy)
    assert second.disposition is Disposition.REUSED_ACTIVE and second.run.id == first.run.id
    with app.sessions.begin() as session:
        newer = AssignmentBackup(
            workspace_id=world.workspace_id,
            policy_id=world.policy.id,
            label="another backup",
            items=world.backup.items,
        )
        session.add(newer)
    assert restore(app, newer, world.policy).disposition is Disposition.CREATED  # another identity

    outer, [inner] = _duplicate_during_the_run(
        app, directory, JobMessage.for_run(first.run), "apply_assignment"
    )

    assert outer.status == "completed" and inner.status == "skipped" and inner.reason == "running"
    applied = directory.calls[("apply_assignment", world.policy.external_id)]
    assert applied == len(world.backup.items)  # one execution's worth of work
    assert app.ledger.get(first.run.id).attempts == 1


def test_a_completed_fetch_is_reused_for_15_minutes_then_a_new_run_is_created(
    app: ReferenceApp, world: World, opsrun_clock: ManualClock
) -> None:
    first = fetch(app, world.policy)
    assert first.run.identity == {"policy_id": str(world.policy.id)}
    assert first.run.identity_hash == assignment_job_fingerprint(
        FETCH_TYPE,
        workspace_id=world.workspace_id,
        tenant_id=world.policy.tenant_id,
        policy_id=world.policy.id,
    )
    assert app.deliver(JobMessage.for_run(first.run)).status == "completed"

    opsrun_clock.advance(timedelta(minutes=15) - timedelta(seconds=1))
    within = fetch(app, world.policy)
    assert within.disposition is Disposition.REUSED_COOLDOWN and within.run.id == first.run.id
    assert fetch(app, world.other_policy).created  # the cooldown is per identity

    opsrun_clock.advance(timedelta(seconds=2))
    after = fetch(app, world.policy)
    assert after.disposition is Disposition.CREATED and after.run.id != first.run.id


# --------------------------------------------------------------------------- throttling


def test_throttling_is_recorded_as_directory_throttled_with_no_secret_in_the_database(
    app: ReferenceApp,
    world: World,
    directory: FakeDirectory,
    opsrun_engine: Engine,
    caplog: pytest.LogCaptureFixture,
) -> None:
    directory.throttle(world.policy.external_id, times=None, operation="read_assignment")
    directory.delete_group(world.backup.items[0]["target_id"])  # a per-item error with a token too
    fetch_run = fetch(app, world.policy).run
    restore_run = restore(app, world.backup, world.policy).run  # applies, so is not throttled

    throttled = deliver(app, JobMessage.for_run(fetch_run), retries=2)
    partial = deliver(app, JobMessage.for_run(restore_run), retries=0)

    assert [r.status for r in throttled.results] == ["released", "released", "failed"]
    failed = app.ledger.get(fetch_run.id)
    assert failed.outcome is Outcome.FAILED and failed.attempts == 3
    assert_counts_complete(failed.summary_counts)
    [entry] = failed.failure_summary
    assert entry["code"] == THROTTLED
    assert "HTTP 429" in entry["message"] and "[REDACTED]" in entry["message"]
    assert partial.final is not None and partial.final.status == "completed"
    assert app.ledger.get(restore_run.id).outcome is Outcome.PARTIALLY_SUCCEEDED

    # nothing secret anywhere: every text and JSON column of every table, scanned in SQL
    tokens = directory.issued_tokens
    assert len(tokens) == 4
    secrets = [directory.client_secret, directory.client_secret.removeprefix("cs~")]
    for token in tokens:
        secrets += [token, token.rsplit(".", 1)[-1]]  # the whole token, and its signature alone
    assert ("operation_runs", "failure_summary") in text_columns(opsrun_engine)
    assert columns_containing(opsrun_engine, THROTTLED) == ["operation_runs.failure_summary"]
    for secret in secrets:
        assert columns_containing(opsrun_engine, secret) == [], "a secret reached the database"
        assert secret not in caplog.text, "a secret reached the log"
    # a failed run starts no cooldown: the user's retry gets a new run
    assert fetch(app, world.policy).disposition is Disposition.CREATED


# --------------------------------------------------------------------------- reconcile


def _abandon(app: ReferenceApp, policy: Policy) -> int:
    """Dispatch a fetch and claim it like a worker that then dies: no complete, fail or release."""
    run_id = fetch(app, policy).run.id
    assert app.ledger.claim(run_id).acquired
    return run_id


def _past_the_lease(app: ReferenceApp) -> timedelta:
    return app.ledger.catalog.spec(FETCH_TYPE).lease_duration + DEFAULT_GRACE + timedelta(seconds=1)


def test_reconcile_job_is_tracked_and_finishes_the_crashed_run(
    app: ReferenceApp, world: World, opsrun_clock: ManualClock
) -> None:
    crashed = _abandon(app, world.policy)
    early = app.reconcile.handle(world.workspace_id)
    assert early.did_work and early.run.summary_counts["total"] == 0  # its lease still holds
    assert app.ledger.get(crashed).status is RunStatus.RUNNING

    opsrun_clock.advance(_past_the_lease(app))
    waiting = fetch(app, world.other_policy).run.id  # queued a moment ago: healthy
    report = app.reconcile.handle(world.workspace_id)

    run = report.run
    assert report.did_work and run.type == RECONCILE_TYPE == app.reconcile.type
    assert run.workspace_id == str(world.workspace_id) and run.tenant_id is None
    assert run.status is RunStatus.COMPLETED and run.outcome is Outcome.SUCCEEDED
    assert_counts_complete(run.summary_counts)
    assert (run.summary_counts["total"], run.summary_counts["processed"]) == (1, 1)
    assert run.summary_counts["failed"] == 0
    finished = app.ledger.get(crashed)
    assert finished.outcome is Outcome.FAILED
    assert [e["code"] for e in finished.failure_summary] == [LEASE_EXPIRED]
    assert app.ledger.get(waiting).status is RunStatus.QUEUED
    assert len(app.ledger.runs(type=RECONCILE_TYPE)) == 2
    assert fetch(app, world.policy).created  # the identity is free again


def test_reconcile_job_failure_is_tracked_with_a_stable_code_and_no_secret(
    app: ReferenceApp, world: World, opsrun_clock: ManualClock, opsrun_engine: Engine
) -> None:
    secret = "whsec_5f2b9c1e8d7a6b5c4d3e2f1a0b9c8d7e"

    class FailingAuditHook:
        """An app plugin that reports finished runs to a webhook that is down."""

        @hookimpl
        def opsrun_run_finished(self, run):
            if run.type != RECONCILE_TYPE:
                raise ConnectionError(
                    f"audit webhook https://hooks.example.test/runs refused "
                    f"Authorization: Bearer {secret}; signing_secret={secret}"
                )

    crashed = _abandon(app, world.policy)
    opsrun_clock.advance(_past_the_lease(app))
    plugin = FailingAuditHook()
    app.ledger.pm.register(plugin)
    try:
        with pytest.raises(ReconcileError) as caught:
            app.reconcile.handle(world.workspace_id)
    finally:
        app.ledger.pm.unregister(plugin)

    run = caught.value.run
    assert run is not None and run.type == RECONCILE_TYPE and run.tenant_id is None
    assert run.status is RunStatus.COMPLETED and run.outcome is Outcome.FAILED
    [entry] = run.failure_summary
    assert entry["code"] == RECONCILE_FAILED and "ConnectionError" in entry["message"]
    assert app.ledger.get(run.id).failure_summary == run.failure_summary
    assert secret not in str(caught.value)
    assert columns_containing(opsrun_engine, secret) == []
    assert columns_containing(opsrun_engine, RECONCILE_FAILED) == ["operation_runs.failure_summary"]
    # the observer raised after the sweep's write committed (observers hear only of committed
    # writes): the crashed run is finished all the same, and the next reconcile succeeds
    assert app.ledger.get(crashed).failure_summary[0]["code"] == LEASE_EXPIRED
    assert app.reconcile.handle(world.workspace_id).run.outcome is Outcome.SUCCEEDED


# --------------------------------------------------------------------------- the command line


def test_cli_dispatch_work_and_reconcile(opsrun_database_url: str, opsrun_engine: Engine) -> None:
    runner = CliRunner()

    def run(*args: str) -> str:
        result = runner.invoke(cli, [*args, "--database-url", opsrun_database_url])
        assert result.exit_code == 0, result.output
        return result.output

    run("seed", "--fresh")
    assert "created" in run("dispatch", "fetch", "2", "3")
    assert "reused_active" in run("dispatch", "fetch", "2")
    assert "created" in run("dispatch", "restore", "2")
    out = run("work", "--failure-rate", "0", "--workers", "2")
    assert "3 messages delivered: completed 3" in out
    assert "nothing queued" in run("work")
    assert "reused_cooldown" in run("dispatch", "fetch", "2")
    assert "0 stale" in run("reconcile")
    with opsrun_engine.connect() as conn:
        rows = conn.execute(text("SELECT type, status, outcome FROM operation_runs")).all()
    assert sorted(rows) == sorted(
        [
            (FETCH_TYPE, "completed", "succeeded"),
            (FETCH_TYPE, "completed", "succeeded"),
            (RESTORE_TYPE, "completed", "succeeded"),
            (RECONCILE_TYPE, "completed", "succeeded"),
        ]
    )


def test_cli_errors_are_one_line_with_an_exit_code_and_no_traceback(tmp_path) -> None:
    runner = CliRunner()
    empty = f"sqlite:///{tmp_path / 'empty.db'}"
    cases = [
        (["seed", "--database-url", "not a url"], 4, "not a valid SQLAlchemy URL"),
        (["--database-url", empty, "dispatch", "fetch", "1"], 4, "python -m reference_app seed"),
        (["reconcile", "--database-url", empty], 4, "python -m reference_app seed"),
        (["seed", "--database-url", empty], 0, ""),
        (["dispatch", "fetch", "999", "--database-url", empty], 3, "no policy with id 999"),
        (["dispatch", "restore", "999", "--database-url", empty], 3, "no backup with id 999"),
    ]
    for args, code, expected in cases:
        result = runner.invoke(cli, args)
        assert result.exit_code == code, (args, result.output)
        assert "Traceback" not in result.output
        if code:
            [line] = result.output.strip().splitlines()
            assert line.startswith("reference_app: error: ") and expected in line
    result = runner.invoke(cli, ["dispatch", "fetch", "--database-url", empty])
    assert result.exit_code == 2 and "POLICY_ID" in result.output


def test_cli_help_lists_every_command() -> None:
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0
    for command in ("seed", "demo", "dispatch", "work", "reconcile"):
        assert command in result.output
    result = CliRunner().invoke(cli, ["dispatch", "--help"])
    assert "fetch" in result.output and "restore" in result.output
