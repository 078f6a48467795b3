"""pytest plugin: test a host app's opsrun jobs against SQLite and a real Postgres.

Installed with opsrun, the plugin loads through the ``pytest11`` entry point ``opsrun``
(``-p no:opsrun`` turns it off, ``-p opsrun`` loads it under ``PYTEST_DISABLE_PLUGIN_AUTOLOAD``).
From a checkout that is not installed, load it with ``-p opsrun_core.pytest_plugin``; never both,
as pytest refuses one module registered under two names.

Fixtures
--------
``opsrun_backend``
    ``"sqlite"`` or ``"postgres"``: the ledger backend of the current test (see *Backends*).
``opsrun_database_url``
    URL of a clean, migrated database of that backend, private to this test, so that tests
    can connect to it themselves, from other processes too. SQLite: a fresh file under
    ``tmp_path``. Postgres: the session's throwaway database, ``operation_runs`` truncated
    (``RESTART IDENTITY``) before the test.
``opsrun_engine``
    A SQLAlchemy ``Engine`` on ``opsrun_database_url``, built by
    :func:`opsrun_core.db.make_engine` and disposed after the test.
``opsrun_clock``
    A :class:`~opsrun_core.clock.ManualClock` frozen at :data:`FROZEN_AT` (2026-01-01T00:00:00Z);
    move it with ``.advance(timedelta)`` or ``.set(datetime)``.
``opsrun_ledger``
    ``Ledger(opsrun_engine, clock=opsrun_clock)`` on the clean database.
``opsrun_postgres_url`` (session)
    URL of the session's throwaway Postgres database, for tests that only want Postgres. It is
    shared by the whole session and not cleaned between tests; it skips (or fails, when Postgres
    is required) like every Postgres test.

Backends
--------
A test that uses ``opsrun_backend``, ``opsrun_database_url``, ``opsrun_engine`` or
``opsrun_ledger`` (directly or through another fixture) is parametrized over the configured
backends, with ids ``sqlite`` and ``postgres``: ``test_dedupe[sqlite]``, ``test_dedupe[postgres]``.
``@pytest.mark.opsrun_backends("postgres")`` restricts a test (or class, or module through
``pytestmark``) to the named backends; a restriction that leaves none of the configured backends
produces a skipped test that says so. A test that parametrizes ``opsrun_backend`` itself is left
alone.

Options (each a command-line flag and an ini option)
----------------------------------------------------
``--opsrun-backends`` / ``opsrun_backends``
    Backends to run, separated by spaces or commas; default ``"sqlite postgres"``.
``--opsrun-database-url`` / ``opsrun_database_url`` / env ``OPSRUN_TEST_DATABASE_URL``
    A Postgres server to use (flag over ini over env). Its database is only the one the plugin
    connects to; the tests run in a throwaway database created next to it, so the role needs
    ``CREATEDB``. A malformed URL is a usage error; an unreachable one fails each Postgres test
    with a message naming this setting.
``--opsrun-require-postgres`` / ``opsrun_require_postgres`` / env ``OPSRUN_REQUIRE_POSTGRES=1``
    Postgres tests that cannot find a server fail instead of skipping (CI sets this).
``--opsrun-keep-database`` / ``opsrun_keep_database``
    Keep the throwaway Postgres database after the session, for debugging; the summary names it.
``--opsrun-postgres-image`` / ``opsrun_postgres_image``
    The image testcontainers starts; default :data:`DEFAULT_POSTGRES_IMAGE`.

Where Postgres comes from
-------------------------
Decided once per session, on first use (the report header already needs it), in this order:

1. the explicit URL above;
2. a testcontainers ``PostgresContainer`` (``pip install 'opsrun[testcontainers]'``) when a Docker
   engine answers a short ping; started on first use, stopped at the end of the session;
3. a local server reachable with libpq defaults (``PGHOST``, ``PGUSER``, the default socket, ...),
   used as ``postgresql+psycopg:///postgres``;
4. none: the Postgres tests skip with a message naming those three ways, or fail with it when
   Postgres is required.

The pure decision is :func:`choose_postgres`; the probes are :func:`probe_docker` and
:func:`probe_local_postgres`. The report header says which backends run and where Postgres came
from (never a password).

The throwaway database
----------------------
Each session (each pytest-xdist worker) creates ``opsrun_test_<random>`` on the chosen server
(Postgres 13 or newer), migrates it once with ``Ledger(engine).upgrade()`` and drops it
``WITH (FORCE)`` at the end of the session, failed tests or not. SQLite tests copy a template file
migrated once per session.
"""

