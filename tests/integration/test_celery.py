"""opsrun on Celery: real worker processes on a Redis broker, a real Postgres ledger.

Every test gets its own Redis key prefix and queue (see ``tests/celery_app.py``) and starts its own
``celery worker`` processes, stopped in a finalizer. Without Redis (or without celery installed)
the tests skip, saying why; ``OPSRUN_REQUIRE_REDIS=1`` (set by ``.ci/run``) makes that a failure.
Redis comes from ``OPSRUN_TEST_REDIS_URL`` (default ``redis://127.0.0.1:6379/0``).

Every wait is bounded (:data:`tests.celery_app.WAIT_S`); the tests assert outcomes, never durations.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from opsrun_core import (
    ConfigurationError,
    InvalidInput,
    Outcome,
    Run,
    RunStatus,
)
from tests.celery_app import Harness, Settings, Worker, build, race_dispatch, wait_until

pytestmark = [pytest.mark.opsrun_backends("postgres"), pytest.mark.slow]

N_DISPATCHERS = 6


class CeleryTest:
    """One test's broker namespace, harness and worker processes."""

    def __init__(self, database_url: str, broker_url: str, tmp_path: Path) -> None:
        import secrets

        uid = secrets.token_hex(4)
        self.database_url = database_url
        self.broker_url = broker_url
        self.tmp_path = tmp_path
        self.prefix = f"opsrun-test-{uid}:"
        self.queue = f"opsrun-test-{uid}"
        self.harness: Harness | None = None
        self.workers: list[Worker] = []

    def setup(self, *, visibility_timeout: float = 3600.0) -> Harness:
        settings = Settings(
            database_url=self.database_url,
            broker_url=self.broker_url,
            prefix=self.prefix,
            queue=self.queue,
            visibility_timeout=visibility_timeout,
        )
        self.harness = build(settings)
        return self.harness

    def start_workers(self, *names: str) -> list[Worker]:
        assert self.harness is not None
        started = [Worker(self.harness.settings, name, self.tmp_path).start() for name in names]
        self.workers.extend(started)
        for worker in started:
            worker.wait_ready(self.harness.app)
        return started

    def logs(self) -> str:
        return "\n".join(f"--- {w.hostname}\n{w.log_tail()}" for w in self.workers)

    def wait_until(self, condition: Callable[[], Any], what: str) -> Any:
        return wait_until(condition, what, logs=self.logs)

    def wait_completed(self, run_id: int) -> Run:
        assert self.harness is not None
        ledger = self.harness.ledger

        def completed() -> Run | None:
            run = ledger.get(run_id)
            return run if run.status is RunStatus.COMPLETED else None

        return wait_until(completed, f"run {run_id} to complete", logs=self.logs)

    def close(self) -> None:
        for worker in self.workers:
            worker.terminate()  # all at once, then wait for each
        for worker in self.workers:
            worker.stop()
        if self.harness is not None:
            client = self.harness.redis
            keys = list(client.scan_iter(match=f"{self.prefix}*"))
            if keys:
                client.delete(*keys)
            self.harness.close()


@pytest.fixture
def celery_test(opsrun_database_url: str, redis_url: str, tmp_path: Path) -> Iterator[CeleryTest]:
    test = CeleryTest(opsrun_database_url, redis_url, tmp_path)
    try:
        yield test
    finally:
        test.close()


def test_duplicate_dispatch_from_processes_sends_one_message_and_executes_once(
    celery_test: CeleryTest,
) -> None:
    h = celery_test.setup()
    h.redis.set(f"{h.settings.prefix}vault:c1", "s3cr3t-from-the-vault")

    results = race_dispatch(h.settings, N_DISPATCHERS, "i1")

    dispositions = sorted(disposition for disposition, _, _ in results)
    assert dispositions == ["created"] + ["reused_active"] * (N_DISPATCHERS - 1)
    assert len({run_id for _, run_id, _ in results}) == 1
    assert [sent for disposition, _, sent in results if sent] == [True]
    assert h.queued_messages() == 1  # duplicates never reached the broker
    assert not any(b"s3cr3t" in body for body in h.queued_bodies())

    celery_test.start_workers("a")
    run = celery_test.wait_completed(results[0][1])

    assert run.outcome is Outcome.SUCCEEDED
    assert run.attempts == 1
    assert run.summary_counts == {"total": 1, "processed": 1, "failed": 0}
    starts = h.events("start")
    assert len(starts) == 1
    assert starts[0]["token"] == "s3cr3t-from-the-vault"  # resolved in the worker
    assert run.context is not None and run.context["celery_task_id"]
    assert h.queued_messages() == 0


