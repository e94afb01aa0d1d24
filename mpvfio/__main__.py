"""``python -m mpvfio``: run the command line of :mod:`mpvfio.cli.main`."""

from __future__ import annotations

from mpvfio.cli.main import main

if __name__ == "__main__":
    raise SystemExit(main())
