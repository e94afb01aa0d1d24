"""The kernel VFIO backend: migration v2 ioctls on a VFIO cdev (layer 1).

:class:`KernelVFIODevice` drives a real device through the kernel uAPI
(../shared/spec/VFIO_UAPI.md), with :func:`fcntl.ioctl` and the exact
16-byte buffers of §4.4:

=========================  ==========  ============================
operation                  request     buffer (argsz, flags, data)
=========================  ==========  ============================
GET MIGRATION              0x3B75      16, 0x00010001, u64 out
GET MIG_DEVICE_STATE       0x3B75      16, 0x00010002, u32 state, s32 fd
SET MIG_DEVICE_STATE       0x3B75      16, 0x00020002, state, -1 -> data_fd
GET MIG_DATA_SIZE          0x3B75      16, 0x00010009, u64 out
PROBE DMA_LOGGING_START    0x3B75      32, 0x00060006 (PROBE|SET), zeros
VFIO_MIG_GET_PRECOPY_INFO  0x3B79      on the data fd: 24, 0, u64, u64
VFIO_DEVICE_RESET          0x3B6F      no argument
VFIO_DEVICE_BIND_IOMMUFD   0x3B76      16, 0, s32 iommufd, u32 out_devid
=========================  ==========  ============================

**Opening.**  Only the cdev interface is supported (``/dev/vfio/devices/
vfioN``, kernel 6.6+ with CONFIG_VFIO_DEVICE_CDEV), not the legacy
group/container one.  A cdev fd refuses every ioctl until it is bound to an
iommufd: the constructor opens ``/dev/iommu`` (or takes an iommufd you pass)
and issues VFIO_DEVICE_BIND_IOMMUFD (``struct vfio_device_bind_iommufd``:
u32 argsz = 16, u32 flags = 0, s32 iommufd, u32 out_devid; no VF token).
It attaches no IOAS: the migration ioctls do not need DMA mappings, but a
device whose driver insists on an attached IOAS will fail them, and dirty
page tracking (DMA_LOGGING) is not driven here, only probed.  The bind
layout is from the kernel headers, not yet exercised on hardware here; a
failing bind raises a :class:`~mpvfio.errors.DeviceError` naming the ioctl.
Pass ``fd=`` (an already bound device fd) to skip opening and binding.

**Errors.**  :func:`wrap_errno` is the boundary (psutil's
``wrap_exceptions`` habit): every public method turns :class:`OSError`
into :class:`~mpvfio.errors.DeviceError` naming the device, the ioctl and
the errno, or :class:`~mpvfio.errors.TransitionError` for a failed SET.
A failed SET is followed by a GET (the kernel does not report where a
failed walk stopped), and the state reached is in the message.

**Data.**  The data fd is the kernel's own: :meth:`KernelVFIODevice.read_data`
is ``os.read`` (ENOMSG, the temporary end of pre-copy data, gives ``None``;
0 bytes gives ``b""``), :meth:`KernelVFIODevice.write_data` is ``os.write``
until all is written.  The caller owns and closes the data fd.

**Arc records.**  Like vfio-user, the kernel hides the hops inside one SET:
one :class:`~mpvfio.devices.base.ArcRecord` per SET request.
"""

from __future__ import annotations

import errno as _errno
import fcntl
import functools
import os
import time
from collections.abc import Callable
from typing import Concatenate, ParamSpec, TypeVar

from mpvfio.devices.base import ArcRecord
from mpvfio.errors import DeviceError, MpvfioError, TransitionError, errno_name
from mpvfio.uapi.vfio import (
    BIND_IOMMUFD,
    DMA_LOGGING_CONTROL,
    FEATURE_HDR,
    FEATURE_MIG_DATA_SIZE,
    FEATURE_MIGRATION,
    IOMMU_DEV,
    PRECOPY_INFO,
    VFIO_DEVICE_BIND_IOMMUFD,
    VFIO_DEVICE_FEATURE,
    VFIO_DEVICE_FEATURE_GET,
    VFIO_DEVICE_FEATURE_PROBE,
    VFIO_DEVICE_FEATURE_SET,
    VFIO_DEVICE_RESET,
    VFIO_MIG_GET_PRECOPY_INFO,
    Feature,
    MigFlag,
    MigState,
    pack_feature,
    pack_mig_state,
    pack_precopy_info,
    unpack_mig_state,
    unpack_precopy_info,
)

__all__ = [
    "BIND_IOMMUFD",
    "IOMMU_DEV",
    "VFIO_DEVICE_BIND_IOMMUFD",
    "KernelVFIODevice",
    "wrap_errno",
]

_S = MigState
_P = ParamSpec("_P")
_R = TypeVar("_R")


class _SetFailed(OSError):
    """A failed SET, after the GET that found where the walk stopped."""

    def __init__(self, err: int, cur: MigState, new: MigState, now: str) -> None:
        super().__init__(err, os.strerror(err))
        self.cur = cur
        self.new = new
        self.now = now


