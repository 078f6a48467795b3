"""The demo on Celery: ``python -m reference_app demo --celery``, through real worker processes.

The threaded demo (:mod:`reference_app.demo`) delivers messages on threads of its own process;
this one sends them to a real broker and lets real Celery workers, in processes of their own,
execute them:

1. checks that the broker answers (before touching the database), then seeds a fresh database;
2. dispatches a fetch for every policy and a restore for some through the Celery tasks'
   ``dispatch``, users clicking twice on two of them: the duplicate click reuses the active run and
   sends nothing, so the broker holds one message per run;
3. starts worker processes (``python -m reference_app worker``, prefork, one child each) on a queue
   of this demo run only, so no stray message or worker can interfere;
4. waits (bounded, with progress) until every run completed: the directory throttles two policies
   (one recovers on a Celery retry, one never does and fails with ``directory.throttled``) and
   fails some assignments (partial success);
5. sends a run's message again, as a broker redelivers one: the worker skips it (completed);
6. a user clicks again within 15 minutes: the completed run is reused (cooldown), nothing is sent;
7. sends the reconcile task, as Celery beat does every 5 minutes;
8. stops the workers (SIGTERM, then SIGKILL after a bound);

then the CLI prints the ledger and a summary, as for the threaded demo. The summary is the demo's
own bookkeeping: what ``dispatch`` returned, and what each delivery did as the workers report it
(their ``task_postrun`` signal appends one JSON line per delivery to a file of the demo's). The
tests check it against the ledger.

The workers are started with the demo's environment and ``$OPSRUN_DATABASE_URL`` /
``$OPSRUN_BROKER_URL`` set (never a URL on their command line, where ``ps`` would show its
password), and with ``--exit-with-parent``: if the demo dies without stopping them, they go too.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from celery.signals import task_postrun  # type: ignore[import-untyped]
from rich.console import Console
from sqlalchemy.engine import make_url

from opsrun_core import ConfigurationError, Disposition, EnsureResult, OpsrunError
from opsrun_core.db import safe_url
from opsrun_plugins.celery import (
    RUN_ID_KWARG,
    OperationFailed,
    OpsrunTask,
    RunLeaseHeld,
)

from .app import DATABASE_URL_ENV
from .celery_app import (
    BROKER_URL_ENV,
    RECONCILE_EVERY,
    RECONCILE_TASK,
    CeleryReferenceApp,
    build,
    check_broker,
    safe_broker_url,
)
from .console import make_progress
from .demo import DEFAULT_LATENCY, DemoRecord, DemoReport, load_world
from .identity import FETCH_TYPE
from .jobs import JobMessage
from .models import Policy
from .seed import seed

__all__ = [
    "DEFAULT_TIMEOUT",
    "DEFAULT_WORKERS",
    "DemoFailed",
    "WorkerProcess",
    "exit_with_parent",
    "read_deliveries",
    "record_deliveries",
    "run_celery_demo",
]

#: worker processes the demo starts
DEFAULT_WORKERS = 2
#: seconds the demo waits for the workers to complete every run before giving up
DEFAULT_TIMEOUT = 120.0
#: seconds before a throttled job is retried in the demo (a real worker backs off 10 s, 20 s, ...)
DEMO_RETRY_COUNTDOWN = 0.5
#: seconds a worker gets to shut down warmly (SIGTERM) before it is killed
STOP_TIMEOUT = 10.0
#: how often the demo looks at the workers' reports
POLL_S = 0.2
#: the package's parent directory, put on the workers' PYTHONPATH (the app runs from a checkout)
ROOT = Path(__file__).resolve().parents[1]


class DemoFailed(OpsrunError):
    """The Celery demo could not finish (a worker died, or the runs did not complete in time)."""


# --------------------------------------------------------------------------- the workers' side


def delivery_event(
    task: Any, task_id: str | None, kwargs: Mapping[str, Any] | None, retval: Any, state: str
) -> dict[str, Any] | None:
    """What one delivery of a task did, as a JSON-able dict (None: not a task of this app).

    ``status`` is ``completed``, ``failed`` (the run failed: ``OperationFailed``), ``released``
    (the job raised and the run went back for a Celery retry), ``skipped`` (``reason``:
    ``completed``, or ``running`` when another worker's lease held it), ``lease_lost``,
    ``error`` (the delivery itself broke) or ``reconciled``.
    """
    request = getattr(task, "request", None)
    event: dict[str, Any] = {
        "task_id": task_id,
        "task": getattr(task, "name", None),
        "worker": getattr(request, "hostname", None),
        "pid": os.getpid(),
    }
    if isinstance(task, OpsrunTask):
        event["type"] = task.operation.type
        event["run_id"] = (kwargs or {}).get(RUN_ID_KWARG)
        if state == "SUCCESS" and isinstance(retval, dict):
            event.update(
                status=retval.get("status"),
                outcome=retval.get("outcome"),
                reason=retval.get("reason"),
            )
        elif state == "RETRY":
            if isinstance(getattr(retval, "exc", None), RunLeaseHeld):
                event.update(status="skipped", reason="running")
            else:
                event.update(status="released")
        elif state == "FAILURE" and isinstance(retval, OperationFailed):
            event.update(status="failed", outcome="failed")
        else:
            event.update(status="error", reason=f"{state}: {type(retval).__name__}")
        return event
    if event["task"] == RECONCILE_TASK:
        runs = retval if isinstance(retval, list) else []
        event.update(status="reconciled" if state == "SUCCESS" else "error")
        event["run_ids"] = [r.get("run_id") for r in runs if isinstance(r, dict)]
        return event
    return None


def record_deliveries(capp: CeleryReferenceApp, path: str | os.PathLike[str]) -> None:
    """Append one JSON line per delivery of ``capp``'s tasks to ``path`` (in every pool process).

    Call it in the worker before the pool forks. Only statuses and ids are written: never a
    keyword argument of the job, never an error message.
    """
    target = os.fspath(path)
    celery = capp.celery

    def on_postrun(
        sender: Any = None,
        task_id: str | None = None,
        kwargs: Mapping[str, Any] | None = None,
        retval: Any = None,
        state: str = "",
        **_: Any,
    ) -> None:
        if getattr(sender, "app", None) is not celery:
            return
        event = delivery_event(sender, task_id, kwargs, retval, state)
        if event is None:
            return
        line = (json.dumps(event, default=str) + "\n").encode()
        fd = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line)  # one write with O_APPEND: lines of concurrent processes never mix
        finally:
            os.close(fd)

    task_postrun.connect(on_postrun, weak=False)


def read_deliveries(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The deliveries the workers reported so far, in order (a half-written last line is left)."""
    try:
        raw = Path(path).read_text()
    except FileNotFoundError:
        return []
    events = []
    for line in raw.splitlines():
        with contextlib.suppress(ValueError):
            events.append(json.loads(line))
    return events


def exit_with_parent() -> None:
    """Kill this worker (and its pool) when the process that started it goes away.

    For workers the demo starts in a session of their own: if the demo is killed before it could
    stop them, they do not linger.
    """
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1)
        if os.getpgid(0) == os.getpid():  # our own process group: the pool goes with us
            os.killpg(os.getpid(), signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


# --------------------------------------------------------------------------- the demo's side


class WorkerProcess:
    """One ``python -m reference_app worker`` process, in a session of its own, logging to a file."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_path: Path) -> None:
        self.name = name
        self.argv = argv
        self.env = env
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.argv,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: stopped (and killed) as a whole
            )
        return self

    @property
    def exit_code(self) -> int | None:
        """None while it runs."""
        return None if self.proc is None else self.proc.poll()

    def signal(self, signum: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signum)

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for it to exit; True if it did."""
        if self.proc is None:
            return True
        try:
            self.proc.wait(timeout=max(0.0, timeout))
        except subprocess.TimeoutExpired:
            return False
        return True

    def kill(self) -> None:
        """SIGKILL its whole process group (pool children that outlived it too)."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=STOP_TIMEOUT)

    def last_log_line(self) -> str:
        try:
            lines = [
                line for line in self.log_path.read_text(errors="replace").splitlines() if line
            ]
        except OSError:
            return "(no log)"
        return lines[-1].strip() if lines else "(empty log)"


def stop_workers(workers: list[WorkerProcess], *, timeout: float = STOP_TIMEOUT) -> list[str]:
    """SIGTERM every worker (a warm shutdown), then SIGKILL those still there after ``timeout``.

    Returns the names of the workers that had to be killed.
    """
    for worker in workers:
        worker.signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    killed = []
    for worker in workers:
        if not worker.wait(deadline - time.monotonic()):
            killed.append(worker.name)
        worker.kill()  # also whatever of its pool outlived it
    return killed


def _check_database(database_url: str) -> None:
    url = make_url(database_url)
    if url.get_backend_name() == "sqlite" and (
        url.database in (None, "", ":memory:") or "memory" in str(url.query.get("mode", ""))
    ):
        raise ConfigurationError(
            "demo --celery needs a database its worker processes can open too: an SQLite file "
            "(sqlite:///reference_app.db) or, better, Postgres; not an in-memory SQLite database"
        )


def _queued_messages(capp: CeleryReferenceApp) -> int | None:
    """Messages waiting on the demo's queue in the broker (None if the broker cannot say)."""
    try:
        with capp.celery.connection_for_read() as connection:
            ok = connection.default_channel.queue_declare(queue=capp.queue, passive=True)
            return int(ok.message_count)
    except Exception:
        return None


def _forget_queue(capp: CeleryReferenceApp, hostnames: list[str]) -> None:
    """Best effort, once the workers are gone: remove what the demo's queue left in Redis.

    The queue is this run's only, so whatever is left of it goes: its binding tables (Redis keeps
    them), messages a failed run left waiting or unacknowledged (a later worker on this Redis would
    otherwise restore those into a queue nobody consumes), and its workers' pidbox bindings.
    """
    if not capp.broker_url.startswith(("redis://", "rediss://")):
        return
    queue = capp.queue
    with contextlib.suppress(Exception):
        import redis

        client = redis.Redis.from_url(capp.broker_url, socket_timeout=2)
        try:
            keys = [f"_kombu.binding.{queue}", f"_kombu.binding_permanent.{queue}"]
            keys += client.scan_iter(match=f"{queue}*")  # the queue's lists, one per priority
            client.delete(*keys)
            for tag, payload in client.hscan_iter("unacked"):
                if queue.encode() in payload:
                    client.hdel("unacked", tag)
                    client.zrem("unacked_index", tag)
            for key in ("_kombu.binding.celery.pidbox", "_kombu.binding.reply.celery.pidbox"):
                stale = [m for m in client.smembers(key) if any(n.encode() in m for n in hostnames)]
                if stale:
                    client.srem(key, *stale)
        finally:
            client.close()


class _Demo:
    """One run of the Celery demo: its queue, log directory, workers and bookkeeping."""

    def __init__(
        self,
        database_url: str,
        *,
        console: Console,
        broker: str | None,
        workers: int,
        latency: float,
        timeout: float,
    ) -> None:
        self.database_url = database_url
        self.console = console
        self.timeout = timeout
        self.latency = latency
        self.n_workers = workers
        self.run_token = secrets.token_hex(4)
        self.capp = build(database_url, broker=broker, queue=f"reference_app-demo-{self.run_token}")
        self.app = self.capp.app
        self.record = DemoRecord()
        self.logs = Path(tempfile.mkdtemp(prefix="reference_app-celery-"))
        self.deliveries_path = self.logs / "deliveries.jsonl"
        self.workers: list[WorkerProcess] = []
        self.stopped = False
        self.seen = 0  # deliveries already counted in the record
        self._steps = iter(range(1, 100))

    def say(self, text: str) -> None:
        self.console.print(f"[bold cyan]{next(self._steps):>2}.[/] {text}")

    # -- workers --------------------------------------------------------------------------------

    def start_workers(self) -> None:
        env = {
            **os.environ,
            DATABASE_URL_ENV: self.database_url,
            BROKER_URL_ENV: self.capp.broker_url,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        }
        for i in range(1, self.n_workers + 1):
            name = f"demo{i}-{self.run_token}@reference_app"
            argv = [
                sys.executable,
                "-m",
                "reference_app",
                "worker",
                "--queue",
                self.capp.queue,
                "--concurrency",
                "1",
                "--hostname",
                name,
                "--directory",
                "demo",
                "--latency",
                str(self.latency),
                "--retry-countdown",
                str(DEMO_RETRY_COUNTDOWN),
                "--delivery-log",
                str(self.deliveries_path),
                "--exit-with-parent",
            ]
            log = self.logs / f"worker-demo{i}.log"
            self.workers.append(WorkerProcess(name, argv, env, log).start())

    def stop_workers(self) -> list[str]:
        """Stop the workers (see :func:`stop_workers`), then forget the demo's queue."""
        killed = stop_workers(self.workers)
        self.stopped = True
        _forget_queue(self.capp, [w.name for w in self.workers])
        return killed

    def _check_workers(self) -> None:
        for worker in self.workers:
            code = worker.exit_code
            if code is not None:
                raise DemoFailed(
                    f"worker {worker.name} exited (code {code}) before the demo was done: "
                    f"{worker.last_log_line()} (its log: {worker.log_path})"
                )

    # -- bookkeeping ----------------------------------------------------------------------------

    def events(self) -> list[dict[str, Any]]:
        return read_deliveries(self.deliveries_path)

    def wait_for(
        self,
        what: str,
        done: Callable[[list[dict[str, Any]]], tuple[int, int]],
        *,
        progress_label: str | None = None,
    ) -> list[dict[str, Any]]:
        """Poll the workers' reports until ``done(events)`` says ``(n, total)`` with n == total.

        Shows progress (a bar on a terminal, a line when it moves anywhere else); gives up after
        the demo's timeout, and as soon as a worker exits.
        """
        started = time.monotonic()
        deadline = started + self.timeout
        progress = make_progress(self.console)  # a bar on a terminal ...
        progress.disable = progress.disable or progress_label is None
        lines = progress_label is not None and not self.console.is_terminal  # ... or lines
        shown = -1
        last_line = started
        with progress:
            bar = progress.add_task(progress_label or what, total=None)
            while True:
                events = self.events()
                n, total = done(events)
                progress.update(bar, completed=n, total=total)
                now = time.monotonic()
                if lines and n != shown and now - last_line >= 1:
                    self.console.print(f"    {progress_label}: {n}/{total} ({now - started:.1f} s)")
                    shown, last_line = n, now
                if n >= total:
                    return events
                self._check_workers()
                if now > deadline:
                    raise DemoFailed(
                        f"gave up waiting for {what} after {self.timeout:.0f} s ({n} of {total}); "
                        f"the workers' logs are in {self.logs}"
                    )
                time.sleep(POLL_S)

    def count(self, events: list[dict[str, Any]]) -> None:
        """Add the deliveries not counted yet to the record."""
        record = self.record
        for event in events[self.seen :]:
            status = str(event.get("status"))
            if status == "reconciled":
                for run_id in event.get("run_ids") or ():
                    record.reconcile_runs.add(run_id)
                    record.created.add(run_id)
                    record.attempts += 1
                    record.targets.setdefault(run_id, "workspace")
                continue
            record.deliveries[status] += 1
            if status == "skipped":
                record.skipped[str(event.get("reason"))] += 1
            elif status in ("completed", "failed", "released", "lease_lost"):
                record.attempts += 1  # each of them claimed the run
        self.seen = len(events)

    # -- the story ------------------------------------------------------------------------------

    def run(self) -> DemoReport:
        capp, app, record = self.capp, self.app, self.record
        where = safe_url(app.engine.url)
        self.console.print(
            f"[bold]opsrun reference app demo[/] on {where}, with Celery workers on "
            f"{safe_broker_url(capp.broker_url)} (queue {capp.queue})"
        )
        seeded = seed(app.engine, fresh=True)
        self.say(
            f"seeded a fresh database: 1 workspace, {seeded.tenants} tenants (1 platform), "
            f"{seeded.policies} policies, {seeded.backups} backups"
        )
        world = load_world(app, seeded.workspace_id)
        ws = world.workspace_id
        sent: list[str] = []  # task ids of the messages dispatch sent
        clicks: list[str] = []  # the run type of each click

        def fetch(policy: Policy) -> EnsureResult:
            d = capp.fetch.dispatch(
                workspace_id=ws, tenant_id=policy.tenant_id, policy_id=policy.id, initiator="user:1"
            )
            clicks.append(d.run.type)
            if d.task_id is not None:
                sent.append(d.task_id)
            return record.dispatched(d.result, policy.name)

        def restore(policy: Policy) -> EnsureResult:
            backup = world.backups[policy.id]
            d = capp.restore.dispatch(
                workspace_id=ws,
                tenant_id=policy.tenant_id,
                policy_id=policy.id,
                backup_id=backup.id,
                initiator="user:1",
            )
            clicks.append(d.run.type)
            if d.task_id is not None:
                sent.append(d.task_id)
            return record.dispatched(d.result, f"{policy.name} ← backup {backup.id}")

        # 2. users click; a click whose identity is active reuses its run and sends nothing
        contoso_windows = world.policy("contoso", "windows")
        for policy in world.policies.values():
            for _ in range(2 if policy is contoso_windows else 1):  # a double click
                fetch(policy)
        for slug in ("contoso", "fabrikam", "northwind"):
            for _ in range(2 if slug == "contoso" else 1):
                restore(world.policy(slug, "windows"))
        runs = sorted(record.created)
        queued = _queued_messages(capp)
        reused = record.dispatches[Disposition.REUSED_ACTIVE.value]
        self.say(
            f"dispatched {len(runs)} runs from {len(clicks)} clicks through the Celery tasks: "
            f"{reused} duplicate clicks reused the active run and sent nothing; "
            f"{len(sent)} messages sent, "
            + ("? " if queued is None else f"{queued} ")
            + "waiting on the broker"
        )

        # 3. the workers
        self.start_workers()
        self.say(
            f"started {len(self.workers)} Celery workers (prefork, 1 process each): "
            + ", ".join(w.name for w in self.workers)
        )

        # 4. every run done: one final delivery (completed or failed) each
        started = time.monotonic()

        def finished(events: list[dict[str, Any]]) -> tuple[int, int]:
            final = {e.get("run_id") for e in events if e.get("status") in ("completed", "failed")}
            return len(final & set(runs)), len(runs)

        events = self.wait_for(
            "every run to complete", finished, progress_label="runs completed by the workers"
        )
        elapsed = time.monotonic() - started
        self.count(events)
        for run in app.ledger.runs():
            if run.id in runs:
                record.final[run.id] = run
        d = record.deliveries
        by_worker = _by_worker(events)
        self.say(
            f"the workers completed {len(runs)} runs in {elapsed:.1f} s (since they started) "
            f"with {len(events)} deliveries: {d['completed']} completed, {d['failed']} failed, "
            f"{d['released']} released for a Celery retry (HTTP 429), {d['skipped']} skipped; "
            + ", ".join(f"{name} {n}" for name, n in by_worker.items())
        )

        # 5. a broker redelivers a message whose run completed: the claim skips it
        again = next(
            r
            for r in record.final.values()
            if r.type == FETCH_TYPE and r.identity.get("policy_id") == str(contoso_windows.id)
        )
        redelivery = f"redelivery-{secrets.token_hex(4)}"
        capp.task(again.type).apply_async(
            kwargs={**JobMessage.for_run(again).kwargs(), RUN_ID_KWARG: again.id},
            task_id=redelivery,
        )
        late = self.wait_for("the redelivered message", lambda es: (_has(es, redelivery), 1))
        self.count(late)
        (event,) = [e for e in late if e.get("task_id") == redelivery]
        self.say(
            f"a message for run {again.id} was delivered again (as a broker redelivers one): "
            f"{event.get('status')} ({event.get('reason')}) on {_node(event)}"
        )

        # 6. a user clicks again within the cooldown
        before = len(sent)
        cooled = fetch(contoso_windows)
        self.say(
            f"a user fetched {contoso_windows.name} again: {cooled.disposition.value} run "
            f"{cooled.run.id} (it succeeded less than 15 minutes ago); "
            f"{len(sent) - before} messages sent"
        )

        # 7. what Celery beat sends every 5 minutes
        reconcile = f"reconcile-{secrets.token_hex(4)}"
        capp.reconcile.apply_async(task_id=reconcile)
        done = self.wait_for("the reconcile task", lambda es: (_has(es, reconcile), 1))
        self.count(done)
        (event,) = [e for e in done if e.get("task_id") == reconcile]
        reconciled = event.get("run_ids") or []
        minutes = int(RECONCILE_EVERY.total_seconds() // 60)
        self.say(
            f"the reconcile task (Celery beat sends it every {minutes} minutes) ran on "
            f"{_node(event)}: "
            + (
                f"reconciled {len(reconciled)} workspace(s)"
                if reconciled
                else "no workspace had active runs, nothing to do"
            )
        )
        for run_id in reconciled:
            record.final[run_id] = app.ledger.get(run_id)

        # 8. stop the workers
        stopping = time.monotonic()
        killed = self.stop_workers()
        self.say(
            f"stopped the workers (SIGTERM) in {time.monotonic() - stopping:.1f} s"
            + (f"; killed {', '.join(killed)} after {STOP_TIMEOUT:.0f} s" if killed else "")
        )

        by_worker = _by_worker(self.events())
        ledger_runs = sorted(app.ledger.runs(), key=lambda r: r.id)
        tenants = {str(t.id): t.slug for t in world.tenants.values()}
        labels = {spec.type: spec.display_label for spec in app.ledger.catalog}
        summary = record.summary()
        summary["celery"] = {
            "broker": safe_broker_url(capp.broker_url),
            "queue": capp.queue,
            "workers": len(self.workers),
            "clicks": len(clicks),
            "messages_sent": len(sent),
            "messages_waiting_before_workers": queued,
            "deliveries_by_worker": by_worker,
            "killed_workers": killed,
        }
        return DemoReport(where, summary, ledger_runs, tenants, dict(record.targets), labels)

    def close(self, *, keep_logs: bool) -> None:
        try:
            if self.workers and not self.stopped:
                self.stop_workers()
        finally:
            self.capp.close()
            if not (keep_logs and self.workers):
                shutil.rmtree(self.logs, ignore_errors=True)


def _by_worker(events: list[dict[str, Any]]) -> dict[str, int]:
    """Job deliveries per worker (its node name before the ``@``)."""
    found = Counter(_node(e) for e in events if e.get("status") != "reconciled")
    return dict(sorted(found.items()))


def _node(event: dict[str, Any]) -> str:
    return str(event.get("worker")).split("@")[0]


def _has(events: list[dict[str, Any]], task_id: str) -> int:
    return int(any(e.get("task_id") == task_id for e in events))


def run_celery_demo(
    database_url: str,
    *,
    console: Console,
    broker: str | None = None,
    workers: int = DEFAULT_WORKERS,
    latency: float = DEFAULT_LATENCY,
    timeout: float = DEFAULT_TIMEOUT,
) -> DemoReport:
    """Play the demo through Celery worker processes (see the module docstring).

    :raises BrokerUnavailable: the broker does not answer (nothing was touched).
    :raises ConfigurationError: the database is one worker processes cannot share.
    :raises DemoFailed: a worker died, or the runs did not complete within ``timeout`` seconds;
        the workers' logs are kept and named.
    """
    _check_database(database_url)
    demo = _Demo(
        database_url,
        console=console,
        broker=broker,
        workers=workers,
        latency=latency,
        timeout=timeout,
    )
    ok = False
    try:
        check_broker(demo.capp.celery)
        report = demo.run()
        ok = True
        return report
    finally:
        demo.close(keep_logs=not ok)
