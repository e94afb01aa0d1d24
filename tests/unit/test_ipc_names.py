"""Tests of mpvfio.ipc.names: run prefixes, NameRegistry and sweep_stale."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import multiprocess
import psutil
import pytest

from mpvfio.errors import UsageError
from mpvfio.ipc import posixobj
from mpvfio.ipc.names import (
    PREFIX_RE,
    NameRegistry,
    make_prefix,
    posix_name,
    prefix_pid,
    shm_entry,
    sweep_stale,
)

SHM = Path("/dev/shm")
REPO = Path(__file__).resolve().parents[2]
CTX = multiprocess.get_context("fork")


def _exists(name: str, kind: Any) -> bool:
    return (SHM / shm_entry(name, kind)).exists()


def _dead_pid() -> int:
    """A pid that just exited and was reaped (so very likely free)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    assert not psutil.pid_exists(proc.pid)
    return proc.pid


@pytest.fixture
def registry() -> Iterator[NameRegistry]:
    reg = NameRegistry()
    try:
        yield reg
    finally:
        reg.unlink_all()


# -- prefixes and names -------------------------------------------------------


def test_prefix_format() -> None:
    prefix = make_prefix()
    m = PREFIX_RE.match(prefix)
    assert m is not None, prefix
    assert int(m["pid"]) == os.getpid()
    assert len(m["rand"]) == 8
    assert prefix_pid(prefix) == os.getpid()
    assert make_prefix(1234).startswith("mpvfio-1234-")
    assert len({make_prefix() for _ in range(50)}) == 50


def test_prefix_pid_rejects_other_strings() -> None:
    for bad in ("mpvfio-12-xyz", "mpvfio-0-0011aabb", "other-1-0011aabb", ""):
        with pytest.raises(UsageError):
            prefix_pid(bad)


def test_posix_name_and_entries() -> None:
    prefix = make_prefix()
    assert posix_name(prefix, "bar0-mutex") == f"/{prefix}-bar0-mutex"
    assert shm_entry(f"/{prefix}-a", "sem") == f"sem.{prefix}-a"
    assert shm_entry(f"/{prefix}-a", "shm") == f"{prefix}-a"
    for bad in ("", "a/b", "x" * 65, "sp ace"):
        with pytest.raises(UsageError):
            posix_name(prefix, bad)
    with pytest.raises(UsageError):
        posix_name("a/b", "x")


def test_registry_name_uses_prefix(registry: NameRegistry) -> None:
    assert registry.name("x") == f"/{registry.prefix}-x"
    assert registry.creator_pid == os.getpid()
    assert registry.is_creator()
    assert len(registry) == 0


# -- NameRegistry ---------------------------------------------------------------


def test_unlink_all_is_idempotent(registry: NameRegistry) -> None:
    sem_name = registry.name("s")
    shm_name = registry.name("m")
    sem = posixobj.create_semaphore(sem_name, 0)
    registry.add(sem_name, "sem")
    mm = posixobj.create_shm(shm_name, 64)
    registry.add(shm_name, "shm")
    try:
        assert _exists(sem_name, "sem")
        assert _exists(shm_name, "shm")
        assert sem_name in registry
        assert registry.names() == {sem_name: "sem", shm_name: "shm"}
        assert sorted(registry.unlink_all()) == sorted([sem_name, shm_name])
        assert not _exists(sem_name, "sem")
        assert not _exists(shm_name, "shm")
        assert registry.unlink_all() == []
        assert registry.unlink_all() == []
        assert len(registry) == 0
    finally:
        posixobj.close_semaphore(sem)
        mm.close()


def test_unlink_all_tolerates_names_already_gone(registry: NameRegistry) -> None:
    name = registry.name("gone")
    sem = posixobj.create_semaphore(name, 0)
    registry.add(name, "sem")
    posixobj.close_semaphore(sem)
    assert posixobj.unlink_semaphore(name)
    assert registry.unlink_all() == []


def test_unlink_one(registry: NameRegistry) -> None:
    name = registry.name("one")
    sem = posixobj.create_semaphore(name, 0)
    posixobj.close_semaphore(sem)
    registry.add(name, "sem")
    assert registry.unlink(name)
    assert name not in registry
    assert not registry.unlink(name)
    assert not _exists(name, "sem")


def test_add_rejects_bad_kind(registry: NameRegistry) -> None:
    with pytest.raises(UsageError):
        registry.add(registry.name("k"), "pipe")  # type: ignore[arg-type]


def _child_unlinks(reg: NameRegistry, conn: Any) -> None:
    # The inherited registry must be inert here: no unlink, no add.
    removed = reg.unlink_all()
    try:
        reg.add(reg.name("child"), "sem")
        added = "added"
    except UsageError:
        added = "refused"
    conn.send((removed, added, reg.unlink(next(iter(reg.names())))))
    conn.close()


