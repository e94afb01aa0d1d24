"""One contract suite over every available device backend.

The same tests run against:

* ``emulated``: :class:`EmulatedDevice` in-process;
* ``vfio-user``: :class:`VFIOUserDevice` clients of a
  :class:`DeviceServer` running in a thread of this process (checksums come
  from the server-side devices through the client's checksum hook);
* ``kernel``: :class:`KernelVFIODevice` on ``/dev/vfio/devices/vfio*``,
  only when such devices exist, bind and report migration support;
  otherwise skipped with the reason.

At the end, vfio-user against a server in a *child process*: killing it
mid-transition, a silent server, SIGTERM, the PF concurrency limit.
"""

from __future__ import annotations

import errno
import glob
import itertools
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from mpvfio.devices.base import DeviceBackend
from mpvfio.devices.emulated import EmulatedDevice
from mpvfio.devices.kernel import KernelVFIODevice
from mpvfio.devices.profiles import Profile, get_profile, profile_from_dict
from mpvfio.devices.registry import SCHEMES, open_backend, parse_spec
from mpvfio.devices.vfio_user.client import VFIOUserDevice
from mpvfio.devices.vfio_user.server import DeviceServer
from mpvfio.errors import DeviceError, MpvfioError, TransitionError, UsageError
from mpvfio.uapi import fsm
from mpvfio.uapi.vfio import LEGAL_FLAG_SETS, MigFlag, MigState

S = MigState
INSTANT = get_profile("instant")
CHUNK = 1 << 20


# ---------------------------------------------------------------- harness


def _kernel_devices() -> tuple[list[str], str]:
    """Usable kernel devices, or the reason there are none."""
    paths = sorted(glob.glob("/dev/vfio/devices/vfio*"))
    if not paths:
        return [], "no /dev/vfio/devices/vfio* (no VFIO cdev devices on this host)"
    usable, why = [], []
    for path in paths:
        try:
            dev = KernelVFIODevice(path)
        except MpvfioError as exc:
            why.append(f"{path}: {exc}")
            continue
        try:
            if dev.migration_flags() & MigFlag.STOP_COPY:
                usable.append(path)
            else:
                why.append(f"{path}: no VFIO_MIGRATION_STOP_COPY")
        except MpvfioError as exc:
            why.append(f"{path}: {exc}")
        finally:
            dev.close()
    return usable, "; ".join(why)


@dataclass
class Harness:
    """Makes devices of one backend kind and cleans them up."""

    kind: str
    sockdir: str = ""
    kernel_paths: list[str] = field(default_factory=list)
    devices: list[DeviceBackend] = field(default_factory=list)
    servers: list[DeviceServer] = field(default_factory=list)
    fds: list[int] = field(default_factory=list)

    @property
    def emulates(self) -> bool:
        """Profiles, faults and checksums are available (not the kernel)."""
        return self.kind != "kernel"

    def make(self, n: int = 1, profile: Profile = INSTANT) -> list[DeviceBackend]:
        devs: list[DeviceBackend]
        if self.kind == "emulated":
            devs = [EmulatedDevice(f"emu{i}", profile) for i in range(n)]
        elif self.kind == "vfio-user":
            prefix = os.path.join(self.sockdir, f"s{len(self.servers)}-vf")
            srv = DeviceServer(prefix, n, profile).start()
            self.servers.append(srv)
            devs = [VFIOUserDevice(p, timeout=20) for p in srv.paths]
        else:
            if len(self.kernel_paths) < n:
                pytest.skip(f"needs {n} kernel devices, have {len(self.kernel_paths)}")
            devs = [KernelVFIODevice(p) for p in self.kernel_paths[:n]]
            for d in devs:
                if d.get_state() != S.RUNNING:
                    d.reset()
        self.devices.extend(devs)
        return devs

    def fd(self, fd: int | None) -> int:
        assert fd is not None, "expected a data fd"
        self.fds.append(fd)
        return fd

    def checksum(self, dev: DeviceBackend) -> str:
        assert isinstance(dev, EmulatedDevice | VFIOUserDevice)
        return dev.checksum()

    def cleanup(self) -> None:
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass
        for dev in self.devices:
            if self.kind == "kernel":
                try:
                    dev.reset()
                except MpvfioError:
                    pass
            dev.close()
        for srv in self.servers:
            srv.stop()


