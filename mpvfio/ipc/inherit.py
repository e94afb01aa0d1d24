"""Sockets a forked child must not keep: closed in every fork child (layer 1).

Device workers are forked, and a worker forked while the parent serves a
QMP client or a migration channel (a replacement after a crash, a worker
of a machine built late) inherits those sockets.  A socket that a child
still holds does not end when the parent closes it: the peer sees no EOF,
a QMP client waits for a disconnect that never comes, a migration target
waits for a channel that is long dead.  ``close_fds`` cannot help (a fork
without exec keeps every descriptor), and closing *all* descriptors in the
child would break the mappings and semaphores the worker was handed.

So the parent registers the sockets it serves with :func:`parent_only`;
an ``os.register_at_fork`` hook closes them in every child the process
forks (workers and the local migration's target), before the child runs
anything else.  Each entry remembers the descriptor's identity (device and
inode), so a number the parent closed and reused for another file is never
closed in a child.
"""

from __future__ import annotations

import os
import threading
from typing import Protocol

__all__ = ["parent_only", "registered"]


class _HasFileno(Protocol):
    def fileno(self) -> int: ...


_lock = threading.Lock()
#: (fd, st_dev, st_ino): the identity makes a reused descriptor number safe
_fds: set[tuple[int, int, int]] = set()
_hooked = False


def _identity(fd: int) -> tuple[int, int, int] | None:
    try:
        st = os.fstat(fd)
    except OSError:
        return None
    return fd, st.st_dev, st.st_ino


def _close_in_child() -> None:
    # the child has one thread: the parent's lock may have been held by
    # another thread at fork time, so it is not taken here
    try:
        null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        null = -1
    for fd, dev, ino in list(_fds):
        if _identity(fd) == (fd, dev, ino):  # still that socket, not a reuse
            try:
                if null >= 0:
                    # /dev/null takes the number: the inherited socket object
                    # still names it, and a later close of that object must
                    # not hit a descriptor the child opened since
                    os.dup2(null, fd)
                else:
                    os.close(fd)
            except OSError:
                pass
    if null >= 0:
        os.close(null)
    _fds.clear()


def parent_only(obj: _HasFileno | int) -> None:
    """Close this socket (or descriptor) in every child forked from now on.

    Entries whose descriptor was closed (or reused for another file) since
    are dropped here and never touched in a child.
    """
    global _hooked
    fd = obj if isinstance(obj, int) else obj.fileno()
    ident = _identity(fd)
    if ident is None:
        return
    with _lock:
        if not _hooked:
            os.register_at_fork(after_in_child=_close_in_child)
            _hooked = True
        stale = {e for e in _fds if _identity(e[0]) != e}
        _fds.difference_update(stale)
        _fds.add(ident)


def registered() -> int:
    """How many registered descriptors are still open (a test hook)."""
    with _lock:
        return sum(1 for e in _fds if _identity(e[0]) == e)
