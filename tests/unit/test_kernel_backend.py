"""The kernel VFIO backend: ioctl numbers and buffers against VFIO_UAPI.md.

``fcntl.ioctl`` is replaced by a recorder that checks every request number
and buffer and plays the kernel's part (fills the out fields, or fails with
an errno), so no VFIO device is needed.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

from mpvfio.devices import kernel
from mpvfio.devices.kernel import KernelVFIODevice
from mpvfio.errors import DeviceError, TransitionError
from mpvfio.uapi import vfio
from mpvfio.uapi.vfio import MigFlag, MigState

S = MigState
PATH = "/dev/vfio/devices/vfio7"

# VFIO_UAPI.md §1 and §4.4
FEATURE = 0x3B75
RESET = 0x3B6F
PRECOPY = 0x3B79
BIND = 0x3B76


@dataclass
class Call:
    fd: int
    req: int
    buf: bytes | None  # what the caller passed in


@dataclass
class FakeKernel:
    """Plays VFIO_DEVICE_FEATURE & co. for one device fd."""

    fd: int
    state: int = S.RUNNING
    flags: int = 0x7
    data_size: int = 4242
    fail: dict[int, tuple[int, int]] = field(default_factory=dict)  # new->(err,at)
    errors: dict[int, int] = field(default_factory=dict)  # flags word -> errno
    calls: list[Call] = field(default_factory=list)
    next_fd: int = 99

    def ioctl(
        self, fd: int, req: int, arg: bytearray | int = 0, mutate: bool = True
    ) -> int:
        buf = bytes(arg) if isinstance(arg, bytearray) else None
        self.calls.append(Call(fd, req, buf))
        if req == RESET:
            assert fd == self.fd and arg == 0
            self.state = S.RUNNING
            return 0
        assert isinstance(arg, bytearray)
        if req == BIND:
            argsz, flags, _iommufd, _devid = struct.unpack("<IIiI", arg)
            assert (argsz, flags) == (16, 0)
            struct.pack_into("<I", arg, 12, 5)
            return 0
        if req == PRECOPY:
            argsz, flags, _i, _d = struct.unpack("<IIQQ", arg)
            assert (len(arg), argsz, flags) == (24, 24, 0)
            struct.pack_into("<QQ", arg, 8, 1000, 24)
            return 0
        assert req == FEATURE and fd == self.fd
        argsz, word = struct.unpack_from("<II", arg)
        assert argsz == len(arg)
        if word in self.errors:
            raise OSError(self.errors[word], os.strerror(self.errors[word]))
        if word == 0x00010001:
            struct.pack_into("<Q", arg, 8, self.flags)
        elif word == 0x00010002:
            struct.pack_into("<Ii", arg, 8, self.state, -1)
        elif word == 0x00010009:
            struct.pack_into("<Q", arg, 8, self.data_size)
        elif word == 0x00020002:
            new, data_fd = struct.unpack_from("<Ii", arg, 8)
            assert data_fd == -1
            if new in self.fail:
                err, self.state = self.fail[new]
                struct.pack_into("<i", arg, 12, -1)  # a failed SET writes -1 too
                raise OSError(err, os.strerror(err))
            opens = new in (S.STOP_COPY, S.RESUMING, S.PRE_COPY)
            self.state = new
            struct.pack_into("<i", arg, 12, self.next_fd if opens else -1)
        elif word == 0x00060006:
            assert argsz == 8 + 24
        else:
            raise OSError(errno.EINVAL, "bad feature")
        return 0


@pytest.fixture
def devfd() -> Iterator[int]:
    fd = os.open(os.devnull, os.O_RDWR)
    yield fd
    try:
        os.close(fd)
    except OSError:
        pass


@pytest.fixture
def fk(monkeypatch: pytest.MonkeyPatch, devfd: int) -> FakeKernel:
    fake = FakeKernel(devfd)
    monkeypatch.setattr(fcntl, "ioctl", fake.ioctl)
    return fake


@pytest.fixture
def dev(fk: FakeKernel) -> KernelVFIODevice:
    return KernelVFIODevice(PATH, name="vf7", fd=fk.fd)


def test_ioctl_numbers_are_plain_io() -> None:
    assert vfio.VFIO_DEVICE_FEATURE == FEATURE == 15221
    assert vfio.VFIO_DEVICE_RESET == RESET == 15215
    assert vfio.VFIO_MIG_GET_PRECOPY_INFO == PRECOPY == 15225
    assert kernel.VFIO_DEVICE_BIND_IOMMUFD == BIND == 15222


def test_get_migration_buffer(dev: KernelVFIODevice, fk: FakeKernel) -> None:
    assert dev.migration_flags() == MigFlag(7)
    assert fk.calls == [Call(fk.fd, FEATURE, struct.pack("<IIQ", 16, 0x10001, 0))]
    dev.migration_flags()
    assert len(fk.calls) == 1  # cached: the flags are static


def test_get_state_and_data_size_buffers(dev: KernelVFIODevice, fk: FakeKernel) -> None:
    assert dev.get_state() == S.RUNNING
    assert dev.data_size() == 4242
    assert [c.buf for c in fk.calls] == [
        struct.pack("<IIQ", 16, 0x00010002, 0),
        struct.pack("<IIQ", 16, 0x00010009, 0),
    ]


def test_set_returns_the_data_fd(dev: KernelVFIODevice, fk: FakeKernel) -> None:
    assert dev.set_state(S.STOP) is None
    assert dev.set_state(S.STOP_COPY) == 99
    sets = [c.buf for c in fk.calls if c.buf and c.buf[4:8] == b"\x02\x00\x02\x00"]
    assert sets == [
        struct.pack("<IIIi", 16, 0x00020002, S.STOP, -1),
        struct.pack("<IIIi", 16, 0x00020002, S.STOP_COPY, -1),
    ]
    arcs = dev.take_arcs()
    assert [(a.src, a.dst, a.ok) for a in arcs] == [
        (S.RUNNING, S.STOP, True),
        (S.STOP, S.STOP_COPY, True),
    ]


def test_failed_set_gets_the_state_and_raises_transition_error(
    dev: KernelVFIODevice, fk: FakeKernel
) -> None:
    fk.fail[S.STOP_COPY] = (errno.EIO, S.RUNNING_P2P)
    with pytest.raises(TransitionError) as ei:
        dev.set_state(S.STOP_COPY)
    exc = ei.value
    assert (exc.errno, exc.cur, exc.new, exc.device) == (
        errno.EIO,
        "RUNNING",
        "STOP_COPY",
        "vf7",
    )
    text = str(exc)
    assert "SET MIG_DEVICE_STATE" in text and PATH in text and "EIO" in text
    assert "now in RUNNING_P2P" in text
    # GET (cur), SET, GET (where the walk stopped)
    words = [struct.unpack_from("<I", c.buf, 4)[0] for c in fk.calls if c.buf]
    assert words == [0x00010002, 0x00020002, 0x00010002]
    assert dev.take_arcs()[-1].err == errno.EIO


def test_errno_is_wrapped_naming_device_ioctl_errno(
    dev: KernelVFIODevice, fk: FakeKernel
) -> None:
    fk.errors[0x00010001] = errno.ENOTTY  # a device without migration ops
    with pytest.raises(DeviceError) as ei:
        dev.migration_flags()
    exc = ei.value
    assert type(exc) is DeviceError
    assert exc.errno == errno.ENOTTY and exc.device == "vf7"
    assert "GET MIGRATION" in str(exc) and PATH in str(exc) and "ENOTTY" in str(exc)
    assert isinstance(exc.__cause__, OSError)


def test_precopy_info_goes_to_the_data_fd(
    dev: KernelVFIODevice, fk: FakeKernel
) -> None:
    assert dev.precopy_info(1234) == (1000, 24)
    assert fk.calls == [Call(1234, PRECOPY, struct.pack("<IIQQ", 24, 0, 0, 0))]


def test_probe_dma_logging(dev: KernelVFIODevice, fk: FakeKernel) -> None:
    assert dev.probe_dma_logging() is True
    assert fk.calls[-1].buf == struct.pack("<II", 32, 0x00060006) + bytes(24)
    fk.errors[0x00060006] = errno.ENOTTY
    assert dev.probe_dma_logging() is False
    fk.errors[0x00060006] = errno.EIO
    with pytest.raises(DeviceError):
        dev.probe_dma_logging()


def test_reset(dev: KernelVFIODevice, fk: FakeKernel) -> None:
    dev.set_state(S.STOP)
    dev.reset()
    assert fk.calls[-1] == Call(fk.fd, RESET, None)
    assert dev.get_state() == S.RUNNING


def _read_with(
    monkeypatch: pytest.MonkeyPatch, dev: KernelVFIODevice, err: int
) -> Callable[[], bytes | None]:
    def fake_read(fd: int, n: int) -> bytes:
        raise OSError(err, os.strerror(err))

    def call() -> bytes | None:
        with monkeypatch.context() as m:
            m.setattr(os, "read", fake_read)
            return dev.read_data(55, 10)

    return call


def test_read_data_enomsg_is_none(
    monkeypatch: pytest.MonkeyPatch, dev: KernelVFIODevice
) -> None:
    assert _read_with(monkeypatch, dev, errno.ENOMSG)() is None
    with pytest.raises(DeviceError) as ei:
        _read_with(monkeypatch, dev, errno.ENODEV)()
    assert ei.value.errno == errno.ENODEV and "read(data_fd)" in str(ei.value)


def test_read_and_write_on_a_real_fd(dev: KernelVFIODevice) -> None:
    r, w = os.pipe()
    try:
        assert dev.write_data(w, memoryview(b"hello")) == 5
        os.close(w)
        w = -1
        assert dev.read_data(r, 10) == b"hello"
        assert dev.read_data(r, 10) == b""  # end of stream
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


def test_bind_iommufd_buffer(
    monkeypatch: pytest.MonkeyPatch, fk: FakeKernel, tmp_path: os.PathLike[str]
) -> None:
    path = os.path.join(tmp_path, "vfio3")
    with open(path, "wb"):
        pass
    dev = KernelVFIODevice(path, iommufd=77)
    try:
        assert dev.devid == 5
        bind = fk.calls[0]
        assert (bind.req, bind.buf) == (BIND, struct.pack("<IIiI", 16, 0, 77, 0))
    finally:
        dev.close()
    dev.close()  # idempotent
    with pytest.raises(DeviceError) as ei:
        dev.get_state()
    assert ei.value.errno == errno.ENODEV


def test_open_failure_names_the_path(tmp_path: os.PathLike[str]) -> None:
    missing = os.path.join(tmp_path, "vfio99")
    with pytest.raises(DeviceError) as ei:
        KernelVFIODevice(missing)
    assert ei.value.errno == errno.ENOENT and missing in str(ei.value)
    assert "open" in str(ei.value)


def test_bind_failure_closes_and_names_the_ioctl(
    monkeypatch: pytest.MonkeyPatch, tmp_path: os.PathLike[str]
) -> None:
    path = os.path.join(tmp_path, "vfio4")
    with open(path, "wb"):
        pass

    def refuse(fd: int, req: int, arg: object = 0, mutate: bool = True) -> int:
        raise OSError(errno.EBUSY, "busy")

    monkeypatch.setattr(fcntl, "ioctl", refuse)
    with pytest.raises(DeviceError) as ei:
        KernelVFIODevice(path, iommufd=3)
    assert ei.value.errno == errno.EBUSY
    assert "VFIO_DEVICE_BIND_IOMMUFD" in str(ei.value)
