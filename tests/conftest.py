"""The test suite's own setup: pytester, and the opsrun plugin when running from a checkout."""

from __future__ import annotations

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
