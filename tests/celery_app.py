"""A Celery app for the Celery integration tests, and helpers that run its workers as processes.

A worker process runs ``celery -A tests.celery_app worker ...`` with its settings in the
environment (:meth:`Settings.env`); the module's ``app`` attribute is built from them on first
access, so importing this module in the test process (which builds its own :class:`Harness` with
:func:`build`) needs no environment.

Each test gets its own Redis key prefix (``global_keyprefix``: queues, unacked messages, remote
control channels), queue and worker names, so tests never see another test's or another engineer's
messages. The jobs report what they do to a Redis list (:meth:`Harness.events`), and the app's
``task_retry`` / ``task_postrun`` signal handlers report what each delivery did.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

#: every wait in these tests gives up after this long (a failed test, not a hung suite)
WAIT_S = 60.0
#: the lease of the operation whose worker gets killed: long enough for a redelivery to arrive
#: while it holds, whatever the machine's load (the redelivery comes after the visibility timeout)
CRASH_LEASE = timedelta(seconds=8)
#: the lease of the operation the liveness test lets expire while its task is still active
HOLD_LEASE = timedelta(seconds=2)
#: the lease of the operation whose task heartbeats from a thread
BEATING_LEASE = timedelta(seconds=5)

ROOT = Path(__file__).resolve().parents[1]
_ENV = "OPSRUN_CELERY_TEST_SETTINGS"


@dataclass(frozen=True)
class Settings:
    """Where one test's workers and producers meet."""

    database_url: str
    broker_url: str
    prefix: str
    queue: str
    #: Redis redelivers a message this many seconds after a worker took it, unless acknowledged
    visibility_timeout: float = 3600.0

    def env(self) -> dict[str, str]:
        return {_ENV: json.dumps(asdict(self))}

    @classmethod
    def from_env(cls) -> Settings:
        raw = os.environ.get(_ENV)
        if not raw:
            raise RuntimeError(
                f"{_ENV} is not set: tests.celery_app is started by tests/integration/"
                "test_celery.py, which passes its settings in the environment"
            )
        return cls(**json.loads(raw))

    @property
    def events_key(self) -> str:
        return f"{self.prefix}events"


@dataclass
class Harness:
    """The ledger, the Celery app and the bound tasks of one test (in any process)."""

    settings: Settings
    ledger: Any
    app: Any
    echo: Any
    flaky: Any
    crashy: Any
    hold: Any
    beating: Any
    redis: Any

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        """What jobs and deliveries reported, in order (``kind``: only those)."""
        items = [json.loads(raw) for raw in self.redis.lrange(self.settings.events_key, 0, -1)]
        return [e for e in items if kind is None or e["kind"] == kind]

    def queued_messages(self) -> int:
        """Messages waiting on this test's queue in Redis (every priority list of it)."""
        total = 0
        for key in self.redis.scan_iter(match=f"{self.settings.prefix}{self.settings.queue}*"):
            if self.redis.type(key) == b"list":
                total += self.redis.llen(key)
        return total

    def queued_bodies(self) -> list[bytes]:
        """The raw messages waiting on this test's queue (to look for what must not be there)."""
        bodies: list[bytes] = []
        for key in self.redis.scan_iter(match=f"{self.settings.prefix}{self.settings.queue}*"):
            if self.redis.type(key) == b"list":
                bodies.extend(self.redis.lrange(key, 0, -1))
        return bodies

    def close(self) -> None:
        self.app.close()
        self.ledger.engine.dispose()
        self.redis.close()


