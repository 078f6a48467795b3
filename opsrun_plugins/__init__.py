"""The default opsrun policies, as ordinary pluggy plugins.

Each module is registered through the ``opsrun`` entry-point group like any third-party plugin and
marks its implementations ``trylast=True``, so a host's plugin wins:

* :mod:`opsrun_plugins.identity` — ``opsrun_identity``: the fingerprint;
* :mod:`opsrun_plugins.dedupe` — ``opsrun_claim``: reuse the active run, honour the cooldown;
* :mod:`opsrun_plugins.tracking` — ``opsrun_summarize`` and ``opsrun_fail``.

Block one with ``OPSRUN_DISABLE_PLUGINS=dedupe`` (then another plugin must answer its hook).
"""

from __future__ import annotations

__all__: list[str] = []