from __future__ import annotations

import contextlib
import gc
import os
import re
import secrets
import shutil
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NoReturn, cast

import pytest

from .errors import ConfigurationError

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from .clock import ManualClock
    from .ledger import Ledger

__all__ = [
    "BACKENDS",
    "BACKENDS_SETTING",
    "DATABASE_URL_SETTING",
    "DEFAULT_POSTGRES_IMAGE",
    "FROZEN_AT",
    "LOCAL_SERVER_URL",
    "REQUIRE_SETTING",
    "OpsrunSettings",
    "PostgresChoice",
    "choose_postgres",
    "ensure_available",
    "header_line",
    "normalize_postgres_url",
    "parse_backends",
    "postgres_choice",
    "probe_docker",
    "probe_local_postgres",
    "resolve_explicit_url",
    "settings",
]

#: the ledger backends a test can run on, in their default order
BACKENDS = ("sqlite", "postgres")
#: how messages name the explicit Postgres URL setting
DATABASE_URL_SETTING = (
    "--opsrun-database-url / ini opsrun_database_url / env OPSRUN_TEST_DATABASE_URL"
)
#: how messages name the require setting
REQUIRE_SETTING = (
    "--opsrun-require-postgres / ini opsrun_require_postgres / env OPSRUN_REQUIRE_POSTGRES=1"
)
#: how messages name the backends setting
BACKENDS_SETTING = "--opsrun-backends / ini opsrun_backends"
#: the local server on libpq defaults (host, port, user from PGHOST etc. or the default socket)
LOCAL_SERVER_URL = "postgresql+psycopg:///postgres"
#: the image testcontainers starts unless --opsrun-postgres-image / ini opsrun_postgres_image says
DEFAULT_POSTGRES_IMAGE = "postgres:16-alpine"
#: where ``opsrun_clock`` starts
FROZEN_AT = datetime(2026, 1, 1, tzinfo=timezone.utc)

_ENV_URL = "OPSRUN_TEST_DATABASE_URL"
_ENV_REQUIRE = "OPSRUN_REQUIRE_POSTGRES"
_BACKEND_FIXTURES = frozenset(
    {"opsrun_backend", "opsrun_database_url", "opsrun_engine", "opsrun_ledger"}
)
_NO_POSTGRES = (
    "no Postgres server for the opsrun Postgres tests; provide one in any of three ways: "
    f"(1) give its URL with {DATABASE_URL_SETTING} "
    "(e.g. postgresql+psycopg://user:password@host:5432/postgres; the role needs CREATEDB); "
    "(2) run a Docker engine, and testcontainers (pip install 'opsrun[testcontainers]') starts a "
    "PostgresContainer; (3) run a local server reachable with libpq defaults "
    "(the default socket or PGHOST/PGPORT/PGUSER, as `psql -d postgres` would connect)"
)


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class OpsrunSettings:
    """The plugin's settings for one pytest run, read once in ``pytest_configure``."""

    backends: tuple[str, ...]
    #: the explicit Postgres URL (normalized), or None
    database_url: str | None
    #: which setting gave ``database_url`` (``--opsrun-database-url``, ``ini ...``, ``env ...``)
    database_url_origin: str | None
    require_postgres: bool
    keep_database: bool
    postgres_image: str


def parse_backends(text: str, *, setting: str = BACKENDS_SETTING) -> tuple[str, ...]:
    """``"sqlite postgres"`` or ``"postgres,sqlite"`` -> a tuple of known backend names."""
    names: list[str] = []
    for name in re.split(r"[\s,]+", text.strip().lower()):
        if not name:
            continue
        if name not in BACKENDS:
            raise ConfigurationError(
                f"{setting} names an unknown backend {name!r}; choose from {', '.join(BACKENDS)}"
            )
        if name not in names:
            names.append(name)
    if not names:
        raise ConfigurationError(f"{setting} is empty; name at least one of {', '.join(BACKENDS)}")
    return tuple(names)