def build(settings: Settings) -> Harness:
    """Build the ledger, Celery app and tasks of ``settings`` (the same in every process)."""
    import redis
    from celery import Celery
    from celery.signals import task_postrun, task_retry

    from opsrun_core import Ledger, get_plugin_manager
    from opsrun_plugins.celery import CeleryLiveness, RunLeaseHeld, bind_operation

    app = Celery(f"opsrun-test-{settings.prefix}", broker=settings.broker_url, set_as_current=False)
    app.conf.update(
        broker_transport_options={
            "global_keyprefix": settings.prefix,
            "visibility_timeout": settings.visibility_timeout,
            # look for unacknowledged messages to redeliver every second (kombu: 10 s x 10)
            "unacked_restore_interval": 1,
            "unacked_restore_throttle": 1,
            # a worker killed while holding the restore mutex must not block the others for 5 min
            "unacked_mutex_expire": 5,
        },
        broker_connection_retry_on_startup=True,
        task_default_queue=settings.queue,
        task_ignore_result=True,
        task_publish_retry=False,
        worker_prefetch_multiplier=1,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
    )
    client = redis.Redis.from_url(settings.broker_url)
    ledger = Ledger(
        settings.database_url, plugin_manager=get_plugin_manager(plugins=[CeleryLiveness(app)])
    )

    def report(kind: str, **data: Any) -> None:
        client.rpush(settings.events_key, json.dumps({"kind": kind, "pid": os.getpid(), **data}))

    def wait_for(key: str) -> None:
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline and not client.exists(f"{settings.prefix}{key}"):
            time.sleep(0.05)

    @ledger.operation("celery_test.echo", identity=("item",))
    def echo(ctx: Any, *, workspace_id: str, tenant_id: str, item: str, api_token: str) -> None:
        report("start", run_id=ctx.run.id, attempt=ctx.attempt.number, token=api_token)
        ctx.set_counts(total=1, processed=1)

    def resolve_token(kwargs: dict[str, Any]) -> dict[str, Any]:
        # the reference travels in the message, the secret is looked up in the worker
        secret = client.get(f"{settings.prefix}vault:{kwargs.pop('credential_id')}")
        return {**kwargs, "api_token": secret.decode() if secret else None}

    @ledger.operation("celery_test.flaky", identity=("item",))
    def flaky(ctx: Any, *, workspace_id: str, tenant_id: str, item: str, fail_times: int) -> None:
        number = ctx.attempt.number
        report("start", run_id=ctx.run.id, attempt=number)
        ctx.set_counts(total=100 + number, processed=number, failed=number)  # never kept
        if number <= fail_times:
            raise RuntimeError(f"attempt {number} failed (Authorization: Bearer abc.def.ghi)")
        ctx.set_counts(total=number, processed=number, failed=0)

    @ledger.operation("celery_test.crashy", identity=("item",), lease=CRASH_LEASE)
    def crashy(ctx: Any, *, workspace_id: str, tenant_id: str, item: str) -> None:
        number = ctx.attempt.number
        report("start", run_id=ctx.run.id, attempt=number, worker_pid=os.getppid())
        if number == 1:
            wait_for("never")  # killed here
        ctx.set_counts(total=1, processed=1)
        report("finish", run_id=ctx.run.id, attempt=number)

    @ledger.operation("celery_test.hold", identity=("item",), lease=HOLD_LEASE)
    def hold(ctx: Any, *, workspace_id: str, tenant_id: str, item: str) -> None:
        report("start", run_id=ctx.run.id, attempt=ctx.attempt.number)
        wait_for(f"release:{item}")  # no heartbeat: the lease expires while the task is active
        ctx.set_counts(total=1, processed=1)

    @ledger.operation("celery_test.beating", identity=("item",), lease=BEATING_LEASE)
    def beating(ctx: Any, *, workspace_id: str, tenant_id: str, item: str) -> None:
        first = ctx.run.heartbeat_at
        deadline = time.monotonic() + WAIT_S
        while ctx.run.heartbeat_at == first and time.monotonic() < deadline:
            time.sleep(0.05)  # the task's heartbeat thread moves it, not this function
        report("beat", run_id=ctx.run.id, moved=ctx.run.heartbeat_at != first)
        ctx.set_counts(total=1, processed=1)

    harness = Harness(
        settings=settings,
        ledger=ledger,
        app=app,
        echo=bind_operation(app, echo, resolve_kwargs=resolve_token),
        flaky=bind_operation(app, flaky, max_retries=3, countdown=0.2),
        crashy=bind_operation(app, crashy),
        hold=bind_operation(app, hold),
        beating=bind_operation(app, beating, heartbeat_every=0.2),
        redis=client,
    )

    def on_retry(sender: Any = None, reason: Any = None, request: Any = None, **_: Any) -> None:
        if getattr(sender, "app", None) is not app:
            return
        exc = getattr(reason, "exc", None)
        kind = "wait" if isinstance(exc, RunLeaseHeld) else "retry"
        report(kind, run_id=(request.kwargs or {}).get("opsrun_run_id"), message=str(exc))

    def on_postrun(sender: Any = None, retval: Any = None, state: Any = None, **_: Any) -> None:
        if getattr(sender, "app", None) is app and isinstance(retval, dict):
            report("delivery", state=state, **retval)

    task_retry.connect(on_retry, weak=False)
    task_postrun.connect(on_postrun, weak=False)
    return harness


