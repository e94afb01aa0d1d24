"""Names of mpvfio's POSIX IPC objects: per-run prefixes, clean-up, sweeping.

This module owns the naming scheme and the lifetime of the *names* (not of
the objects' contents):

* a run prefix is ``mpvfio-<pid>-<8 hex random>``; an object's POSIX name is
  ``"/" + prefix + "-" + suffix``.  Linux shows a semaphore as
  ``/dev/shm/sem.<prefix>-<suffix>`` and a shared-memory object as
  ``/dev/shm/<prefix>-<suffix>`` (PERF_LIMITS pitfall 1);
* :class:`NameRegistry` records every name its creator made and unlinks them
  all in :meth:`NameRegistry.unlink_all` (idempotent; also run by ``atexit``);
* :func:`sweep_stale` removes the ``/dev/shm`` entries of runs whose creator
  pid is dead (objects survive a SIGKILL of their creator).

Across a fork (data flow of the names)::

    parent (creator pid P)                      forked child (pid C != P)
    NameRegistry(prefix mpvfio-P-xxxxxxxx)      inherits a copy of the registry
      create -> add(name) ----- names ------->  opens the names (attach)
      unlink_all() / atexit: unlinks             unlink_all() / atexit: no-op,
                                                 because os.getpid() != P
    SIGKILL of P -> names stay in /dev/shm -> a later sweep_stale() sees that
    P is dead and unlinks every entry mpvfio-P-*, sem.mpvfio-P-*.

The pid test cannot tell a reused pid from the original process, so a sweep
may leave an entry behind (never remove a live one); entries of other pid
namespaces sharing ``/dev/shm`` are judged by this namespace's pids.
"""

from __future__ import annotations

import atexit
import os
import re
import secrets
from typing import Literal

import psutil

from mpvfio.errors import IPCError, UsageError
from mpvfio.ipc import posixobj

__all__ = [
    "PREFIX_RE",
    "SHM_DIR",
    "STALE_ENTRY_RE",
    "Kind",
    "NameRegistry",
    "make_prefix",
    "posix_name",
    "prefix_pid",
    "shm_entry",
    "sweep_stale",
]

#: Where Linux exposes POSIX semaphores and shared memory.
SHM_DIR = "/dev/shm"

#: A run prefix: ``mpvfio-<pid>-<8 lowercase hex>``.
PREFIX_RE = re.compile(r"^mpvfio-(?P<pid>[1-9][0-9]*)-(?P<rand>[0-9a-f]{8})$")

#: A ``/dev/shm`` entry made under a run prefix (``sem.`` for semaphores).
STALE_ENTRY_RE = re.compile(
    r"^(?:sem\.)?mpvfio-(?P<pid>[1-9][0-9]*)-[0-9a-f]{8}(?:-[^/]*)?$"
)

_SUFFIX_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")

Kind = Literal["sem", "shm"]


def make_prefix(pid: int | None = None) -> str:
    """Return a fresh run prefix ``mpvfio-<pid>-<8 hex>`` (pid: this process)."""
    return f"mpvfio-{os.getpid() if pid is None else pid}-{secrets.token_hex(4)}"


def prefix_pid(prefix: str) -> int:
    """Return the creator pid encoded in a run prefix.

    :raises UsageError: ``prefix`` is not a run prefix.
    """
    m = PREFIX_RE.match(prefix)
    if m is None:
        raise UsageError(f"not an mpvfio run prefix: {prefix!r}")
    return int(m["pid"])


def posix_name(prefix: str, suffix: str) -> str:
    """Return the POSIX name ``/<prefix>-<suffix>``.

    :raises UsageError: a part is empty or contains ``/`` or odd characters.
    """
    if not prefix or "/" in prefix or not _SUFFIX_RE.match(prefix):
        raise UsageError(f"bad IPC name prefix {prefix!r}")
    if not _SUFFIX_RE.match(suffix):
        raise UsageError(f"bad IPC name suffix {suffix!r}")
    return f"/{prefix}-{suffix}"


def shm_entry(name: str, kind: Kind) -> str:
    """Return the ``/dev/shm`` entry of POSIX ``name`` (``sem.`` for a sem)."""
    bare = name.lstrip("/")
    return f"sem.{bare}" if kind == "sem" else bare


