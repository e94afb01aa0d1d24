"""Failed and cancelled migrations: the source rolls back, the target never runs.

For every way a migration can fail before the commit (the target process
killed, the connection dropped, a malformed stream from either side, device
data the target rejects, a cancel at each source and target stage, device
errors on the source) the source takes QEMU's failed path (QEMU.md R7.2):
its VM runs again, every device is RUNNING with its state bytes unchanged;
the target resets its devices and its VM never enters ``running``; the
error is a :class:`MigrationError` naming the stage and side.  The profile
dirties nothing during pre-copy, so "unchanged" means "equal to the
checksums taken before the migration".  After the commit the rule turns
around: the source never restarts unless the target says it did not start.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from _helpers import (
    EVENTS,
    HAS_CALL_FDS,
    MachineFactory,
    cancel_at,
    machine_factory,
    pair,
    ran,
    real_states,
    started_source,
)

from mpvfio.devices.profiles import Fault, MiB, Profile
from mpvfio.machine import Machine
from mpvfio.migration import engine
from mpvfio.migration.engine import STAGES, MigrationError, MigrationParams
from mpvfio.migration.local import PairResult, migrate_pair, run_local
from mpvfio.net.transport import (
    Cancel,
    Channels,
    accept_channels,
    listen,
    new_session,
    open_channels,
    sendall_deadline,
)
from mpvfio.uapi.vfio import MigFlag, MigState
from mpvfio.vmstate import RunState

S = MigState
#: 64 KiB of state, 16 KiB pre-copied, nothing dirtied: the state a source
#: rolls back to is exactly the state it started with.
STABLE = Profile(name="stable", default_arc_ms=1.0, precopy_dirty=0)
NOPRE = Profile(
    name="stable-nopre",
    flags=MigFlag.STOP_COPY | MigFlag.P2P,
    default_arc_ms=1.0,
    precopy_dirty=0,
)
#: 8 MiB through a 16 MB/s data fd: pre-copy takes about half a second.
SLOW = Profile(
    name="slow",
    default_arc_ms=1.0,
    state_size=8 * MiB,
    precopy_initial=8 * MiB,
    precopy_dirty=0,
    bandwidth=16e6,
)
#: 8 MiB, 64 KiB of it pre-copied: the STOP_COPY data takes about 0.5 s.
SLOWSTOP = SLOW.replace(name="slowstop", precopy_initial=64 * 1024)
TARGET_STAGES = ("accept", "load", "check", "start")

pytestmark = pytest.mark.timeout(60)


def params(channels: int = 0, **kw: Any) -> MigrationParams:
    return MigrationParams(
        **{"timeout": 10.0, "connect_retry_s": 0.5, "multifd_channels": channels, **kw}
    )


@pytest.fixture
def machine() -> Iterator[MachineFactory]:
    with machine_factory("serial", 2, STABLE) as make:
        yield make


def checksums(m: Machine) -> dict[str, str]:
    return {d.name: d.checksum() for d in m.devices}


def check_rolled_back(src: Machine, before: dict[str, str]) -> None:
    """R7.2: the VM runs, every device RUNNING, no state lost."""
    assert src.vm.runstate == RunState.RUNNING
    assert [d.state for d in src.devices] == [S.RUNNING] * len(src.devices)
    assert real_states(src) == [S.RUNNING] * len(src.devices)
    assert checksums(src) == before
    # and it can migrate again afterwards: nothing is left half open
    for d in src.devices:
        assert d.call("save_setup") == 0
        d.call("save_cleanup")
        assert d.call("set_state", int(S.RUNNING)) == 0


def check_target_reset(dst: Machine) -> None:
    """The target's devices were reset; its VM never ran."""
    assert real_states(dst) == [S.RUNNING] * len(dst.devices)
    assert not ran(dst)
    assert dst.vm.runstate == RunState.INMIGRATE