KERNEL_PATHS, KERNEL_WHY = _kernel_devices()
BACKENDS: list[Any] = ["emulated", "vfio-user"]
if KERNEL_PATHS:
    BACKENDS.append(pytest.param("kernel", marks=pytest.mark.kernel))


@pytest.mark.kernel
def test_kernel_backend_is_in_the_suite() -> None:
    """One visible skip (with the reason) instead of one per contract test."""
    if not KERNEL_PATHS:
        pytest.skip(f"kernel backend not in the contract suite: {KERNEL_WHY}")
    assert "kernel" in [getattr(b, "values", (b,))[0] for b in BACKENDS]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> Iterator[Harness]:
    kind: str = request.param
    h = Harness(kind)
    if kind == "kernel":
        h.kernel_paths = KERNEL_PATHS
    if kind == "vfio-user":
        h.sockdir = tempfile.mkdtemp(prefix="mpvc")  # AF_UNIX: 108-byte paths
    try:
        yield h
    finally:
        h.cleanup()
        if h.sockdir:
            shutil.rmtree(h.sockdir, ignore_errors=True)


def _needs_emulation(h: Harness) -> None:
    if not h.emulates:
        pytest.skip("needs a profile (faults, flags, checksums): emulated backends")


def drain(dev: DeviceBackend, fd: int, until_end: bool) -> bytes:
    """Read to ENOMSG (pre-copy) or to the end (STOP_COPY)."""
    out = bytearray()
    while True:
        chunk = dev.read_data(fd, CHUNK)
        if chunk is None:
            assert not until_end, "ENOMSG in STOP_COPY"
            return bytes(out)
        if not chunk:
            return bytes(out)
        out += chunk


def save_stop_copy(h: Harness, dev: DeviceBackend) -> bytes:
    fd = h.fd(dev.set_state(S.STOP_COPY))
    stream = drain(dev, fd, until_end=True)
    assert dev.set_state(S.STOP) is None
    return stream


def load(h: Harness, dev: DeviceBackend, stream: bytes) -> None:
    fd = h.fd(dev.set_state(S.RESUMING))
    assert dev.write_data(fd, stream) == len(stream)
    assert dev.set_state(S.RUNNING) is None


# ------------------------------------------------------------- the suite


def test_flags_include_stop_copy(backend: Harness) -> None:
    (dev,) = backend.make()
    flags = dev.migration_flags()
    assert flags & MigFlag.STOP_COPY
    if backend.emulates:
        assert flags == INSTANT.flags


@pytest.mark.parametrize("flags", LEGAL_FLAG_SETS, ids=fsm.flags_name)
def test_flags_are_reported_as_advertised(backend: Harness, flags: MigFlag) -> None:
    _needs_emulation(backend)
    (dev,) = backend.make(profile=INSTANT.replace(flags=flags))
    assert dev.migration_flags() == flags


@pytest.mark.parametrize("target", [s for s in S if s != S.ERROR], ids=lambda s: s.name)
def test_walk_to_each_state(backend: Harness, target: MigState) -> None:
    (dev,) = backend.make()
    flags = dev.migration_flags()
    if not fsm.supported(flags, target):
        pytest.skip(f"{target.name} needs flags the device lacks")
    fd = dev.set_state(target)
    if fd is not None:
        backend.fd(fd)
    path = fsm.walk(flags, S.RUNNING, target)
    assert (fd is not None) == fsm.returns_data_fd(path)
    assert dev.get_state() == target
    arcs = dev.take_arcs()
    if target != S.RUNNING:
        assert arcs and all(a.ok for a in arcs) and arcs[-1].dst == target
    assert dev.take_arcs() == []
    dev.reset()
    assert dev.get_state() == S.RUNNING


@pytest.mark.parametrize("via", [S.STOP_COPY, S.PRE_COPY], ids=lambda s: s.name)
def test_saving_states_walk_back_to_running(backend: Harness, via: MigState) -> None:
    (dev,) = backend.make()
    if not fsm.supported(dev.migration_flags(), via):
        pytest.skip(f"{via.name} not supported")
    fd = backend.fd(dev.set_state(via))
    assert dev.set_state(S.RUNNING) is None
    assert dev.get_state() == S.RUNNING
    with pytest.raises(DeviceError):  # the session ended with its state
        dev.read_data(fd, 16)