def test_a_task_that_raises_is_retried_on_one_run_until_it_succeeds_or_runs_out(
    celery_test: CeleryTest,
) -> None:
    h = celery_test.setup()
    (worker,) = celery_test.start_workers("a")

    ok = h.flaky.dispatch(workspace_id="w1", tenant_id="t1", item="i1", fail_times=2)
    doomed = h.flaky.dispatch(workspace_id="w1", tenant_id="t1", item="i2", fail_times=99)
    run = celery_test.wait_completed(ok.run.id)
    failed = celery_test.wait_completed(doomed.run.id)

    # raised twice, retried twice, then succeeded: one run, three attempts, the last one's counts
    assert run.outcome is Outcome.SUCCEEDED
    assert run.attempts == 3
    assert run.summary_counts == {"total": 3, "processed": 3, "failed": 0}
    assert run.failure_summary is None
    assert [e["attempt"] for e in h.events("start") if e["run_id"] == run.id] == [1, 2, 3]
    assert len(h.ledger.runs(type="celery_test.flaky", workspace_id="w1")) == 2

    # max_retries=3: four attempts, then the run fails with a sanitized failure entry
    assert failed.outcome is Outcome.FAILED
    assert failed.attempts == 4
    assert failed.failure_summary is not None
    assert [entry["code"] for entry in failed.failure_summary] == ["celery_test.flaky.failed"]
    assert "abc.def.ghi" not in failed.failure_summary[0]["message"]

    retries = [e for e in h.events("retry") if e["run_id"] in (run.id, failed.id)]
    assert len(retries) == 2 + 3
    assert all("abc.def.ghi" not in e["message"] for e in retries)
    worker.stop()
    log = worker.log_path.read_text(errors="replace")
    assert "OperationFailed" in log  # Celery saw the last attempt fail ...
    assert "abc.def.ghi" not in log  # ... and logged no secret from it


def test_a_worker_killed_mid_task_is_taken_over_after_its_lease_and_completes_once(
    celery_test: CeleryTest,
) -> None:
    # Redis redelivers an unacknowledged message 3 s after a worker took it, well before the
    # operation's 8 s lease (tests.celery_app.CRASH_LEASE) expires
    h = celery_test.setup(visibility_timeout=3.0)
    a, b = celery_test.start_workers("a", "b")

    d = h.crashy.dispatch(workspace_id="w1", tenant_id="t1", item="i1")
    first = celery_test.wait_until(lambda: h.events("start"), "the first attempt to start")[0]
    assert first["attempt"] == 1
    victim = {a.pid: a, b.pid: b}[first["worker_pid"]]
    victim.kill()

    run = celery_test.wait_completed(d.run.id)

    assert run.outcome is Outcome.SUCCEEDED
    assert run.attempts == 2  # the killed attempt, then one takeover
    events = [e for e in h.events() if e.get("run_id") == run.id]
    kinds = [(e["kind"], e.get("attempt")) for e in events]
    assert [k for k in kinds if k[0] == "start"] == [("start", 1), ("start", 2)]
    assert [k for k in kinds if k[0] == "finish"] == [("finish", 2)]  # completed exactly once
    # the redelivery found the lease held: it waited (no call) and took over only after it
    assert ("wait", None) in kinds
    assert kinds.index(("wait", None)) < kinds.index(("start", 2))
    assert sum(1 for e in events if e["kind"] == "delivery" and e["status"] == "completed") == 1


def test_liveness_hook_sees_an_active_task_and_has_no_opinion_without_workers(
    celery_test: CeleryTest,
) -> None:
    from opsrun_plugins.celery import CeleryLiveness

    h = celery_test.setup()
    (worker,) = celery_test.start_workers("a")
    liveness = CeleryLiveness(h.app, timeout=1.0, cache_for=0)

    d = h.hold.dispatch(workspace_id="w1", tenant_id="t1", item="i1")
    celery_test.wait_until(lambda: h.events("start"), "the task to start")
    run = h.ledger.get(d.run.id)
    assert liveness.opsrun_is_alive(run=run) is True
    elsewhere = h.ledger.ensure_run("celery_test.hold", workspace_id="w1", identity={"item": "i2"})
    assert liveness.opsrun_is_alive(run=elsewhere.run) is None  # not dispatched through Celery

    # the job does not heartbeat: once its lease expired, reconcile asks Celery and spares it
    celery_test.wait_until(
        lambda: h.ledger.now() > h.ledger.get(run.id).lease_expires_at, "the lease to expire"
    )
    reconcile = h.ledger.reconcile("w1", grace=timedelta(0))
    assert reconcile.summary_counts is not None and reconcile.summary_counts["alive"] >= 1
    assert h.ledger.get(run.id).status is RunStatus.RUNNING

    h.redis.set(f"{h.settings.prefix}release:i1", 1)
    assert celery_test.wait_completed(run.id).outcome is Outcome.SUCCEEDED
    worker.stop()
    assert liveness.opsrun_is_alive(run=run) is None  # nobody answers