def resolve_explicit_url(
    flag: str | None, ini: str | None, env: str | None
) -> tuple[str | None, str | None]:
    """The explicit Postgres URL and the setting it came from: flag, then ini, then env."""
    for value, origin in (
        (flag, "--opsrun-database-url"),
        (ini, "ini opsrun_database_url"),
        (env, f"env {_ENV_URL}"),
    ):
        if value and value.strip():
            return value.strip(), origin
    return None, None


def normalize_postgres_url(url: str) -> str:
    """Check that ``url`` is a Postgres SQLAlchemy URL and name the psycopg 3 driver in it.

    Raises :class:`ConfigurationError` naming :data:`DATABASE_URL_SETTING`; never echoes the value
    (it may hold a password).
    """
    from sqlalchemy import make_url

    try:
        parsed = make_url(url)
    except Exception as exc:
        raise ConfigurationError(
            f"{DATABASE_URL_SETTING} is not a valid database URL (expected e.g. "
            "'postgresql+psycopg://user:password@host:5432/postgres'); fix the setting"
        ) from exc
    if parsed.get_backend_name() not in ("postgresql", "postgres"):
        raise ConfigurationError(
            f"{DATABASE_URL_SETTING} must be a Postgres URL, not a {parsed.get_backend_name()!r} "
            "one (SQLite tests need no URL); use e.g. 'postgresql+psycopg://user@host/postgres'"
        )
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def _read_settings(config: pytest.Config) -> OpsrunSettings:
    backends_text = config.getoption("opsrun_backends") or str(config.getini("opsrun_backends"))
    url, origin = resolve_explicit_url(
        config.getoption("opsrun_database_url"),
        str(config.getini("opsrun_database_url") or ""),
        os.environ.get(_ENV_URL),
    )
    return OpsrunSettings(
        backends=parse_backends(backends_text),
        database_url=normalize_postgres_url(url) if url else None,
        database_url_origin=origin,
        require_postgres=bool(
            config.getoption("opsrun_require_postgres")
            or config.getini("opsrun_require_postgres")
            or _truthy(os.environ.get(_ENV_REQUIRE))
        ),
        keep_database=bool(
            config.getoption("opsrun_keep_database") or config.getini("opsrun_keep_database")
        ),
        postgres_image=config.getoption("opsrun_postgres_image")
        or str(config.getini("opsrun_postgres_image")),
    )


_SETTINGS_KEY = pytest.StashKey[OpsrunSettings]()
_CHOICE_KEY = pytest.StashKey["PostgresChoice"]()
_KEPT_KEY = pytest.StashKey[str]()


def settings(config: pytest.Config) -> OpsrunSettings:
    """The plugin's settings for this run."""
    return config.stash[_SETTINGS_KEY]


# --------------------------------------------------------------------------- provider chain


@dataclass(frozen=True)
class PostgresChoice:
    """Where this session's Postgres comes from."""

    #: ``"url"`` (explicit setting), ``"testcontainers"``, ``"local"`` (libpq defaults), ``"none"``
    source: Literal["url", "testcontainers", "local", "none"]
    #: the server URL when known before starting anything (None for testcontainers and none)
    url: str | None = None
    #: why Postgres tests cannot run; None when they can
    skip_reason: str | None = None
    #: Postgres is required: ``skip_reason`` is an error, not a skip
    required: bool = False
    #: for ``"url"``: which setting gave it
    origin: str | None = None

    @property
    def available(self) -> bool:
        """True when the Postgres tests can run."""
        return self.skip_reason is None


def choose_postgres(
    explicit_url: str | None,
    docker_probe: Callable[[], bool],
    local_probe: Callable[[], bool],
    *,
    require: bool = False,
    origin: str | None = None,
) -> PostgresChoice:
    """Walk the provider chain: explicit URL, else Docker (testcontainers), else a local server.

    Probes are called only as far as needed. Nothing found gives a choice whose ``skip_reason``
    names the three ways to provide Postgres, and ``required`` says whether that is an error.
    A malformed ``explicit_url`` raises :class:`ConfigurationError` naming the setting.
    """
    if explicit_url:
        return PostgresChoice(
            "url",
            url=normalize_postgres_url(explicit_url),
            required=require,
            origin=origin or "--opsrun-database-url",
        )
    if docker_probe():
        return PostgresChoice("testcontainers", required=require)
    if local_probe():
        return PostgresChoice("local", url=LOCAL_SERVER_URL, required=require)
    if require:
        reason = f"Postgres is required ({REQUIRE_SETTING}) but there is {_NO_POSTGRES}"
    else:
        reason = _NO_POSTGRES
    return PostgresChoice("none", skip_reason=reason, required=require)


