"""Typed wrappers around ``posix_ipc``: the only module that imports it.

This module owns every call into ``posix_ipc`` (named semaphores and shared
memory) and turns its exceptions into :mod:`mpvfio.errors`.  It fixes the
pitfalls of PERF_LIMITS.md once, so callers cannot forget them:

* objects are created with ``O_CREX`` and mode ``0o600`` (never reopened by
  accident, never readable by other users);
* a shared-memory object is mapped and its fd closed at once
  (``close_fd()`` right after ``mmap``: pitfall 3, no fd per mapping);
* :func:`acquire` retries on ``posix_ipc.SignalError`` (EINTR, pitfall 4)
  and recomputes the remaining time from a ``time.monotonic()`` deadline,
  because ``posix_ipc`` timeouts are absolute ``CLOCK_REALTIME`` deadlines:
  a forward step of the wall clock would otherwise end a wait early (a
  backward step can still lengthen one slice: that is the kernel's clock);
* unlinking ignores ``ExistentialError`` (already gone is fine).

Signal handlers (pitfall 4): ``posix_ipc`` runs Python signal handlers from
inside ``acquire()`` and then replaces whatever they raised (e.g. the
``SystemExit`` of a SIGTERM handler calling ``sys.exit()``) by
``SignalError``.  The exception is lost for good; so a process that must
stop on a signal should record it in its handler and install a hook with
:func:`set_signal_hook`, which :func:`acquire` calls after every
interruption and which may raise (``SystemExit``, ``BarrierError`` ...) to
end the wait.  SIGINT's ``KeyboardInterrupt`` propagates unchanged.
"""

from __future__ import annotations

import mmap
import time
from collections.abc import Callable
from typing import Protocol

import posix_ipc

from mpvfio.errors import IPCError, UsageError

__all__ = [
    "MODE",
    "NamedLock",
    "Semaphore",
    "acquire",
    "close_semaphore",
    "create_semaphore",
    "create_shm",
    "drain",
    "open_semaphore",
    "open_shm",
    "release",
    "set_signal_hook",
    "try_acquire",
    "unlink_semaphore",
    "unlink_shm",
]

#: Permission bits of every object mpvfio creates (owner read/write only).
MODE = 0o600


class Semaphore(Protocol):
    """The subset of ``posix_ipc.Semaphore`` that mpvfio uses."""

    @property
    def name(self) -> str: ...

    @property
    def value(self) -> int: ...

    def acquire(self, timeout: float | None = None) -> None: ...

    def release(self) -> None: ...

    def close(self) -> None: ...


_signal_hook: Callable[[], None] | None = None


def set_signal_hook(hook: Callable[[], None] | None) -> Callable[[], None] | None:
    """Install ``hook`` to run after every EINTR in :func:`acquire`.

    The hook may raise to end the wait (its exception propagates).  Returns
    the previous hook.  The hook is per process (a forked child inherits it).
    """
    global _signal_hook
    previous = _signal_hook
    _signal_hook = hook
    return previous


def _ipc_error(what: str, name: str, exc: BaseException) -> IPCError:
    return IPCError(f"{what} {name!r}: {type(exc).__name__}: {exc}")


def create_semaphore(name: str, initial: int = 0) -> Semaphore:
    """Create a new named semaphore (``O_CREX``, mode 0600) holding ``initial``.

    :raises IPCError: the name exists already or cannot be created.
    """
    try:
        sem: Semaphore = posix_ipc.Semaphore(name, posix_ipc.O_CREX, MODE, initial)
    except posix_ipc.Error as exc:
        raise _ipc_error("cannot create semaphore", name, exc) from exc
    except ValueError as exc:
        raise UsageError(f"bad semaphore {name!r}: {exc}") from exc
    return sem


def open_semaphore(name: str) -> Semaphore:
    """Open an existing named semaphore; never creates one.

    :raises IPCError: it does not exist (unlinked already?) or is not ours.
    """
    try:
        sem: Semaphore = posix_ipc.Semaphore(name)
    except posix_ipc.Error as exc:
        raise _ipc_error("cannot open semaphore", name, exc) from exc
    return sem


def close_semaphore(sem: Semaphore) -> None:
    """Drop this process's handle (``sem_close``); ignores a closed handle."""
    try:
        sem.close()
    except posix_ipc.Error:
        pass