def wrap_errno(
    ioctl: str,
) -> Callable[
    [Callable[Concatenate[KernelVFIODevice, _P], _R]],
    Callable[Concatenate[KernelVFIODevice, _P], _R],
]:
    """Translate :class:`OSError` from ``ioctl`` into mpvfio errors.

    A failed SET (raised internally as a private OSError subclass carrying
    the states) becomes :class:`TransitionError`; any other OSError becomes
    :class:`DeviceError`.  Both name the device, its path, the ioctl and
    the errno.  mpvfio errors pass through untouched.
    """

    def decorate(
        fn: Callable[Concatenate[KernelVFIODevice, _P], _R],
    ) -> Callable[Concatenate[KernelVFIODevice, _P], _R]:
        def wrapper(
            self: KernelVFIODevice, /, *args: _P.args, **kwargs: _P.kwargs
        ) -> _R:
            try:
                return fn(self, *args, **kwargs)
            except MpvfioError:
                raise
            except _SetFailed as exc:
                err = exc.errno or _errno.EIO
                raise TransitionError(
                    f"{ioctl} {exc.cur.name} -> {exc.new.name} on {self.path} "
                    f"failed: {errno_name(err)} ({os.strerror(err)}); "
                    f"the device is now in {exc.now}",
                    self.name,
                    err,
                    exc.cur.name,
                    exc.new.name,
                ) from None
            except OSError as exc:
                err = exc.errno or _errno.EIO
                raise DeviceError(
                    f"{ioctl} on {self.path} failed: {errno_name(err)} "
                    f"({os.strerror(err)})",
                    self.name,
                    err,
                ) from exc

        functools.update_wrapper(wrapper, fn)
        return wrapper

    return decorate


def _feature_buf(flags: int, data_size: int = 8, data: bytes = b"") -> bytearray:
    """A VFIO_DEVICE_FEATURE buffer: argsz = 8 + data_size, data zero-padded."""
    return bytearray(pack_feature(flags, data.ljust(data_size, b"\0")))


