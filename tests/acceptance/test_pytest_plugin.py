"""The opsrun pytest plugin, run by ``pytester`` in a tiny host project, in a real subprocess.

Tests that need Postgres take this session's own throwaway database (``opsrun_postgres_url``) and
hand it to the host run as ``OPSRUN_TEST_DATABASE_URL``: the host session then creates and drops
its own throwaway database on the same server, wherever this session found it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from importlib.metadata import entry_points
from pathlib import Path

import pytest
from sqlalchemy import Engine, make_url, text

import opsrun_core.pytest_plugin as opsrun_plugin
from opsrun_core.db import make_engine

#: every test here starts a pytest subprocess (seconds each): tox runs them on one interpreter
pytestmark = pytest.mark.slow

#: where this process imported opsrun from, so the host subprocess imports the same code
CODE_ROOT = Path(opsrun_plugin.__file__).resolve().parents[1]
SETTING = "--opsrun-database-url / ini opsrun_database_url / env OPSRUN_TEST_DATABASE_URL"
UNREACHABLE = "postgresql+psycopg://nobody@127.0.0.1:1/x"

HOST_TESTS = """
from datetime import datetime, timezone
from pathlib import Path

import pytest
from sqlalchemy import inspect, text

FROZEN = datetime(2026, 1, 1, tzinfo=timezone.utc)
DIALECTS = {"sqlite": "sqlite", "postgres": "postgresql"}


def record(backend, url):
    with open(Path(__file__).with_name("urls.txt"), "a") as out:
        out.write(f"{backend} {url}\\n")


def test_dispatch_dedupes_on_a_clean_ledger(
    opsrun_backend, opsrun_ledger, opsrun_engine, opsrun_clock, opsrun_database_url
):
    record(opsrun_backend, opsrun_database_url)
    assert opsrun_engine.dialect.name == DIALECTS[opsrun_backend]
    assert opsrun_clock() == FROZEN
    first = opsrun_ledger.ensure_run("host.sync", workspace_id="w1", tenant_id="t1", identity={})
    again = opsrun_ledger.ensure_run("host.sync", workspace_id="w1", tenant_id="t1", identity={})
    assert first.created and first.run.id == 1
    assert first.run.created_at == FROZEN
    assert not again.created and again.run.id == first.run.id


def test_next_test_starts_clean_too(opsrun_backend, opsrun_ledger, opsrun_database_url):
    record(opsrun_backend, opsrun_database_url)
    assert "operation_runs" in inspect(opsrun_ledger.engine).get_table_names()
    first = opsrun_ledger.ensure_run("host.sync", workspace_id="w1", tenant_id="t1", identity={})
    assert first.created and first.run.id == 1
"""


def plugin_args() -> list[str]:
    """Load the plugin exactly once: by its entry point name when installed, else by module.

    ``-p opsrun_core.pytest_plugin`` next to the installed entry point would register the same
    module under two names, which pytest refuses.
    """
    if entry_points(group="pytest11", name="opsrun"):
        return ["-p", "opsrun"]
    return ["-p", opsrun_plugin.__name__]


@pytest.fixture
def host(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    """A host project as strict as ours, with none of this session's opsrun settings."""
    path = os.pathsep.join(p for p in (str(CODE_ROOT), os.environ.get("PYTHONPATH")) if p)
    monkeypatch.setenv("PYTHONPATH", path)
    for name in ("OPSRUN_TEST_DATABASE_URL", "OPSRUN_REQUIRE_POSTGRES", "PYTEST_ADDOPTS"):
        monkeypatch.delenv(name, raising=False)
    pytester.makeini(
        """
        [pytest]
        addopts = --strict-markers -p no:cacheprovider
        filterwarnings = error
        """
    )
    return pytester


@pytest.fixture
def postgres_host(
    host: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, opsrun_postgres_url: str
) -> pytest.Pytester:
    """The host project, pointed at this session's Postgres server."""
    monkeypatch.setenv("OPSRUN_TEST_DATABASE_URL", opsrun_postgres_url)
    return host


@pytest.fixture
def server(opsrun_postgres_url: str) -> Iterator[Engine]:
    """An engine on this session's Postgres server, to look at ``pg_database``."""
    engine = make_engine(opsrun_postgres_url, isolation_level="AUTOCOMMIT")
    yield engine
    engine.dispose()


def run(host: pytest.Pytester, *args: str) -> pytest.RunResult:
    return host.runpytest_subprocess(*plugin_args(), *args, timeout=300)


