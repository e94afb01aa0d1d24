"""Worker-side migration data path: a device sends its own state (layer 2).

QEMU.md R10.4: after the VM stop, each device's save thread takes the device
to STOP_COPY (recover STOP), reads its STOP_COPY data and queues 12-byte-header
packets (version 0, idx from 0, flags 0) on the multifd channels, then the
config as the last packet (flags = CONFIG_STATE).  In mpvfio the device's
**worker** does this, so N devices stream in parallel from N processes.

Data path on the source: the device's data fd is read in chunks of at most
1 MiB (VFIO_MIG_DEFAULT_DATA_BUFFER_SIZE) into one buffer, and each frame
goes out with one ``sendmsg`` of [wrapper + packet header, data] (a gather
write: the payload is not copied again in user space).  A channel shared by
several devices is serialised per frame with a lock (a named POSIX semaphore
across workers, a thread lock in the parent), so frames never interleave.
"""

from __future__ import annotations

import errno as _errno
import os
import socket
import time
from typing import Any, Protocol

from mpvfio.errors import DeviceError, MpvfioError
from mpvfio.ipc import posixobj
from mpvfio.vfiomig import DATA_BUFFER_SIZE, VFIOMigration
from mpvfio.wire.multifd import pack_packet_header, pack_wrapper

__all__ = ["FrameLock", "send_device_state", "worker_call"]


class FrameLock(Protocol):
    """Serialises whole frames on one channel."""

    def acquire(self, timeout: float | None = None) -> bool: ...

    def release(self) -> None: ...


def _send_frame(
    sock: socket.socket,
    lock: FrameLock | None,
    head: bytes,
    data: bytes,
    deadline: float,
    what: str,
) -> None:
    if lock is not None and not lock.acquire(max(0.0, deadline - time.monotonic())):
        raise MpvfioError(f"{what}: channel lock not free before the deadline")
    try:
        parts = [memoryview(head), memoryview(data)]
        while parts:
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            sent = sock.sendmsg(parts)
            while sent and parts:
                n = parts[0].nbytes
                if sent >= n:
                    sent -= n
                    parts.pop(0)
                else:
                    parts[0] = parts[0][sent:]
                    sent = 0
            parts = [p for p in parts if p.nbytes]
    except OSError as exc:
        raise MpvfioError(
            f"{what}: sending on the multifd channel failed: {exc}"
        ) from exc
    finally:
        if lock is not None:
            lock.release()


def send_device_state(
    mig: VFIOMigration,
    sock: socket.socket,
    lock: FrameLock | None,
    idstr: str,
    config_payload: bytes,
    timeout: float,
    chunk: int = DATA_BUFFER_SIZE,
) -> dict[str, Any]:
    """R10.4 for one device: STOP_COPY, data packets, config packet last.

    :return: ``{"packets", "bytes", "start_ns", "end_ns"}``.
    :raise DeviceError: the device failed to enter STOP_COPY or to read.
    :raise MpvfioError: the channel failed or the deadline passed.
    """
    start = time.monotonic_ns()
    deadline = time.monotonic() + timeout
    ret = mig.save_complete()
    if ret < 0:
        raise DeviceError(
            "could not enter STOP_COPY for the multifd send", mig.name, -ret
        )
    idx = 0
    total = 0
    while True:
        data = mig.read_chunk(chunk)
        if data is None:
            raise DeviceError(
                "read returned ENOMSG in STOP_COPY", mig.name, _errno.ENOMSG
            )
        if not data:
            break
        head = pack_wrapper(idstr, 12 + len(data)) + pack_packet_header(idx)
        _send_frame(sock, lock, head, data, deadline, f"device {mig.name} idx {idx}")
        idx += 1
        total += len(data)
    head = pack_wrapper(idstr, 12 + len(config_payload)) + pack_packet_header(
        idx, config=True
    )
    _send_frame(sock, lock, head, config_payload, deadline, f"device {mig.name} config")
    return {
        "packets": idx + 1,
        "bytes": total,
        "start_ns": start,
        "end_ns": time.monotonic_ns(),
    }


def worker_call(worker: Any, method: str, args: tuple[Any, ...], fds: list[int]) -> Any:
    """Migration operations that need file descriptors from the parent.

    ``mig_send(lock_name, idstr, config_payload, timeout)`` with one fd, the
    multifd channel socket: :func:`send_device_state` on this worker's device.
    The worker owns the received fds and closes them here.
    """
    try:
        if method == "mig_send":
            lock_name, idstr, config_payload, timeout = args
            if len(fds) != 1:
                raise MpvfioError(f"mig_send needs one channel fd, got {len(fds)}")
            sock = socket.socket(fileno=fds.pop())
            lock = posixobj.NamedLock(lock_name) if lock_name else None
            try:
                return send_device_state(
                    worker.mig, sock, lock, idstr, config_payload, timeout
                )
            finally:
                sock.close()
                if lock is not None:
                    lock.close()
        raise MpvfioError(f"unknown migration call {method!r}; valid: mig_send")
    finally:
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass
