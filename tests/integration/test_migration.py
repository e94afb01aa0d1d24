"""Live migration end to end: the source here, the target forked or in a thread.

Every test checks what a migration promises (QEMU.md R8-R11, §13): the
devices arrive byte-identical (checksums), the target's VM and devices run,
the source ends in postmigrate with its devices in STOP (after save_cleanup),
the downtime covers the stop, and the data took the path asked for (main
channel or multifd channels).  Profiles are tiny and almost free of latency;
the only time bounds are hang guards.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from _helpers import (
    EVENTS,
    HAS_CALL_FDS,
    ROOT,
    MachineFactory,
    cancel_at,
    child_env,
    machine_factory,
    pair,
    ran,
    real_states,
    started_source,
)

from mpvfio.devices.profiles import MiB, Profile
from mpvfio.events import Event
from mpvfio.machine import Machine
from mpvfio.migration import engine
from mpvfio.migration.engine import (
    IncomingInfo,
    LiveStats,
    MachineLock,
    MigrationError,
    MigrationInfo,
    MigrationParams,
)
from mpvfio.migration.local import PairResult, migrate_pair, run_local
from mpvfio.net.transport import Cancel, listen
from mpvfio.uapi.vfio import MigFlag, MigState
from mpvfio.vmstate import RunState

S = MigState
MODES = ("serial", "threads", "workers")
needs_call_fds = pytest.mark.skipif(
    not HAS_CALL_FDS, reason="call_fds not available yet"
)
#: 64 KiB of state, 16 KiB pre-copied, 4 KiB dirtied, 1 ms per arc.
FAST = Profile(name="fast", default_arc_ms=1.0)
#: No PRE_COPY: everything goes in STOP_COPY (STOP -> STOP_COPY).
NOPRE = Profile(name="nopre", flags=MigFlag.STOP_COPY | MigFlag.P2P, default_arc_ms=1.0)

pytestmark = pytest.mark.timeout(120)


def _ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


HAS_IPV6 = _ipv6_loopback()


def params(channels: int = 0, **kw: Any) -> MigrationParams:
    return MigrationParams(
        **{"timeout": 20.0, "connect_retry_s": 5.0, "multifd_channels": channels, **kw}
    )


@pytest.fixture
def machine() -> Iterator[MachineFactory]:
    """``machine(mode, vfs, profile, **kw)``: a new Machine, closed at teardown."""
    with machine_factory("serial", 2, FAST) as make:
        yield make


def check_source_done(src: Machine, info: MigrationInfo) -> None:
    """The source after a completed migration (R7.2, R8.9)."""
    assert info.status == "completed", info
    assert src.vm.runstate == RunState.POSTMIGRATE
    assert [d.state for d in src.devices] == [S.STOP] * len(src.devices)
    assert real_states(src) == [S.STOP] * len(src.devices)
    assert info.downtime_ms > 0
    assert info.downtime_ms >= info.stop_ms > 0
    assert info.checksums_equal, (info.checksums, info.target_checksums)
    assert set(info.checksums) == {d.name for d in src.devices}


def check_pair_done(src: Machine, dst: Machine, res: PairResult) -> MigrationInfo:
    assert res.ok, (res.error, res.target_error)
    assert res.info is not None and res.target_info is not None
    check_source_done(src, res.info)
    assert dst.vm.runstate == RunState.RUNNING
    assert real_states(dst) == [S.RUNNING] * len(dst.devices)
    assert {d.name: d.checksum() for d in dst.devices} == res.info.checksums
    # the config state loaded on the target is the source's (R8.8)
    assert [d.config for d in dst.devices] == [d.config for d in src.devices]
    assert res.target_info.started
    return res.info


def check_report(report: dict[str, Any], vfs: int) -> dict[str, Any]:
    """The forked target's report after a completed migration."""
    assert report.get("ok"), report
    assert report["runstate"] == str(RunState.RUNNING)
    assert report["device_states"] == {f"vf{i}": "RUNNING" for i in range(vfs)}
    info: dict[str, Any] = report["info"]
    assert info["status"] == "completed" and info["started"]
    return info