def database_exists(server: Engine, name: str) -> bool:
    with server.connect() as connection:
        found = connection.execute(
            text("SELECT count(*) FROM pg_database WHERE datname = :name"), {"name": name}
        ).scalar_one()
    return bool(found)


def recorded_urls(host: pytest.Pytester) -> list[tuple[str, str]]:
    lines = (host.path / "urls.txt").read_text().splitlines()
    return [(backend, url) for backend, url in (line.split(" ", 1) for line in lines)]


def without_probes(host: pytest.Pytester) -> None:
    """Make the host run find neither a Docker engine nor a local server."""
    host.makeconftest(
        """
        import opsrun_core.pytest_plugin as opsrun_plugin

        opsrun_plugin.probe_docker = lambda timeout=2.0: False
        opsrun_plugin.probe_local_postgres = lambda timeout=3: False
        """
    )


# --------------------------------------------------------------------------- both backends


def test_host_tests_pass_on_both_backends_with_a_clean_ledger_each(
    postgres_host: pytest.Pytester, server: Engine
) -> None:
    postgres_host.makepyfile(test_jobs=HOST_TESTS)

    result = run(postgres_host, "-v")

    result.assert_outcomes(passed=4)
    result.stdout.fnmatch_lines(
        [
            "opsrun: backends sqlite, postgres (postgres from env OPSRUN_TEST_DATABASE_URL *)",
            "*test_dispatch_dedupes_on_a_clean_ledger[[]sqlite[]] PASSED*",
            "*test_dispatch_dedupes_on_a_clean_ledger[[]postgres[]] PASSED*",
            "*test_next_test_starts_clean_too[[]sqlite[]] PASSED*",
            "*test_next_test_starts_clean_too[[]postgres[]] PASSED*",
        ]
    )
    urls = recorded_urls(postgres_host)
    sqlite_urls = {url for backend, url in urls if backend == "sqlite"}
    postgres_urls = {url for backend, url in urls if backend == "postgres"}
    assert len(sqlite_urls) == 2, "each SQLite test gets its own file"
    assert len(postgres_urls) == 1, "the Postgres tests share the session's throwaway database"
    (name,) = {make_url(url).database for url in postgres_urls}
    assert name is not None and re.fullmatch(r"opsrun_test_[0-9a-f]{8}", name)
    assert not database_exists(server, name), "the throwaway database outlived its session"


def test_throwaway_database_is_dropped_after_a_failing_session(
    postgres_host: pytest.Pytester, server: Engine
) -> None:
    postgres_host.makepyfile(
        test_fails="""
        import pytest
        from sqlalchemy import text

        @pytest.mark.opsrun_backends("postgres")
        def test_fails_after_looking(opsrun_engine, opsrun_database_url):
            with open("urls.txt", "a") as out:
                out.write(f"postgres {opsrun_database_url}\\n")
            with opsrun_engine.connect() as connection:
                name = connection.execute(text("SELECT current_database()")).scalar_one()
            assert name.startswith("opsrun_test_")
            assert False, "a failing host test"
        """
    )

    result = run(postgres_host)

    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*a failing host test*"])
    ((_, url),) = recorded_urls(postgres_host)
    name = make_url(url).database
    assert name is not None and name.startswith("opsrun_test_")
    assert not database_exists(server, name)


def test_keep_database_keeps_it_and_says_where(
    postgres_host: pytest.Pytester, server: Engine
) -> None:
    postgres_host.makepyfile(
        test_keep="""
        import pytest

        @pytest.mark.opsrun_backends("postgres")
        def test_records(opsrun_database_url):
            with open("urls.txt", "a") as out:
                out.write(f"postgres {opsrun_database_url}\\n")
        """
    )

    result = run(postgres_host, "--opsrun-keep-database")

    ((_, url),) = recorded_urls(postgres_host)
    name = make_url(url).database
    assert name is not None
    try:
        result.assert_outcomes(passed=1)
        assert database_exists(server, name)
        result.stdout.fnmatch_lines([f"opsrun: kept the throwaway database *{name}"])
    finally:
        with server.connect() as connection:
            connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


FAKE_CONTAINER = """
import os
from pathlib import Path

import opsrun_core.pytest_plugin as opsrun_plugin

LOG = Path(__file__).with_name("container.log")


def log(line):
    with LOG.open("a") as out:
        out.write(line + "\\n")


class FakePostgresContainer:
    def __init__(self, image, driver=None):
        log(f"init {image} {driver}")

    def start(self):
        log("start")
        return self

    def get_connection_url(self):
        return os.environ["FAKE_CONTAINER_URL"]

    def stop(self):
        log("stop")


opsrun_plugin.probe_docker = lambda timeout=2.0: True
opsrun_plugin.probe_local_postgres = lambda timeout=3: False
opsrun_plugin._postgres_container_class = lambda: FakePostgresContainer
"""