def check_failed_pair(
    src: Machine, dst: Machine, res: PairResult, before: dict[str, str]
) -> MigrationError:
    assert isinstance(res.error, MigrationError), res.error
    assert isinstance(res.target_error, MigrationError), res.target_error
    assert res.error.side in ("source", "target")
    assert res.target_error.side == "target"
    assert res.target_info is None
    check_rolled_back(src, before)
    check_target_reset(dst)
    return res.error


def check_report_reset(report: dict[str, Any] | None, vfs: int, stage: str) -> None:
    """The forked target's report after it failed."""
    assert report, "the target sent no report"
    assert report["ok"] is False
    assert report["stage"] == stage, report
    assert report["ran"] is False
    assert report["runstate"] == str(RunState.INMIGRATE)
    assert report["device_states"] == {f"vf{i}": "RUNNING" for i in range(vfs)}


# -- the target process killed ---------------------------------------------------------


@pytest.mark.parametrize("stage", ["precopy", "stop", "data", "config", "complete"])
@pytest.mark.parametrize("channels", [0, 2])
def test_target_killed_at_a_source_stage(stage: str, channels: int) -> None:
    mode = "workers" if HAS_CALL_FDS else "threads"
    src = started_source(mode, 2, STABLE)
    try:
        before = checksums(src)
        pids: list[int] = []

        def kill(name: str) -> None:
            if name == stage:
                os.kill(pids[0], signal.SIGKILL)
                time.sleep(0.05)  # let the kernel close its sockets

        with pytest.raises(MigrationError) as ei:
            run_local(
                2, STABLE, mode, params(channels), source=src,
                on_target=pids.append, on_stage=kill,
            )  # fmt: skip
        err = ei.value
        assert err.side == "source"
        assert STAGES.index(err.stage) >= STAGES.index(stage), err
        assert err.target_report is None  # it died without a word
        check_rolled_back(src, before)
    finally:
        src.close()


def test_target_killed_during_a_slow_precopy() -> None:
    """A timed kill: it lands while pre-copy data is streaming."""
    src = started_source("threads", 2, SLOW)
    try:
        before = checksums(src)
        pids: list[int] = []
        timers: list[threading.Timer] = []

        def arm(name: str) -> None:
            if name == "precopy":
                t = threading.Timer(0.15, os.kill, (pids[0], signal.SIGKILL))
                timers.append(t)
                t.start()

        t0 = time.monotonic()
        with pytest.raises(MigrationError) as ei:
            run_local(
                2, SLOW, "threads", params(2), source=src,
                on_target=pids.append, on_stage=arm,
            )  # fmt: skip
        for t in timers:
            t.join()
        assert ei.value.stage == "precopy", ei.value
        assert time.monotonic() - t0 < 20
        check_rolled_back(src, before)
    finally:
        src.close()


# -- the connection dropped by the target ----------------------------------------------


@pytest.fixture
def target_channels(monkeypatch: pytest.MonkeyPatch) -> list[Channels]:
    """The target's channels, as :func:`incoming` accepts them."""
    got: list[Channels] = []
    real = engine.accept_channels

    def capture(*a: Any, **kw: Any) -> Channels:
        chans = real(*a, **kw)
        got.append(chans)
        return chans

    monkeypatch.setattr(engine, "accept_channels", capture)
    return got


@pytest.mark.parametrize("stage", ["precopy", "stop", "data", "config"])
@pytest.mark.parametrize("channels", [0, 2])
def test_connection_dropped_mid_stream(
    machine: MachineFactory,
    target_channels: list[Channels],
    stage: str,
    channels: int,
) -> None:
    src, dst = pair(machine, "threads", 2)
    before = checksums(src)

    def drop(name: str) -> None:
        if name == stage:
            target_channels[0].close()  # the target's side of every channel

    res = migrate_pair(src, dst, params(channels), on_stage=drop)
    err = check_failed_pair(src, dst, res, before)
    assert STAGES.index(err.stage) >= STAGES.index(stage), err


