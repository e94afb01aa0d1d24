"""Shared fixtures: every test is checked for leaked children and IPC objects.

A test that leaves a child process alive or a ``/dev/shm`` entry of mpvfio
behind fails, even when its own assertions passed.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator

import psutil
import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--run-stress",
        action="store_true",
        default=False,
        help="run the long randomized stress tests (marker 'stress')",
    )


def pytest_collection_modifyitems(
    config: pytest.Config, items: list[pytest.Item]
) -> None:
    if config.getoption("--run-stress"):
        return
    skip = pytest.mark.skip(reason="stress test: pass --run-stress to run it")
    for item in items:
        if "stress" in item.keywords:
            item.add_marker(skip)


_PID = re.compile(r"mpvfio-(\d+)-")


def _shm_entries() -> set[str]:
    """mpvfio entries of this process, or of processes that are gone.

    A live *other* process's objects (another pytest run on the machine) are
    not ours to judge; a dead process's leftovers are (a crashed child).
    """
    try:
        names = [n for n in os.listdir("/dev/shm") if "mpvfio" in n]
    except FileNotFoundError:
        return set()
    mine = set()
    for n in names:
        m = _PID.search(n)
        pid = int(m.group(1)) if m else os.getpid()
        if pid == os.getpid() or not psutil.pid_exists(pid):
            mine.add(n)
    return mine


def _children() -> list[psutil.Process]:
    try:
        return psutil.Process().children(recursive=True)
    except psutil.Error:
        return []


@pytest.fixture(autouse=True)
def _no_leaks() -> Iterator[None]:
    """Fail a test that leaves a child process or a /dev/shm object behind."""
    shm_before = _shm_entries()
    yield
    deadline = time.monotonic() + 5.0
    kids = _children()
    while kids and time.monotonic() < deadline:
        _, kids = psutil.wait_procs(kids, timeout=0.1)
    leaked_shm = _shm_entries() - shm_before
    while leaked_shm and time.monotonic() < deadline:
        time.sleep(0.05)
        leaked_shm = _shm_entries() - shm_before
    for p in kids:  # reap them anyway so one failure does not cascade
        try:
            p.kill()
            p.wait(2)
        except psutil.Error:
            pass
    for name in leaked_shm:
        try:
            os.unlink(os.path.join("/dev/shm", name))
        except OSError:
            pass
    assert not kids, f"test leaked child processes: {kids}"
    assert not leaked_shm, f"test leaked POSIX IPC objects: {sorted(leaked_shm)}"