@pytest.mark.timeout(30)
def test_forked_child_does_not_unlink_parent_names(registry: NameRegistry) -> None:
    name = registry.name("keep")
    sem = posixobj.create_semaphore(name, 0)
    registry.add(name, "sem")
    rx, tx = CTX.Pipe(duplex=False)
    proc = CTX.Process(target=_child_unlinks, args=(registry, tx))
    proc.start()
    try:
        tx.close()
        assert rx.poll(20)
        removed, added, unlinked_one = rx.recv()
        proc.join(20)
    finally:
        if proc.is_alive():
            proc.kill()
        proc.join(5)
        rx.close()
        posixobj.close_semaphore(sem)
    assert proc.exitcode == 0
    assert removed == []
    assert added == "refused"
    assert unlinked_one is False
    assert _exists(name, "sem")
    assert registry.unlink_all() == [name]


@pytest.mark.timeout(60)
def test_atexit_unlinks_in_creator_only() -> None:
    """A plain os.fork child exiting normally runs atexit: it must not unlink."""
    script = textwrap.dedent(
        """
        import os, sys
        from mpvfio.ipc import posixobj
        from mpvfio.ipc.names import NameRegistry, shm_entry
        reg = NameRegistry()
        name = reg.name("atexit")
        sem = posixobj.create_semaphore(name, 0)
        reg.add(name, "sem")
        posixobj.close_semaphore(sem)
        entry = "/dev/shm/" + shm_entry(name, "sem")
        pid = os.fork()
        if pid == 0:
            sys.exit(0)  # runs atexit in the child
        _, status = os.waitpid(pid, 0)
        print(entry, os.path.exists(entry), os.waitstatus_to_exitcode(status))
        """
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        capture_output=True,
        text=True,
        timeout=50,
        check=True,
    ).stdout.split()
    entry, exists_after_child, child_rc = out
    assert exists_after_child == "True"
    assert child_rc == "0"
    assert not os.path.exists(entry)  # the creator's atexit unlinked it


# -- sweep_stale ----------------------------------------------------------------


def _make_objects(conn: Any) -> None:
    reg = NameRegistry()
    sem_name = reg.name("s")
    shm_name = reg.name("m")
    sem = posixobj.create_semaphore(sem_name, 0)
    reg.add(sem_name, "sem")
    mm = posixobj.create_shm(shm_name, 128)
    reg.add(shm_name, "shm")
    conn.send((reg.prefix, sem_name, shm_name))
    conn.close()
    signal.pause()  # until SIGKILLed: the names stay behind
    del sem, mm


@pytest.mark.timeout(60)
def test_sweep_removes_dead_pid_entries_only(registry: NameRegistry) -> None:
    # A live pid's objects (ours) that the sweep must not touch.
    live_sem = registry.name("live")
    sem = posixobj.create_semaphore(live_sem, 0)
    registry.add(live_sem, "sem")
    live_shm = registry.name("liveshm")
    mm = posixobj.create_shm(live_shm, 64)
    registry.add(live_shm, "shm")

    rx, tx = CTX.Pipe(duplex=False)
    proc = CTX.Process(target=_make_objects, args=(tx,))
    proc.start()
    try:
        tx.close()
        assert rx.poll(20), "child did not create its objects"
        prefix, sem_name, shm_name = rx.recv()
        assert prefix_pid(prefix) == proc.pid
        assert _exists(sem_name, "sem")
        assert _exists(shm_name, "shm")
        # While the child lives, its entries are safe too.
        assert not any(prefix in e for e in sweep_stale())
        assert _exists(sem_name, "sem")
        proc.kill()
        proc.join(20)
    finally:
        if proc.is_alive():
            proc.kill()
        proc.join(5)
        rx.close()
    assert proc.exitcode == -signal.SIGKILL
    assert _exists(sem_name, "sem"), "SIGKILL should leave the names behind"

    removed = sweep_stale()
    assert shm_entry(sem_name, "sem") in removed
    assert shm_entry(shm_name, "shm") in removed
    assert not _exists(sem_name, "sem")
    assert not _exists(shm_name, "shm")
    assert not any(registry.prefix in e for e in removed)
    assert _exists(live_sem, "sem")
    assert _exists(live_shm, "shm")
    assert sweep_stale() == [] or not any(prefix in e for e in sweep_stale())
    posixobj.close_semaphore(sem)
    mm.close()


def test_sweep_in_a_directory(tmp_path: Path) -> None:
    dead = _dead_pid()
    live = os.getpid()
    stale = [
        f"sem.mpvfio-{dead}-0011aabb-bar0-mutex",
        f"mpvfio-{dead}-0011aabb-bar0-shm",
        f"mpvfio-{dead}-0011aabb",
    ]
    keep = [
        f"sem.mpvfio-{live}-0011aabb-bar0-mutex",
        f"mpvfio-{live}-ffeeddcc-x",
        f"mpvfio-{dead}-nothex00-x",  # not the naming scheme
        f"other-{dead}-0011aabb-x",
        f"xmpvfio-{dead}-0011aabb-x",
    ]
    for name in stale + keep:
        (tmp_path / name).write_bytes(b"")
    assert sorted(sweep_stale(str(tmp_path))) == sorted(stale)
    assert sorted(os.listdir(tmp_path)) == sorted(keep)
    assert sweep_stale(str(tmp_path)) == []
    assert sweep_stale(str(tmp_path / "missing")) == []
