"""The mpvfio error tree (layer 0: imports nothing from mpvfio).

Every error says whose fault it was::

    Exception
     └── MpvfioError                  root of everything mpvfio raises
          ├── UsageError (ValueError) the caller asked for something invalid
          │    └── ProfileError       an unknown or malformed device profile
          ├── StateError              a call arrived in the wrong run state
          ├── MigrationBlockedError   the device set cannot migrate (R4.6)
          ├── DeviceError             the device (or its driver) failed
          │    └── TransitionError    a VFIO state transition failed (errno)
          ├── IPCError                a POSIX IPC object failed or is missing
          │    └── BarrierError       the cross-process barrier is broken
          │         └── BarrierTimeout   ... because a party never arrived
          ├── WorkerError             a device worker process failed
          │    ├── WorkerCrashed      it died (exit code or signal named)
          │    └── WorkerTimeout      it did not answer within its deadline
          ├── TransportError          a migration socket failed (URI, errno)
          │    ├── TransportTimeout   ... because a deadline passed
          │    ├── TransportCancelled ... because a Cancel token stopped it
          │    └── PeerClosedError    ... because the peer closed early
          ├── StreamError             the main-channel stream is malformed
          ├── MultifdError            a multifd packet or channel is invalid
          │    ├── MultifdCancelled   reassembly was cancelled
          │    └── MultifdTimeout     no next packet before the deadline
          ├── MigrationError          a migration failed (side and stage)
          └── InternalError           a bug in mpvfio: please report it

All errors pickle (they cross the parent/worker boundary): each keeps the
positional arguments of its constructor in ``args`` and rebuilds from them.
A cause from another process arrives as ``__cause__ = RemoteTraceback(text)``.
"""

from __future__ import annotations

import errno as _errno
import os as _os
import signal as _signal
from typing import Any

__all__ = [
    "BarrierError",
    "BarrierTimeout",
    "DeviceError",
    "IPCError",
    "InternalError",
    "MigrationBlockedError",
    "MigrationError",
    "MpvfioError",
    "MultifdCancelled",
    "MultifdError",
    "MultifdTimeout",
    "PeerClosedError",
    "ProfileError",
    "RemoteTraceback",
    "StateError",
    "StreamError",
    "TransitionError",
    "TransportCancelled",
    "TransportError",
    "TransportTimeout",
    "UsageError",
    "WorkerCrashed",
    "WorkerError",
    "WorkerTimeout",
    "errno_name",
    "exitcode_name",
]


def errno_name(err: int) -> str:
    """Return ``'EINVAL'`` for 22 (the symbolic name of a positive errno)."""
    return _errno.errorcode.get(abs(err), f"E{abs(err)}")


def exitcode_name(exitcode: int | None) -> str:
    """Name a process exit code the way loky does: ``SIGKILL(-9)``, ``EXIT(3)``."""
    if exitcode is None:
        return "RUNNING"
    if exitcode < 0:
        try:
            return f"{_signal.Signals(-exitcode).name}({exitcode})"
        except ValueError:
            return f"SIGNAL({exitcode})"
    return f"EXIT({exitcode})"


class MpvfioError(Exception):
    """Root of every error mpvfio raises.

    Subclasses keep their constructor arguments in ``args`` so that
    ``pickle`` (and therefore the worker channel) rebuilds them exactly.
    """

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), self.args, self.__dict__ or None)

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else type(self).__name__


class UsageError(MpvfioError, ValueError):
    """The caller asked for something invalid (the caller's fault)."""


class ProfileError(UsageError):
    """A device profile is unknown, malformed or out of range."""


class StateError(MpvfioError):
    """A call arrived in a run state that does not allow it."""


class MigrationBlockedError(MpvfioError):
    """The VM cannot migrate with this device set (QEMU.md R4.6/R4.7)."""


class DeviceError(MpvfioError):
    """The device or its driver failed (the device's fault).

    :param message: what happened.
    :param device: the device's name (qdev id) or ``""``.
    :param err: a positive errno, or 0 when none applies.
    """

    def __init__(self, message: str, device: str = "", err: int = 0) -> None:
        super().__init__(message, device, err)
        self.device = device
        self.errno = err

    def __str__(self) -> str:
        msg = str(self.args[0])
        parts = []
        if self.device:
            parts.append(f"device {self.device}")
        if self.errno:
            parts.append(errno_name(self.errno))
        return f"{msg} ({', '.join(parts)})" if parts else msg