def test_multifd_channel_dropped_during_data(
    machine: MachineFactory, target_channels: list[Channels]
) -> None:
    """Only one multifd channel breaks: both sides notice and fail promptly."""
    src, dst = pair(machine, "threads", 2, SLOWSTOP)
    before = checksums(src)

    def drop(name: str) -> None:
        if name == "data":
            ch = target_channels[0].extra[1]
            threading.Timer(0.05, ch.shutdown, (socket.SHUT_RDWR,)).start()

    t0 = time.monotonic()
    res = migrate_pair(src, dst, params(2), on_stage=drop)
    assert time.monotonic() - t0 < 15  # no network timeout was waited out
    err = check_failed_pair(src, dst, res, before)
    assert err.stage in ("data", "config", "complete"), err


# -- malformed streams -----------------------------------------------------------------


def _fake_target(
    uri: str, script: Callable[[Channels], None], n_extra: int = 0
) -> tuple[threading.Thread, list[BaseException], str]:
    """A target that accepts one session and runs ``script`` on it."""
    lst = listen(uri)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            with accept_channels(lst, n_extra, 10.0) as chans:
                script(chans)
        except BaseException as exc:  # noqa: BLE001 - checked by the test
            errors.append(exc)
        finally:
            lst.close()

    t = threading.Thread(target=run, name="fake-target")
    t.start()
    return t, errors, str(lst.uri)


def _drain(sock: socket.socket, seconds: float = 10.0) -> None:
    sock.settimeout(seconds)
    try:
        while sock.recv(1 << 16):
            pass
    except OSError:
        pass


@pytest.mark.parametrize(
    "answer",
    [
        b"\xff" * 64,  # a length far over the limit
        b"\x00\x00\x00\x05garbage",  # not JSON
        b"\x00\x00\x00\x02[]",  # JSON, not an object
        b"\x00\x00\x00\x15" + b'{"status": "bananas"}',  # not an ack
        b"",  # closes at once
    ],
    ids=["huge", "not-json", "not-object", "unexpected", "closed"],
)
@pytest.mark.parametrize("mode", ["serial", "workers"])
def test_target_sends_garbage(
    machine: MachineFactory, tmp_path: Any, answer: bytes, mode: str
) -> None:
    src = machine(mode, 2, name="src")
    src.start()
    before = checksums(src)

    def script(chans: Channels) -> None:
        if answer:
            sendall_deadline(chans.main, answer, time.monotonic() + 5)
        chans.main.shutdown(socket.SHUT_WR)
        _drain(chans.main, 5.0)

    t, errors, uri = _fake_target(f"unix:{tmp_path}/t.sock", script)
    t0 = time.monotonic()
    with pytest.raises(MigrationError) as ei:
        engine.migrate(src, uri, params())
    t.join(15)
    assert not t.is_alive() and not errors
    assert time.monotonic() - t0 < 10
    assert ei.value.stage == "precopy"  # it failed waiting for the ack
    check_rolled_back(src, before)


def test_target_answers_loaded_twice(machine: MachineFactory, tmp_path: Any) -> None:
    """A target that never asks for the commit properly cannot make it start."""
    src = machine("serial", 1, name="src")
    src.start()
    before = checksums(src)

    def msg(obj: bytes) -> bytes:
        return len(obj).to_bytes(4, "big") + obj

    def script(chans: Channels) -> None:
        sendall_deadline(
            chans.main,
            msg(b'{"status": "switchover-ack"}') + msg(b'{"status": "nope"}'),
            time.monotonic() + 5,
        )
        _drain(chans.main, 5.0)

    t, errors, uri = _fake_target(f"unix:{tmp_path}/t.sock", script)
    with pytest.raises(MigrationError) as ei:
        engine.migrate(src, uri, params())
    t.join(15)
    assert not t.is_alive() and not errors
    assert ei.value.stage == "complete" and "unexpected answer" in str(ei.value)
    check_rolled_back(src, before)


