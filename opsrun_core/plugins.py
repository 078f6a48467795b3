"""The plugin manager factory.

Nothing is registered at import time: :func:`get_plugin_manager` builds a fresh manager with the
hookspecs, the plugins of the ``opsrun`` entry-point group (the built-ins among them), minus the
block list in ``OPSRUN_DISABLE_PLUGINS``, and checks that every hook implementation matches a spec.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import pluggy

from . import hookspecs
from .errors import PluginError

__all__ = ["BLOCKLIST_ENV", "get_plugin_manager"]

#: comma-separated names of plugins (entry-point names, e.g. ``dedupe``) not to load
BLOCKLIST_ENV = "OPSRUN_DISABLE_PLUGINS"


def get_plugin_manager(
    *, plugins: Iterable[object] = (), load_entrypoints: bool = True, blocked: Iterable[str] = ()
) -> pluggy.PluginManager:
    """A new plugin manager for a ledger.

    :param plugins: extra plugin objects (modules or instances) to register after the entry points,
        so they are called before the built-ins.
    :param load_entrypoints: load the ``opsrun`` entry-point group (the built-ins live there).
    :param blocked: plugin names to skip, in addition to ``OPSRUN_DISABLE_PLUGINS``.
    :raises PluginError: a plugin implements a hook that does not exist (a misspelling such as
        ``opsrun_clam``) or with arguments the spec does not have.
    """
    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    names = {n.strip() for n in os.environ.get(BLOCKLIST_ENV, "").split(",") if n.strip()}
    names.update(blocked)
    for name in names:
        pm.set_blocked(name)
    try:
        if load_entrypoints:
            pm.load_setuptools_entrypoints(hookspecs.PROJECT_NAME)
        for plugin in plugins:
            pm.register(plugin)
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(
            f"plugin {exc.plugin!r} is invalid: {exc}; hooks are named opsrun_<verb> as listed "
            "in opsrun_core.hookspecs (docs/hooks.md)"
        ) from exc
    return pm
