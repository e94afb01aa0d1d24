#!/usr/bin/env python3
"""Switchover benchmark: stop + start phase times per mode, interleaved.

The same options as ``mpvfio bench switchover`` (both call
:func:`mpvfio.jobs.bench.run_bench_cli`), e.g.::

    python tools/bench_switchover.py --vfs 4,16,64 --profile fixed50 --rounds 5
    python tools/bench_switchover.py --profile instant --vfs 4,16,64 --rounds 20
    python tools/bench_switchover.py --vfs 4 --modes threads,workers \\
        --relaxed-interlock-too --json

Exit status: 0 ok, 1 a device failed (or a target was missed with
--check-targets), 2 bad usage, 130 interrupted.
"""

from __future__ import annotations

import sys

from mpvfio.jobs.bench import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