class KernelVFIODevice:
    """A VFIO cdev device with migration support (module docstring).

    :param path: ``/dev/vfio/devices/vfioN``.
    :param name: the device's name in errors and records (default: the path).
    :param fd: an already opened *and bound* device fd (owned from now on).
    :param iommufd: an open iommufd to bind to (not owned); default: open
        ``/dev/iommu`` (owned).
    """

    def __init__(
        self,
        path: str,
        *,
        name: str | None = None,
        fd: int | None = None,
        iommufd: int | None = None,
    ) -> None:
        self.path = path
        self.name = name or path
        self._arcs: list[ArcRecord] = []
        self._own_iommufd = -1
        self._closed = False
        self._flags: MigFlag | None = None
        if fd is not None:
            self.fd = fd
            self.devid: int | None = None
            return
        self.fd = self._open()
        try:
            self.devid = self._bind(iommufd)
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------ opening
    @wrap_errno("open")
    def _open(self) -> int:
        return os.open(self.path, os.O_RDWR | os.O_CLOEXEC)

    @wrap_errno("VFIO_DEVICE_BIND_IOMMUFD")
    def _bind(self, iommufd: int | None) -> int:
        if iommufd is None:
            try:
                iommufd = self._own_iommufd = os.open(
                    IOMMU_DEV, os.O_RDWR | os.O_CLOEXEC
                )
            except OSError as exc:
                raise DeviceError(
                    f"cannot open {IOMMU_DEV} to bind {self.path} "
                    f"({exc.strerror}); the cdev needs an iommufd "
                    "(CONFIG_IOMMUFD) or pass fd= with a bound device",
                    self.name,
                    exc.errno or _errno.ENODEV,
                ) from None
        buf = bytearray(BIND_IOMMUFD.pack(BIND_IOMMUFD.size, 0, iommufd, 0))
        fcntl.ioctl(self.fd, VFIO_DEVICE_BIND_IOMMUFD, buf, True)
        return int(BIND_IOMMUFD.unpack(buf)[3])

    def _check_open(self) -> None:
        if self._closed:
            raise DeviceError("device is closed", self.name, _errno.ENODEV)

    def _ioctl_feature(self, buf: bytearray) -> bytearray:
        self._check_open()
        fcntl.ioctl(self.fd, VFIO_DEVICE_FEATURE, buf, True)
        return buf

    # ------------------------------------------------------ the contract
    @wrap_errno("VFIO_DEVICE_FEATURE(GET MIGRATION)")
    def migration_flags(self) -> MigFlag:
        """GET feature MIGRATION (cached: the flags are static)."""
        if self._flags is None:
            buf = self._ioctl_feature(
                _feature_buf(VFIO_DEVICE_FEATURE_GET | Feature.MIGRATION)
            )
            (flags,) = FEATURE_MIGRATION.unpack_from(buf, FEATURE_HDR.size)
            self._flags = MigFlag(int(flags))
        return self._flags

    @wrap_errno("VFIO_DEVICE_FEATURE(GET MIG_DEVICE_STATE)")
    def get_state(self) -> MigState:
        """GET feature MIG_DEVICE_STATE."""
        return self._get_state()

    def _get_state(self) -> MigState:
        buf = self._ioctl_feature(
            _feature_buf(VFIO_DEVICE_FEATURE_GET | Feature.MIG_DEVICE_STATE)
        )
        state, _fd = unpack_mig_state(bytes(buf[FEATURE_HDR.size :]))
        if not 0 <= state < len(_S):
            raise DeviceError(
                f"kernel reports unknown migration state {state}",
                self.name,
                _errno.EPROTO,
            )
        return _S(state)

    @wrap_errno("VFIO_DEVICE_FEATURE(SET MIG_DEVICE_STATE)")
    def set_state(self, new: MigState) -> int | None:
        """SET feature MIG_DEVICE_STATE; the new data fd (caller's) or None."""
        self._check_open()
        cur = self._get_state()
        buf = _feature_buf(
            VFIO_DEVICE_FEATURE_SET | Feature.MIG_DEVICE_STATE,
            data=pack_mig_state(int(new)),
        )
        start = time.monotonic_ns()
        try:
            fcntl.ioctl(self.fd, VFIO_DEVICE_FEATURE, buf, True)
        except OSError as exc:
            end = time.monotonic_ns()
            err = exc.errno or _errno.EIO
            self._arcs.append(
                ArcRecord(self.name, cur, _S(new), start, end, False, err)
            )
            try:
                now = self._get_state().name
            except OSError as gexc:
                now = (
                    f"an unknown state (GET failed too: {errno_name(gexc.errno or 0)})"
                )
            raise _SetFailed(err, cur, _S(new), now) from None
        self._arcs.append(
            ArcRecord(self.name, cur, _S(new), start, time.monotonic_ns())
        )
        _state, data_fd = unpack_mig_state(bytes(buf[FEATURE_HDR.size :]))
        return data_fd if data_fd >= 0 else None

    @wrap_errno("read(data_fd)")
    def read_data(self, fd: int, n: int) -> bytes | None:
        """read() on the saving fd: ``None`` for ENOMSG, ``b""`` at the end."""
        try:
            return os.read(fd, n)
        except OSError as exc:
            if exc.errno == _errno.ENOMSG:
                return None
            raise

    @wrap_errno("write(data_fd)")
    def write_data(self, fd: int, data: bytes | memoryview) -> int:
        """write() all of ``data`` on the resuming fd."""
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            done += os.write(fd, view[done:])
        return done

    @wrap_errno("VFIO_MIG_GET_PRECOPY_INFO")
    def precopy_info(self, fd: int) -> tuple[int, int]:
        """VFIO_MIG_GET_PRECOPY_INFO on the data fd: (initial, dirty)."""
        buf = bytearray(pack_precopy_info())
        fcntl.ioctl(fd, VFIO_MIG_GET_PRECOPY_INFO, buf, True)
        return unpack_precopy_info(bytes(buf[: PRECOPY_INFO.size]))

    @wrap_errno("VFIO_DEVICE_FEATURE(GET MIG_DATA_SIZE)")
    def data_size(self) -> int:
        """GET feature MIG_DATA_SIZE: estimated bytes to finish STOP_COPY."""
        buf = self._ioctl_feature(
            _feature_buf(VFIO_DEVICE_FEATURE_GET | Feature.MIG_DATA_SIZE)
        )
        (length,) = FEATURE_MIG_DATA_SIZE.unpack_from(buf, FEATURE_HDR.size)
        return int(length)

    @wrap_errno("VFIO_DEVICE_FEATURE(PROBE DMA_LOGGING_START)")
    def probe_dma_logging(self) -> bool:
        """Whether the device can log dirty DMA pages (PROBE|SET of START)."""
        buf = _feature_buf(
            VFIO_DEVICE_FEATURE_PROBE
            | VFIO_DEVICE_FEATURE_SET
            | Feature.DMA_LOGGING_START,
            DMA_LOGGING_CONTROL.size,
        )
        try:
            self._ioctl_feature(buf)
        except OSError as exc:
            if exc.errno in (_errno.ENOTTY, _errno.EINVAL, _errno.EOPNOTSUPP):
                return False
            raise
        return True

    @wrap_errno("VFIO_DEVICE_RESET")
    def reset(self) -> None:
        """VFIO_DEVICE_RESET: sessions end, the state is RUNNING."""
        self._check_open()
        fcntl.ioctl(self.fd, VFIO_DEVICE_RESET)

    def take_arcs(self) -> list[ArcRecord]:
        """Records since the last call (one per SET request)."""
        arcs, self._arcs = self._arcs, []
        return arcs

    def close(self) -> None:
        """Close the device fd (and the iommufd it opened); idempotent."""
        if self._closed:
            return
        self._closed = True
        for fd in (getattr(self, "fd", -1), self._own_iommufd):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass

    def __repr__(self) -> str:
        return f"<KernelVFIODevice {self.name!r} fd={self.fd}>"
