"""The pytest plugin's Postgres provider chain, with fake probes (no database, no Docker)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from opsrun_core.errors import ConfigurationError
from opsrun_core.pytest_plugin import (
    DATABASE_URL_SETTING,
    LOCAL_SERVER_URL,
    OpsrunSettings,
    PostgresChoice,
    choose_postgres,
    ensure_available,
    header_line,
    normalize_postgres_url,
    parse_backends,
    probe_docker,
    probe_local_postgres,
    resolve_explicit_url,
)

SETTING_NAMES = ("--opsrun-database-url", "opsrun_database_url", "OPSRUN_TEST_DATABASE_URL")


class Probe:
    """A fake probe that answers ``answer`` and counts its calls."""

    def __init__(self, answer: bool) -> None:
        self.answer = answer
        self.calls = 0

    def __call__(self) -> bool:
        self.calls += 1
        return self.answer


def never_called() -> bool:
    raise AssertionError("this probe must not be called")


def choose(
    explicit: str | None = None,
    docker: Callable[[], bool] = never_called,
    local: Callable[[], bool] = never_called,
    *,
    require: bool = False,
) -> PostgresChoice:
    return choose_postgres(explicit, docker, local, require=require, origin="--opsrun-database-url")


def assert_names_the_three_ways(message: str) -> None:
    for name in SETTING_NAMES:
        assert name in message
    assert "Docker" in message and "testcontainers" in message
    assert "local server" in message and "libpq defaults" in message


# --------------------------------------------------------------------------- the chain


def test_explicit_url_wins_without_probing() -> None:
    choice = choose("postgresql+psycopg://ci:pw@db.example:5432/postgres")

    assert choice.source == "url"
    assert choice.url == "postgresql+psycopg://ci:pw@db.example:5432/postgres"
    assert choice.origin == "--opsrun-database-url"
    assert choice.available and choice.skip_reason is None


def test_explicit_url_gets_the_psycopg_driver() -> None:
    choice = choose("postgresql://ci@db.example/postgres")

    assert choice.url == "postgresql+psycopg://ci@db.example/postgres"


def test_explicit_url_wins_even_when_required() -> None:
    choice = choose("postgresql+psycopg://ci@db.example/postgres", require=True)

    assert choice.source == "url" and choice.available


def test_docker_answers_means_testcontainers_and_no_local_probe() -> None:
    docker = Probe(True)

    choice = choose(None, docker, never_called)

    assert choice.source == "testcontainers"
    assert choice.url is None  # known only once the container runs
    assert choice.available
    assert docker.calls == 1


def test_local_server_when_docker_is_silent() -> None:
    docker, local = Probe(False), Probe(True)

    choice = choose(None, docker, local)

    assert choice.source == "local"
    assert choice.url == LOCAL_SERVER_URL
    assert choice.available
    assert (docker.calls, local.calls) == (1, 1)


def test_empty_explicit_url_counts_as_not_given() -> None:
    choice = choose("", Probe(False), Probe(True))

    assert choice.source == "local"


def test_nothing_found_skips_naming_the_three_ways() -> None:
    choice = choose(None, Probe(False), Probe(False))

    assert choice.source == "none"
    assert not choice.available
    assert not choice.required
    assert choice.skip_reason is not None
    assert_names_the_three_ways(choice.skip_reason)
    with pytest.raises(pytest.skip.Exception) as excinfo:
        ensure_available(choice)
    assert "--opsrun-database-url" in str(excinfo.value)


def test_nothing_found_and_required_is_an_error_with_the_same_advice() -> None:
    choice = choose(None, Probe(False), Probe(False), require=True)

    assert choice.source == "none"
    assert choice.required
    assert choice.skip_reason is not None
    assert_names_the_three_ways(choice.skip_reason)
    assert "OPSRUN_REQUIRE_POSTGRES" in choice.skip_reason
    with pytest.raises(pytest.fail.Exception) as excinfo:
        ensure_available(choice)
    assert "OPSRUN_TEST_DATABASE_URL" in str(excinfo.value)


def test_an_available_choice_neither_skips_nor_fails() -> None:
    ensure_available(choose(None, Probe(False), Probe(True), require=True))


# --------------------------------------------------------------------------- the explicit URL


@pytest.mark.parametrize(
    "url",
    ["not a url", "postgresql+psycopg://ci:s3cret@db.example:notaport/postgres"],
    ids=["garbage", "bad-port"],
)
def test_malformed_explicit_url_names_the_setting_not_the_value(url: str) -> None:
    with pytest.raises(ConfigurationError) as excinfo:
        choose(url)

    message = str(excinfo.value)
    for name in SETTING_NAMES:
        assert name in message
    assert "s3cret" not in message
    assert "Traceback" not in message


def test_explicit_url_must_be_postgres() -> None:
    with pytest.raises(ConfigurationError, match="must be a Postgres URL") as excinfo:
        normalize_postgres_url("sqlite:///opsrun.db")

    assert DATABASE_URL_SETTING in str(excinfo.value)


@pytest.mark.parametrize(
    ("flag", "ini", "env", "expected", "origin"),
    [
        (
            "postgresql://f/x",
            "postgresql://i/x",
            "postgresql://e/x",
            "postgresql://f/x",
            "--opsrun-database-url",
        ),
        (
            None,
            "postgresql://i/x",
            "postgresql://e/x",
            "postgresql://i/x",
            "ini opsrun_database_url",
        ),
        (None, "", "postgresql://e/x", "postgresql://e/x", "env OPSRUN_TEST_DATABASE_URL"),
        (None, "  ", None, None, None),
    ],
    ids=["flag-over-ini", "ini-over-env", "env", "none"],
)
def test_explicit_url_precedence(
    flag: str | None, ini: str | None, env: str | None, expected: str | None, origin: str | None
) -> None:
    assert resolve_explicit_url(flag, ini, env) == (expected, origin)


# --------------------------------------------------------------------------- backends


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("sqlite postgres", ("sqlite", "postgres")),
        ("postgres,sqlite", ("postgres", "sqlite")),
        (" SQLite ", ("sqlite",)),
        ("postgres postgres", ("postgres",)),
    ],
)
def test_parse_backends(text: str, expected: tuple[str, ...]) -> None:
    assert parse_backends(text) == expected


@pytest.mark.parametrize("text", ["mysql", "sqlite oracle", "", " , "])
def test_parse_backends_refuses_unknown_or_none(text: str) -> None:
    with pytest.raises(ConfigurationError, match="--opsrun-backends"):
        parse_backends(text)


# --------------------------------------------------------------------------- report header


def make_settings(backends: tuple[str, ...] = ("sqlite", "postgres")) -> OpsrunSettings:
    return OpsrunSettings(
        backends=backends,
        database_url=None,
        database_url_origin=None,
        require_postgres=False,
        keep_database=False,
        postgres_image="postgres:16-alpine",
    )


def test_header_hides_the_password_of_an_explicit_url() -> None:
    choice = choose("postgresql+psycopg://ci:s3cret@db.example/postgres")

    line = header_line(make_settings(), choice)

    assert line.startswith("opsrun: backends sqlite, postgres (postgres from --opsrun-database-url")
    assert "ci:***@db.example" in line
    assert "s3cret" not in line


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        (PostgresChoice("local", url=LOCAL_SERVER_URL), f"from local server {LOCAL_SERVER_URL}"),
        (PostgresChoice("testcontainers"), "from testcontainers postgres:16-alpine"),
        (PostgresChoice("none", skip_reason="x"), "postgres tests will be skipped"),
        (PostgresChoice("none", skip_reason="x", required=True), "will fail (required)"),
    ],
    ids=["local", "testcontainers", "skip", "required"],
)
def test_header_says_where_postgres_comes_from(choice: PostgresChoice, expected: str) -> None:
    assert expected in header_line(make_settings(), choice)


def test_header_for_sqlite_only_mentions_no_postgres() -> None:
    assert header_line(make_settings(("sqlite",)), None) == "opsrun: backends sqlite"


# --------------------------------------------------------------------------- real probes


def test_local_probe_says_no_when_nothing_listens(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PGHOST", str(tmp_path))  # a socket directory with no server in it

    assert probe_local_postgres(timeout=1) is False


def test_docker_probe_says_no_quietly_when_no_engine_listens(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # also proves the failed ping leaks no socket (a ResourceWarning is an error here)
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path / 'docker.sock'}")

    assert probe_docker(timeout=1) is False