class TransitionError(DeviceError):
    """A VFIO migration state transition failed.

    :param message: what happened.
    :param device: the device's name.
    :param err: the positive errno of the failed SET (EINVAL for an arc the
        kernel's FSM refuses).
    :param cur: name of the state the request started from.
    :param new: name of the requested state.
    """

    def __init__(
        self,
        message: str,
        device: str = "",
        err: int = _errno.EINVAL,
        cur: str = "",
        new: str = "",
    ) -> None:
        MpvfioError.__init__(self, message, device, err, cur, new)
        self.device = device
        self.errno = err
        self.cur = cur
        self.new = new


class IPCError(MpvfioError):
    """A POSIX IPC object could not be created, opened or used."""


class BarrierError(IPCError):
    """The cross-process barrier is broken: every party sees this error."""


class BarrierTimeout(BarrierError):
    """A party waited past its deadline; the barrier is now broken."""


class WorkerError(MpvfioError):
    """A device worker process failed.

    :param message: what happened.
    :param device: the device the worker drives.
    """

    def __init__(self, message: str, device: str = "") -> None:
        super().__init__(message, device)
        self.device = device

    def __str__(self) -> str:
        msg = str(self.args[0])
        return f"{msg} (device {self.device})" if self.device else msg


class WorkerCrashed(WorkerError):
    """A worker died; ``exitcode`` is the process exit code (< 0: signal)."""

    def __init__(
        self, message: str, device: str = "", exitcode: int | None = None
    ) -> None:
        MpvfioError.__init__(self, message, device, exitcode)
        self.device = device
        self.exitcode = exitcode

    def __str__(self) -> str:
        base = WorkerError.__str__(self)
        return f"{base} [{exitcode_name(self.exitcode)}]"


class WorkerTimeout(WorkerError):
    """A worker did not answer within its deadline (it may hang)."""


class InternalError(MpvfioError):
    """A bug in mpvfio: this should never happen; please report it."""


class RemoteTraceback(Exception):
    """The formatted traceback of an exception raised in another process."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb


# ------------------------------------------- migration streams and sockets


class TransportError(MpvfioError):
    """A migration stream socket failed (listen, connect, send, receive).

    :param message: what happened.
    :param uri: the URI involved, or ``""``.
    :param err: a positive errno, or 0 when none applies.
    """

    def __init__(self, message: str, uri: str = "", err: int = 0) -> None:
        super().__init__(message, uri, err)
        self.uri = uri
        self.errno = err

    def __str__(self) -> str:
        msg = str(self.args[0])
        parts = []
        if self.uri:
            parts.append(self.uri)
        if self.errno:
            parts.append(f"{errno_name(self.errno)}: {_os.strerror(self.errno)}")
        return f"{msg} ({', '.join(parts)})" if parts else msg


class TransportTimeout(TransportError):
    """A deadline passed before the operation completed."""


class TransportCancelled(TransportError):
    """A :class:`Cancel` token stopped the operation."""


class PeerClosedError(TransportError):
    """The peer closed the connection before all expected bytes arrived."""


class StreamError(MpvfioError):
    """The main-channel stream is malformed, truncated or unreadable.

    :param message: what was wrong, where (byte offset) and what was expected.
    :param offset: the byte offset of the offending item, or -1.
    """

    def __init__(self, message: str, offset: int = -1) -> None:
        super().__init__(message, offset)
        self.offset = offset


class MultifdError(MpvfioError):
    """A multifd packet or channel is invalid, or reassembly failed.

    :param message: what happened (it names the device and idx already).
    :param device: the device name, or ``""``.
    :param idx: the packet index concerned, or -1.
    """

    def __init__(self, message: str, device: str = "", idx: int = -1) -> None:
        super().__init__(message, device, idx)
        self.device = device
        self.idx = idx


class MultifdCancelled(MultifdError):
    """The reassembly was cancelled ("operation cancelled")."""


class MultifdTimeout(MultifdError):
    """A consumer waited past its deadline for the next packet."""


class MigrationError(MpvfioError):
    """A migration failed; ``stage`` names where (source or target side).

    :param message: what happened.
    :param stage: ``setup``, ``precopy``, ``stop``, ``data``, ``config``,
        ``complete`` on the source; ``accept``, ``load``, ``check``,
        ``start`` on the target.
    :param side: ``source`` or ``target``.
    """

    def __init__(self, message: str, stage: str = "", side: str = "source") -> None:
        super().__init__(message, stage, side)
        self.stage = stage
        self.side = side
        #: :func:`mpvfio.migration.local.run_local`: the forked target's report.
        self.target_report: dict[str, Any] | None = None

    def __str__(self) -> str:
        return f"migration failed ({self.side}, stage {self.stage}): {self.args[0]}"
