"""Named POSIX semaphores, locks and shared memory for the rest of mpvfio.

The public face of :mod:`mpvfio.ipc._posix` (the only module that imports
``posix_ipc``): workers, the machine and the migration engine use these
typed helpers and never ``posix_ipc`` itself.  Every helper keeps the
guarantees listed in :mod:`mpvfio.ipc._posix` (``O_CREX`` and mode 0o600,
EINTR-safe monotonic timeouts, fd closed right after a mapping, idempotent
unlink).
"""

from __future__ import annotations

from mpvfio.ipc._posix import (
    NamedLock,
    Semaphore,
    acquire,
    close_semaphore,
    create_semaphore,
    create_shm,
    drain,
    open_semaphore,
    open_shm,
    release,
    try_acquire,
    unlink_semaphore,
    unlink_shm,
)

__all__ = [
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
    "try_acquire",
    "unlink_semaphore",
    "unlink_shm",
]