@pytest.mark.parametrize(
    "garbage",
    [b"\x00" * 100, b"MPVFIOS\x00" + b"\xff" * 40, random.Random(7).randbytes(4096)],
    ids=["zeros", "bad-header", "random"],
)
@pytest.mark.parametrize("mode", ["serial", "workers"])
def test_source_sends_garbage(
    machine: MachineFactory, tmp_path: Any, garbage: bytes, mode: str
) -> None:
    dst = machine(mode, 2, name="dst")
    dst.start(run=False, runstate=RunState.INMIGRATE)
    with listen(f"unix:{tmp_path}/t.sock") as lst:
        out: list[BaseException] = []

        def run() -> None:
            try:
                engine.incoming(dst, lst, params())
            except BaseException as exc:  # noqa: BLE001 - checked below
                out.append(exc)

        t = threading.Thread(target=run)
        t.start()
        with open_channels(lst.uri, 0, new_session(), 5.0) as chans:
            sendall_deadline(chans.main, garbage, time.monotonic() + 5)
            chans.main.shutdown(socket.SHUT_WR)
            _drain(chans.main, 10.0)
        t.join(15)
    assert not t.is_alive()
    assert len(out) == 1 and isinstance(out[0], MigrationError), out
    assert out[0].side == "target" and out[0].stage == "accept"
    check_target_reset(dst)


# -- device data the target rejects ----------------------------------------------------


@pytest.mark.parametrize("channels", [0, 2])
def test_target_rejects_data_of_another_size(channels: int) -> None:
    """A source device of 64 KiB, a target device of 128 KiB: check fails."""
    mode = "workers" if HAS_CALL_FDS else "threads"
    src = started_source(mode, 2, STABLE)
    try:
        before = checksums(src)
        bigger = STABLE.replace(name="bigger", state_size=128 * 1024)
        with pytest.raises(MigrationError) as ei:
            run_local(
                2, STABLE, mode, params(channels), source=src, target_profile=bigger
            )
        err = ei.value
        assert (err.stage, err.side) == ("check", "target"), err
        assert "state size" in str(err)
        check_rolled_back(src, before)
        check_report_reset(err.target_report, 2, "check")
    finally:
        src.close()


@pytest.mark.parametrize("mode", ["serial", "threads"])
@pytest.mark.parametrize("channels", [0, 2])
def test_target_rejects_corrupt_data(
    machine: MachineFactory, mode: str, channels: int
) -> None:
    """One byte of STOP_COPY data flipped on the way: the checksum catches it."""
    src, dst = pair(machine, mode, 2)
    before = checksums(src)
    dev = src.devices[1].device
    assert dev is not None
    real = dev.read_data
    flipped: list[int] = []

    def corrupt(fd: int, n: int) -> bytes | None:
        data = real(fd, n)
        if data and dev._save is not None and dev._save.stopcopy and not flipped:
            i = len(data) // 2
            flipped.append(i)
            return data[:i] + bytes([data[i] ^ 0x5A]) + data[i + 1 :]
        return data

    dev.read_data = corrupt  # type: ignore[method-assign]
    res = migrate_pair(src, dst, params(channels))
    assert flipped
    err = check_failed_pair(src, dst, res, before)
    assert (err.stage, err.side) == ("check", "target"), err
    assert "vf1" in str(err) and "checksum mismatch" in str(err)


@pytest.mark.parametrize("channels", [0, 2])
def test_target_rejects_foreign_config(machine: MachineFactory, channels: int) -> None:
    src, dst = pair(machine, "threads", 2)
    before = checksums(src)
    src.devices[0].config = b"\x86\x80\x00\x00" + bytes(252)  # not a CX-7 VF
    res = migrate_pair(src, dst, params(channels))
    err = check_failed_pair(src, dst, res, before)
    assert (err.stage, err.side) == ("load", "target"), err
    assert "config state rejected" in str(err)