@pytest.mark.parametrize(
    ("args", "image"),
    [((), "postgres:16-alpine"), (("--opsrun-postgres-image", "postgres:17"), "postgres:17")],
    ids=["default-image", "image-option"],
)
def test_testcontainers_postgres_is_started_once_and_stopped(
    host: pytest.Pytester,
    monkeypatch: pytest.MonkeyPatch,
    opsrun_postgres_url: str,
    args: tuple[str, ...],
    image: str,
) -> None:
    # no Docker here: a stand-in container whose "server" is this session's database
    monkeypatch.setenv("FAKE_CONTAINER_URL", opsrun_postgres_url)
    host.makeconftest(FAKE_CONTAINER)
    host.makepyfile(
        test_two="""
        import pytest

        pytestmark = pytest.mark.opsrun_backends("postgres")

        def test_one(opsrun_ledger):
            pass

        def test_two(opsrun_engine):
            pass
        """
    )

    result = run(host, *args)

    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(
        [f"opsrun: backends sqlite, postgres (postgres from testcontainers {image}, *)"]
    )
    log = (host.path / "container.log").read_text().splitlines()
    assert log == [f"init {image} psycopg", "start", "stop"]


# --------------------------------------------------------------------------- report header


def test_report_header_names_the_url_setting_without_its_password(host: pytest.Pytester) -> None:
    host.makepyfile(test_jobs=HOST_TESTS)

    result = run(
        host,
        "--collect-only",
        "--opsrun-database-url=postgresql://ci:s3cret@db.invalid:5432/postgres",
    )

    assert result.ret == pytest.ExitCode.OK
    result.stdout.fnmatch_lines(
        [
            "opsrun: backends sqlite, postgres (postgres from --opsrun-database-url "
            "postgresql+psycopg://ci:***@db.invalid:5432/postgres)"
        ]
    )
    assert "s3cret" not in result.stdout.str() + result.stderr.str()