def check_channels(tinfo: dict[str, Any], vfs: int, channels: int) -> None:
    """The STOP_COPY data took the multifd channels, or none was used."""
    loads = [s for s in tinfo["timeline"] if s["what"] == "load"]
    if not channels:
        assert tinfo["channel_bytes"] == []
        assert loads == []
        return
    used = tinfo["channel_bytes"]
    assert len(used) == channels
    # device i sends on channel i % channels: every channel up to vfs works
    assert all(n > 0 for n in used[: min(vfs, channels)]), used
    assert sum(used) >= vfs * (FAST.state_size - FAST.precopy_initial)
    assert sorted(s["device"] for s in loads) == [f"vf{i}" for i in range(vfs)]


# -- local migrations (target in a forked process) -------------------------------------


def _cases() -> list[Any]:
    cases = []
    for mode in MODES:
        for vfs in (1, 2, 4):
            for ch in sorted({0, 1, 2, vfs}):
                marks = [needs_call_fds] if mode == "workers" and ch else []
                cases.append(pytest.param(mode, vfs, ch, marks=marks))
    return cases


@pytest.mark.parametrize(("mode", "vfs", "channels"), _cases())
def test_local_migration(mode: str, vfs: int, channels: int) -> None:
    src = started_source(mode, vfs, FAST)
    try:
        configs = {d.name: d.config.hex() for d in src.devices}
        info, report = run_local(
            vfs, FAST, mode, params(channels), props=EVENTS, source=src
        )
        check_source_done(src, info)
        tinfo = check_report(report, vfs)
        assert report["checksums"] == info.checksums
        assert report["configs"] == configs
        assert info.precopy_bytes > 0  # FAST pre-copies 16 KiB per device
        assert info.precopy_iterations > 0
        assert info.stopcopy_bytes > 0
        assert info.mode == mode and info.vfs == vfs
        assert info.multifd_channels == channels
        assert tinfo["received_bytes"] >= info.precopy_bytes + info.stopcopy_bytes
        check_channels(tinfo, vfs, channels)
        # the timeline holds the source's stop arcs and the target's start arcs
        whats = {s.what.split()[0] for s in info.timeline}
        assert {"stop", "data", "start"} <= whats
    finally:
        src.close()


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1",
        pytest.param(
            "[::1]", marks=pytest.mark.skipif(not HAS_IPV6, reason="no IPv6 loopback")
        ),
    ],
)
@pytest.mark.parametrize("channels", [0, 2])
def test_local_migration_tcp(host: str, channels: int) -> None:
    mode = "workers" if HAS_CALL_FDS else "threads"
    info, report = run_local(
        2, FAST, mode, params(channels), props=EVENTS, uri=f"tcp:{host}:0"
    )
    assert info.status == "completed" and info.checksums_equal
    assert info.downtime_ms >= info.stop_ms > 0
    check_channels(check_report(report, 2), 2, channels)


# -- in-process pairs ------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("channels", [0, 2])
def test_pair_in_process(machine: MachineFactory, mode: str, channels: int) -> None:
    if mode == "workers" and channels and not HAS_CALL_FDS:
        pytest.skip("call_fds not available yet")
    src, dst = pair(machine, mode, 2)
    res = migrate_pair(src, dst, params(channels))
    check_pair_done(src, dst, res)
    assert res.target_info is not None
    assert res.target_info.received_bytes > 0
    assert len(res.target_info.channel_bytes) == channels


@pytest.mark.parametrize("host", ["127.0.0.1", "[::1]"])
def test_pair_tcp(machine: MachineFactory, host: str) -> None:
    if host == "[::1]" and not HAS_IPV6:
        pytest.skip("no IPv6 loopback")
    src, dst = pair(machine, "threads", 2)
    res = migrate_pair(src, dst, params(2), uri=f"tcp:{host}:0")
    check_pair_done(src, dst, res)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("channels", [0, 2])
def test_device_without_precopy(
    machine: MachineFactory, mode: str, channels: int
) -> None:
    """STOP_COPY|P2P only: no pre-copy; RUNNING_P2P -> STOP, then STOP_COPY."""
    if mode == "workers" and channels and not HAS_CALL_FDS:
        pytest.skip("call_fds not available yet")
    src, dst = pair(machine, mode, 2, NOPRE)
    res = migrate_pair(src, dst, params(channels))
    info = check_pair_done(src, dst, res)
    assert info.precopy_bytes == 0 and info.precopy_iterations == 0
    assert info.stopcopy_bytes > NOPRE.state_size  # the whole state + framing
    stop_arcs = sorted({s.what for s in info.timeline if s.what.startswith("stop")})
    assert stop_arcs == ["stop RUNNING>RUNNING_P2P", "stop RUNNING_P2P>STOP"]