def ensure_available(choice: PostgresChoice) -> None:
    """Skip the current test, or fail it when Postgres is required, unless ``choice`` can run."""
    if choice.skip_reason is None:
        return
    if choice.required:
        _fail(choice.skip_reason)
    pytest.skip(choice.skip_reason)


def probe_docker(timeout: float = 2.0) -> bool:
    """True when testcontainers is installed and a Docker engine answers a ping within ``timeout``.

    Finds the engine as testcontainers does (``tc.host``, ``DOCKER_HOST``, the docker context).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        answered = _ping_docker(timeout)
        if not answered:
            # a failed docker-py client leaves its socket in a reference cycle: close it now,
            # quietly, rather than as a ResourceWarning in whatever test runs next
            gc.collect()
    return answered


def _ping_docker(timeout: float) -> bool:
    try:
        _postgres_container_class()
        from testcontainers.core.docker_client import DockerClient

        client = DockerClient(timeout=timeout)
    except Exception:
        return False
    try:
        return bool(client.client.ping())
    except Exception:
        return False
    finally:
        client.client.close()


def probe_local_postgres(timeout: int = 3) -> bool:
    """True when a server answers with libpq defaults, on its ``postgres`` database."""
    try:
        import psycopg
    except ImportError:
        return False
    try:
        with psycopg.connect("", dbname="postgres", connect_timeout=timeout):
            return True
    except psycopg.Error:
        return False


def postgres_choice(config: pytest.Config) -> PostgresChoice:
    """This session's :class:`PostgresChoice`, probed on first call and then remembered."""
    choice = config.stash.get(_CHOICE_KEY, None)
    if choice is None:
        s = settings(config)
        choice = choose_postgres(
            s.database_url,
            lambda: probe_docker(),
            lambda: probe_local_postgres(),
            require=s.require_postgres,
            origin=s.database_url_origin,
        )
        config.stash[_CHOICE_KEY] = choice
    return choice


def header_line(s: OpsrunSettings, choice: PostgresChoice | None) -> str:
    """The report header line: the backends, and where Postgres comes from (no password)."""
    from .db import safe_url

    line = "opsrun: backends " + ", ".join(s.backends)
    if "postgres" not in s.backends or choice is None:
        return line
    if choice.source == "url" and choice.url:
        where = f"postgres from {choice.origin} {safe_url(choice.url)}"
    elif choice.source == "testcontainers":
        where = f"postgres from testcontainers {s.postgres_image}, started on first use"
    elif choice.source == "local":
        where = f"postgres from local server {LOCAL_SERVER_URL}"
    else:
        verdict = "fail (required)" if choice.required else "be skipped"
        where = (
            f"postgres tests will {verdict}: no server via {DATABASE_URL_SETTING}, "
            "a Docker engine for testcontainers, or a local server on libpq defaults"
        )
    return f"{line} ({where})"


# --------------------------------------------------------------------------- pytest hooks


