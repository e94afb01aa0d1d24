"""The device backend contract (layer 1).

Every backend (the built-in emulated VF; later vfio-user and kernel VFIO)
offers the same operations with the kernel uAPI's semantics
(../shared/spec/VFIO_UAPI.md):

* ``migration_flags()``      GET feature MIGRATION (VFIO_MIGRATION_* bits)
* ``set_state(new)``         SET feature MIG_DEVICE_STATE: walks the kernel's
                             combination path; returns a new data fd (owned
                             by the caller) when the last arc opens a session,
                             else ``None``; raises :class:`TransitionError`
                             and leaves the device where the walk stopped
* ``get_state()``            GET feature MIG_DEVICE_STATE
* ``read_data(fd, n)``       read() on the saving fd: bytes, ``b""`` at the
                             end of STOP_COPY, ``None`` for ENOMSG (the
                             temporary end of PRE_COPY data)
* ``write_data(fd, data)``   write() on the resuming fd
* ``precopy_info(fd)``       VFIO_MIG_GET_PRECOPY_INFO: (initial, dirty)
* ``data_size()``            GET feature MIG_DATA_SIZE (stop_copy_length)
* ``reset()``                VFIO_DEVICE_RESET: back to RUNNING
* ``close()``

Each successful arc is recorded as an :class:`ArcRecord` (timing per arc).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from mpvfio.uapi.vfio import MigFlag, MigState

__all__ = ["ArcGate", "ArcRecord", "DeviceBackend", "ThreadGate"]


@dataclass(frozen=True)
class ArcRecord:
    """One arc a device executed (times are ``time.monotonic_ns()``)."""

    device: str
    src: MigState
    dst: MigState
    start_ns: int
    end_ns: int
    ok: bool = True
    err: int = 0

    @property
    def ms(self) -> float:
        """Duration in milliseconds."""
        return (self.end_ns - self.start_ns) / 1e6

    def to_dict(self) -> dict[str, object]:
        """JSON-able form."""
        return {
            "device": self.device,
            "src": self.src.name,
            "dst": self.dst.name,
            "start_ns": self.start_ns,
            "end_ns": self.end_ns,
            "ms": round(self.ms, 3),
            "ok": self.ok,
            "err": self.err,
        }


class ArcGate(Protocol):
    """A counting gate shared by the VFs of one PF (PF concurrency limit)."""

    def acquire(self, timeout: float | None = None) -> bool: ...

    def release(self) -> None: ...


class ThreadGate:
    """An :class:`ArcGate` for devices of one process (threads).

    ``threading.BoundedSemaphore.acquire``'s first parameter is
    ``blocking``: the device's ``acquire(timeout)`` is passed on by keyword.
    """

    def __init__(self, limit: int) -> None:
        self._sem = threading.BoundedSemaphore(limit)

    def acquire(self, timeout: float | None = None) -> bool:
        return self._sem.acquire(timeout=timeout)

    def release(self) -> None:
        self._sem.release()


@runtime_checkable
class DeviceBackend(Protocol):
    """What the VFIO migration layer needs from a device (module docstring)."""

    name: str

    def migration_flags(self) -> MigFlag: ...

    def get_state(self) -> MigState: ...

    def set_state(self, new: MigState) -> int | None: ...

    def read_data(self, fd: int, n: int) -> bytes | None: ...

    def write_data(self, fd: int, data: bytes | memoryview) -> int: ...

    def precopy_info(self, fd: int) -> tuple[int, int]: ...

    def data_size(self) -> int: ...

    def reset(self) -> None: ...

    def close(self) -> None: ...

    def take_arcs(self) -> list[ArcRecord]: ...