def test_round_trip_stop_copy(backend: Harness) -> None:
    src, dst = backend.make(2)
    if backend.emulates:
        before = backend.checksum(src)
        assert backend.checksum(dst) != before
    stream = save_stop_copy(backend, src)
    assert stream
    load(backend, dst, stream)
    assert dst.get_state() == S.RUNNING
    if backend.emulates:
        assert backend.checksum(dst) == backend.checksum(src) == before


def test_data_size_estimates_the_stream(backend: Harness) -> None:
    (dev,) = backend.make()
    size = dev.data_size()
    assert size >= 0
    if backend.emulates:
        assert size == len(save_stop_copy(backend, dev))


def test_precopy_enomsg_then_stop_copy(backend: Harness) -> None:
    src, dst = backend.make(2)
    if not src.migration_flags() & MigFlag.PRE_COPY:
        pytest.skip("no PRE_COPY")
    fd = backend.fd(src.set_state(S.PRE_COPY))
    initial, _dirty = src.precopy_info(fd)
    assert initial > 0 or not backend.emulates
    stream = bytearray(drain(src, fd, until_end=False))
    assert src.read_data(fd, CHUNK) is None  # ENOMSG again: still nothing
    if backend.emulates:
        assert stream
        assert src.precopy_info(fd) == (0, 0)
    assert src.set_state(S.STOP_COPY) is None  # same session, same fd
    with pytest.raises(DeviceError) as ei:
        src.precopy_info(fd)  # only valid in PRE_COPY(_P2P)
    assert ei.value.errno == errno.EINVAL
    stream += drain(src, fd, until_end=True)
    assert src.read_data(fd, CHUNK) == b""  # the end stays the end
    assert src.set_state(S.STOP) is None
    load(backend, dst, bytes(stream))
    if backend.emulates:
        assert backend.checksum(dst) == backend.checksum(src)


def test_blocked_arc_is_einval_and_changes_nothing(backend: Harness) -> None:
    (dev,) = backend.make()
    if not dev.migration_flags() & MigFlag.PRE_COPY:
        pytest.skip("no PRE_COPY")
    fd = backend.fd(dev.set_state(S.STOP_COPY))
    with pytest.raises(TransitionError) as ei:
        dev.set_state(S.PRE_COPY)
    assert ei.value.errno == errno.EINVAL
    assert (ei.value.cur, ei.value.new) == ("STOP_COPY", "PRE_COPY")
    assert dev.get_state() == S.STOP_COPY
    assert drain(dev, fd, until_end=True)  # the session is intact


@pytest.mark.parametrize("target", [S.ERROR, S.RUNNING_P2P], ids=lambda s: s.name)
def test_unrequestable_target_is_einval(backend: Harness, target: MigState) -> None:
    _needs_emulation(backend)
    no_p2p = INSTANT.replace(flags=MigFlag.STOP_COPY | MigFlag.PRE_COPY)
    (dev,) = backend.make(profile=no_p2p)
    with pytest.raises(TransitionError) as ei:
        dev.set_state(target)
    assert ei.value.errno == errno.EINVAL
    assert dev.get_state() == S.RUNNING


@pytest.mark.parametrize("how", ["garbage", "truncated"])
def test_bad_resume_data_ends_in_error_and_reset_recovers(
    backend: Harness, how: str
) -> None:
    src, dst = backend.make(2)
    if how == "garbage":
        stream = b"not a device state" * 10
    else:
        stream = save_stop_copy(backend, src)[:-10]
    fd = backend.fd(dst.set_state(S.RESUMING))
    dst.write_data(fd, stream)
    with pytest.raises(TransitionError) as ei:
        dst.set_state(S.RUNNING)
    assert ei.value.errno != 0
    state = dst.get_state()
    if backend.emulates:
        assert ei.value.errno == errno.EINVAL
        assert state == S.ERROR
        with pytest.raises(TransitionError) as ei2:
            dst.set_state(S.RUNNING)  # only reset leaves ERROR
        assert ei2.value.errno == errno.EINVAL
        assert dst.get_state() == S.ERROR
    else:  # the kernel allows RESUMING (mtty) or ERROR
        assert state in (S.ERROR, S.RESUMING)
    dst.reset()
    assert dst.get_state() == S.RUNNING
    good = save_stop_copy(backend, src) if how == "garbage" else None
    if good is not None:  # the device works again after the reset
        load(backend, dst, good)
        if backend.emulates:
            assert backend.checksum(dst) == backend.checksum(src)


def test_failed_arc_reports_where_the_walk_stopped(backend: Harness) -> None:
    _needs_emulation(backend)
    faulty = profile_from_dict(
        {
            "base": "instant",
            "faults": {
                "RUNNING_P2P>STOP": {"kind": "errno", "errno": "EIO", "times": 1}
            },
        }
    )
    (dev,) = backend.make(profile=faulty)
    with pytest.raises(TransitionError) as ei:
        dev.set_state(S.STOP_COPY)
    # (cur/new name the request for vfio-user and kernel, the failing arc
    # for the emulated device: not part of the contract checked here)
    assert ei.value.errno == errno.EIO
    assert dev.get_state() == S.RUNNING_P2P
    assert any(not a.ok and a.err == errno.EIO for a in dev.take_arcs())
    backend.fd(dev.set_state(S.STOP_COPY))  # the fault fired once
    assert dev.get_state() == S.STOP_COPY


def test_error_state_fault_then_reset(backend: Harness) -> None:
    _needs_emulation(backend)
    faulty = profile_from_dict(
        {"base": "instant", "faults": {"STOP>STOP_COPY": {"kind": "error-state"}}}
    )
    (dev,) = backend.make(profile=faulty)
    with pytest.raises(TransitionError):
        dev.set_state(S.STOP_COPY)
    assert dev.get_state() == S.ERROR
    dev.reset()
    assert dev.get_state() == S.RUNNING


def test_reset_ends_the_session(backend: Harness) -> None:
    (dev,) = backend.make()
    fd = backend.fd(dev.set_state(S.STOP_COPY))
    dev.reset()
    assert dev.get_state() == S.RUNNING
    with pytest.raises(DeviceError):
        dev.read_data(fd, 16)


def test_write_needs_the_resuming_session(backend: Harness) -> None:
    src, dst = backend.make(2)
    fd = backend.fd(src.set_state(S.STOP_COPY))
    with pytest.raises(DeviceError):
        dst.write_data(fd, b"x")  # another device's fd


def test_closed_device_refuses_calls(backend: Harness) -> None:
    (dev,) = backend.make()
    dev.close()
    with pytest.raises(DeviceError) as ei:
        dev.get_state()
    assert ei.value.errno == errno.ENODEV
    dev.close()  # idempotent


# --------------------------------------------------------------- registry


def test_registry_opens_emulated_and_vfio_user() -> None:
    dev = open_backend("emulated:instant", name="x")
    assert isinstance(dev, EmulatedDevice) and dev.name == "x"
    dev.close()
    sockdir = tempfile.mkdtemp(prefix="mpvr")
    try:
        with DeviceServer(os.path.join(sockdir, "vf"), 1, "instant") as srv:
            user = open_backend(f"vfio-user:{srv.paths[0]}", timeout=5)
            assert isinstance(user, VFIOUserDevice)
            assert isinstance(user, DeviceBackend)
            assert user.get_state() == S.RUNNING
            user.close()
    finally:
        shutil.rmtree(sockdir, ignore_errors=True)


@pytest.mark.parametrize(
    "spec", ["instant", "qemu:x", "emulated:", "vfio:/dev/vfio/12", "vfio-user:"]
)
def test_registry_refuses_bad_specs(spec: str) -> None:
    with pytest.raises(UsageError) as ei:
        parse_spec(spec)
    assert any(s in str(ei.value) for s in SCHEMES)


def test_registry_kernel_spec_reaches_the_kernel_backend() -> None:
    with pytest.raises(DeviceError) as ei:
        open_backend("vfio:/nonexistent/vfio0")
    assert ei.value.errno == errno.ENOENT


# -------------------------------------- vfio-user against a child process