def test_mixed_precopy_and_not(machine: MachineFactory) -> None:
    src = machine("threads", 0, name="src")
    dst = machine("threads", 0, name="dst")
    for m in (src, dst):
        m.add_vfio_device("vf0", FAST, props=EVENTS)
        m.add_vfio_device("vf1", NOPRE, props=EVENTS)
    src.start()
    dst.start(run=False, runstate=RunState.INMIGRATE)
    res = migrate_pair(src, dst, params(1))
    info = check_pair_done(src, dst, res)
    assert 0 < info.precopy_bytes <= FAST.precopy_initial + FAST.precopy_dirty + 4096


def test_precopy_dirty_data_arrives(machine: MachineFactory) -> None:
    """The device dirties its state during pre-copy; the new bytes arrive."""
    src, dst = pair(machine, "serial", 1)
    before = src.devices[0].checksum()
    res = migrate_pair(src, dst, params())
    info = check_pair_done(src, dst, res)
    assert info.checksums["vf0"] != before  # it really changed under pre-copy
    assert info.precopy_bytes >= FAST.precopy_initial


@pytest.mark.parametrize("mode", MODES)
def test_megabyte_chunks_with_latency_and_bandwidth(
    machine: MachineFactory, mode: str
) -> None:
    """2 MiB per device: 1 MiB data chunks cross every boundary (pipes too)."""
    slow = Profile(
        name="slowish",
        default_arc_ms=5.0,
        state_size=2 * MiB,
        precopy_initial=1 * MiB,
        bandwidth=200e6,
    )
    src, dst = pair(machine, mode, 2, slow)
    res = migrate_pair(src, dst, params(2 if HAS_CALL_FDS or mode != "workers" else 0))
    info = check_pair_done(src, dst, res)
    # two stop arcs of >= 5 ms each, in parallel
    assert info.stop_ms >= 10.0
    assert info.downtime_ms >= info.stop_ms + info.transfer_ms


# -- x-migration-load-config-after-iter ------------------------------------------------


def _config_timing(
    machine: MachineFactory,
    monkeypatch: pytest.MonkeyPatch,
    cai: str,
    delay: float = 0.3,
) -> tuple[PairResult, list[float], float]:
    """Migrate with multifd; the source holds its FULL sections back ``delay`` s.

    Returns when each target device loaded its config and when the source
    let the FULL sections go (both time.monotonic()).
    """
    src, dst = pair(machine, "threads", 2)
    loads: list[float] = []
    lock = threading.Lock()
    for d in dst.devices:
        orig = d.load_config

        def load(config: bytes, orig: Callable[[bytes], None] = orig) -> None:
            with lock:
                loads.append(time.monotonic())
            orig(config)

        monkeypatch.setattr(d, "load_config", load)
    released: list[float] = []

    def on_stage(name: str) -> None:
        if name == "config":
            time.sleep(delay)
            released.append(time.monotonic())

    res = migrate_pair(src, dst, params(2, config_after_iter=cai), on_stage=on_stage)
    check_pair_done(src, dst, res)
    return res, loads, released[0]