def test_dispatch_refuses_secrets_and_sends_only_after_the_session_commits(
    celery_test: CeleryTest,
) -> None:
    from sqlalchemy.orm import Session

    h = celery_test.setup()
    with pytest.raises(InvalidInput, match="api_token"):
        h.echo.dispatch(workspace_id="w1", tenant_id="t1", item="i1", api_token="s3cr3t")
    assert h.ledger.runs() == []

    with Session(h.ledger.engine) as session:
        d = h.echo.dispatch(
            workspace_id="w1", tenant_id="t1", item="i1", credential_id="c1", session=session
        )
        assert d.created and d.on_commit
        assert h.queued_messages() == 0
        session.rollback()
    assert h.queued_messages() == 0
    assert h.ledger.runs() == []

    with Session(h.ledger.engine) as session:
        d = h.echo.dispatch(
            workspace_id="w1", tenant_id="t1", item="i1", credential_id="c1", session=session
        )
        assert h.queued_messages() == 0
        session.commit()
    assert h.queued_messages() == 1
    assert h.ledger.get(d.run.id).status is RunStatus.QUEUED


def test_a_message_the_broker_refuses_fails_its_run_and_frees_the_identity(
    celery_test: CeleryTest,
) -> None:
    from celery import Celery
    from kombu.exceptions import OperationalError

    from opsrun_plugins.celery import bind_operation

    h = celery_test.setup()
    nowhere = Celery("nowhere", broker="redis://127.0.0.1:1/0", set_as_current=False)
    nowhere.conf.update(task_publish_retry=False, broker_transport_options={"max_retries": 0})
    try:
        task = bind_operation(nowhere, h.crashy.operation)
        with pytest.raises(OperationalError):
            task.dispatch(workspace_id="w1", tenant_id="t1", item="i1")
    finally:
        nowhere.close()
    (run,) = h.ledger.runs()
    assert run.outcome is Outcome.FAILED
    assert run.failure_summary is not None
    assert run.failure_summary[0]["code"] == "celery_test.crashy.failed"
    assert "broker refused" in run.failure_summary[0]["message"]

    again = h.crashy.dispatch(workspace_id="w1", tenant_id="t1", item="i1")
    assert again.created and again.run.id != run.id
    assert h.queued_messages() == 1


def test_a_task_in_process_heartbeats_from_a_thread_and_a_second_delivery_skips(
    celery_test: CeleryTest,
) -> None:
    h = celery_test.setup()
    run = h.ledger.ensure_run(
        "celery_test.beating", workspace_id="w1", tenant_id="t1", identity={"item": "i1"}
    ).run
    message = {"opsrun_run_id": run.id, "workspace_id": "w1", "tenant_id": "t1", "item": "i1"}

    first = h.beating.apply(kwargs=message).get(timeout=60)
    second = h.beating.apply(kwargs=message).get(timeout=60)

    assert first == {
        "run_id": run.id,
        "status": "completed",
        "outcome": "succeeded",
        "reason": None,
    }
    assert h.events("beat")[0]["moved"] is True
    assert second == {"run_id": run.id, "status": "skipped", "outcome": None, "reason": "completed"}
    assert len(h.events("beat")) == 1
    assert h.ledger.get(run.id).attempts == 1


def test_bind_operation_refuses_a_taken_name_and_a_heartbeat_slower_than_the_lease(
    celery_test: CeleryTest,
) -> None:
    from opsrun_plugins.celery import bind_operation

    h = celery_test.setup()
    with pytest.raises(ConfigurationError, match="already registered"):
        bind_operation(h.app, h.hold.operation)
    with pytest.raises(InvalidInput, match="shorter than the lease"):
        bind_operation(h.app, h.hold.operation, name="opsrun.other", heartbeat_every=5)
