"""The test suite's own setup: pytester, and the opsrun plugin when running from a checkout."""

from __future__ import annotations

import os
import sys

import pytest

pytest_plugins = ["pytester"]

_PLUGIN = "opsrun_core.pytest_plugin"


def pytest_addoption(parser: pytest.Parser, pluginmanager: pytest.PytestPluginManager) -> None:
    """Load the opsrun plugin unless its entry point (or ``-p``) already did, or it is blocked.

    Installed (tox), pytest loads it through the ``pytest11`` entry point before this conftest;
    registering the same module again would be an error. Registering here, while options are
    still being added, keeps its flags and ini options working.
    """
    loaded = sys.modules.get(_PLUGIN)
    if loaded is not None and pluginmanager.is_registered(loaded):
        return
    if pluginmanager.is_blocked("opsrun") or pluginmanager.is_blocked(_PLUGIN):
        return
    pluginmanager.import_plugin(_PLUGIN)


# -- Celery on Redis: shared by tests/integration/test_celery.py and the reference app's --------

REDIS_URL = os.environ.get("OPSRUN_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
REQUIRE_REDIS = os.environ.get("OPSRUN_REQUIRE_REDIS", "").strip().lower() in ("1", "true", "yes")


def _redis_unavailable(reason: str) -> None:
    message = f"{reason} (OPSRUN_REQUIRE_REDIS=1 makes this a failure)"
    if REQUIRE_REDIS:
        pytest.fail(f"the Celery tests are required, but {message}", pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def celery_installed() -> None:
    """Skip (or fail, when required) without celery and its Redis client."""
    try:
        import celery  # noqa: F401
        import redis  # noqa: F401
    except ImportError:
        _redis_unavailable(
            "celery is not installed: pip install 'opsrun[celery]' to run the Celery tests"
        )


@pytest.fixture(scope="session")
def redis_url(celery_installed: None) -> str:
    """The broker's URL, once Redis answers; skip (or fail, when required) otherwise."""
    import redis

    from opsrun_core import sanitize_message

    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2, socket_timeout=2)
    try:
        client.ping()
    except redis.RedisError as exc:
        _redis_unavailable(
            f"no Redis answers at {sanitize_message(REDIS_URL)} ({type(exc).__name__}) for the "
            "Celery tests: start one (redis-server) or point OPSRUN_TEST_REDIS_URL at one"
        )
    finally:
        client.close()
    return REDIS_URL