class NameRegistry:
    """Every POSIX name one process created, to unlink them all exactly once.

    Only the creating process (``creator_pid``) may add names or unlink
    them; in a forked child the inherited copy is inert, so a worker's exit
    never removes its parent's objects.
    """

    def __init__(self, prefix: str | None = None) -> None:
        self._prefix = make_prefix() if prefix is None else prefix
        posix_name(self._prefix, "x")  # validates the prefix
        self._creator_pid = os.getpid()
        self._names: dict[str, Kind] = {}
        self._atexit_registered = False

    @property
    def prefix(self) -> str:
        """The run prefix (``mpvfio-<pid>-<8 hex>`` unless given)."""
        return self._prefix

    @property
    def creator_pid(self) -> int:
        """The pid of the process that made this registry."""
        return self._creator_pid

    def is_creator(self) -> bool:
        """``True`` in the creating process, ``False`` in a forked child."""
        return os.getpid() == self._creator_pid

    def name(self, suffix: str) -> str:
        """Return the POSIX name ``/<prefix>-<suffix>`` (records nothing)."""
        return posix_name(self._prefix, suffix)

    def add(self, name: str, kind: Kind) -> None:
        """Record a name this process just created (``kind``: sem or shm).

        :raises UsageError: called in a forked child, or a bad ``kind``.
        """
        if not self.is_creator():
            raise UsageError(
                f"NameRegistry of pid {self._creator_pid} used in pid {os.getpid()}"
            )
        if kind not in ("sem", "shm"):
            raise UsageError(f"bad IPC object kind {kind!r}")
        self._names[name] = kind
        if not self._atexit_registered:
            atexit.register(self._atexit)
            self._atexit_registered = True

    def __contains__(self, name: object) -> bool:
        return name in self._names

    def __len__(self) -> int:
        return len(self._names)

    def names(self) -> dict[str, Kind]:
        """A copy of the recorded names and their kinds."""
        return dict(self._names)

    def unlink(self, name: str) -> bool:
        """Unlink one recorded name and forget it; ``False`` if not unlinked.

        Does nothing (returns ``False``) in a forked child.
        """
        if not self.is_creator():
            return False
        kind = self._names.pop(name, None)
        if kind is None:
            return False
        return self._unlink(name, kind)

    @staticmethod
    def _unlink(name: str, kind: Kind) -> bool:
        if kind == "sem":
            return posixobj.unlink_semaphore(name)
        return posixobj.unlink_shm(name)

    def unlink_all(self) -> list[str]:
        """Unlink every recorded name; return those that were still there.

        Idempotent, and a no-op in a forked child.  Keeps going past an
        error and raises the first one at the end.
        """
        if not self.is_creator():
            return []
        removed: list[str] = []
        first_error: IPCError | None = None
        while self._names:
            name, kind = self._names.popitem()
            try:
                if self._unlink(name, kind):
                    removed.append(name)
            except IPCError as exc:
                first_error = first_error or exc
        if self._atexit_registered:
            atexit.unregister(self._atexit)
            self._atexit_registered = False
        if first_error is not None:
            raise first_error
        return removed

    def _atexit(self) -> None:
        try:
            self.unlink_all()
        except IPCError:
            pass

    def __enter__(self) -> NameRegistry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.unlink_all()

    def __repr__(self) -> str:
        return (
            f"NameRegistry({self._prefix!r}, creator={self._creator_pid}, "
            f"names={len(self._names)})"
        )


def _pid_alive(pid: int) -> bool:
    try:
        return psutil.pid_exists(pid)
    except (OSError, psutil.Error):
        return True  # cannot tell: keep the entry


def sweep_stale(shm_dir: str = SHM_DIR) -> list[str]:
    """Remove ``shm_dir`` entries ``[sem.]mpvfio-<pid>-*`` of dead pids.

    Returns the entry names removed (as listed in ``shm_dir``, e.g.
    ``sem.mpvfio-123-0a1b2c3d-bar0-mutex``).  Entries whose pid is alive,
    or that do not match the naming scheme, are never touched.
    """
    try:
        entries = sorted(os.listdir(shm_dir))
    except FileNotFoundError:
        return []
    alive: dict[int, bool] = {}
    removed: list[str] = []
    for entry in entries:
        m = STALE_ENTRY_RE.match(entry)
        if m is None:
            continue
        pid = int(m["pid"])
        if pid not in alive:
            alive[pid] = _pid_alive(pid)
        if alive[pid]:
            continue
        try:
            os.unlink(os.path.join(shm_dir, entry))
        except FileNotFoundError:
            continue  # another sweeper was faster
        except OSError as exc:
            raise IPCError(f"cannot remove stale {shm_dir}/{entry}: {exc}") from exc
        removed.append(entry)
    return removed
