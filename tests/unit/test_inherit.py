"""Parent-only sockets are closed in forked children, and only those."""

from __future__ import annotations

import os
import socket
import tempfile

from mpvfio.ipc.inherit import parent_only, registered


def _in_child(fn: object) -> int:
    """Fork; the child exits with ``fn()``; the exit status."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            code = fn()  # type: ignore[operator]
        except BaseException:  # noqa: BLE001
            code = 99
        os._exit(int(code))
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_a_registered_socket_is_closed_in_the_child_only() -> None:
    a, b = socket.socketpair()
    try:
        parent_only(a)
        fd = a.fileno()
        ino = os.fstat(fd).st_ino
        # in the child the number now names /dev/null, not the socket
        assert _in_child(lambda: 0 if os.fstat(fd).st_ino != ino else 1) == 0
        assert os.fstat(fd).st_ino == ino  # the parent keeps it
        # the child's copy being gone is what lets the peer see EOF
        assert _in_child(lambda: 0) == 0
        a.close()
        b.settimeout(5)
        assert b.recv(1) == b""
    finally:
        a.close()
        b.close()


def test_an_unregistered_descriptor_is_inherited() -> None:
    a, b = socket.socketpair()
    try:
        fd = a.fileno()
        assert _in_child(lambda: 0 if _is_open(fd) else 1) == 0
    finally:
        a.close()
        b.close()


def test_a_reused_descriptor_number_is_not_closed() -> None:
    a, b = socket.socketpair()
    fd = a.fileno()
    parent_only(a)
    a.close()
    b.close()
    with tempfile.TemporaryFile() as f:
        if f.fileno() != fd:  # take the same number on purpose
            os.dup2(f.fileno(), fd)
        try:
            assert _in_child(lambda: 0 if _is_open(fd) else 1) == 0
        finally:
            if f.fileno() != fd:
                os.close(fd)


def test_closed_entries_are_not_counted() -> None:
    a, b = socket.socketpair()
    parent_only(a)
    parent_only(b)
    before = registered()
    a.close()
    assert registered() == before - 1
    b.close()