class ChildServer:
    """``python -m mpvfio.devices.vfio_user.server`` in a child process."""

    def __init__(self, sockdir: str, profile: dict[str, Any], vfs: int = 1) -> None:
        prof = os.path.join(sockdir, "profile.json")
        with open(prof, "w") as f:
            json.dump(profile, f)
        self.prefix = os.path.join(sockdir, "vf")
        self.paths = [f"{self.prefix}{i}.sock" for i in range(vfs)]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mpvfio.devices.vfio_user.server",
             "--pf", self.prefix, "--vfs", str(vfs), "--profile", prof],
            stdout=subprocess.PIPE,
            bufsize=0,
        )  # fmt: skip
        assert self.proc.stdout is not None
        out = self.proc.stdout.fileno()
        deadline = time.monotonic() + 30
        text = b""
        while time.monotonic() < deadline and b"ready\n" not in text:
            ready, _, _ = select.select([out], [], [], 0.5)
            if ready:
                part = os.read(out, 4096)
                if not part:
                    break
                text += part
        if b"ready\n" not in text:
            self.kill()
            raise AssertionError(f"server did not become ready: {text!r}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture
def child() -> Iterator[Callable[..., ChildServer]]:
    sockdir = tempfile.mkdtemp(prefix="mpvk")
    made: list[ChildServer] = []

    def start(profile: dict[str, Any], vfs: int = 1) -> ChildServer:
        srv = ChildServer(sockdir, profile, vfs)
        made.append(srv)
        return srv

    yield start
    for srv in made:
        srv.kill()
    shutil.rmtree(sockdir, ignore_errors=True)


SLOW = {"name": "slow", "base": "instant", "arc_ms": {"RUNNING>RUNNING_P2P": 5000}}


def test_server_killed_mid_transition_is_a_clear_device_error(
    child: Callable[..., ChildServer],
) -> None:
    srv = child(SLOW)
    dev = VFIOUserDevice(srv.paths[0], timeout=30)
    killer = threading.Timer(0.3, srv.proc.kill)
    killer.start()
    t0 = time.monotonic()
    try:
        with pytest.raises(DeviceError) as ei:
            dev.set_state(S.STOP)
    finally:
        killer.join()
    assert time.monotonic() - t0 < 4.0  # not the 5 s arc, not the 30 s timeout
    exc = ei.value
    assert type(exc) is DeviceError and exc.errno == errno.ECONNRESET
    assert "closed the connection" in str(exc) and srv.paths[0] in str(exc)
    with pytest.raises(DeviceError) as ei:
        dev.get_state()
    assert ei.value.errno == errno.ENOTCONN
    dev.close()


def test_silent_server_hits_the_deadline(child: Callable[..., ChildServer]) -> None:
    srv = child(SLOW)
    dev = VFIOUserDevice(srv.paths[0], timeout=0.5)
    t0 = time.monotonic()
    with pytest.raises(DeviceError) as ei:
        dev.set_state(S.STOP)
    assert time.monotonic() - t0 < 3.0
    assert ei.value.errno == errno.ETIMEDOUT
    dev.close()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
def test_signal_stops_the_server_cleanly(
    child: Callable[..., ChildServer], sig: signal.Signals
) -> None:
    srv = child({"name": "i", "base": "instant"}, vfs=3)
    devs = [VFIOUserDevice(p, timeout=10) for p in srv.paths]
    backend_fd = devs[0].set_state(S.STOP_COPY)
    assert backend_fd is not None
    srv.proc.send_signal(sig)
    assert srv.proc.wait(10) == 0
    assert not any(os.path.exists(p) for p in srv.paths)
    for dev in devs:
        with pytest.raises(DeviceError):
            dev.get_state()
        dev.close()
    os.close(backend_fd)


def test_pf_concurrency_limit_is_shared_by_the_vfs() -> None:
    prof = INSTANT.replace(name="pf1", default_arc_ms=60.0, pf_concurrency=1)
    sockdir = tempfile.mkdtemp(prefix="mpvp")
    try:
        with DeviceServer(os.path.join(sockdir, "vf"), 3, prof) as srv:
            devs = [VFIOUserDevice(p, timeout=20) for p in srv.paths]
            threads = [
                threading.Thread(target=d.set_state, args=(S.STOP,)) for d in devs
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join(20)
            assert all(d.get_state() == S.STOP for d in devs)
            arcs = sorted(
                (a for i in range(3) for a in srv.device(i).take_arcs()),
                key=lambda a: a.start_ns,
            )
            assert len(arcs) == 6  # RUNNING -> RUNNING_P2P -> STOP, 3 VFs
            for a, b in itertools.pairwise(arcs):
                assert a.end_ns <= b.start_ns, "two arcs of one PF overlapped"
            for d in devs:
                d.close()
    finally:
        shutil.rmtree(sockdir, ignore_errors=True)
