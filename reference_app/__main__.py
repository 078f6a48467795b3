"""``python -m reference_app``: the app's command line (see :mod:`reference_app.cli`)."""

from __future__ import annotations

from reference_app.cli import main

if __name__ == "__main__":
    main()