_worker_harness: Harness | None = None


def __getattr__(name: str) -> Any:
    """``app`` for ``celery -A tests.celery_app worker``: built from the environment once."""
    global _worker_harness
    if name != "app":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if _worker_harness is None:
        _worker_harness = build(Settings.from_env())
        _exit_with_parent()
    return _worker_harness.app


def _exit_with_parent() -> None:
    """Kill this worker (and its pool) if the test process that started it dies without
    stopping it, so an interrupted test run leaves no worker behind."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1)
        os.killpg(os.getpgid(0), signal.SIGKILL)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


# -- processes ----------------------------------------------------------------------------------


class Worker:
    """A ``celery worker`` process (prefork, one child) on the test's queue, in its own session."""

    def __init__(self, settings: Settings, name: str, log_dir: Path) -> None:
        self.settings = settings
        self.hostname = f"{name}@opsrun-test"
        self.log_path = log_dir / f"worker-{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Worker:
        env = {
            **os.environ,
            **self.settings.env(),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        }
        argv = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "tests.celery_app",
            "worker",
            "--pool=prefork",
            "--concurrency=1",
            "--prefetch-multiplier=1",
            "-Q",
            self.settings.queue,
            "-n",
            self.hostname,
            "--without-heartbeat",
            "--without-gossip",
            "--without-mingle",
            "--loglevel=INFO",
        ]
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                argv,
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    def wait_ready(self, app: Any, timeout: float = WAIT_S) -> Worker:
        """Wait until the worker answers a ping (it consumes from then on)."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"worker {self.hostname} exited early:\n{self.log_tail()}")
            if app.control.ping(destination=[self.hostname], timeout=0.5):
                return self
        raise AssertionError(f"worker {self.hostname} not ready in {timeout} s:\n{self.log_tail()}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def kill(self) -> None:
        """SIGKILL the worker and its pool children at once (a host that died)."""
        assert self.proc is not None
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=WAIT_S)

    def terminate(self) -> None:
        """Ask for a warm shutdown (SIGTERM); :meth:`stop` waits for it."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)

    def stop(self, timeout: float = 10.0) -> None:
        """Warm shutdown (SIGTERM), then SIGKILL whatever is left after ``timeout``."""
        if self.proc is None:
            return
        self.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=timeout)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # pool children that outlived the parent
        self.proc.wait(timeout=WAIT_S)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def wait_until(
    condition: Callable[[], Any],
    what: str,
    timeout: float = WAIT_S,
    *,
    logs: Callable[[], str] | None = None,
) -> Any:
    """Poll ``condition`` until it is truthy; fail naming ``what`` (and showing ``logs()``) after
    ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            detail = logs() if logs is not None else ""
            raise AssertionError(f"gave up waiting for {what} after {timeout} s\n{detail}")
        time.sleep(0.1)


def _dispatch_entry(
    settings: dict[str, Any], item: str, barrier: Any, results: Any, i: int
) -> None:
    import traceback

    try:
        harness = build(Settings(**settings))  # the slow part, before the start line
    except BaseException:
        barrier.abort()
        results.put((i, False, traceback.format_exc()))
        return
    try:
        barrier.wait(timeout=WAIT_S)
        d = harness.echo.dispatch(workspace_id="w1", tenant_id="t1", item=item, credential_id="c1")
        results.put((i, True, (d.disposition.value, d.run.id, d.task_id is not None)))
    except BaseException:
        results.put((i, False, traceback.format_exc()))
    finally:
        harness.close()


def race_dispatch(settings: Settings, n: int, item: str) -> list[tuple[str, int, bool]]:
    """Dispatch ``item`` from ``n`` processes at once: (disposition, run id, message sent) each.

    Like :func:`tests.workers.race`, but each process builds its Celery app and ledger before
    the barrier, so the dispatches themselves start together.
    """
    import multiprocessing as mp

    ctx = mp.get_context("forkserver")
    # effective only if this starts the forkserver (else it already has opsrun imported)
    ctx.set_forkserver_preload(["opsrun_core", "celery", "kombu.transport.redis", "redis"])
    barrier = ctx.Barrier(n)
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_dispatch_entry, args=(asdict(settings), item, barrier, results, i))
        for i in range(n)
    ]
    for proc in procs:
        proc.start()
    from tests.workers import collect

    return collect(procs, results, timeout=WAIT_S * 2, what="dispatching")