def pytest_addoption(parser: pytest.Parser) -> None:
    """Register the flags and ini options (see the module docstring)."""
    group = parser.getgroup("opsrun", "opsrun ledger test databases")
    group.addoption(
        "--opsrun-backends",
        dest="opsrun_backends",
        metavar="NAMES",
        default=None,
        help='ledger backends to test on, e.g. "sqlite postgres" (ini: opsrun_backends)',
    )
    parser.addini(
        "opsrun_backends",
        'ledger backends to test on, separated by spaces or commas (default "sqlite postgres")',
        default="sqlite postgres",
    )
    group.addoption(
        "--opsrun-database-url",
        dest="opsrun_database_url",
        metavar="URL",
        default=None,
        help="Postgres server for the throwaway test database; the role needs CREATEDB "
        f"(ini: opsrun_database_url, env: {_ENV_URL})",
    )
    parser.addini(
        "opsrun_database_url",
        f"Postgres server for the throwaway test database (flag: --opsrun-database-url, env: "
        f"{_ENV_URL})",
        default="",
    )
    group.addoption(
        "--opsrun-require-postgres",
        dest="opsrun_require_postgres",
        action="store_true",
        default=False,
        help="fail Postgres tests instead of skipping them when no server is found "
        f"(ini: opsrun_require_postgres, env: {_ENV_REQUIRE}=1)",
    )
    parser.addini(
        "opsrun_require_postgres",
        "fail Postgres tests instead of skipping them when no server is found",
        type="bool",
        default=False,
    )
    group.addoption(
        "--opsrun-keep-database",
        dest="opsrun_keep_database",
        action="store_true",
        default=False,
        help="keep the throwaway Postgres database after the session (ini: opsrun_keep_database)",
    )
    parser.addini(
        "opsrun_keep_database",
        "keep the throwaway Postgres database after the session",
        type="bool",
        default=False,
    )
    group.addoption(
        "--opsrun-postgres-image",
        dest="opsrun_postgres_image",
        metavar="IMAGE",
        default=None,
        help=f"image for the testcontainers Postgres (default {DEFAULT_POSTGRES_IMAGE}; "
        "ini: opsrun_postgres_image)",
    )
    parser.addini(
        "opsrun_postgres_image",
        "image for the testcontainers Postgres",
        default=DEFAULT_POSTGRES_IMAGE,
    )


def pytest_configure(config: pytest.Config) -> None:
    """Register the marker and read the settings; a bad setting is a usage error."""
    config.addinivalue_line(
        "markers",
        "opsrun_backends(*names): run this test only on the named opsrun ledger backends "
        f"({', '.join(repr(b) for b in BACKENDS)}), of those selected by {BACKENDS_SETTING}",
    )
    try:
        config.stash[_SETTINGS_KEY] = _read_settings(config)
    except ConfigurationError as exc:
        raise pytest.UsageError(str(exc)) from None


def pytest_report_header(config: pytest.Config) -> str:
    """One line naming the backends and where Postgres comes from."""
    s = settings(config)
    return header_line(s, postgres_choice(config) if "postgres" in s.backends else None)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrize tests that use a backend fixture over the configured (or marked) backends."""
    if not _BACKEND_FIXTURES.intersection(metafunc.fixturenames):
        return
    for mark in metafunc.definition.iter_markers("parametrize"):
        argnames = mark.args[0] if mark.args else mark.kwargs.get("argnames", ())
        if isinstance(argnames, str):
            argnames = [n.strip() for n in argnames.split(",")]
        if "opsrun_backend" in argnames:
            return  # the test chose its backends itself
    configured = settings(metafunc.config).backends
    marker = metafunc.definition.get_closest_marker("opsrun_backends")
    if marker is None:
        params = [pytest.param(b, id=b) for b in configured]
    else:
        if not marker.args or not all(isinstance(a, str) for a in marker.args):
            _fail(
                f"{metafunc.definition.nodeid}: @pytest.mark.opsrun_backends takes backend names, "
                f'e.g. @pytest.mark.opsrun_backends("postgres")',
            )
        try:
            wanted = parse_backends(" ".join(marker.args), setting="@pytest.mark.opsrun_backends")
        except ConfigurationError as exc:
            _fail(f"{metafunc.definition.nodeid}: {exc}")
        chosen = [b for b in wanted if b in configured]
        if chosen:
            params = [pytest.param(b, id=b) for b in chosen]
        else:
            reason = (
                f"opsrun backend {'/'.join(wanted)} not selected by {BACKENDS_SETTING} "
                f"({', '.join(configured)})"
            )
            params = [pytest.param(b, id=b, marks=pytest.mark.skip(reason=reason)) for b in wanted]
    metafunc.parametrize("opsrun_backend", params, indirect=True)


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    """Name the throwaway database when ``--opsrun-keep-database`` kept it."""
    kept = config.stash.get(_KEPT_KEY, None)
    if kept is not None:
        terminalreporter.write_line(f"opsrun: kept the throwaway database {kept}")


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def opsrun_backend(request: pytest.FixtureRequest) -> str:
    """The ledger backend of this test: ``"sqlite"`` or ``"postgres"``."""
    backend = getattr(request, "param", None) or settings(request.config).backends[0]
    if backend not in BACKENDS:
        _fail(f"opsrun_backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    return cast(str, backend)


@pytest.fixture
def opsrun_database_url(request: pytest.FixtureRequest, opsrun_backend: str, tmp_path: Path) -> str:
    """URL of a clean, migrated database of this test's backend (see the module docstring)."""
    if opsrun_backend == "sqlite":
        template: Path = request.getfixturevalue("_opsrun_sqlite_template")
        path = tmp_path / "opsrun.sqlite3"
        shutil.copyfile(template, path)
        return f"sqlite:///{path}"
    database: _ThrowawayDatabase = request.getfixturevalue("_opsrun_postgres_database")
    database.truncate()
    return database.url


