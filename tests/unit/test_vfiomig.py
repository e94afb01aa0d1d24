"""Tests of mpvfio.vfiomig against QEMU.md R4.1-R4.6, R5, R6, R8.2, R8.9, R9.1, R12.

A scripted fake backend forces failures in chosen SETs and logs every call
together with the emitted events, so the order of SETs, resets and events
can be checked; the real EmulatedDevice runs the end-to-end flows.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from typing import Any

import pytest

from mpvfio.devices.base import DeviceBackend
from mpvfio.devices.emulated import EmulatedDevice
from mpvfio.devices.profiles import Fault, Profile, get_profile
from mpvfio.errors import DeviceError, MigrationBlockedError, TransitionError
from mpvfio.events import Event
from mpvfio.uapi.vfio import MigFlag, MigState
from mpvfio.vfiomig import (
    MigrationProps,
    VFIOMigration,
    check_multiple_devices,
    main_target,
    prepare_target,
)
from mpvfio.vmstate import RunState

S = MigState
F = MigFlag
ALL = F.STOP_COPY | F.P2P | F.PRE_COPY
QOM = "/machine/peripheral/vf0"
# QEMU.md R12.1, typed in
QAPI = {
    S.STOP: "stop",
    S.RUNNING: "running",
    S.STOP_COPY: "stop-copy",
    S.RESUMING: "resuming",
    S.RUNNING_P2P: "running-p2p",
    S.PRE_COPY: "pre-copy",
    S.PRE_COPY_P2P: "pre-copy-p2p",
}
EVENTS_ON = MigrationProps(migration_events=True)
SMALL = get_profile("instant").replace(
    name="small", state_size=12 * 1024, precopy_initial=4096, precopy_dirty=4096
)


# ------------------------------------------------------------------ fd checks
def _fd_links() -> dict[int, str]:
    out = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            out[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            pass
    return out


@pytest.fixture(autouse=True)
def _no_fd_leaks() -> Iterator[None]:
    before = _fd_links()
    yield
    leaked = {
        fd: link
        for fd, link in _fd_links().items()
        if before.get(fd) != link and ("memfd:mpvfio" in link or link == os.devnull)
    }
    assert not leaked, f"leaked fds: {leaked}"


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


# --------------------------------------------------------------- fake backend
class FakeBackend:
    """A DeviceBackend whose SETs succeed unless scripted to fail.

    ``fail[target]`` is a queue of errnos (or exceptions) for the next SETs
    to ``target``; ``fd_on`` holds the targets whose SET returns a new fd.
    Every call and every event (via :meth:`emit`) lands in ``log``.
    """

    def __init__(self, flags: F = ALL, name: str = "fake") -> None:
        self.name = name
        self.flags = flags
        self.state = S.RUNNING
        self.log: list[tuple[Any, ...]] = []
        self.fail: dict[S, list[int | Exception]] = {}
        self.fd_on: set[S] = set()
        self.fail_reset = False
        self.fds: list[int] = []

    def emit(self, event: Event) -> None:
        self.log.append(("EVENT", event.name, event.data["device-state"]))

    def sets(self) -> list[Any]:
        return [e[1] if e[0] == "SET" else e[0] for e in self.log if e[0] != "EVENT"]

    def events(self) -> list[tuple[str, str]]:
        return [(e[1], e[2]) for e in self.log if e[0] == "EVENT"]

    def migration_flags(self) -> F:
        return self.flags

    def get_state(self) -> S:
        return self.state

    def set_state(self, new: S) -> int | None:
        self.log.append(("SET", new))
        queue = self.fail.get(new)
        if queue:
            err = queue.pop(0)
            if isinstance(err, Exception):
                raise err
            raise TransitionError("injected", self.name, err, self.state.name, new.name)
        self.state = new
        if new in self.fd_on:
            fd = os.open(os.devnull, os.O_RDONLY)
            self.fds.append(fd)
            return fd
        return None

    def read_data(self, fd: int, n: int) -> bytes | None:
        self.log.append(("READ", fd, n))
        return b"data"

    def write_data(self, fd: int, data: bytes | memoryview) -> int:
        self.log.append(("WRITE", fd, bytes(data)))
        return len(data)

    def precopy_info(self, fd: int) -> tuple[int, int]:
        self.log.append(("INFO", fd))
        return (3, 4)

    def data_size(self) -> int:
        return 1000

    def reset(self) -> None:
        self.log.append(("RESET",))
        if self.fail_reset:
            raise DeviceError("reset failed", self.name, errno.EIO)
        self.state = S.RUNNING

    def close(self) -> None:
        pass

    def take_arcs(self) -> list[Any]:
        return []


class Migs:
    """Builds VFIOMigration objects and closes their data fds afterwards."""

    def __init__(self) -> None:
        self.migs: list[VFIOMigration] = []
        self.devs: list[EmulatedDevice] = []
        self.errors: list[TransitionError] = []

    def fake(
        self, flags: F = ALL, props: MigrationProps = EVENTS_ON, name: str = "vf0"
    ) -> tuple[VFIOMigration, FakeBackend]:
        be = FakeBackend(flags, name)
        mig = VFIOMigration(be, name, QOM, emit=be.emit, props=props,
                            on_error=self.errors.append)  # fmt: skip
        self.migs.append(mig)
        return mig, be

    def real(
        self,
        profile: Profile = SMALL,
        props: MigrationProps = EVENTS_ON,
        name: str = "vf0",
        key: str | None = None,
    ) -> tuple[VFIOMigration, EmulatedDevice, list[Event]]:
        dev = EmulatedDevice(name, profile, key=key)
        self.devs.append(dev)
        events: list[Event] = []
        mig = VFIOMigration(dev, name, QOM, emit=events.append, props=props,
                            on_error=self.errors.append)  # fmt: skip
        self.migs.append(mig)
        return mig, dev, events

    def close(self) -> None:
        for mig in self.migs:
            mig.close_data_fd()
        for dev in self.devs:
            dev.close()


@pytest.fixture
def migs() -> Iterator[Migs]:
    m = Migs()
    yield m
    m.close()


def states(events: list[Event]) -> list[str]:
    assert all(e.name == "VFIO_MIGRATION" for e in events)
    return [e.data["device-state"] for e in events]


# ------------------------------------------------------------------- R4 init
def test_init_defaults(migs: Migs) -> None:
    mig, be = migs.fake()
    assert isinstance(be, DeviceBackend)
    assert mig.device_state == S.RUNNING  # R4.2: assumed, never set
    assert mig.data_fd == -1
    assert be.log == []
    assert mig.has_p2p and mig.has_precopy
    mig2, _ = migs.fake(F.STOP_COPY, name="vf1")
    assert not mig2.has_p2p and not mig2.has_precopy


@pytest.mark.parametrize("flags", [F(0), F.P2P, F.P2P | F.PRE_COPY])
def test_init_requires_stop_copy(flags: F) -> None:
    with pytest.raises(DeviceError) as info:
        VFIOMigration(FakeBackend(flags), "vf0", QOM)
    assert info.value.errno == errno.EOPNOTSUPP


# --------------------------------------------------------------- R5.1 basics
def test_request_for_cached_state_is_a_noop(migs: Migs) -> None:
    props = MigrationProps(migration_events=True, prepare_events=True)
    mig, be = migs.fake(props=props)
    assert mig.set_state(S.RUNNING, S.ERROR) == 0
    assert mig.set_state_or_reset(S.RUNNING) == 0
    assert be.log == []  # no SET, no event
    assert mig.set_state(S.STOP, S.ERROR) == 0
    be.log.clear()
    assert mig.set_state(S.STOP, S.RUNNING) == 0
    assert be.log == []


def test_noop_is_decided_by_the_cached_state(migs: Migs) -> None:
    mig, be = migs.fake()
    be.state = S.STOP  # the device moved behind QEMU's back
    assert mig.set_state(S.RUNNING, S.ERROR) == 0
    assert be.log == []
    assert mig.set_state(S.STOP, S.ERROR) == 0
    assert be.sets() == [S.STOP]


def test_success_caches_and_emits(migs: Migs) -> None:
    mig, be = migs.fake()
    events: list[Event] = []
    mig2 = VFIOMigration(be, "vf0", QOM, emit=events.append, props=EVENTS_ON)
    assert mig2.set_state(S.RUNNING_P2P, S.ERROR) == 0
    assert mig2.device_state == S.RUNNING_P2P
    assert len(events) == 1
    assert events[0].name == "VFIO_MIGRATION"
    assert events[0].data == {
        "device-id": "vf0",
        "qom-path": QOM,
        "device-state": "running-p2p",
    }
    assert mig.device_state == S.RUNNING  # the other object's cache is its own


def test_set_comes_before_its_event(migs: Migs) -> None:
    mig, be = migs.fake()
    mig.set_state(S.STOP, S.ERROR)
    assert be.log == [("SET", S.STOP), ("EVENT", "VFIO_MIGRATION", "stop")]


@pytest.mark.parametrize("target", [s for s in S if s != S.ERROR])
def test_event_uses_qapi_names(migs: Migs, target: S) -> None:
    mig, be = migs.fake()
    if target == S.RUNNING:
        mig.set_state(S.STOP, S.ERROR)
        be.log.clear()
    assert mig.set_state(target, S.ERROR) == 0
    assert ("EVENT", "VFIO_MIGRATION", QAPI[target]) == be.log[-1]
    mig.close_data_fd()


def test_no_events_without_migration_events(migs: Migs) -> None:
    mig, be = migs.fake(props=MigrationProps())
    be.fail[S.STOP_COPY] = [errno.EIO]
    be.fail[S.STOP] = [errno.EIO]
    mig.set_state(S.PRE_COPY_P2P, S.ERROR)
    mig.set_state(S.STOP_COPY, S.STOP)  # fails, recovery fails, reset
    mig.set_state(S.STOP, S.ERROR)
    assert be.events() == []


def test_emit_none_is_fine(migs: Migs) -> None:
    be = FakeBackend()
    mig = VFIOMigration(be, "vf0", QOM, props=MigrationProps(True, True))
    be.fail[S.STOP] = [errno.EIO]
    assert mig.set_state(S.STOP, S.ERROR) == -errno.EIO
    assert mig.set_state(S.RUNNING_P2P, S.ERROR) == 0


def test_data_fd_is_stored(migs: Migs) -> None:
    mig, be = migs.fake()
    be.fd_on = {S.PRE_COPY}
    assert mig.set_state(S.PRE_COPY, S.RUNNING) == 0
    assert mig.data_fd == be.fds[0]
    assert is_open(mig.data_fd)
    assert mig.read_chunk(10) == b"data"
    assert mig.precopy_info() == (3, 4)
    assert ("READ", be.fds[0], 10) in be.log
    mig.close_data_fd()
    assert mig.data_fd == -1
    assert not is_open(be.fds[0])


# ------------------------------------------------------- R5.1 step 2 / R12.3
def test_pre_copy_p2p_prepare_precedes_the_set(migs: Migs) -> None:
    mig, be = migs.fake()
    mig.set_state(S.PRE_COPY, S.RUNNING)
    be.log.clear()
    assert mig.set_state(S.PRE_COPY_P2P, S.ERROR) == 0
    assert be.log == [
        ("EVENT", "VFIO_MIGRATION", "pre-copy-p2p-prepare"),
        ("SET", S.PRE_COPY_P2P),
        ("EVENT", "VFIO_MIGRATION", "pre-copy-p2p"),
    ]
    be.log.clear()
    assert mig.set_state(S.PRE_COPY_P2P, S.ERROR) == 0  # no-op: no event
    assert be.log == []


def test_pre_copy_p2p_prepare_only_for_that_target(migs: Migs) -> None:
    mig, be = migs.fake()
    for target in (S.PRE_COPY, S.RUNNING, S.RUNNING_P2P, S.STOP, S.STOP_COPY):
        mig.set_state(target, S.ERROR)
    assert all(state != "pre-copy-p2p-prepare" for _, state in be.events())


def test_pre_copy_p2p_prepare_needs_migration_events(migs: Migs) -> None:
    mig, be = migs.fake(props=MigrationProps(migration_events=False))
    mig.set_state(S.PRE_COPY_P2P, S.ERROR)
    assert be.log == [("SET", S.PRE_COPY_P2P)]


def test_pre_copy_p2p_prepare_then_failure(migs: Migs) -> None:
    """R12.3: the prepare event does not promise the pre-copy-p2p one."""
    mig, be = migs.fake()
    mig.set_state(S.PRE_COPY, S.RUNNING)
    be.log.clear()
    be.fail[S.PRE_COPY_P2P] = [errno.EIO]
    assert mig.set_state(S.PRE_COPY_P2P, S.ERROR) == -errno.EIO
    assert be.log == [
        ("EVENT", "VFIO_MIGRATION", "pre-copy-p2p-prepare"),
        ("SET", S.PRE_COPY_P2P),
        ("RESET",),
        ("EVENT", "VFIO_MIGRATION", "running"),
    ]


def test_prepare_events_before_every_set(migs: Migs) -> None:
    mig, be = migs.fake(props=MigrationProps(prepare_events=True))
    for target in (S.RUNNING_P2P, S.STOP, S.STOP, S.STOP_COPY):
        mig.set_state(target, S.ERROR)
    assert be.log == [
        ("EVENT", "VFIO_MIGRATION_PREPARE", "running-p2p"),
        ("SET", S.RUNNING_P2P),
        ("EVENT", "VFIO_MIGRATION_PREPARE", "stop"),
        ("SET", S.STOP),
        # the second STOP request is a no-op: nothing at all
        ("EVENT", "VFIO_MIGRATION_PREPARE", "stop-copy"),
        ("SET", S.STOP_COPY),
    ]


def test_prepare_events_with_migration_events(migs: Migs) -> None:
    props = MigrationProps(migration_events=True, prepare_events=True)
    mig, be = migs.fake(props=props)
    be.fail[S.STOP] = [errno.EBUSY]
    assert mig.set_state(S.STOP, S.RUNNING_P2P) == -errno.EBUSY
    assert be.log == [
        ("EVENT", "VFIO_MIGRATION_PREPARE", "stop"),
        ("SET", S.STOP),
        ("SET", S.RUNNING_P2P),
        ("EVENT", "VFIO_MIGRATION", "running-p2p"),
    ]


def test_prepare_events_default_off() -> None:
    assert MigrationProps().prepare_events is False
    assert MigrationProps().migration_events is False


# ------------------------------------------------------- R5.1 failure paths
def test_failure_recovers_to_recover_state(migs: Migs) -> None:
    mig, be = migs.fake()
    mig.set_state(S.STOP, S.ERROR)
    be.log.clear()
    be.fail[S.STOP_COPY] = [errno.ENOSPC]
    assert mig.set_state(S.STOP_COPY, S.STOP) == -errno.ENOSPC
    assert mig.device_state == S.STOP
    assert be.log == [
        ("SET", S.STOP_COPY),
        ("SET", S.STOP),  # SET(recover) is issued even if the device is there
        ("EVENT", "VFIO_MIGRATION", "stop"),  # the event for the recover state
    ]
    assert len(mig.errors) == 1
    assert mig.errors[0].errno == errno.ENOSPC
    assert mig.errors[0].device == "vf0"
    assert migs.errors == mig.errors  # on_error saw it


def test_recover_event_even_when_state_is_unchanged(migs: Migs) -> None:
    """R12.2: the recover-state set emits its event."""
    mig, be = migs.fake()
    be.fail[S.PRE_COPY] = [errno.EIO]
    assert mig.set_state(S.PRE_COPY, S.RUNNING) == -errno.EIO
    assert mig.device_state == S.RUNNING
    assert be.events() == [("VFIO_MIGRATION", "running")]


def test_recover_failing_takes_the_reset_path(migs: Migs) -> None:
    mig, be = migs.fake()
    mig.set_state(S.PRE_COPY_P2P, S.ERROR)
    be.log.clear()
    be.fail[S.STOP_COPY] = [errno.EIO]
    be.fail[S.STOP] = [errno.EBUSY]
    assert mig.set_state(S.STOP_COPY, S.STOP) == -errno.EIO  # the FIRST errno
    assert mig.device_state == S.RUNNING
    assert be.state == S.RUNNING
    assert be.log == [
        ("SET", S.STOP_COPY),
        ("SET", S.STOP),
        ("RESET",),
        ("EVENT", "VFIO_MIGRATION", "running"),
    ]
    assert len(mig.errors) == 1
    assert mig.errors[0].errno == errno.EIO


def test_recover_error_means_reset(migs: Migs) -> None:
    mig, be = migs.fake()
    be.fail[S.RUNNING_P2P] = [errno.ETIMEDOUT]
    assert mig.set_state_or_reset(S.RUNNING_P2P) == -errno.ETIMEDOUT
    assert mig.device_state == S.RUNNING
    assert be.log == [
        ("SET", S.RUNNING_P2P),
        ("RESET",),
        ("EVENT", "VFIO_MIGRATION", "running"),
    ]
    be.log.clear()
    be.fail[S.STOP] = [errno.EIO]
    assert mig.set_state(S.STOP, S.ERROR) == -errno.EIO
    assert S.ERROR not in be.sets()  # ERROR is never requested


def test_reset_failing_is_fatal(migs: Migs) -> None:
    """R5.1 step 7: a failing reset ioctl is hw_error (here: it raises)."""
    mig, be = migs.fake()
    be.fail[S.STOP] = [errno.EIO]
    be.fail_reset = True
    with pytest.raises(DeviceError):
        mig.set_state_or_reset(S.STOP)


def test_device_error_is_a_failure_too(migs: Migs) -> None:
    mig, be = migs.fake()
    be.fail[S.STOP] = [DeviceError("gone", "fake", errno.ENODEV)]
    assert mig.set_state(S.STOP, S.RUNNING_P2P) == -errno.ENODEV
    assert mig.device_state == S.RUNNING_P2P
    assert isinstance(mig.errors[0], TransitionError)
    assert mig.errors[0].errno == errno.ENODEV


def test_failure_without_errno_is_eio(migs: Migs) -> None:
    mig, be = migs.fake()
    be.fail[S.STOP] = [DeviceError("vague", "fake", 0)]
    assert mig.set_state(S.STOP, S.RUNNING) == -errno.EIO


def test_second_data_fd_is_closed_with_ebadf(migs: Migs) -> None:
    mig, be = migs.fake()
    be.fd_on = {S.PRE_COPY, S.STOP_COPY}
    assert mig.set_state(S.PRE_COPY, S.RUNNING) == 0
    first = mig.data_fd
    be.log.clear()
    assert mig.set_state(S.STOP_COPY, S.STOP) == -errno.EBADF
    second = be.fds[1]
    assert not is_open(second)  # closed by the migration layer
    assert mig.data_fd == first and is_open(first)
    assert mig.device_state == S.STOP_COPY  # the cached state stays new
    assert be.log == [("SET", S.STOP_COPY), ("EVENT", "VFIO_MIGRATION", "stop-copy")]
    assert mig.errors[-1].errno == errno.EBADF
    assert mig.errors[-1].cur == "PRE_COPY"
    assert mig.errors[-1].new == "STOP_COPY"


def test_recover_that_opens_a_session_does_not_leak(migs: Migs) -> None:
    """A recover SET that returns a data fd: kept (none held) or closed."""
    mig, be = migs.fake()
    mig.set_state(S.STOP, S.ERROR)
    be.fd_on = {S.STOP_COPY}
    be.fail[S.RESUMING] = [errno.EIO]
    assert mig.set_state(S.RESUMING, S.STOP_COPY) == -errno.EIO
    assert mig.device_state == S.STOP_COPY
    assert mig.data_fd == be.fds[0]
    # with an fd already held, the recover fd is closed
    mig2, be2 = migs.fake(name="vf1")
    be2.fd_on = {S.STOP_COPY, S.PRE_COPY}
    mig2.set_state(S.PRE_COPY, S.RUNNING)
    be2.fail[S.RESUMING] = [errno.EIO]
    assert mig2.set_state(S.RESUMING, S.STOP_COPY) == -errno.EIO
    assert mig2.data_fd == be2.fds[0]
    assert not is_open(be2.fds[1])


# ---------------------------------------------------------- R6.1/R6.2 tables
@pytest.mark.parametrize("cached", list(S))
def test_prepare_target(cached: S) -> None:
    expect = S.PRE_COPY_P2P if cached == S.PRE_COPY else S.RUNNING_P2P
    assert prepare_target(cached) == expect


@pytest.mark.parametrize("runstate", list(RunState))
@pytest.mark.parametrize("cached", list(S))
def test_main_target(cached: S, runstate: RunState) -> None:
    assert main_target(cached, True, runstate) == S.RUNNING
    stop_copy = cached in (S.PRE_COPY, S.PRE_COPY_P2P) and runstate in (
        RunState.FINISH_MIGRATE,
        RunState.PAUSED,
    )
    assert main_target(cached, False, runstate) == (
        S.STOP_COPY if stop_copy else S.STOP
    )


@pytest.mark.parametrize(
    "runstate", [RunState.SHUTDOWN, RunState.SAVE_VM, RunState.IO_ERROR]
)
@pytest.mark.parametrize("cached", [S.PRE_COPY, S.PRE_COPY_P2P])
def test_main_target_other_stops_give_stop(cached: S, runstate: RunState) -> None:
    assert main_target(cached, False, runstate) == S.STOP


def test_handlers_read_the_cached_state_at_call_time(migs: Migs) -> None:
    mig, be = migs.fake()
    mig.set_state(S.PRE_COPY, S.RUNNING)
    assert mig.vmstate_change_prepare(False, RunState.FINISH_MIGRATE) == 0
    assert mig.device_state == S.PRE_COPY_P2P
    assert mig.vmstate_change(False, RunState.FINISH_MIGRATE) == 0
    assert mig.device_state == S.STOP_COPY
    # start after a failed migration: STOP_COPY -> RUNNING_P2P -> RUNNING
    assert mig.vmstate_change_prepare(True, RunState.RUNNING) == 0
    assert mig.device_state == S.RUNNING_P2P
    assert mig.vmstate_change(True, RunState.RUNNING) == 0
    assert mig.device_state == S.RUNNING
    assert be.sets() == [
        S.PRE_COPY,
        S.PRE_COPY_P2P,
        S.STOP_COPY,
        S.RUNNING_P2P,
        S.RUNNING,
    ]


@pytest.mark.parametrize("running", [True, False])
def test_handlers_never_raise_on_device_failure(migs: Migs, running: bool) -> None:
    mig, be = migs.fake()
    for target in S:
        be.fail[target] = [errno.EIO] * 10
    rs = RunState.RUNNING if running else RunState.FINISH_MIGRATE
    assert mig.vmstate_change_prepare(running, rs) == -errno.EIO
    assert mig.device_state == S.RUNNING  # reset
    if not running:
        assert mig.vmstate_change(running, rs) == -errno.EIO
        assert mig.device_state == S.RUNNING
    assert be.sets().count("RESET") >= 1
    assert len(migs.errors) >= 1


def test_handlers_never_raise_with_a_real_faulty_device(migs: Migs) -> None:
    prof = SMALL.replace(
        faults={
            "RUNNING>RUNNING_P2P": Fault("error-state", err=errno.EPROTO),
        }
    )
    mig, dev, events = migs.real(prof)
    assert mig.vmstate_change_prepare(False, RunState.FINISH_MIGRATE) == -errno.EPROTO
    assert dev.get_state() == S.RUNNING  # reset out of ERROR
    assert mig.device_state == S.RUNNING
    assert states(events) == ["running"]
    assert mig.vmstate_change(False, RunState.FINISH_MIGRATE) == -errno.EPROTO
    assert mig.device_state == S.RUNNING


# -------------------------------------------------------------------- R4.6
def test_check_multiple_devices() -> None:
    check_multiple_devices([], [])
    check_multiple_devices([F.STOP_COPY], ["solo"])  # one device: fine
    check_multiple_devices([F.STOP_COPY | F.P2P] * 3, ["a", "b", "c"])
    with pytest.raises(MigrationBlockedError) as info:
        check_multiple_devices([F.STOP_COPY | F.P2P, F.STOP_COPY], ["good", "bad"])
    msg = str(info.value)
    assert "bad" in msg
    assert "good" not in msg.replace("supported", "")
    assert "P2P" in msg
    with pytest.raises(MigrationBlockedError) as info:
        check_multiple_devices(
            [F.STOP_COPY | F.PRE_COPY, ALL, F.STOP_COPY], ["x1", "x2", "x3"]
        )
    assert "x1" in str(info.value) and "x3" in str(info.value)
    assert "x2" not in str(info.value)


# ------------------------------------------------------------- R8.2 / R8.9
def test_save_setup_running_to_pre_copy(migs: Migs) -> None:
    mig, dev, events = migs.real()
    assert mig.save_setup() == 0
    assert mig.device_state == S.PRE_COPY
    assert dev.get_state() == S.PRE_COPY
    assert mig.data_fd != -1
    initial, dirty = mig.precopy_info()
    assert initial > 0 and dirty == 0
    assert states(events) == ["pre-copy"]


def test_save_setup_on_stop_stays_stop(migs: Migs) -> None:
    mig, dev, events = migs.real()
    mig.set_state(S.STOP, S.ERROR)
    dev.take_arcs()
    events.clear()
    assert mig.save_setup() == 0
    assert mig.device_state == S.STOP
    assert dev.take_arcs() == []
    assert events == []
    assert mig.data_fd == -1


def test_save_setup_without_pre_copy_is_a_noop(migs: Migs) -> None:
    mig, dev, _ = migs.real(SMALL.replace(flags=F.STOP_COPY | F.P2P))
    assert mig.save_setup() == 0
    assert mig.device_state == S.RUNNING
    assert dev.take_arcs() == []
    assert mig.data_fd == -1


def test_save_setup_other_state_is_einval(migs: Migs) -> None:
    mig, be = migs.fake()
    mig.set_state(S.RUNNING_P2P, S.ERROR)
    be.log.clear()
    assert mig.save_setup() == -errno.EINVAL
    assert be.log == []
    assert mig.device_state == S.RUNNING_P2P


def test_save_setup_failure_recovers_running(migs: Migs) -> None:
    prof = SMALL.replace(faults={"RUNNING>PRE_COPY": Fault("errno", err=errno.ENOMEM)})
    mig, dev, events = migs.real(prof)
    assert mig.save_setup() == -errno.ENOMEM
    assert mig.device_state == S.RUNNING
    assert dev.get_state() == S.RUNNING
    assert mig.data_fd == -1
    assert states(events) == ["running"]


def test_save_cleanup_from_stop_copy(migs: Migs) -> None:
    mig, dev, _ = migs.real()
    mig.set_state(S.STOP, S.ERROR)
    assert mig.save_complete() == 0
    assert mig.device_state == S.STOP_COPY
    fd = mig.data_fd
    assert fd != -1
    assert mig.save_cleanup() == 0
    assert mig.device_state == S.STOP
    assert dev.get_state() == S.STOP
    assert mig.data_fd == -1
    assert not is_open(fd)


def test_save_cleanup_elsewhere_only_closes(migs: Migs) -> None:
    mig, be = migs.fake()
    be.fd_on = {S.PRE_COPY}
    mig.save_setup()
    mig.set_state(S.RUNNING, S.ERROR)  # a failed migration restarted the VM
    fd = mig.data_fd
    be.log.clear()
    assert mig.save_cleanup() == 0
    assert be.log == []  # no SET
    assert mig.data_fd == -1
    assert not is_open(fd)
    assert mig.save_cleanup() == 0  # idempotent


def test_save_cleanup_failure_resets(migs: Migs) -> None:
    mig, be = migs.fake()
    be.fd_on = {S.STOP_COPY}
    mig.set_state(S.STOP, S.ERROR)
    mig.save_complete()
    be.fail[S.STOP] = [errno.EIO]
    be.log.clear()
    assert mig.save_cleanup() == -errno.EIO
    assert mig.device_state == S.RUNNING
    assert mig.data_fd == -1
    assert be.sets() == [S.STOP, "RESET"]


def test_save_complete_is_a_noop_after_pre_copy(migs: Migs) -> None:
    mig, dev, events = migs.real()
    mig.save_setup()
    mig.vmstate_change_prepare(False, RunState.FINISH_MIGRATE)
    mig.vmstate_change(False, RunState.FINISH_MIGRATE)
    dev.take_arcs()
    events.clear()
    assert mig.save_complete() == 0
    assert dev.take_arcs() == []
    assert events == []


def test_save_complete_failure_recovers_stop(migs: Migs) -> None:
    prof = SMALL.replace(faults={"STOP>STOP_COPY": Fault("errno", err=errno.EIO)})
    mig, _, _ = migs.real(prof)
    mig.set_state(S.STOP, S.ERROR)
    assert mig.save_complete() == -errno.EIO
    assert mig.device_state == S.STOP
    assert mig.data_fd == -1


# --------------------------------------------------------------------- R9.1
def test_load_setup_resuming(migs: Migs) -> None:
    mig, dev, events = migs.real()
    assert mig.load_setup() == 0
    assert mig.device_state == S.RESUMING
    assert dev.get_state() == S.RESUMING
    assert mig.data_fd != -1
    assert states(events) == ["resuming"]


def test_load_setup_failure_recovers_current_state(migs: Migs) -> None:
    mig, be = migs.fake()
    be.fail[S.RESUMING] = [errno.EIO]
    assert mig.load_setup() == -errno.EIO
    assert be.sets() == [S.RESUMING, S.RUNNING]
    assert mig.device_state == S.RUNNING
    mig.set_state(S.STOP, S.ERROR)
    be.log.clear()
    be.fail[S.RESUMING] = [errno.EIO]
    assert mig.load_setup() == -errno.EIO
    assert be.sets() == [S.RESUMING, S.STOP]
    assert mig.device_state == S.STOP


def test_chunks_need_a_data_fd(migs: Migs) -> None:
    mig, _ = migs.fake()
    with pytest.raises(DeviceError) as info:
        mig.read_chunk()
    assert info.value.errno == errno.EBADF
    with pytest.raises(DeviceError) as info:
        mig.write_chunk(b"x")
    assert info.value.errno == errno.EBADF


# ---------------------------------------------------------------- end to end
def _source(mig: VFIOMigration, runstate: RunState) -> bytes:
    """R8.10: save_setup, iterate, stop the VM, complete, cleanup."""
    assert mig.save_setup() == 0
    data = bytearray()
    while mig.has_precopy and (chunk := mig.read_chunk(1500)) is not None:
        assert chunk
        data += chunk
    if mig.has_p2p:
        assert mig.vmstate_change_prepare(False, runstate) == 0
    assert mig.vmstate_change(False, runstate) == 0
    assert mig.save_complete() == 0
    while chunk := mig.read_chunk():
        data += chunk
    assert mig.read_chunk() == b""
    return bytes(data)


def _destination(mig: VFIOMigration, data: bytes) -> None:
    """R9.6: load_setup, write, vm_start (prepare + cb), load_cleanup."""
    assert mig.load_setup() == 0
    for i in range(0, len(data), 4000):
        mig.write_chunk(data[i : i + 4000])
    if mig.has_p2p:
        assert mig.vmstate_change_prepare(True, RunState.RUNNING) == 0
    assert mig.vmstate_change(True, RunState.RUNNING) == 0
    mig.close_data_fd()


@pytest.mark.parametrize(
    "flags",
    [F.STOP_COPY, F.STOP_COPY | F.P2P, F.STOP_COPY | F.PRE_COPY, ALL],
    ids=["sc", "sc+p2p", "sc+pre", "all"],
)
def test_end_to_end(migs: Migs, flags: F) -> None:
    prof = SMALL.replace(flags=flags)
    src, sdev, sev = migs.real(prof, name="src")
    data = _source(src, RunState.FINISH_MIGRATE)
    checksum = sdev.checksum()
    assert src.device_state == S.STOP_COPY
    assert src.save_cleanup() == 0
    assert src.device_state == S.STOP
    assert src.data_fd == -1
    expect = (["pre-copy"] if flags & F.PRE_COPY else []) + (
        ["pre-copy-p2p-prepare", "pre-copy-p2p"]
        if flags & F.PRE_COPY and flags & F.P2P
        else ["running-p2p"]
        if flags & F.P2P
        else []
    )
    expect += ["stop-copy"] if flags & F.PRE_COPY else ["stop", "stop-copy"]
    expect += ["stop"]
    assert states(sev) == expect
    dst, ddev, dev_events = migs.real(prof, name="dst")
    assert ddev.checksum() != checksum
    _destination(dst, data)
    assert ddev.checksum() == checksum
    assert dst.device_state == S.RUNNING
    assert ddev.get_state() == S.RUNNING
    assert states(dev_events) == ["resuming"] + (
        ["running-p2p"] if flags & F.P2P else []
    ) + ["running"]
    assert src.errors == [] and dst.errors == []


def test_user_stop_during_pre_copy_keeps_the_fd(migs: Migs) -> None:
    """R6.2: PAUSED during pre-copy goes to STOP_COPY, the saving fd lives."""
    mig, _, _ = migs.real()
    mig.save_setup()
    fd = mig.data_fd
    mig.vmstate_change_prepare(False, RunState.PAUSED)
    mig.vmstate_change(False, RunState.PAUSED)
    assert mig.device_state == S.STOP_COPY
    assert mig.data_fd == fd
    assert mig.read_chunk()


@pytest.mark.parametrize(
    "runstate", [RunState.SHUTDOWN, RunState.SAVE_VM, RunState.IO_ERROR]
)
def test_other_stops_during_pre_copy_end_the_session(
    migs: Migs, runstate: RunState
) -> None:
    mig, dev, _ = migs.real()
    mig.save_setup()
    mig.vmstate_change_prepare(False, runstate)
    assert mig.device_state == S.PRE_COPY_P2P
    mig.vmstate_change(False, runstate)
    assert mig.device_state == S.STOP
    assert dev.get_state() == S.STOP
    with pytest.raises(DeviceError) as info:
        mig.read_chunk()
    assert info.value.errno == errno.ENODEV


def test_bad_load_resets_to_running(migs: Migs) -> None:
    """A failed RESUMING -> STOP (ERROR) is reset by the prepare handler."""
    mig, dev, events = migs.real()
    assert mig.load_setup() == 0
    mig.write_chunk(b"not a stream")
    assert mig.vmstate_change_prepare(True, RunState.RUNNING) == -errno.EINVAL
    assert mig.device_state == S.RUNNING
    assert dev.get_state() == S.RUNNING
    assert states(events) == ["resuming", "running"]
    assert mig.errors[0].errno == errno.EINVAL