def unlink_semaphore(name: str) -> bool:
    """Remove a semaphore's name; ``False`` when it was already gone."""
    try:
        posix_ipc.unlink_semaphore(name)
    except posix_ipc.ExistentialError:
        return False
    except posix_ipc.Error as exc:
        raise _ipc_error("cannot unlink semaphore", name, exc) from exc
    return True


class NamedLock:
    """A counting lock over a named semaphore that another process created.

    Opened, never created (the parent owns and unlinks the name): a worker's
    PF concurrency gate, a multifd channel's frame lock.
    """

    def __init__(self, name: str) -> None:
        self._sem = open_semaphore(name)

    def acquire(self, timeout: float | None = None) -> bool:
        return acquire(self._sem, timeout)

    def release(self) -> None:
        release(self._sem)

    def close(self) -> None:
        close_semaphore(self._sem)


def _map(shm: posix_ipc.SharedMemory) -> mmap.mmap:
    try:
        return mmap.mmap(shm.fd, shm.size)
    finally:
        shm.close_fd()  # pitfall 3: the mapping keeps the object alive


def create_shm(name: str, size: int) -> mmap.mmap:
    """Create a zero-filled shared-memory object (``O_CREX``, 0600) and map it.

    :raises IPCError: the name exists already or cannot be created.
    """
    if size <= 0:
        raise UsageError(f"shared memory size must be > 0, got {size}")
    try:
        shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, MODE, size)
    except posix_ipc.Error as exc:
        raise _ipc_error("cannot create shared memory", name, exc) from exc
    return _map(shm)


def open_shm(name: str) -> mmap.mmap:
    """Open and map an existing shared-memory object; never creates one.

    :raises IPCError: it does not exist (unlinked already?) or is not ours.
    """
    try:
        shm = posix_ipc.SharedMemory(name)
    except posix_ipc.Error as exc:
        raise _ipc_error("cannot open shared memory", name, exc) from exc
    if shm.size <= 0:
        shm.close_fd()
        raise IPCError(f"shared memory {name!r} is empty")
    return _map(shm)


def unlink_shm(name: str) -> bool:
    """Remove a shared-memory object's name; ``False`` when already gone."""
    try:
        posix_ipc.unlink_shared_memory(name)
    except posix_ipc.ExistentialError:
        return False
    except posix_ipc.Error as exc:
        raise _ipc_error("cannot unlink shared memory", name, exc) from exc
    return True


def try_acquire(sem: Semaphore) -> bool:
    """Take one token if one is there right now (``sem_trywait``)."""
    try:
        sem.acquire(0)
    except posix_ipc.BusyError:
        return False
    except posix_ipc.SignalError:  # sem_trywait never blocks; be safe anyway
        return False
    return True


def acquire(sem: Semaphore, timeout: float | None) -> bool:
    """Take one token, waiting at most ``timeout`` seconds (``None``: forever).

    Returns ``True`` when a token was taken, ``False`` on timeout.  EINTR is
    retried with the time that remains of the monotonic deadline; the hook of
    :func:`set_signal_hook` runs after each interruption and may raise.
    """
    if timeout is None:
        while True:
            try:
                sem.acquire(None)
            except posix_ipc.SignalError:
                if _signal_hook is not None:
                    _signal_hook()
                continue
            return True
    if timeout <= 0:
        return try_acquire(sem)
    deadline = time.monotonic() + timeout
    remaining = timeout
    while True:
        try:
            sem.acquire(remaining)
        except posix_ipc.BusyError:
            # The realtime deadline passed; trust it only if the monotonic
            # one did too (a wall-clock step forward ends the wait early).
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            continue
        except posix_ipc.SignalError:
            if _signal_hook is not None:
                _signal_hook()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return try_acquire(sem)
            continue
        return True


def release(sem: Semaphore, n: int = 1) -> None:
    """Post ``n`` tokens (``sem_post`` ``n`` times)."""
    try:
        for _ in range(n):
            sem.release()
    except posix_ipc.Error as exc:
        raise _ipc_error("cannot release semaphore", sem.name, exc) from exc


def drain(sem: Semaphore) -> int:
    """Take every token that is there now; returns how many were taken."""
    n = 0
    while try_acquire(sem):
        n += 1
    return n