def test_config_after_iter_on_waits_for_load_ready(
    machine: MachineFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    res, loads, released = _config_timing(machine, monkeypatch, "on")
    assert res.info is not None and res.info.config_after_iter
    assert res.target_info is not None and res.target_info.config_after_iter
    assert len(loads) == 2
    # R10.7: the config load waited for DEV_CONFIG_LOAD_READY (FULL section)
    assert min(loads) >= released


def test_config_after_iter_off_loads_config_early(
    machine: MachineFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    res, loads, released = _config_timing(machine, monkeypatch, "off")
    assert res.info is not None and not res.info.config_after_iter
    assert len(loads) == 2
    # the load threads loaded the config as soon as its packet was in
    assert max(loads) < released


@pytest.mark.parametrize(("arch", "expect"), [("aarch64", True), ("x86_64", False)])
def test_config_after_iter_auto_follows_arch(
    machine: MachineFactory, arch: str, expect: bool
) -> None:
    src, dst = pair(machine, "threads", 2, arch=arch, target_arch=arch)
    res = migrate_pair(src, dst, params(2, config_after_iter="auto"))
    info = check_pair_done(src, dst, res)
    assert info.config_after_iter is expect
    assert res.target_info is not None
    assert res.target_info.config_after_iter is expect


def test_config_after_iter_without_multifd_is_off(machine: MachineFactory) -> None:
    """Without multifd the property has no effect (R10.7): no mismatch."""
    src, dst = pair(machine, "serial", 2, arch="aarch64", target_arch="x86_64")
    res = migrate_pair(
        src,
        dst,
        params(0, config_after_iter="on"),
        target_params=params(0, config_after_iter="off"),
    )
    info = check_pair_done(src, dst, res)
    assert not info.config_after_iter


@pytest.mark.parametrize(
    ("src_arch", "dst_arch", "src_cai", "dst_cai"),
    [
        ("aarch64", "x86_64", "auto", "auto"),
        ("x86_64", "aarch64", "auto", "auto"),
        ("x86_64", "x86_64", "on", "off"),
        ("x86_64", "x86_64", "off", "on"),
    ],
)
def test_config_after_iter_mismatch_is_a_clear_error(
    machine: MachineFactory, src_arch: str, dst_arch: str, src_cai: str, dst_cai: str
) -> None:
    src, dst = pair(machine, "threads", 2, arch=src_arch, target_arch=dst_arch)
    res = migrate_pair(
        src,
        dst,
        params(2, config_after_iter=src_cai),
        target_params=params(2, config_after_iter=dst_cai),
    )
    for err in (res.error, res.target_error):
        assert isinstance(err, MigrationError)
        assert "x-migration-load-config-after-iter differs" in str(err)
        assert err.side == "target" and err.stage == "accept"
    assert src.vm.runstate == RunState.RUNNING
    assert real_states(src) == [S.RUNNING] * 2
    assert real_states(dst) == [S.RUNNING] * 2 and not ran(dst)


def test_engine_checks_the_session(
    machine: MachineFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A main stream whose hello names another session is refused."""
    src, dst = pair(machine, "serial", 1)
    real = engine.open_channels

    def other_session(uri: Any, n: int, session: Any, *a: Any, **kw: Any) -> Any:
        return real(uri, n, "ab" * 16, *a, **kw)

    monkeypatch.setattr(engine, "open_channels", other_session)
    res = migrate_pair(src, dst, params())
    assert isinstance(res.target_error, MigrationError)
    assert "peer mismatch" in str(res.target_error)
    assert isinstance(res.error, MigrationError)
    assert src.vm.runstate == RunState.RUNNING and not ran(dst)


# -- sharing the machine: stop/cont, autostart, live counters, failure order -----------


@dataclass
class Side:
    """One side of :func:`run_pair`: its info, or the error it raised."""

    info: Any = None
    error: BaseException | None = None


def run_pair(
    src: Machine,
    dst: Machine,
    p: MigrationParams,
    *,
    autostart: bool | Callable[[], bool] = True,
    target_on_stage: Callable[[str], None] | None = None,
    target_cancel: Cancel | None = None,
    **source_kw: Any,
) -> tuple[Side, Side]:
    """engine.migrate here, engine.incoming in a thread, with any arguments."""
    tmp = tempfile.mkdtemp(prefix="mpvfio-share-", dir="/tmp")
    source, target = Side(), Side()
    try:
        lst = listen(f"unix:{tmp}/m.sock")

        def run_target() -> None:
            try:
                target.info = engine.incoming(
                    dst,
                    lst,
                    p,
                    autostart=autostart,
                    on_stage=target_on_stage,
                    cancel=target_cancel,
                )
            except BaseException as exc:  # noqa: BLE001 - checked by the test
                target.error = exc
            finally:
                lst.close()

        t = threading.Thread(target=run_target, name="share-target")
        t.start()
        try:
            source.info = engine.migrate(src, str(lst.uri), p, **source_kw)
        except BaseException as exc:  # noqa: BLE001 - checked by the test
            source.error = exc
        finally:
            t.join(p.timeout + 10)
        assert not t.is_alive(), "the target thread hangs"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return source, target


def stop_at_first_safe_point(
    m: Machine, lock: MachineLock, at: str = "precopy"
) -> Callable[[str], None]:
    """An on_stage hook: at stage ``at`` another thread queues for the lock
    and stops the VM (paused), as a QMP ``stop`` does; the migration lets
    it in at its next safe point."""

    def stopper() -> None:
        assert lock.acquire(20)
        try:
            m.vm_stop(RunState.PAUSED)
        finally:
            lock.release()

    def on_stage(name: str) -> None:
        if name == at:
            threading.Thread(target=stopper, name="user-stop").start()
            deadline = time.monotonic() + 10
            while not lock.waiting():  # queued before the engine goes on
                assert time.monotonic() < deadline
                time.sleep(0.001)

    return on_stage


def run_pair_with_user_stop(src: Machine, dst: Machine, **kw: Any) -> tuple[Side, Side]:
    """:func:`run_pair` with the caller holding the machine lock, as a QMP
    ``migrate`` does, and a user's ``stop`` queued at the first safe point."""
    lock = MachineLock()
    assert lock.acquire(1)  # the migration's caller holds it
    try:
        return run_pair(
            src,
            dst,
            params(),
            lock=lock,
            on_stage=stop_at_first_safe_point(src, lock),
            **kw,
        )
    finally:
        lock.release()


def events_of(m: Machine, names: list[str]) -> list[Event]:
    seen: list[Event] = []
    m.events.subscribe(seen.append, names)
    return seen


def test_machine_lock_hands_over_in_arrival_order() -> None:
    lock = MachineLock()
    order: list[str] = []
    assert lock.acquire(1) and lock.owned()

    def waiter(name: str) -> None:
        assert lock.acquire(10)
        order.append(name)
        lock.release()

    threads = []
    for name in ("a", "b"):
        t = threading.Thread(target=waiter, args=(name,))
        t.start()
        threads.append(t)
        deadline = time.monotonic() + 10
        while lock.waiting() < len(threads):
            assert time.monotonic() < deadline
            time.sleep(0.001)
    assert lock.pause(10)  # both waiters ran, in order, then it came back
    assert order == ["a", "b"] and lock.owned()
    for t in threads:
        t.join(10)
    with pytest.raises(RuntimeError):
        lock.acquire(1)  # not reentrant
    # a waiter that times out leaves the queue; others cannot release it
    got: list[bool] = []
    t = threading.Thread(target=lambda: got.append(lock.acquire(0.05)))
    t.start()
    t.join(10)
    assert got == [False] and lock.waiting() == 0
    t = threading.Thread(target=lambda: got.append(_release_raises(lock)))
    t.start()
    t.join(10)
    assert got == [False, True]
    lock.release()
    assert not lock.owned() and lock.acquire(0.01)
    lock.release()


def _release_raises(lock: MachineLock) -> bool:
    try:
        lock.release()
    except RuntimeError:
        return True
    return False


@pytest.mark.parametrize("channels", [0, 2])
def test_live_stats_grow_and_end_equal_to_the_totals(
    machine: MachineFactory, channels: int
) -> None:
    """LiveStats read from another thread: monotonic, vfio <= transferred,
    and at the end exactly MigrationInfo's totals."""
    slow = Profile(
        name="paced",
        state_size=1 * MiB,
        precopy_initial=1 * MiB,
        precopy_dirty=0,
        bandwidth=8 * MiB,
    )
    mode = "workers" if HAS_CALL_FDS else "threads"
    src, dst = pair(machine, mode, 2, slow)
    live = LiveStats()
    samples: list[dict[str, Any]] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            samples.append(live.snapshot())
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, name="sampler")
    sampler.start()
    try:
        source, target = run_pair(src, dst, params(channels), live=live)
    finally:
        done.set()
        sampler.join(10)
    assert source.error is None and target.error is None, (source, target)
    info: MigrationInfo = source.info
    assert info.status == "completed" and info.checksums_equal
    for key in ("transferred", "vfio", "precopy", "stopcopy", "iterations"):
        values = [s[key] for s in samples]
        assert values == sorted(values), key
    assert all(s["vfio"] <= s["transferred"] for s in samples)
    grew = {s["vfio"] for s in samples if s["vfio"] > 0}
    assert len(grew) >= 2, "the counters did not move while it ran"
    end = live.snapshot()
    assert end["transferred"] == info.transferred_bytes
    assert end["vfio"] == info.precopy_bytes + info.stopcopy_bytes
    assert end["precopy"] == info.precopy_bytes > 0
    assert end["stopcopy"] == info.stopcopy_bytes > 0
    assert end["multifd"] == (info.stopcopy_bytes if channels else 0)
    assert end["iterations"] == info.precopy_iterations


@pytest.mark.parametrize("mode", MODES)
def test_incoming_without_autostart_stays_paused_until_started(
    machine: MachineFactory, mode: str
) -> None:
    """R9.6 without autostart: paused, devices RESUMING; vm_start later."""
    src, dst = pair(machine, mode, 2)
    resume = events_of(dst, ["RESUME", "STOP"])
    source, target = run_pair(src, dst, params(), autostart=lambda: False)
    assert source.error is None and target.error is None, (source, target)
    info: MigrationInfo = source.info
    assert info.status == "completed" and not info.target_started
    assert not info.checksums_equal  # nothing to compare before it starts
    assert any("paused" in n for n in info.notes)
    assert src.vm.runstate == RunState.POSTMIGRATE
    assert real_states(src) == [S.STOP] * 2
    tinfo: IncomingInfo = target.info
    assert tinfo.status == "completed" and not tinfo.started
    assert dst.vm.runstate == RunState.PAUSED and not ran(dst)
    assert [d.state for d in dst.devices] == [S.RESUMING] * 2
    assert real_states(dst) == [S.RESUMING] * 2
    assert resume == []  # no handler ran, no event
    dst.vm_start()  # `cont`: RESUMING -> RUNNING_P2P -> RUNNING, data applied
    assert [e.name for e in resume] == ["RESUME"]
    assert real_states(dst) == [S.RUNNING] * 2 and not dst.errors
    assert {d.name: d.checksum() for d in dst.devices} == info.checksums


@pytest.mark.parametrize("mode", ["serial", "workers"])
def test_a_stop_during_precopy_lets_the_migration_finish_paused(
    machine: MachineFactory, mode: str
) -> None:
    """A user's stop mid-migration (QEMU allows it): STOP_COPY (R6.2
    paused), the switchover stops a VM that is not live (O9), source
    postmigrate, and the target, told the source was paused, stays paused."""
    src, dst = pair(machine, mode, 2)
    src_events = events_of(src, ["STOP", "RESUME"])
    source, target = run_pair_with_user_stop(src, dst)
    assert source.error is None and target.error is None, (source, target)
    info: MigrationInfo = source.info
    assert info.status == "completed" and not info.target_started
    assert info.precopy_bytes == 0  # paused before the first pass
    assert [e.name for e in src_events] == ["STOP"]  # the user's only
    # the switchover ran no handler: no arc at the stop
    assert info.stop_ms < 50 and not [s for s in info.timeline if s.what[:4] == "stop"]
    assert [t.new for t in src.vm.runstate_history][-3:] == [
        RunState.PAUSED,
        RunState.FINISH_MIGRATE,
        RunState.POSTMIGRATE,
    ]
    assert real_states(src) == [S.STOP] * 2
    assert dst.vm.runstate == RunState.PAUSED and not ran(dst)
    assert real_states(dst) == [S.RESUMING] * 2
    dst.vm_start()
    assert {d.name: d.checksum() for d in dst.devices} == info.checksums


def test_failure_calls_on_failed_before_the_restart(machine: MachineFactory) -> None:
    """R7.2: FAILED is set before migration_iteration_finish's vm_start."""
    from mpvfio.devices.profiles import Fault

    faulty = FAST.replace(
        name="faulty", faults={"PRE_COPY_P2P>STOP_COPY": Fault("errno", times=1)}
    )
    src = machine("serial", 2, faulty, name="src")
    dst = machine("serial", 2, FAST, name="dst")
    src.start()
    dst.start(run=False, runstate=RunState.INMIGRATE)
    order: list[str] = []
    src.events.subscribe(lambda ev: order.append(ev.name), ["STOP", "RESUME"])

    def on_failed(error: str) -> None:
        order.append(f"failed {src.vm.runstate}")

    source, target = run_pair(src, dst, params(), on_failed=on_failed)
    assert isinstance(source.error, MigrationError), source.error
    assert source.error.stage == "stop"
    assert order == ["STOP", "failed finish-migrate", "RESUME"], order
    assert src.vm.runstate == RunState.RUNNING
    assert real_states(src) == [S.RUNNING] * 2
    assert isinstance(target.error, MigrationError) and not ran(dst)


def test_a_failure_after_a_user_stop_leaves_the_vm_paused(
    machine: MachineFactory,
) -> None:
    """R7.2: the VM was paused when the switchover came: it is not
    restarted; the FAILED notifier still sets RUNNING (QEMU's quirk)."""
    src, dst = pair(machine, "serial", 2)
    resumed = events_of(src, ["RESUME"])
    failed: list[str] = []
    cancel, target_fails = cancel_at("check", "target refuses")
    source, target = run_pair_with_user_stop(
        src,
        dst,
        on_failed=failed.append,
        target_on_stage=target_fails,
        target_cancel=cancel,
    )
    assert isinstance(source.error, MigrationError), source.error
    assert "target refuses" in str(source.error) and failed
    assert src.vm.runstate == RunState.PAUSED
    assert resumed == []
    assert real_states(src) == [S.RUNNING] * 2  # R7.1 quirk
    assert isinstance(target.error, MigrationError) and not ran(dst)


# -- the command line ------------------------------------------------------------------


def _mpvfio(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mpvfio", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=child_env(),
        check=False,
    )


@needs_call_fds
def test_cli_compare_json() -> None:
    res = _mpvfio(
        "migrate", "--vfs", "2", "--local", "--compare", "--profile", "instant",
        "--json",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["checksums_equal"] is True
    rows = doc["rows"]
    assert len(rows) == 3
    for row in rows:
        assert set(row) == {
            "mode", "vfs", "downtime_ms", "stop_ms", "transfer_ms", "start_ms",
        }  # fmt: skip
        assert row["vfs"] == 2
        assert row["downtime_ms"] > 0
        assert row["downtime_ms"] >= row["stop_ms"]
    assert [r["mode"] for r in rows] == [
        "serial transitions",
        "parallel transitions",
        "parallel transitions + multifd data",
    ]


def test_cli_local_json_single_row() -> None:
    res = _mpvfio(
        "migrate", "--vfs", "2", "--local", "--mode", "threads",
        "--multifd-channels", "2", "--profile", "instant", "--json",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["checksums_equal"] is True
    assert len(doc["rows"]) == 1 and doc["rows"][0]["vfs"] == 2


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def test_cli_timeline_png(tmp_path: Path) -> None:
    png = tmp_path / "t.png"
    res = _mpvfio(
        "migrate", "--vfs", "2", "--local", "--mode", "threads", "--profile",
        "instant", "--timeline", str(png), "-q",
    )  # fmt: skip
    if _has_matplotlib():
        assert res.returncode == 0, res.stderr
        assert png.stat().st_size > 0
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert res.returncode != 0
        assert "matplotlib" in res.stderr and "pip install" in res.stderr
        assert not png.exists()


def test_cli_migrate_to_incoming(tmp_path: Path) -> None:
    """``mpvfio incoming`` and ``mpvfio migrate --to`` as two processes."""
    sock = tmp_path / "m.sock"
    common = ["--vfs", "2", "--profile", "instant", "--mode", "serial", "--json"]
    target = subprocess.Popen(
        [sys.executable, "-m", "mpvfio", "incoming", "--listen", f"unix:{sock}",
         *common],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        env=child_env(),
    )  # fmt: skip
    try:
        src = _mpvfio("migrate", "--to", f"unix:{sock}", *common)
        t_out, t_err = target.communicate(timeout=60)
    finally:
        if target.poll() is None:
            target.kill()
            target.communicate(timeout=10)
    assert src.returncode == 0, src.stderr
    assert target.returncode == 0, t_err
    tdoc = json.loads(t_out)
    sdoc = json.loads(src.stdout)
    assert sdoc["checksums_equal"] is True
    assert tdoc["status"] == "completed" and tdoc["started"] is True
    assert sorted(tdoc["checksums"]) == ["vf0", "vf1"]


# -- 4 x 100 MiB -----------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_four_vfs_of_100_mib() -> None:
    big = Profile(
        name="big",
        state_size=100 * MiB,
        precopy_initial=8 * MiB,
        precopy_dirty=1 * MiB,
    )
    mode = "workers" if HAS_CALL_FDS else "threads"
    info, report = run_local(4, big, mode, params(4, timeout=60.0), props=EVENTS)
    assert info.status == "completed"
    assert info.checksums_equal
    assert info.stopcopy_bytes >= 4 * (big.state_size - big.precopy_initial)
    tinfo = check_report(report, 4)
    assert all(n >= 90 * MiB for n in tinfo["channel_bytes"]), tinfo["channel_bytes"]
    assert info.downtime_ms >= info.stop_ms
