"""mpvfio's inter-process layer: named POSIX IPC objects shared with workers.

This package owns everything that spans the parent and its forked device
workers at the OS level: object names and their clean-up
(:mod:`~mpvfio.ipc.names`), the phase barrier (:mod:`~mpvfio.ipc.barrier`),
the pre-flight OS limits check (:mod:`~mpvfio.ipc.limits`) and the typed
semaphores, locks and shared memory that wrap the only import of
``posix_ipc`` (:mod:`~mpvfio.ipc.posixobj`).  It imports
only the standard library, ``posix_ipc``, ``psutil`` and
:mod:`mpvfio.errors`.

Data flow::

    parent: NameRegistry(prefix) -> ProcessBarrier.create() -> .spec --+
            reset(n) / wait_filled() / abort() / unlink()              |
    worker (forked):        ProcessBarrier.attach(spec) <--------------+
            wait(timeout) ... close()
    start-up: sweep_stale() removes the objects of runs whose pid died
"""

from __future__ import annotations

from mpvfio.ipc.barrier import MAX_PARTIES, BarrierSpec, ProcessBarrier
from mpvfio.ipc.limits import check_limits, limits_report
from mpvfio.ipc.names import (
    PREFIX_RE,
    NameRegistry,
    make_prefix,
    posix_name,
    prefix_pid,
    shm_entry,
    sweep_stale,
)
from mpvfio.ipc.posixobj import set_signal_hook

__all__ = [
    "MAX_PARTIES",
    "PREFIX_RE",
    "BarrierSpec",
    "NameRegistry",
    "ProcessBarrier",
    "check_limits",
    "limits_report",
    "make_prefix",
    "posix_name",
    "prefix_pid",
    "set_signal_hook",
    "shm_entry",
    "sweep_stale",
]