@pytest.fixture
def opsrun_engine(opsrun_database_url: str) -> Iterator[Engine]:
    """An engine on ``opsrun_database_url``, disposed after the test."""
    from .db import make_engine

    engine = make_engine(opsrun_database_url, setting="the opsrun_database_url fixture")
    yield engine
    engine.dispose()


@pytest.fixture
def opsrun_clock() -> ManualClock:
    """A manual clock frozen at :data:`FROZEN_AT`."""
    from .clock import ManualClock

    return ManualClock(FROZEN_AT)


@pytest.fixture
def opsrun_ledger(opsrun_engine: Engine, opsrun_clock: ManualClock) -> Ledger:
    """A ledger on the clean database of this test, on the frozen clock."""
    from .ledger import Ledger

    return Ledger(opsrun_engine, clock=opsrun_clock)


@pytest.fixture(scope="session")
def opsrun_postgres_url(_opsrun_postgres_database: _ThrowawayDatabase) -> str:
    """URL of this session's throwaway Postgres database (shared, not cleaned between tests)."""
    return _opsrun_postgres_database.url


# Why a template: measured once by hand (50 rounds each after a warm-up; Python 3.11,
# SQLAlchemy 2.1, alembic 1.20, local disk), migrating a new SQLite file with Ledger.upgrade()
# took 29-35 ms, copying the migrated template 0.5 ms. Tests never time anything.
@pytest.fixture(scope="session")
def _opsrun_sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite file migrated once per session, in rollback-journal mode so one file is all."""
    import sqlite3

    from .db import make_engine

    path = tmp_path_factory.mktemp("opsrun-sqlite") / "template.sqlite3"
    engine = make_engine(f"sqlite:///{path}", setting="the opsrun SQLite template")
    try:
        _migrate(engine)
    finally:
        engine.dispose()
    connection = sqlite3.connect(path, isolation_level=None)
    try:
        connection.execute("PRAGMA journal_mode = DELETE")  # folds the WAL into the file
    finally:
        connection.close()
    return path


@pytest.fixture(scope="session")
def _opsrun_postgres_server(request: pytest.FixtureRequest) -> Iterator[str]:
    """The chosen Postgres server's URL; starts (and finally stops) a container if that is it."""
    s = settings(request.config)
    if "postgres" not in s.backends:
        pytest.skip(f"opsrun backend postgres not selected by {BACKENDS_SETTING}")
    choice = postgres_choice(request.config)
    ensure_available(choice)
    if choice.source != "testcontainers":
        assert choice.url is not None
        yield choice.url
        return
    container = _start_container(s.postgres_image)
    try:
        yield str(container.get_connection_url())
    finally:
        container.stop()


