"""What every command line shares (layer 0): argparse value types, the exit
statuses and :func:`run_main`, the entry points' error handling.

Each value type raises :class:`argparse.ArgumentTypeError` with a message
saying what was wrong, so argparse reports it as a usage error (exit 2).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Sequence

from mpvfio.errors import MpvfioError, UsageError

__all__ = [
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "nonneg_int",
    "positive_float",
    "positive_int",
    "run_main",
]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def _int(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1."""
    return _int(text, 1)


def nonneg_int(text: str) -> int:
    """An integer >= 0."""
    return _int(text, 0)


def positive_float(text: str) -> float:
    """A finite number > 0 (``inf`` and ``nan`` are refused too)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def run_main(
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None,
    func: Callable[[argparse.Namespace], int] | None = None,
    *,
    prog: str = "mpvfio",
    all_errors_usage: bool = False,
) -> int:
    """Parse ``argv``, run ``func(args)`` (default ``args.func``); the status.

    Never raises :class:`SystemExit`: ``--help``/``--version`` return 0 and
    an argparse error 2 (its message already printed).  Errors become one
    line on stderr: :class:`~mpvfio.errors.UsageError` ``PROG: error: MSG``
    (:data:`EXIT_USAGE`), any other :class:`~mpvfio.errors.MpvfioError`
    ``PROG: MSG`` (:data:`EXIT_FAILED`), Ctrl-C ``PROG: interrupted``
    (:data:`EXIT_INTERRUPTED`).

    :param all_errors_usage: report every MpvfioError like a UsageError
        (``mpvfio device-server``'s standalone convention).
    """
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help/--version (0) or an argparse error (2)
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or EXIT_OK
        return EXIT_USAGE
    run: Callable[[argparse.Namespace], int] = func or args.func
    try:
        return run(args)
    except MpvfioError as exc:
        usage = all_errors_usage or isinstance(exc, UsageError)
        print(f"{prog}: {'error: ' if usage else ''}{exc}", file=sys.stderr)
        return EXIT_USAGE if usage else EXIT_FAILED
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
