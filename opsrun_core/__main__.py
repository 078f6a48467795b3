"""``python -m opsrun_core``: the ``opsrun`` command line without the console script."""

from __future__ import annotations

from .cli import main

if __name__ == "__main__":
    main()