# -- cancel at every stage -------------------------------------------------------------


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("channels", [0, 2])
@pytest.mark.parametrize("mode", ["serial", "workers"])
def test_cancel_at_source_stage(
    machine: MachineFactory, mode: str, channels: int, stage: str
) -> None:
    if mode == "workers" and channels and not HAS_CALL_FDS:
        pytest.skip("call_fds not available yet")
    src, dst = pair(machine, mode, 2)
    before = checksums(src)
    cancel, on_stage = cancel_at(stage, f"test cancels at {stage}")
    t0 = time.monotonic()
    res = migrate_pair(src, dst, params(channels), cancel=cancel, on_stage=on_stage)
    assert time.monotonic() - t0 < 10
    err = check_failed_pair(src, dst, res, before)
    assert (err.stage, err.side) == (stage, "source"), err
    assert f"test cancels at {stage}" in str(err)


@pytest.mark.parametrize("stage", TARGET_STAGES)
@pytest.mark.parametrize("channels", [0, 2])
@pytest.mark.parametrize("mode", ["serial", "workers"])
def test_cancel_at_target_stage(
    machine: MachineFactory, mode: str, channels: int, stage: str
) -> None:
    if mode == "workers" and channels and not HAS_CALL_FDS:
        pytest.skip("call_fds not available yet")
    src, dst = pair(machine, mode, 2)
    before = checksums(src)
    cancel, on_stage = cancel_at(stage, f"target cancels at {stage}")
    t0 = time.monotonic()
    res = migrate_pair(
        src, dst, params(channels), target_cancel=cancel, target_on_stage=on_stage
    )
    assert time.monotonic() - t0 < 10
    check_failed_pair(src, dst, res, before)
    assert isinstance(res.target_error, MigrationError)
    assert res.target_error.stage == stage
    assert f"target cancels at {stage}" in str(res.target_error)
    if stage != "accept":  # the source heard why
        assert isinstance(res.error, MigrationError)
        assert (res.error.stage, res.error.side) == (stage, "target"), res.error


def test_cancel_from_another_thread_during_precopy(machine: MachineFactory) -> None:
    src, dst = pair(machine, "threads", 2, SLOW)
    before = checksums(src)
    cancel = Cancel()

    def on_stage(name: str) -> None:
        if name == "precopy":
            threading.Timer(0.1, cancel.cancel, ("operator",)).start()

    t0 = time.monotonic()
    res = migrate_pair(src, dst, params(2), cancel=cancel, on_stage=on_stage)
    assert time.monotonic() - t0 < 10
    err = check_failed_pair(src, dst, res, before)
    assert err.stage == "precopy" and "operator" in str(err)


# -- device errors ---------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["serial", "threads", "workers"])
def test_source_device_fails_the_stop(machine: MachineFactory, mode: str) -> None:
    """R6.1: a failed stop arc fails the migration; the device was reset."""
    faulty = STABLE.replace(
        name="faulty", faults={"PRE_COPY_P2P>STOP_COPY": Fault("errno", times=1)}
    )
    src = machine(mode, 0, name="src")
    dst = machine(mode, 0, name="dst")
    for m in (src, dst):
        m.add_vfio_device("vf0", STABLE, props=EVENTS)
        m.add_vfio_device("vf1", faulty if m is src else STABLE, props=EVENTS)
    src.start()
    dst.start(run=False, runstate=RunState.INMIGRATE)
    before = checksums(src)
    res = migrate_pair(src, dst, params())
    err = check_failed_pair(src, dst, res, before)
    assert (err.stage, err.side) == ("stop", "source"), err
    assert "vf1" in str(err)


def test_source_device_fails_save_complete(machine: MachineFactory) -> None:
    """A device without PRE_COPY fails STOP -> STOP_COPY in the data stage."""
    faulty = NOPRE.replace(
        name="faulty", faults={"STOP>STOP_COPY": Fault("errno", times=1)}
    )
    src, dst = pair(machine, "serial", 2, faulty, target_profile=NOPRE)
    before = checksums(src)
    res = migrate_pair(src, dst, params())
    err = check_failed_pair(src, dst, res, before)
    assert (err.stage, err.side) == ("data", "source"), err


