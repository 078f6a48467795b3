"""The ``opsrun`` command line through click's runner, on SQLite and Postgres.

Test data is written by ``opsrun_ledger``, whose manual clock stands at 2026-01-01, while the
command line's own ledger runs on the real clock (the server's on Postgres). Expectations are
chosen so that does not matter: a lease taken at 2026-01-01 has expired "now" whatever now is, a
cooldown of ten years has not, a cooldown of 15 minutes has. Where a live lease is needed, the run
is written by a ledger on the real clock (``real_ledger``), which agrees with the command line's.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import create_engine, inspect, text

from opsrun_core import (
    RECONCILE_TYPE,
    ClaimDecision,
    Ledger,
    ManualClock,
    OperationSpec,
    Outcome,
    Run,
    RunStatus,
    get_plugin_manager,
    hookimpl,
)
from opsrun_core.cli import CliState, cli
from opsrun_core.invariants import RULES

FETCH = "assignments.fetch"
SYNC = "directory.sync"
SECRET = "hunter2"
UNREACHABLE = "postgresql+psycopg://nobody@127.0.0.1:1/x"
SETTING = "--database-url / OPSRUN_DATABASE_URL"
# keep the developer's environment out of the runner: no database, colours or width from outside
CLEAN_ENV: dict[str, str | None] = {
    "OPSRUN_DATABASE_URL": None,
    "OPSRUN_TRACEBACK": None,
    "OPSRUN_DISABLE_PLUGINS": None,
    "FORCE_COLOR": None,
    "TTY_COMPATIBLE": None,
    "COLUMNS": None,
}

Invoke = Callable[..., Result]


def _when(value: datetime | None) -> str:
    """How the command line prints a timestamp."""
    assert value is not None
    return value.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _one_line_error(result: Result, exit_code: int) -> str:
    """Assert the command failed with ``exit_code`` and exactly one ``opsrun: error:`` line."""
    assert result.exit_code == exit_code, (result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("opsrun: error: ")
    assert "Traceback" not in result.output
    return lines[0]


def _row(output: str, *cells: object) -> re.Match[str] | None:
    """The table row made of ``cells`` in order, separated by whitespace."""
    pattern = r"^\s*" + r"\s+".join(re.escape(str(c)) for c in cells) + r"\s*$"
    return re.search(pattern, output, flags=re.MULTILINE)


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner(env=CLEAN_ENV)


@pytest.fixture
def invoke(runner: CliRunner, opsrun_database_url: str) -> Invoke:
    """``invoke("runs", "--json")``: ``opsrun --database-url <the test database> runs --json``."""

    def run(*args: str, obj: CliState | None = None) -> Result:
        return runner.invoke(
            cli, ["--database-url", opsrun_database_url, *args], obj=obj, catch_exceptions=False
        )

    return run


@pytest.fixture
def real_ledger(opsrun_database_url: str) -> Iterator[Ledger]:
    """A ledger on the real clock (the server's on Postgres), as the command line's is."""
    ledger = Ledger(opsrun_database_url)
    yield ledger
    ledger.engine.dispose()


def _completed(ledger: Ledger, type_: str, counts: dict[str, int], **scope: Any) -> Run:
    run = ledger.ensure_run(type_, **scope).run
    return ledger.complete(ledger.claim(run.id), counts)


def _stale(ledger: Ledger, workspace: str, policy: str = "p1") -> Run:
    """A running run whose lease (taken on the manual clock, 2026-01-01) expired long ago."""
    run = ledger.ensure_run(
        FETCH, workspace_id=workspace, tenant_id="t1", identity={"policy_id": policy}
    ).run
    attempt = ledger.claim(run.id)
    assert attempt.acquired and attempt.run is not None
    return attempt.run


@pytest.fixture
def history(opsrun_ledger: Ledger, opsrun_clock: ManualClock) -> list[Run]:
    """Three runs ten minutes apart from 2026-01-01 00:00: partially succeeded, queued, failed."""
    partial = _completed(
        opsrun_ledger,
        FETCH,
        {"total": 3, "processed": 3, "failed": 1},
        workspace_id="w1",
        tenant_id="t1",
        identity={"policy_id": "p1"},
    )
    opsrun_clock.advance(timedelta(minutes=10))
    queued = opsrun_ledger.ensure_run(
        FETCH, workspace_id="w1", tenant_id="t2", identity={"policy_id": "p2"}
    ).run
    opsrun_clock.advance(timedelta(minutes=10))
    sync = opsrun_ledger.ensure_run(SYNC, workspace_id="w2", identity={"full": True}).run
    failed = opsrun_ledger.fail(
        opsrun_ledger.claim(sync.id), RuntimeError(f"directory [ldap] down, password={SECRET}")
    )
    return [partial, queued, failed]


# --------------------------------------------------------------------------- help and entry points


def test_group_help_names_the_setting_and_the_exit_codes(runner: CliRunner) -> None:
    result = runner.invoke(cli, ["--help"])
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    assert "--database-url URL" in text and "env var: OPSRUN_DATABASE_URL" in text
    assert "default: sqlite:///opsrun.db" in text
    for line in ("0 success", "1 a reconcile failed", "2 usage error", "3 not found", "4 database"):
        assert line in text
    for command in ("migrate", "runs", "show", "why", "reconcile"):
        assert re.search(rf"^\s+{command}\s+\S", result.output, flags=re.MULTILINE), command


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        ("migrate", "opsrun_alembic_version"),
        ("runs", "--since WHEN"),
        ("show", "Exits 3 when no run has that id"),
        ("why", "KEY:=JSON a typed value"),
        ("reconcile", "exactly one of --workspace ID or --all"),
    ],
)
def test_each_command_has_help(runner: CliRunner, command: str, expected: str) -> None:
    result = runner.invoke(cli, [command, "--help"], prog_name="opsrun")
    assert result.exit_code == 0
    assert result.output.startswith(f"Usage: opsrun {command} [OPTIONS]")
    assert expected in " ".join(result.output.split())


def test_why_help_documents_typed_values_and_where_cooldowns_come_from(runner: CliRunner) -> None:
    text = " ".join(runner.invoke(cli, ["why", "--help"]).output.split())
    assert "policy_id:=42" in text and "--cooldown DURATION" in text
    assert "opsrun_register_operations" in text


def test_python_m_opsrun_core_runs_the_command_line(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in CLEAN_ENV}
    shown = subprocess.run(
        [sys.executable, "-m", "opsrun_core", "--help"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=120,
        check=False,
    )
    assert shown.returncode == 0, shown.stderr
    assert "OPSRUN_DATABASE_URL" in shown.stdout and "Exit codes" in shown.stdout
    failed = subprocess.run(
        [sys.executable, "-m", "opsrun_core", "--database-url", "not a url", "runs"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=120,
        check=False,
    )
    assert failed.returncode == 4
    assert failed.stderr.count("\n") == 1 and failed.stderr.startswith("opsrun: error: ")
    assert SETTING in failed.stderr and "Traceback" not in failed.stderr
    assert list(tmp_path.iterdir()) == []


def test_console_script_is_installed() -> None:
    script = shutil.which("opsrun", path=str(Path(sys.executable).parent))
    if script is None:
        pytest.skip("the opsrun console script is not installed next to this interpreter")
    done = subprocess.run(
        [script, "--version"], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0 and "opsrun, version" in done.stdout


# --------------------------------------------------------------------------- settings and errors


@pytest.mark.parametrize("url", ["not a url", UNREACHABLE], ids=["malformed", "unreachable"])
@pytest.mark.parametrize("how", ["option", "env"])
def test_a_bad_database_url_is_one_line_and_exit_4(runner: CliRunner, url: str, how: str) -> None:
    if how == "option":
        result = runner.invoke(cli, ["--database-url", url, "runs"])
    else:
        result = runner.invoke(cli, ["runs"], env={"OPSRUN_DATABASE_URL": url})
    line = _one_line_error(result, 4)
    assert SETTING in line
    assert result.stdout == ""


def test_a_missing_sqlite_file_says_migrate_first_and_is_not_created(
    runner: CliRunner, tmp_path: Path
) -> None:
    path = tmp_path / "nothing-here.db"
    result = runner.invoke(cli, ["--database-url", f"sqlite:///{path}", "runs"])
    line = _one_line_error(result, 4)
    assert "run `opsrun migrate` first" in line
    assert not path.exists()


@pytest.mark.parametrize(
    "args", [["runs"], ["show", "1"], ["why", FETCH, "--workspace", "w1"], ["reconcile", "--all"]]
)
def test_a_database_without_the_ledger_says_migrate_first(
    runner: CliRunner, tmp_path: Path, args: list[str]
) -> None:
    path = tmp_path / "empty.db"
    sqlite3.connect(path).close()
    result = runner.invoke(cli, ["--database-url", f"sqlite:///{path}", *args])
    line = _one_line_error(result, 4)
    assert "has no opsrun ledger yet; run `opsrun migrate` first" in line


def test_the_environment_variable_names_the_database(
    runner: CliRunner, opsrun_database_url: str, history: list[Run]
) -> None:
    result = runner.invoke(
        cli, ["runs", "--json"], env={"OPSRUN_DATABASE_URL": opsrun_database_url}
    )
    assert result.exit_code == 0, result.stderr
    assert [r["id"] for r in json.loads(result.stdout)] == [3, 2, 1]


def test_an_unexpected_error_is_one_line_and_exit_1(invoke: Invoke) -> None:
    class Broken:
        @hookimpl(tryfirst=True)
        def opsrun_claim(self, **kwargs: Any) -> ClaimDecision | None:
            raise KeyError(f"policy lookup failed, password={SECRET}")

    state = CliState(plugin_manager=get_plugin_manager(plugins=[Broken()]))
    result = invoke("why", FETCH, "--workspace", "w1", obj=state)
    line = _one_line_error(result, 1)
    assert "unexpected KeyError" in line and "OPSRUN_TRACEBACK=1" in line
    assert SECRET not in result.output


# --------------------------------------------------------------------------- migrate


def test_migrate_creates_the_ledger_in_a_fresh_sqlite_file(
    runner: CliRunner, tmp_path: Path
) -> None:
    path = tmp_path / "fresh.db"
    url = f"sqlite:///{path}"
    first = runner.invoke(cli, ["--database-url", url, "migrate"])
    assert first.exit_code == 0, first.stderr
    assert "from an empty database to revision 0001" in first.stdout
    engine = create_engine(url)
    try:
        assert inspect(engine).has_table("operation_runs")
        assert inspect(engine).has_table("opsrun_alembic_version")
    finally:
        engine.dispose()
    again = runner.invoke(cli, ["--database-url", url, "migrate"])
    assert again.exit_code == 0
    assert "already at revision 0001; nothing to do" in again.stdout
    listed = runner.invoke(cli, ["--database-url", url, "runs"])
    assert listed.exit_code == 0 and "No runs match." in listed.stdout


def test_migrate_on_a_migrated_database_changes_nothing(invoke: Invoke) -> None:
    result = invoke("migrate")
    assert result.exit_code == 0, result.stderr
    assert "already at revision 0001" in result.stdout


def test_migrate_never_prints_the_password(runner: CliRunner) -> None:
    url = "postgresql+psycopg://nobody:s3cretpw@127.0.0.1:1/x"
    result = runner.invoke(cli, ["--database-url", url, "migrate"])
    _one_line_error(result, 4)
    assert "s3cretpw" not in result.output and "***" in result.stderr


# --------------------------------------------------------------------------- runs


def test_runs_lists_newest_first_with_labels_and_counts(invoke: Invoke, history: list[Run]) -> None:
    result = invoke("runs")
    assert result.exit_code == 0, result.stderr
    out = result.stdout
    header = out.splitlines()[0].split()
    assert header == [
        "id", "type", "label", "workspace", "tenant", "status", "outcome", "attempts",
        "counts", "t/p/f", "created",
    ]  # fmt: skip
    partial, queued, failed = history
    assert _row(
        out, 3, SYNC, "Directory sync", "w2", "-", "completed", "failed", 1, "0/0/0",
        _when(failed.created_at),
    )  # fmt: skip
    assert _row(
        out, 2, FETCH, "Assignments fetch", "w1", "t2", "queued", "pending", 0, "-",
        _when(queued.created_at),
    )  # fmt: skip
    assert _row(
        out, 1, FETCH, "Assignments fetch", "w1", "t1", "completed", "partially_succeeded", 1,
        "3/3/1", _when(partial.created_at),
    )  # fmt: skip
    ids = [int(m.group(1)) for m in re.finditer(r"^\s*(\d+)\s", out, flags=re.MULTILINE)]
    assert ids == [3, 2, 1]


def test_runs_json_is_a_parseable_array_of_every_field(invoke: Invoke, history: list[Run]) -> None:
    result = invoke("runs", "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert [r["id"] for r in data] == [3, 2, 1]
    partial = data[2]
    assert partial["type"] == FETCH and partial["label"] == "Assignments fetch"
    assert partial["status"] == "completed" and partial["outcome"] == "partially_succeeded"
    assert partial["summary_counts"] == {"total": 3, "processed": 3, "failed": 1}
    assert partial["identity"] == {"policy_id": "p1"}
    assert partial["identity_hash"] == history[0].identity_hash
    assert datetime.fromisoformat(partial["created_at"]) == history[0].created_at
    assert datetime.fromisoformat(partial["completed_at"]) == history[0].completed_at
    assert data[1]["summary_counts"] is None and data[1]["completed_at"] is None
    assert data[0]["failure_summary"][0]["code"] == f"{SYNC}.failed"
    assert SECRET not in result.stdout


@pytest.mark.parametrize(
    ("args", "ids"),
    [
        (["--type", FETCH], [2, 1]),
        (["--workspace", "w2"], [3]),
        (["--tenant", "t2"], [2]),
        (["--status", "queued"], [2]),
        (["--status", "queued", "--status", "running"], [2]),
        (["--outcome", "failed"], [3]),
        (["--outcome", "failed", "--outcome", "partially_succeeded"], [3, 1]),
        (["--type", FETCH, "--status", "completed"], [1]),
        (["--since", "2026-01-01T00:05:00Z"], [3, 2]),
        (["--since", "2026-01-01 00:10:00"], [3, 2]),
        (["--since", "2026-01-01T01:10:00+01:00"], [3, 2]),
        (["--limit", "1"], [3]),
        (["--workspace", "nowhere"], []),
    ],
)
def test_runs_filters(invoke: Invoke, history: list[Run], args: list[str], ids: list[int]) -> None:
    result = invoke("runs", "--json", *args)
    assert result.exit_code == 0, result.stderr
    assert [r["id"] for r in json.loads(result.stdout)] == ids


def test_runs_since_a_relative_duration_counts_back_from_the_ledgers_now(
    invoke: Invoke, history: list[Run], real_ledger: Ledger
) -> None:
    recent = real_ledger.ensure_run(FETCH, workspace_id="w9", identity={"policy_id": "p9"}).run
    result = invoke("runs", "--json", "--since", "1h")
    assert result.exit_code == 0, result.stderr
    assert [r["id"] for r in json.loads(result.stdout)] == [recent.id]


def test_runs_without_a_match_says_so(invoke: Invoke) -> None:
    result = invoke("runs")
    assert result.exit_code == 0 and result.stdout.strip() == "No runs match."
    assert json.loads(invoke("runs", "--json").stdout) == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--status", "done"], "'done' is not one of"),
        (["--since", "yesterday"], "neither an ISO-8601 datetime"),
        (["--limit", "0"], "--limit"),
    ],
)
def test_runs_rejects_bad_values_as_usage_errors(
    invoke: Invoke, args: list[str], message: str
) -> None:
    result = invoke("runs", *args)
    assert result.exit_code == 2
    assert message in result.stderr and "Traceback" not in result.output


# --------------------------------------------------------------------------- show


def test_show_prints_every_field_counts_and_failures(invoke: Invoke, history: list[Run]) -> None:
    partial = history[0]
    out = invoke("show", "1").stdout
    assert "Run 1: Assignments fetch (assignments.fetch)" in out
    for name, value in (
        ("status", "completed"),
        ("outcome", "partially_succeeded"),
        ("workspace", "w1"),
        ("tenant", "t1"),
        ("attempts", "1"),
        ("identity", '{"policy_id": "p1"}'),
        ("identity hash", partial.identity_hash),
        ("created", _when(partial.created_at)),
        ("completed", _when(partial.completed_at)),
        ("total", "3"),
        ("processed", "3"),
        ("failed", "1"),
    ):
        assert _row(out, name, value), name
    failed = invoke("show", "3")
    assert failed.exit_code == 0
    assert _row(failed.stdout, "status", "completed") and _row(failed.stdout, "outcome", "failed")
    # sanitized, and printed literally: "[ldap]" is not taken for rich markup
    assert f"{SYNC}.failed" in failed.stdout
    assert "RuntimeError: directory [ldap] down, password=[REDACTED]" in failed.stdout
    assert SECRET not in failed.stdout


def test_show_of_a_queued_run_says_the_counts_come_later(
    invoke: Invoke, history: list[Run]
) -> None:
    out = invoke("show", "2").stdout
    assert _row(out, "status", "queued") and _row(out, "started", "-")
    assert "none yet (written when the run completes)" in out


def test_show_json(invoke: Invoke, history: list[Run]) -> None:
    result = invoke("show", "3", "--json")
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    assert data["id"] == 3 and data["label"] == "Directory sync" and data["tenant_id"] is None
    assert data["outcome"] == "failed" and data["identity"] == {"full": True}
    assert data["failure_summary"] == history[2].failure_summary


def test_show_of_an_unknown_run_is_one_line_and_exit_3(invoke: Invoke, history: list[Run]) -> None:
    line = _one_line_error(invoke("show", "999"), 3)
    assert "no operation run with id 999" in line


@pytest.mark.parametrize("run_id", ["abc", "0", "-4"])
def test_show_of_a_malformed_id_is_a_usage_error(invoke: Invoke, run_id: str) -> None:
    assert invoke("show", "--", run_id).exit_code == 2


# --------------------------------------------------------------------------- why


def _why(invoke: Invoke, *args: str, obj: CliState | None = None) -> dict[str, Any]:
    result = invoke("why", *args, "--json", obj=obj)
    assert result.exit_code == 0, result.stderr
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def test_why_names_the_active_run_that_blocks_and_its_expired_lease(
    invoke: Invoke, opsrun_ledger: Ledger
) -> None:
    run = _stale(opsrun_ledger, "w1")
    assert run.lease_expires_at is not None
    args = (FETCH, "--workspace", "w1", "--tenant", "t1", "policy_id=p1")
    result = invoke("why", *args)
    assert result.exit_code == 0, result.stderr
    out = result.stdout
    assert f"A dispatch now would REUSE the active run {run.id}: it blocks a new run." in out
    assert f"run {run.id}: running, 1 attempt(s), created {_when(run.created_at)}" in out
    assert f"lease expired {_when(run.lease_expires_at)}" in out
    assert "`opsrun reconcile --workspace w1` finishes it" in out
    assert f"hash {run.identity_hash}" in out
    data = _why(invoke, *args)
    assert data["decision"] == "reuse_active" and data["run"]["id"] == run.id
    assert data["active_run_id"] == run.id and data["lease_expired"] is True
    assert data["identity_hash"] == run.identity_hash
    # nothing was written
    assert [r.id for r in opsrun_ledger.runs()] == [run.id]
    assert opsrun_ledger.get(run.id) == run


def test_why_shows_a_live_lease_and_a_queued_run(
    invoke: Invoke, real_ledger: Ledger, opsrun_ledger: Ledger
) -> None:
    held = real_ledger.ensure_run(FETCH, workspace_id="w1", identity={"policy_id": "live"}).run
    assert real_ledger.claim(held.id).acquired
    live = invoke("why", FETCH, "--workspace", "w1", "policy_id=live").stdout
    assert f"REUSE the active run {held.id}" in live
    assert re.search(r"lease expires .* \(in \d+m", live) and "expired" not in live
    queued = opsrun_ledger.ensure_run(FETCH, workspace_id="w1", identity={"policy_id": "q"}).run
    waiting = invoke("why", FETCH, "--workspace", "w1", "policy_id=q").stdout
    assert f"REUSE the active run {queued.id}" in waiting
    assert "queued: no worker has claimed it yet" in waiting


def test_why_names_the_completed_run_in_cooldown_and_until_when(
    invoke: Invoke, opsrun_ledger: Ledger
) -> None:
    done = _completed(
        opsrun_ledger,
        FETCH,
        {"total": 2, "processed": 2, "failed": 0},
        workspace_id="w1",
        tenant_id="t1",
        identity={"policy_id": "p1"},
    )
    assert done.completed_at is not None
    until = done.completed_at + timedelta(days=3650)
    args = (FETCH, "--workspace", "w1", "--tenant", "t1", "policy_id=p1", "--cooldown", "3650d")
    out = invoke("why", *args).stdout
    assert "cooldown 3650d (from --cooldown)" in out
    assert (
        f"A dispatch now would REUSE completed run {done.id}: the identity is in cooldown." in out
    )
    assert f"run {done.id}: succeeded, completed {_when(done.completed_at)}" in out
    assert f"cooldown until {_when(until)}" in out
    data = _why(invoke, *args)
    assert data["decision"] == "reuse_cooldown" and data["run"]["id"] == done.id
    assert datetime.fromisoformat(data["cooldown_until"]) == until
    assert data["cooldown_seconds"] == timedelta(days=3650).total_seconds()
    # a cooldown that has passed, none at all, or 0: a new run
    passed = invoke("why", *args[:-1], "15m").stdout
    assert "A dispatch now would CREATE a new run." in passed
    ended = _when(done.completed_at + timedelta(minutes=15))
    assert f"latest completed run {done.id} (succeeded, " in passed
    assert f"its cooldown ended {ended}" in passed
    plain = invoke("why", *args[:-2]).stdout
    assert "CREATE a new run" in plain and "the operation has no cooldown" in plain
    assert "the operation is not in the catalog; give --cooldown" in plain
    assert _why(invoke, *args[:-1], "0")["decision"] == "create"


def test_why_takes_the_cooldown_from_a_plugins_catalog(
    invoke: Invoke, opsrun_ledger: Ledger
) -> None:
    class HostOperations:
        @hookimpl
        def opsrun_register_operations(self) -> list[OperationSpec]:
            return [OperationSpec(FETCH, label="Fetch assignments", cooldown=timedelta(days=3650))]

    done = _completed(
        opsrun_ledger, FETCH, {"total": 1}, workspace_id="w1", identity={"policy_id": "p1"}
    )
    state = CliState(plugin_manager=get_plugin_manager(plugins=[HostOperations()]))
    result = invoke("why", FETCH, "--workspace", "w1", "policy_id=p1", obj=state)
    assert "assignments.fetch (Fetch assignments) in workspace w1" in result.stdout
    assert "cooldown 3650d (from catalog)" in result.stdout
    assert f"REUSE completed run {done.id}" in result.stdout
    listed = invoke("runs", "--json", obj=CliState(plugin_manager=state.plugin_manager))
    assert json.loads(listed.stdout)[0]["label"] == "Fetch assignments"


def test_why_says_a_failed_run_starts_no_cooldown(invoke: Invoke, opsrun_ledger: Ledger) -> None:
    run = opsrun_ledger.ensure_run(SYNC, workspace_id="w2", identity={"full": True}).run
    opsrun_ledger.fail(opsrun_ledger.claim(run.id), RuntimeError("down"))
    out = invoke("why", SYNC, "--workspace", "w2", "full:=true", "--cooldown", "3650d").stdout
    assert "A dispatch now would CREATE a new run." in out
    assert f"latest completed run {run.id} (failed, " in out
    assert "a failed run starts no cooldown" in out


def test_why_would_create_when_the_identity_has_no_runs(
    invoke: Invoke, opsrun_ledger: Ledger
) -> None:
    other = _stale(opsrun_ledger, "w1", policy="p1")
    result = invoke("why", FETCH, "--workspace", "w1", "--tenant", "t1", "policy_id=p2")
    assert result.exit_code == 0, result.stderr
    assert "A dispatch now would CREATE a new run." in result.stdout
    assert "no run of this identity has completed yet, and none is active" in result.stdout
    data = _why(invoke, FETCH, "--workspace", "w1", "--tenant", "t1", "policy_id=p2")
    assert data["decision"] == "create" and data["run"] is None
    assert data["identity_hash"] != other.identity_hash
    # the workspace and the tenant are part of the identity too
    assert (
        _why(invoke, FETCH, "--workspace", "w2", "--tenant", "t1", "policy_id=p1")["decision"]
        == "create"
    )
    assert _why(invoke, FETCH, "--workspace", "w1", "policy_id=p1")["decision"] == "create"
    assert len(opsrun_ledger.runs()) == 1


def test_why_typed_values_must_match_the_dispatch(invoke: Invoke, opsrun_ledger: Ledger) -> None:
    run = opsrun_ledger.ensure_run(
        FETCH, workspace_id="w1", identity={"policy_id": 5, "mode": "full", "ids": [1, 2]}
    ).run
    typed = _why(invoke, FETCH, "--workspace", "w1", "policy_id:=5", "mode=full", "ids:=[1, 2]")
    assert typed["identity"] == {"policy_id": 5, "mode": "full", "ids": [1, 2]}
    assert typed["identity_hash"] == run.identity_hash and typed["active_run_id"] == run.id
    as_text = _why(invoke, FETCH, "--workspace", "w1", "policy_id=5", "mode=full", "ids:=[1, 2]")
    assert as_text["identity"]["policy_id"] == "5" and as_text["decision"] == "create"
    # a value may hold "=" and ":"
    url = _why(invoke, FETCH, "--workspace", "w1", "url=https://x.test/?a=b:c")
    assert url["identity"] == {"url": "https://x.test/?a=b:c"}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["policy_id"], "is not KEY=VALUE or KEY:=JSON"),
        (["=p1"], "has an empty key"),
        (["limit:=ten"], "must be JSON"),
        (["a=1", "a=2"], "is given twice"),
        (["--cooldown", "soon"], "is not a duration"),
    ],
)
def test_why_rejects_malformed_arguments_as_usage_errors(
    invoke: Invoke, args: list[str], message: str
) -> None:
    result = invoke("why", FETCH, "--workspace", "w1", *args)
    assert result.exit_code == 2
    assert message in result.stderr and "Traceback" not in result.output


def test_why_needs_a_workspace(invoke: Invoke) -> None:
    result = invoke("why", FETCH, "policy_id=p1")
    assert result.exit_code == 2 and "--workspace" in result.stderr


def test_why_refuses_a_secret_in_the_identity_in_one_line(invoke: Invoke) -> None:
    result = invoke("why", FETCH, "--workspace", "w1", f"access_token={SECRET}")
    line = _one_line_error(result, 2)
    assert "access_token" in line and SECRET not in result.output


# --------------------------------------------------------------------------- check


def test_group_help_lists_check_and_its_exit_code(runner: CliRunner) -> None:
    result = runner.invoke(cli, ["--help"])
    assert result.exit_code == 0
    assert re.search(r"^\s+check\s+\S", result.output, flags=re.MULTILINE)
    assert "1 a reconcile failed, `opsrun check` found violations" in " ".join(
        result.output.split()
    )


def test_check_help_lists_every_rule(runner: CliRunner) -> None:
    result = runner.invoke(cli, ["check", "--help"], prog_name="opsrun")
    assert result.exit_code == 0
    assert result.output.startswith("Usage: opsrun check [OPTIONS]")
    rules = result.output.split("Rules:", 1)[1]
    for rule in RULES:
        assert re.search(rf"^\s+{rule}\s+\S", rules, flags=re.MULTILINE), rule


def test_check_a_healthy_ledger_exits_0(
    invoke: Invoke, history: list[Run], opsrun_ledger: Ledger
) -> None:
    _stale(opsrun_ledger, "w3")  # a running run too: every status is there
    result = invoke("check")
    assert result.exit_code == 0, (result.stdout, result.stderr)
    assert result.stdout.strip() == "No invariant violations in 4 runs: the ledger is consistent."
    assert result.stderr == ""
    as_json = invoke("check", "--json")
    assert as_json.exit_code == 0
    assert json.loads(as_json.stdout) == {"runs_checked": 4, "violations": []}


def test_check_an_empty_ledger_exits_0(invoke: Invoke) -> None:
    result = invoke("check")
    assert result.exit_code == 0
    assert "No invariant violations in 0 runs" in result.stdout


@pytest.mark.parametrize("batch", [[], ["--batch-size", "1"]], ids=["default", "batch-size-1"])
def test_check_a_broken_ledger_exits_1_naming_each_run_and_rule(
    invoke: Invoke, history: list[Run], opsrun_ledger: Ledger, batch: list[str]
) -> None:
    partial, queued, failed = history
    with opsrun_ledger.engine.begin() as conn:
        conn.execute(
            text("UPDATE operation_runs SET summary_counts = NULL WHERE status = 'completed'")
        )
        conn.execute(
            text(
                'UPDATE operation_runs SET failure_summary = \'[{"message": "x"}]\' WHERE id = :id'
            ),
            {"id": failed.id},
        )
    result = invoke("check", *batch)
    assert result.exit_code == 1, (result.stdout, result.stderr)
    assert result.stderr == ""
    out = result.stdout
    assert out.splitlines()[0].split() == ["run", "rule", "detail"]
    assert _row(out, partial.id, "summary_counts", "completed without summary_counts"), out
    assert _row(out, failed.id, "summary_counts", "completed without summary_counts"), out
    # "[0]" is printed literally, not taken for rich markup
    assert _row(out, failed.id, "failure_summary", "failure_summary[0].code is missing or empty")
    assert not re.search(rf"^\s*{queued.id}\s", out, flags=re.MULTILINE)
    assert "3 invariant violations in 3 runs (failure_summary, summary_counts)" in out
    as_json = invoke("check", "--json", *batch)
    assert as_json.exit_code == 1 and as_json.stderr == ""
    assert json.loads(as_json.stdout) == {
        "runs_checked": 3,
        "violations": [
            {
                "run_id": partial.id,
                "rule": "summary_counts",
                "detail": "completed without summary_counts",
            },
            {
                "run_id": failed.id,
                "rule": "summary_counts",
                "detail": "completed without summary_counts",
            },
            {
                "run_id": failed.id,
                "rule": "failure_summary",
                "detail": "failure_summary[0].code is missing or empty",
            },
        ],
    }


def test_check_without_a_ledger_says_migrate_first(runner: CliRunner, tmp_path: Path) -> None:
    path = tmp_path / "empty.db"
    sqlite3.connect(path).close()
    result = runner.invoke(cli, ["--database-url", f"sqlite:///{path}", "check"])
    line = _one_line_error(result, 4)
    assert "has no opsrun ledger yet; run `opsrun migrate` first" in line


def test_check_rejects_a_bad_batch_size(invoke: Invoke) -> None:
    result = invoke("check", "--batch-size", "0")
    assert result.exit_code == 2 and "--batch-size" in result.stderr


# --------------------------------------------------------------------------- reconcile


def test_reconcile_a_workspace_finishes_its_stale_runs_and_prints_the_counts(
    invoke: Invoke, opsrun_ledger: Ledger
) -> None:
    stale = _stale(opsrun_ledger, "w1")
    never = opsrun_ledger.ensure_run(FETCH, workspace_id="w1", identity={"policy_id": "q"}).run
    elsewhere = _stale(opsrun_ledger, "w2")
    result = invoke("reconcile", "--workspace", "w1", "--initiator", "scheduler")
    assert result.exit_code == 0, result.stderr
    (own,) = opsrun_ledger.runs(type=RECONCILE_TYPE)
    assert own.workspace_id == "w1" and own.tenant_id is None and own.initiator == "scheduler"
    assert own.status is RunStatus.COMPLETED and own.outcome is Outcome.SUCCEEDED
    assert own.summary_counts is not None
    assert {k: own.summary_counts[k] for k in ("total", "processed", "failed", "reconciled")} == {
        "total": 2,
        "processed": 2,
        "failed": 0,
        "reconciled": 2,
    }
    assert _row(result.stdout, "w1", own.id, "done", "succeeded", 2, 2, 0, 2, 0), result.stdout
    finished = opsrun_ledger.get(stale.id)
    assert finished.status is RunStatus.COMPLETED and finished.outcome is Outcome.FAILED
    assert finished.failure_summary is not None
    assert finished.failure_summary[0]["code"] == "ops.run.lease_expired"
    never_started = opsrun_ledger.get(never.id)
    assert never_started.failure_summary is not None
    assert never_started.failure_summary[0]["code"] == "ops.run.never_started"
    assert opsrun_ledger.get(elsewhere.id).status is RunStatus.RUNNING


def test_reconcile_says_when_another_reconcile_is_already_running(
    invoke: Invoke, opsrun_ledger: Ledger, real_ledger: Ledger
) -> None:
    stale = _stale(opsrun_ledger, "w1")
    _, holder = real_ledger.ensure_and_claim(RECONCILE_TYPE, workspace_id="w1", identity={})
    assert holder.acquired
    result = invoke("reconcile", "--workspace", "w1")
    assert result.exit_code == 0, result.stderr
    assert _row(result.stdout, "w1", holder.run_id, "already running", "pending", *["-"] * 5)
    assert (
        f"workspace w1: another reconcile is already running (run {holder.run_id}, running"
        in result.stdout
    )
    assert "nothing was done here" in result.stdout
    assert opsrun_ledger.get(stale.id).status is RunStatus.RUNNING
    assert [r.id for r in opsrun_ledger.runs(type=RECONCILE_TYPE)] == [holder.run_id]


def test_reconcile_all_covers_every_workspace_with_active_runs(
    invoke: Invoke, opsrun_ledger: Ledger
) -> None:
    stale = [_stale(opsrun_ledger, "w1"), _stale(opsrun_ledger, "w2")]
    _completed(opsrun_ledger, SYNC, {"total": 1}, workspace_id="w3", identity={})
    result = invoke("reconcile", "--all")
    assert result.exit_code == 0, result.stderr
    own = {r.workspace_id: r for r in opsrun_ledger.runs(type=RECONCILE_TYPE)}
    assert sorted(own) == ["w1", "w2"]
    for workspace, run in own.items():
        assert run.outcome is Outcome.SUCCEEDED
        assert _row(result.stdout, workspace, run.id, "done", "succeeded", 1, 1, 0, 1, 0)
    for run in stale:
        entries = opsrun_ledger.get(run.id).failure_summary
        assert entries is not None and entries[0]["code"] == "ops.run.lease_expired"
    again = invoke("reconcile", "--all")
    assert again.exit_code == 0
    assert "No workspace has active runs; nothing to reconcile." in again.stdout


@pytest.mark.parametrize("args", [[], ["--workspace", "w1", "--all"]], ids=["neither", "both"])
def test_reconcile_needs_exactly_one_of_workspace_or_all(invoke: Invoke, args: list[str]) -> None:
    result = invoke("reconcile", *args)
    assert result.exit_code == 2
    assert "give exactly one of --workspace ID or --all" in result.stderr


def test_reconcile_rejects_a_bad_grace(invoke: Invoke) -> None:
    result = invoke("reconcile", "--all", "--grace", "a while")
    assert result.exit_code == 2 and "is not a duration" in result.stderr


class BrokenSink:
    """A metrics plugin that fails on the runs reconcile finishes, with a secret in its error."""

    def __init__(self, *workspaces: str) -> None:
        self.workspaces = workspaces

    @hookimpl
    def opsrun_run_finished(self, run: Run) -> None:
        if run.type != RECONCILE_TYPE and run.workspace_id in self.workspaces:
            raise RuntimeError(f"metrics sink down: password={SECRET}")


def test_a_failing_reconcile_is_one_line_and_exit_1(invoke: Invoke, opsrun_ledger: Ledger) -> None:
    _stale(opsrun_ledger, "w1")
    state = CliState(plugin_manager=get_plugin_manager(plugins=[BrokenSink("w1")]))
    result = invoke("reconcile", "--workspace", "w1", obj=state)
    line = _one_line_error(result, 1)
    assert "reconcile of workspace 'w1' failed" in line and "recorded as failed" in line
    assert SECRET not in result.output
    (own,) = opsrun_ledger.runs(type=RECONCILE_TYPE)
    assert own.outcome is Outcome.FAILED and own.failure_summary is not None
    assert own.failure_summary[0]["code"] == "ops.reconcile_adapter_runs.failed"


def test_reconcile_all_goes_on_past_a_failing_workspace_then_exits_1(
    invoke: Invoke, opsrun_ledger: Ledger
) -> None:
    _stale(opsrun_ledger, "w1")
    healthy = _stale(opsrun_ledger, "w2")
    state = CliState(plugin_manager=get_plugin_manager(plugins=[BrokenSink("w1")]))
    result = invoke("reconcile", "--all", obj=state)
    line = _one_line_error(result, 1)
    assert "reconcile of workspace 'w1' failed" in line and SECRET not in result.output
    own = {r.workspace_id: r for r in opsrun_ledger.runs(type=RECONCILE_TYPE)}
    assert own["w1"].outcome is Outcome.FAILED and own["w2"].outcome is Outcome.SUCCEEDED
    assert _row(result.stdout, "w1", own["w1"].id, "error", "failed", *["-"] * 5)
    assert _row(result.stdout, "w2", own["w2"].id, "done", "succeeded", 1, 1, 0, 1, 0)
    assert opsrun_ledger.get(healthy.id).outcome is Outcome.FAILED  # finished by reconcile


def test_a_reconcile_that_could_not_finish_its_runs_exits_1(
    invoke: Invoke, opsrun_ledger: Ledger
) -> None:
    class BlindAdapter:
        @hookimpl
        def opsrun_is_alive(self, run: Run) -> bool | None:
            raise ConnectionError("queue unreachable")

    stale = _stale(opsrun_ledger, "w1")
    state = CliState(plugin_manager=get_plugin_manager(plugins=[BlindAdapter()]))
    result = invoke("reconcile", "--workspace", "w1", obj=state)
    line = _one_line_error(result, 1)
    (own,) = opsrun_ledger.runs(type=RECONCILE_TYPE)
    assert f"could not finish its stale runs (run {own.id} ended failed)" in line
    assert _row(result.stdout, "w1", own.id, "done", "failed", 1, 1, 1, 0, 0)
    assert opsrun_ledger.get(stale.id).status is RunStatus.RUNNING
