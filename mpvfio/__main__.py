"""``python -m mpvfio``: run the command line of :mod:`mpvfio.cli`."""

from __future__ import annotations

from mpvfio.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