# -- after the commit ------------------------------------------------------------------


def test_answer_lost_after_commit_keeps_the_source_stopped(
    machine: MachineFactory, target_channels: list[Channels]
) -> None:
    """The target was told to start: the source must not run the VM too."""
    src, dst = pair(machine, "threads", 2)

    def lose_answer(name: str) -> None:
        if name == "start":
            target_channels[0].close()

    res = migrate_pair(src, dst, params(), target_on_stage=lose_answer)
    assert res.target_error is None and res.target_info is not None
    assert dst.vm.runstate == RunState.RUNNING  # the target took over
    assert isinstance(res.error, MigrationError)
    assert "never runs twice" in str(res.error)
    assert src.vm.runstate == RunState.POSTMIGRATE
    assert real_states(src) == [S.STOP, S.STOP]


def test_target_start_with_device_errors_keeps_the_source_stopped(
    machine: MachineFactory,
) -> None:
    """As in QEMU the target runs anyway; the source then must not."""
    faulty = STABLE.replace(
        name="faulty", faults={"STOP>RUNNING_P2P": Fault("errno", times=1)}
    )
    src, dst = pair(machine, "serial", 2, STABLE, target_profile=faulty)
    res = migrate_pair(src, dst, params())
    assert isinstance(res.target_error, MigrationError)
    assert res.target_error.stage == "start"
    assert dst.vm.runstate == RunState.RUNNING
    assert isinstance(res.error, MigrationError)
    assert (res.error.stage, res.error.side) == ("start", "target")
    assert "never runs twice" in str(res.error)
    assert src.vm.runstate == RunState.POSTMIGRATE


def test_target_cancel_from_another_thread(machine: MachineFactory) -> None:
    """A target blocked reading the stream still notices a cancel at once."""
    src, dst = pair(machine, "threads", 2, SLOW)
    before = checksums(src)
    cancel = Cancel()

    def on_stage(name: str) -> None:
        if name == "load":
            threading.Timer(0.1, cancel.cancel, ("operator",)).start()

    t0 = time.monotonic()
    res = migrate_pair(
        src, dst, params(2), target_cancel=cancel, target_on_stage=on_stage
    )
    assert time.monotonic() - t0 < 5
    check_failed_pair(src, dst, res, before)
    assert isinstance(res.target_error, MigrationError)
    assert res.target_error.stage == "load"
    assert "operator" in str(res.target_error)


def test_cancel_after_the_commit_changes_nothing(machine: MachineFactory) -> None:
    """Once "go" went out the target runs the VM: a late cancel is ignored."""
    src, dst = pair(machine, "serial", 2)
    # at "start" the target got "go"; the source awaits its answer
    cancel, late = cancel_at("start", "too late")
    res = migrate_pair(src, dst, params(), cancel=cancel, target_on_stage=late)
    assert res.ok, (res.error, res.target_error)
    assert res.info is not None and res.info.status == "completed"
    assert res.info.checksums_equal
    assert src.vm.runstate == RunState.POSTMIGRATE
    assert dst.vm.runstate == RunState.RUNNING


def test_channel_count_mismatch_fails_at_once_and_says_it_once() -> None:
    """Source 4 multifd channels, target 2: the target refuses at accept; the
    source's error carries the target's reason once, not wrapped twice."""
    mode = "workers" if HAS_CALL_FDS else "threads"
    src = started_source(mode, 2, STABLE)
    try:
        before = checksums(src)
        t0 = time.monotonic()
        with pytest.raises(MigrationError) as ei:
            run_local(
                2,
                STABLE,
                mode,
                params(4),
                source=src,
                target_params=params(2),
            )
        assert time.monotonic() - t0 < 20  # not an accept timeout
        err = ei.value
        assert (err.stage, err.side) == ("accept", "target"), err
        assert "multifd channels differ: source 4, target 2" in str(err)
        assert str(err).count("migration failed") == 1, str(err)
        check_rolled_back(src, before)
    finally:
        src.close()