def test_ini_options_choose_backends_and_url_over_the_env(
    host: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    host.makeini(
        """
        [pytest]
        addopts = --strict-markers -p no:cacheprovider
        filterwarnings = error
        opsrun_backends = postgres
        opsrun_database_url = postgresql+psycopg://ini@db.invalid/postgres
        """
    )
    host.makepyfile(test_jobs=HOST_TESTS)

    monkeypatch.setenv("OPSRUN_TEST_DATABASE_URL", "postgresql+psycopg://env@db.invalid/postgres")

    result = run(host, "--collect-only")

    result.stdout.fnmatch_lines(
        [
            "opsrun: backends postgres (postgres from ini opsrun_database_url "
            "postgresql+psycopg://ini@db.invalid/postgres)",
            "*<Function test_dispatch_dedupes_on_a_clean_ledger[[]postgres[]]>",
            "*<Function test_next_test_starts_clean_too[[]postgres[]]>",
        ]
    )
    assert "[sqlite]" not in result.stdout.str()


def test_report_header_for_sqlite_only(host: pytest.Pytester) -> None:
    host.makepyfile(test_jobs=HOST_TESTS)

    result = run(host, "--collect-only", "--opsrun-backends", "sqlite")

    assert "opsrun: backends sqlite" in result.stdout.lines
    assert "[postgres]" not in result.stdout.str()


def test_report_header_names_the_local_server_when_that_is_where_postgres_is(
    host: pytest.Pytester, request: pytest.FixtureRequest
) -> None:
    if opsrun_plugin.postgres_choice(request.config).source != "local":
        pytest.skip("this session found no local Postgres server on libpq defaults")
    host.makepyfile(test_jobs=HOST_TESTS)

    result = run(host, "--collect-only")

    result.stdout.fnmatch_lines(
        [
            "opsrun: backends sqlite, postgres (postgres from local server postgresql+psycopg:///postgres)"
        ]
    )


# --------------------------------------------------------------------------- the marker


def test_marker_restricts_backends(host: pytest.Pytester) -> None:
    host.makepyfile(
        test_marked="""
        import pytest

        @pytest.mark.opsrun_backends("postgres")
        def test_postgres_only(opsrun_engine):
            pass

        def test_both(opsrun_backend):
            pass

        @pytest.mark.opsrun_backends("sqlite")
        class TestSqliteOnly:
            def test_in_class(self, opsrun_ledger):
                pass

        def test_no_ledger():
            pass
        """
    )

    result = run(host, "--collect-only", "-q")

    collected = [line for line in result.stdout.lines if line.startswith("test_marked.py::")]
    assert collected == [
        "test_marked.py::test_postgres_only[postgres]",
        "test_marked.py::test_both[sqlite]",
        "test_marked.py::test_both[postgres]",
        "test_marked.py::TestSqliteOnly::test_in_class[sqlite]",
        "test_marked.py::test_no_ledger",
    ]


def test_marker_outside_the_selected_backends_skips_saying_why(host: pytest.Pytester) -> None:
    host.makepyfile(
        test_marked="""
        import pytest

        @pytest.mark.opsrun_backends("postgres")
        def test_postgres_only(opsrun_ledger):
            raise AssertionError("must not run")

        def test_sqlite(opsrun_backend, opsrun_ledger):
            assert opsrun_backend == "sqlite"
        """
    )

    result = run(host, "--opsrun-backends", "sqlite", "-rs")

    result.assert_outcomes(passed=1, skipped=1)
    result.stdout.fnmatch_lines(
        ["SKIPPED * opsrun backend postgres not selected by --opsrun-backends*"]
    )


def test_marker_with_an_unknown_backend_is_a_collection_error(host: pytest.Pytester) -> None:
    host.makepyfile(
        test_marked="""
        import pytest

        @pytest.mark.opsrun_backends("oracle")
        def test_oracle(opsrun_backend):
            pass
        """
    )

    result = run(host)

    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*unknown backend 'oracle'*"])


# --------------------------------------------------------------------------- failures


def test_unreachable_explicit_url_is_one_clear_error_naming_the_setting(
    host: pytest.Pytester,
) -> None:
    host.makepyfile(
        test_one="""
        def test_dispatch(opsrun_ledger):
            pass
        """
    )

    result = run(host, f"--opsrun-database-url={UNREACHABLE}")

    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(
        [
            "*ERROR at setup of test_dispatch[[]postgres[]]*",
            f"opsrun: cannot connect to {UNREACHABLE} (OperationalError); check {SETTING}*",
        ]
    )
    output = result.stdout.str()
    for leak in ("Traceback", "site-packages", "psycopg.OperationalError", "above exception"):
        assert leak not in output, "a driver stack trace leaked into the report"


def test_malformed_explicit_url_is_a_usage_error_naming_the_setting(
    host: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    host.makepyfile(test_jobs=HOST_TESTS)
    monkeypatch.setenv("OPSRUN_TEST_DATABASE_URL", "postgresql://ci:s3cret@db:notaport/postgres")

    result = run(host)

    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"ERROR: {SETTING} is not a valid database URL*"])
    assert "s3cret" not in result.stdout.str() + result.stderr.str()


NO_POSTGRES_TEST = """
def test_dispatch(opsrun_ledger):
    pass
"""


def test_no_postgres_skips_naming_the_three_ways(host: pytest.Pytester) -> None:
    without_probes(host)
    host.makepyfile(test_one=NO_POSTGRES_TEST)

    result = run(host, "-rs")

    result.assert_outcomes(passed=1, skipped=1)
    result.stdout.fnmatch_lines(
        [
            "opsrun: backends sqlite, postgres (postgres tests will be skipped: *)",
            f"SKIPPED * no Postgres server *{SETTING}*Docker engine*testcontainers*"
            "local server reachable with libpq defaults*",
        ]
    )


@pytest.mark.parametrize("how", ["env", "flag", "ini"])
def test_require_postgres_turns_the_skip_into_errors(
    host: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    without_probes(host)
    host.makepyfile(
        test_one=NO_POSTGRES_TEST
        + """
def test_postgres_only_too(opsrun_postgres_url):
    pass
"""
    )
    args: list[str] = []
    if how == "env":
        monkeypatch.setenv("OPSRUN_REQUIRE_POSTGRES", "1")
    elif how == "flag":
        args.append("--opsrun-require-postgres")
    else:
        host.makeini(
            """
            [pytest]
            addopts = --strict-markers -p no:cacheprovider
            filterwarnings = error
            opsrun_require_postgres = true
            """
        )

    result = run(host, *args)

    result.assert_outcomes(passed=1, errors=2)
    result.stdout.fnmatch_lines(
        [
            "opsrun: backends sqlite, postgres (postgres tests will fail (required): *)",
            "*ERROR at setup of test_dispatch[[]postgres[]]*",
            f"Postgres is required*no Postgres server*{SETTING}*Docker engine*"
            "local server reachable with libpq defaults*",
            "*ERROR at setup of test_postgres_only_too*",
            "Postgres is required*",
        ]
    )