@pytest.fixture(scope="session")
def _opsrun_postgres_database(
    request: pytest.FixtureRequest, _opsrun_postgres_server: str
) -> Iterator[_ThrowawayDatabase]:
    """Create, migrate, hand out and finally drop this session's throwaway database."""
    from sqlalchemy import make_url
    from sqlalchemy.exc import SQLAlchemyError

    from .db import check_connection, make_engine, safe_url

    s = settings(request.config)
    choice = postgres_choice(request.config)
    setting = {
        "url": DATABASE_URL_SETTING,
        "testcontainers": "the testcontainers Postgres",
        "local": f"the local server on libpq defaults ({LOCAL_SERVER_URL})",
    }.get(choice.source, "the Postgres server")
    try:
        server = make_engine(_opsrun_postgres_server, setting=setting, isolation_level="AUTOCOMMIT")
    except ConfigurationError as exc:
        _fail(f"opsrun: {exc}")
    try:
        check_connection(server, setting=setting)
    except ConfigurationError as exc:
        server.dispose()
        _fail(f"opsrun: {exc}")
    name = f"opsrun_test_{secrets.token_hex(4)}"
    try:
        with server.connect() as connection:
            connection.exec_driver_sql(f'CREATE DATABASE "{name}"')
    except SQLAlchemyError as exc:
        server.dispose()
        reason = type(getattr(exc, "orig", None) or exc).__name__
        _fail(
            f"opsrun: cannot create the throwaway database {name} on "
            f"{safe_url(_opsrun_postgres_server)} ({reason}); the role of {setting} needs CREATEDB",
        )
    url = make_url(_opsrun_postgres_server).set(database=name)
    database = _ThrowawayDatabase(name, url.render_as_string(hide_password=False))
    try:
        database.engine = make_engine(database.url, setting=setting)
        _migrate(database.engine)
        yield database
    finally:
        if database.engine is not None:
            database.engine.dispose()
        try:
            if s.keep_database:
                request.config.stash[_KEPT_KEY] = safe_url(url)
            else:
                _drop_database(server, name)
        finally:
            server.dispose()


# --------------------------------------------------------------------------- helpers


class _ThrowawayDatabase:
    """The session's Postgres database: its name, URL (with password) and a session engine."""

    def __init__(self, name: str, url: str) -> None:
        self.name = name
        self.url = url
        self.engine: Engine | None = None

    def truncate(self) -> None:
        """Empty ``operation_runs`` and restart its ids, so each test starts from run 1."""
        from sqlalchemy.exc import OperationalError

        assert self.engine is not None
        try:
            with self.engine.begin() as connection:
                connection.exec_driver_sql("SET LOCAL lock_timeout = '10s'")
                connection.exec_driver_sql("TRUNCATE operation_runs RESTART IDENTITY")
        except OperationalError as exc:
            _fail(
                f"opsrun: cannot clean {self.name} for this test ({type(exc.orig).__name__}); "
                "an earlier test probably left a transaction open (dispose your engines, close "
                "your sessions, join your processes)",
            )


def _fail(message: str) -> NoReturn:
    """Fail the current test with ``message`` alone: no traceback, no chained driver errors."""
    raise pytest.fail.Exception(message, pytrace=False) from None


def _migrate(engine: Engine) -> None:
    from .ledger import Ledger

    Ledger(engine).upgrade()


def _drop_database(server: Engine, name: str) -> None:
    from sqlalchemy.exc import SQLAlchemyError

    def drop() -> None:
        with server.connect() as connection:
            # WITH (FORCE) (Postgres 13+) ends connections that tests leaked
            connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    try:
        try:
            drop()
        except SQLAlchemyError:
            # a pooled connection may have died with the server (a test restarted it): once more
            # on a fresh connection
            server.dispose()
            drop()
    except SQLAlchemyError as exc:
        _fail(
            f"opsrun: could not drop the throwaway database {name} "
            f"({type(getattr(exc, 'orig', None) or exc).__name__}); drop it by hand: "
            f'DROP DATABASE "{name}" WITH (FORCE)',
        )


def _postgres_container_class() -> Any:
    """testcontainers' ``PostgresContainer``; 4.15 moved it to ``testcontainers.community``.

    The old ``testcontainers.postgres`` still works there but warns (an error under
    ``filterwarnings = error``), so it is only the fallback for earlier 4.x releases.
    """
    import importlib

    try:
        module = importlib.import_module("testcontainers.community.postgres")
    except ImportError:
        module = importlib.import_module("testcontainers.postgres")
    return module.PostgresContainer


def _start_container(image: str) -> Any:
    container = _postgres_container_class()(image, driver="psycopg")
    try:
        container.start()
    except Exception as exc:
        with contextlib.suppress(Exception):  # a half-started container: clean up what we can
            container.stop()
        _fail(
            f"opsrun: a Docker engine answered, but testcontainers could not start "
            f"PostgresContainer({image!r}) ({type(exc).__name__}); check Docker, pick another "
            f"image with --opsrun-postgres-image / ini opsrun_postgres_image, or give a server "
            f"with {DATABASE_URL_SETTING}",
        )
    return container
