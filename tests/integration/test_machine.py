"""The Machine in every mode: end states, arcs, event order, handler ordering.

Each test builds its machines through the ``machine`` factory fixture, which
closes them at teardown (before the conftest leak check runs).  No test
asserts on speed: timestamps are only compared with each other (ordering),
and the only time bounds are hang guards (``pytest.mark.timeout``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from itertools import pairwise
from typing import Any

import pytest
from _helpers import EVENTS, MachineFactory, machine_factory, real_states

from mpvfio.devices.profiles import Fault, Profile
from mpvfio.errors import MigrationBlockedError, TransitionError
from mpvfio.events import Event
from mpvfio.jobs.switchover import event_order_violations, run_switchover
from mpvfio.machine import Machine, NotifyReport
from mpvfio.qdev import Bus, Device
from mpvfio.uapi.vfio import MigFlag, MigState
from mpvfio.vfiomig import MigrationProps
from mpvfio.vmstate import RunState

S = MigState
MODES = ("serial", "threads", "workers")
PARALLEL = ("threads", "workers")
P2P_STATES = frozenset({S.RUNNING_P2P, S.PRE_COPY_P2P})
P2P_EVENT_NAMES = frozenset({"running-p2p", "pre-copy-p2p"})

STOP_ARCS = ["PRE_COPY>PRE_COPY_P2P", "PRE_COPY_P2P>STOP_COPY"]
START_ARCS = ["STOP_COPY>STOP", "STOP>RUNNING_P2P", "RUNNING_P2P>RUNNING"]

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def machine() -> Iterator[MachineFactory]:
    """``machine(mode, **kw)``: a new Machine (no devices), closed at teardown."""
    with machine_factory("workers") as make:
        yield make


# -- helpers ---------------------------------------------------------------------------


def arcs(report: NotifyReport, name: str) -> list[str]:
    return [f"{a.src.name}>{a.dst.name}" for a in report.arcs[name]]


def states(m: Machine) -> list[MigState]:
    """QEMU's cached states (the parent's mirror in workers mode)."""
    return [d.state for d in m.devices]


def phase_split_ok(report: NotifyReport, phase1_arcs: dict[str, int]) -> bool:
    """O1 by timestamps: every phase-1 arc ended before any phase-2 arc began.

    ``phase1_arcs[name]`` is how many of the device's arcs (failed ones
    included) belong to its prepare step.
    """
    ends = [a.end_ns for name, k in phase1_arcs.items() for a in report.arcs[name][:k]]
    starts = [
        a.start_ns for name, k in phase1_arcs.items() for a in report.arcs[name][k:]
    ]
    return not ends or not starts or max(ends) <= min(starts)


class EventLog:
    """VFIO_MIGRATION events of a machine, and each device's latest state."""

    def __init__(self, m: Machine) -> None:
        self.events: list[Event] = []
        self.seen: dict[str, str] = {}
        self.p2p: set[str] = set()  # devices with a P2P event since clear()
        m.events.subscribe(self._on, ["VFIO_MIGRATION"])

    def _on(self, ev: Event) -> None:
        self.events.append(ev)
        name, state = str(ev.data["device-id"]), str(ev.data["device-state"])
        self.seen[name] = state
        if state in P2P_EVENT_NAMES:
            self.p2p.add(name)

    def clear(self) -> None:
        self.events.clear()
        self.p2p.clear()


def add_devices(
    m: Machine,
    n: int,
    profile: Profile | str = "instant",
    props: MigrationProps = EVENTS,
) -> None:
    for _ in range(n):
        m.add_vfio_device(profile=profile, props=props)


def qdev_at_depth(m: Machine, depth: int, tag: str) -> Device:
    """A non-VFIO qdev device at tree depth 1..4."""
    tree = m.vm.tree
    if depth == 1:
        dev = tree.add_device(f"sys-{tag}")
    elif depth == 2:
        dev = tree.add_device(f"pci-{tag}", m.root_bus)
    else:
        bus: Bus = tree.add_root_port(f"rp-{tag}", m.root_bus)
        if depth == 4:
            bus = tree.add_root_port(f"rp2-{tag}", bus)
        dev = tree.add_device(f"ep-{tag}", bus)
    assert dev.depth == depth
    return dev


def stop_start(
    m: Machine, log: EventLog
) -> tuple[list[str], list[MigState], list[str]]:
    """save_setup, vm_stop(finish-migrate), vm_start.

    :return: the stop's order violations, the states after it, the start's
        order violations.
    """
    for d in m.devices:
        d.call("save_setup")
    log.clear()
    m.vm_stop(RunState.FINISH_MIGRATE)
    stop = event_order_violations(log.events, running=False)
    after_stop = states(m)
    log.clear()
    m.vm_start()
    start = event_order_violations(log.events, running=True)
    return stop, after_stop, start


# -- end states, event order and checksums in every mode -------------------------------


@pytest.mark.parametrize("n", [1, 2, 4, 16])
@pytest.mark.parametrize("mode", MODES)
def test_stop_start_end_states_and_order(
    machine: MachineFactory, mode: str, n: int
) -> None:
    m = machine(mode)
    add_devices(m, n)
    log = EventLog(m)
    m.start()
    assert states(m) == [S.RUNNING] * n
    for d in m.devices:
        d.call("save_setup")
    assert states(m) == [S.PRE_COPY] * n
    log.clear()
    m.vm_stop(RunState.FINISH_MIGRATE)
    assert event_order_violations(log.events, running=False) == []
    assert states(m) == [S.STOP_COPY] * n
    assert real_states(m) == [S.STOP_COPY] * n
    # every device's events of the stop: prepare, P2P, then stop-copy
    for d in m.devices:
        mine = [
            e.data["device-state"] for e in log.events if e.data["device-id"] == d.name
        ]
        assert mine == ["pre-copy-p2p-prepare", "pre-copy-p2p", "stop-copy"]
    log.clear()
    m.vm_start()
    assert event_order_violations(log.events, running=True) == []
    assert states(m) == [S.RUNNING] * n
    assert real_states(m) == [S.RUNNING] * n
    assert m.errors == []
    for d in m.devices:
        d.call("save_cleanup")  # QEMU's cleanup after the cancelled migration
    result = run_switchover(m)
    assert result.ok, (result.errors, result.rounds[0].event_order)
    assert result.rounds[0].checksums_equal
    assert [x.final_state for x in result.rounds[0].devices] == ["RUNNING"] * n


def test_modes_agree(machine: MachineFactory) -> None:
    """Same devices, same steps: identical states, arcs and checksums."""
    seen: dict[str, Any] = {}
    for mode in MODES:
        m = machine(mode, name="same-vm")  # same keys: comparable checksums
        add_devices(m, 4)
        m.start()
        for d in m.devices:
            d.call("save_setup")
            d.call("drain", False)
        m.vm_stop(RunState.FINISH_MIGRATE)
        stop = {d.name: arcs(m.last_report, d.name) for d in m.devices}
        after_stop = (states(m), [d.checksum() for d in m.devices])
        m.vm_start()
        start = {d.name: arcs(m.last_report, d.name) for d in m.devices}
        for d in m.devices:
            d.call("save_cleanup")
        result = run_switchover(m, rounds=2)
        assert result.ok
        seen[mode] = (
            stop,
            start,
            after_stop,
            states(m),
            [
                [
                    (
                        x.checksum_stop,
                        x.checksum_resumed,
                        x.precopy_bytes,
                        x.stopcopy_bytes,
                    )
                    for x in r.devices
                ]
                for r in result.rounds
            ],
        )
        m.close()
    assert seen["serial"] == seen["threads"] == seen["workers"]


# -- the arcs each device takes --------------------------------------------------------


@pytest.mark.parametrize(
    "profile",
    [Profile(name="instant"), Profile(name="fixed", default_arc_ms=2.0)],
    ids=["instant", "fixed"],
)
def test_serial_arc_sequence(machine: MachineFactory, profile: Profile) -> None:
    m = machine("serial")
    add_devices(m, 4, profile)
    m.start()
    for d in m.devices:
        d.call("save_setup")
    m.vm_stop(RunState.FINISH_MIGRATE)
    stop = m.last_report
    m.vm_start()
    start = m.last_report
    for d in m.devices:
        assert arcs(stop, d.name) == STOP_ARCS
        assert arcs(start, d.name) == START_ARCS
    # upstream's serial order: every P2P arc (stop walk: last registered
    # first), then every main arc in the same order
    names = [d.name for d in m.devices]
    rev = names[::-1]
    every = sorted(
        (a for d in m.devices for a in stop.arcs[d.name]), key=lambda a: a.start_ns
    )
    assert [(a.device, a.dst) for a in every] == (
        [(n, S.PRE_COPY_P2P) for n in rev] + [(n, S.STOP_COPY) for n in rev]
    )
    every = sorted(
        (a for d in m.devices for a in start.arcs[d.name]), key=lambda a: a.start_ns
    )
    assert [(a.device, a.dst) for a in every] == (
        [(n, x) for n in names for x in (S.STOP, S.RUNNING_P2P)]
        + [(n, S.RUNNING) for n in names]
    )
    assert stop.ideal_ms() <= stop.ms  # the report's own arithmetic


@pytest.mark.parametrize("mode", MODES)
def test_arc_sequence_every_mode(machine: MachineFactory, mode: str) -> None:
    m = machine(mode)
    add_devices(m, 4, Profile(name="fixed", default_arc_ms=2.0))
    m.start()
    for d in m.devices:
        d.call("save_setup")
    m.vm_stop(RunState.FINISH_MIGRATE)
    stop = m.last_report
    m.vm_start()
    for d in m.devices:
        assert arcs(stop, d.name) == STOP_ARCS
        assert arcs(m.last_report, d.name) == START_ARCS
    assert phase_split_ok(stop, {d.name: 1 for d in m.devices})
    assert phase_split_ok(m.last_report, {d.name: 2 for d in m.devices})


@pytest.mark.parametrize("mode", MODES)
def test_running_device_stop_and_cont(machine: MachineFactory, mode: str) -> None:
    """A device not pre-copying: RUNNING -> RUNNING_P2P -> STOP, then back."""
    m = machine(mode)
    m.add_vfio_device(
        profile=Profile(name="noprecopy", flags=MigFlag.STOP_COPY | MigFlag.P2P),
        props=EVENTS,
    )
    m.add_vfio_device(props=EVENTS)  # pre-copy capable, but no save_setup
    log = EventLog(m)
    m.start()
    for d in m.devices:
        d.call("save_setup")  # a no-op for the first device
    assert states(m) == [S.RUNNING, S.PRE_COPY]
    m.vm_stop(RunState.FINISH_MIGRATE)
    assert arcs(m.last_report, "vf0") == ["RUNNING>RUNNING_P2P", "RUNNING_P2P>STOP"]
    assert states(m) == real_states(m) == [S.STOP, S.STOP_COPY]
    for d in m.devices:
        d.call("save_cleanup")
    assert states(m) == [S.STOP, S.STOP]
    log.clear()
    m.vm_start()  # `cont`
    for d in m.devices:
        assert arcs(m.last_report, d.name) == [
            "STOP>RUNNING_P2P",
            "RUNNING_P2P>RUNNING",
        ]
    assert event_order_violations(log.events, running=True) == []
    assert states(m) == real_states(m) == [S.RUNNING, S.RUNNING]
    # a user `stop` (paused) of a VM that is not migrating: STOP, and back
    m.vm_stop(RunState.PAUSED)
    assert states(m) == [S.STOP, S.STOP]
    m.vm_start()
    assert states(m) == [S.RUNNING, S.RUNNING]
    assert m.errors == []


@pytest.mark.parametrize("runstate", [RunState.PAUSED, RunState.SHUTDOWN])
@pytest.mark.parametrize("mode", MODES)
def test_stop_target_follows_runstate(
    machine: MachineFactory, mode: str, runstate: RunState
) -> None:
    """R6.2: a pre-copying device keeps STOP_COPY on paused, else STOP."""
    m = machine(mode)
    add_devices(m, 2)
    m.start()
    for d in m.devices:
        d.call("save_setup")
    m.vm_stop(runstate)
    want = S.STOP_COPY if runstate == RunState.PAUSED else S.STOP
    assert states(m) == real_states(m) == [want, want]
    # O9: stopping a VM that is not live runs no handler
    m.vm_stop(RunState.FINISH_MIGRATE)
    assert all(a == [] for a in m.last_report.arcs.values())
    assert states(m) == [want, want]


@pytest.mark.parametrize("mode", MODES)
def test_target_path(machine: MachineFactory, mode: str) -> None:
    """Destination: RESUMING -> (STOP) -> RUNNING_P2P -> RUNNING, same bytes."""
    src = machine(mode)
    dst = machine(mode)
    for i in range(3):
        src.add_vfio_device(key=f"k{i}", props=EVENTS)
        dst.add_vfio_device(key=f"k{i}", props=EVENTS)
    src.start()
    dst.start(run=False, runstate=RunState.INMIGRATE)
    precopy = []
    for d in src.devices:
        d.call("save_setup")
        precopy.append(d.call("drain", False))  # dirties the source state
    src.vm_stop(RunState.FINISH_MIGRATE)
    sums = [d.checksum() for d in src.devices]
    rest = [d.call("drain", True) for d in src.devices]
    for d, pre, tail in zip(dst.devices, precopy, rest, strict=True):
        d.call("load_setup")
        assert d.state == S.RESUMING
        d.call("write_all", pre + tail)
    log = EventLog(dst)
    dst.vm_start()
    for d in dst.devices:
        assert arcs(dst.last_report, d.name) == [
            "RESUMING>STOP",
            "STOP>RUNNING_P2P",
            "RUNNING_P2P>RUNNING",
        ]
        d.call("load_cleanup")
    assert event_order_violations(log.events, running=True) == []
    assert states(dst) == real_states(dst) == [S.RUNNING] * 3
    assert [d.checksum() for d in dst.devices] == sums
    assert dst.errors == [] and src.errors == []


# -- devices without P2P ---------------------------------------------------------------


NO_P2P = Profile(name="nop2p", flags=MigFlag.STOP_COPY | MigFlag.PRE_COPY)


@pytest.mark.parametrize("mode", PARALLEL)
def test_single_device_without_p2p(machine: MachineFactory, mode: str) -> None:
    m = machine(mode)
    m.add_vfio_device(profile=NO_P2P, props=EVENTS)
    d = m.devices[0]
    assert all(e.prepare_cb is None for e in d.entries)  # no prepare stage
    prepared: list[int] = []
    # the last prepare callbacks of each walk: priority 0 on stop, deepest on start
    m.vm.add_vm_change_state_handler(
        prepare_cb=lambda r, s: prepared.append(time.monotonic_ns())
    )
    m.vm.qdev_add_vm_change_state_handler(
        qdev_at_depth(m, 4, "deep"),
        prepare_cb=lambda r, s: prepared.append(time.monotonic_ns()),
    )
    m.start()
    assert m.migration_blockers() == []
    d.call("save_setup")
    for step in ("stop", "start"):
        prepared.clear()
        if step == "stop":
            m.vm_stop(RunState.FINISH_MIGRATE)
            assert arcs(m.last_report, d.name) == ["PRE_COPY>STOP_COPY"]
            assert states(m) == real_states(m) == [S.STOP_COPY]
        else:
            m.vm_start()
            assert arcs(m.last_report, d.name) == ["STOP_COPY>STOP", "STOP>RUNNING"]
            assert states(m) == real_states(m) == [S.RUNNING]
        # dispatched in its main entry: after every prepare callback returned
        assert len(prepared) == 2
        assert m.last_report.arcs[d.name][0].start_ns > max(prepared)
    if mode == "workers":
        assert m.barrier is not None
        assert m.barrier.parties == 0  # never armed: nobody waited at it
        assert m.barrier.generation == 0
    assert m.errors == []
    d.call("save_cleanup")
    assert run_switchover(m).ok


@pytest.mark.parametrize("mode", MODES)
def test_two_devices_without_p2p_are_blocked(
    machine: MachineFactory, mode: str
) -> None:
    m = machine(mode)
    m.add_vfio_device(profile=NO_P2P)
    m.add_vfio_device(profile=NO_P2P)
    m.start()
    assert m.migration_blockers()
    with pytest.raises(MigrationBlockedError, match="P2P"):
        run_switchover(m)


# -- ordering with non-VFIO handlers ---------------------------------------------------


class Recorder:
    """Non-VFIO handlers: priority 0 and qdev devices at depths 1..4."""

    def __init__(self, m: Machine, log: EventLog) -> None:
        self.m = m
        self.log = log
        #: (tag, time, latest states seen, devices that reached P2P)
        self.calls: list[tuple[str, int, dict[str, str], set[str]]] = []
        m.vm.add_vm_change_state_handler(cb=self._cb("prio0"), name="prio0")
        for depth in (1, 2, 3, 4):
            dev = qdev_at_depth(m, depth, f"d{depth}")
            m.vm.qdev_add_vm_change_state_handler(
                dev, cb=self._cb(f"depth{depth}"), name=f"depth{depth}"
            )

    def _cb(self, tag: str) -> Callable[[bool, RunState], None]:
        def cb(running: bool, state: RunState) -> None:
            self.calls.append(
                (tag, time.monotonic_ns(), dict(self.log.seen), set(self.log.p2p))
            )

        return cb

    def seen_by(self, tag: str) -> dict[str, str]:
        return next(seen for t, _, seen, _ in self.calls if t == tag)


@pytest.mark.parametrize(
    ("mode", "relaxed"),
    [("serial", False), ("threads", False), ("workers", False), ("workers", True)],
)
def test_order_with_other_handlers(
    machine: MachineFactory, mode: str, relaxed: bool
) -> None:
    m = machine(mode, relaxed_interlock=relaxed)
    add_devices(m, 4, Profile(name="small", default_arc_ms=1.0))
    log = EventLog(m)
    rec = Recorder(m, log)
    names = [d.name for d in m.devices]
    m.start()
    for d in m.devices:
        d.call("save_setup")
    for running in (False, True):
        rec.calls.clear()
        log.clear()
        if running:
            m.vm_start()
        else:
            m.vm_stop(RunState.FINISH_MIGRATE)
        report = m.last_report
        final = "running" if running else "stop-copy"
        # O4: every device is final when the notification returns
        want = S.RUNNING if running else S.STOP_COPY
        assert states(m) == real_states(m) == [want] * 4
        assert {n: log.seen[n] for n in names} == dict.fromkeys(names, final)
        # every handler ran once, in walk order (O2/O3)
        tags = [t for t, _, _, _ in rec.calls]
        order = ["prio0", "depth1", "depth2", "depth3", "depth4"]
        assert tags == (order if running else order[::-1])
        # O3 kept by the joins at depth 3: handlers walked after the VFIO
        # devices' slot see them final
        after = ["depth4"] if running else ["depth2", "depth1", "prio0"]
        for tag in after:
            assert {n: rec.seen_by(tag)[n] for n in names} == dict.fromkeys(
                names, final
            ), tag
        first_main = rec.calls[0]
        p2p_end = max(
            a.end_ns for n in names for a in report.arcs[n] if a.dst in P2P_STATES
        )
        if not relaxed:
            # O1: every device reached P2P before the first main callback ran
            # (in workers mode some may be in phase 2 already: by design)
            assert first_main[3] == set(names)
            assert first_main[1] >= p2p_end
            assert event_order_violations(log.events, running) == []
        else:
            # relaxed: O1 is kept among the VFIO devices only
            assert event_order_violations(log.events, running) == []
            assert phase_split_ok(report, dict.fromkeys(names, 1 if not running else 2))
    assert m.errors == []


@pytest.mark.parametrize("relaxed", [False, True])
def test_same_depth_handler_runs_during_phase2(
    machine: MachineFactory, relaxed: bool
) -> None:
    """Workers: a depth-3 callback runs while the STOP_COPY arcs are in flight."""
    slow = Profile(name="slowstop", arc_ms={"PRE_COPY_P2P>STOP_COPY": 100.0})
    m = machine("workers", relaxed_interlock=relaxed)
    add_devices(m, 2, slow)
    seen: list[int] = []
    m.vm.qdev_add_vm_change_state_handler(
        qdev_at_depth(m, 3, "peer"), cb=lambda r, s: seen.append(time.monotonic_ns())
    )
    m.start()
    for d in m.devices:
        d.call("save_setup")
    seen.clear()
    m.vm_stop(RunState.FINISH_MIGRATE)
    assert states(m) == [S.STOP_COPY, S.STOP_COPY]
    (t,) = seen
    for d in m.devices:
        p2p, main = m.last_report.arcs[d.name]
        assert main.dst == S.STOP_COPY
        assert t < main.end_ns  # before the join: phase 2 still running
        if not relaxed:
            assert t >= p2p.end_ns  # after the interlock


# -- parallel states off on one device -------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "relaxed"), [("threads", False), ("workers", False), ("workers", True)]
)
@pytest.mark.parametrize("serial_index", [0, 1, 2])
def test_parallel_states_off_on_one_device(
    machine: MachineFactory, mode: str, relaxed: bool, serial_index: int
) -> None:
    # the serial device is slow to enter P2P: the parallel ones must wait for it
    slow = Profile(
        name="slowp2p", arc_ms={"PRE_COPY>PRE_COPY_P2P": 20.0, "STOP>RUNNING_P2P": 20.0}
    )
    m = machine(mode, relaxed_interlock=relaxed)
    for i in range(3):
        if i == serial_index:
            m.add_vfio_device(
                profile=slow,
                props=MigrationProps(migration_events=True, parallel_states=False),
            )
        else:
            m.add_vfio_device(props=EVENTS)
    log = EventLog(m)
    names = [d.name for d in m.devices]
    m.start()
    for _ in range(2):  # twice: the barrier is re-armed every round
        assert stop_start(m, log) == ([], [S.STOP_COPY] * 3, [])
        assert states(m) == real_states(m) == [S.RUNNING] * 3
        assert phase_split_ok(m.last_report, dict.fromkeys(names, 2))
        assert phase_split_ok(m.reports[-2], dict.fromkeys(names, 1))
        for d in m.devices:
            d.call("save_cleanup")
    assert m.errors == []
    assert run_switchover(m).ok


# -- failing arcs (O6) -----------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_failing_main_arc(machine: MachineFactory, mode: str) -> None:
    bad = Profile(
        name="badstop", faults={"PRE_COPY_P2P>STOP_COPY": Fault("errno", times=1)}
    )
    m = machine(mode)
    m.add_vfio_device(props=EVENTS)
    m.add_vfio_device(profile=bad, props=EVENTS)
    m.add_vfio_device(props=EVENTS)
    log = EventLog(m)
    m.start()
    assert stop_start(m, log) == ([], [S.STOP_COPY, S.RUNNING, S.STOP_COPY], [])
    report = m.reports[-2]
    assert arcs(report, "vf1") == STOP_ARCS
    assert [a.ok for a in report.arcs["vf1"]] == [True, False]
    errs = [e for e in m.errors if isinstance(e, TransitionError)]
    assert len(errs) == len(m.errors) == 1
    assert errs[0].device == "vf1" and "vf1" in str(errs[0])
    assert "STOP_COPY" in str(errs[0]) and "EIO" in str(errs[0])
    assert m.device("vf1").errors == errs
    assert report.errors == errs
    assert states(m) == real_states(m) == [S.RUNNING] * 3
    # the reset device went RUNNING -> RUNNING_P2P -> RUNNING with the others
    assert arcs(m.last_report, "vf1") == ["RUNNING>RUNNING_P2P", "RUNNING_P2P>RUNNING"]


@pytest.mark.parametrize("mode", MODES)
def test_failing_prepare_arc(machine: MachineFactory, mode: str) -> None:
    """The phase-2 target comes from the post-phase-1 (reset) state: STOP."""
    bad = Profile(
        name="badp2p", faults={"PRE_COPY>PRE_COPY_P2P": Fault("errno", times=1)}
    )
    m = machine(mode)
    m.add_vfio_device(props=EVENTS)
    m.add_vfio_device(props=EVENTS)
    m.add_vfio_device(profile=bad, props=EVENTS)
    m.add_vfio_device(props=EVENTS)
    log = EventLog(m)
    names = [d.name for d in m.devices]
    m.start()
    for d in m.devices:
        d.call("save_setup")
    log.clear()
    m.vm_stop(RunState.FINISH_MIGRATE)
    assert event_order_violations(log.events, running=False) == []
    report = m.last_report
    assert arcs(report, "vf2") == [
        "PRE_COPY>PRE_COPY_P2P",
        "RUNNING>RUNNING_P2P",
        "RUNNING_P2P>STOP",
    ]
    assert [a.ok for a in report.arcs["vf2"]] == [False, True, True]
    assert (
        states(m) == real_states(m) == [S.STOP_COPY, S.STOP_COPY, S.STOP, S.STOP_COPY]
    )
    assert phase_split_ok(report, dict.fromkeys(names, 1))
    assert [getattr(e, "device", None) for e in m.errors] == ["vf2"]
    assert "PRE_COPY_P2P" in str(m.errors[0])
    mine = [e.data["device-state"] for e in log.events if e.data["device-id"] == "vf2"]
    assert mine == ["pre-copy-p2p-prepare", "running", "stop"]
    m.vm_start()
    assert states(m) == real_states(m) == [S.RUNNING] * 4
    assert len(m.errors) == 1


@pytest.mark.parametrize("mode", MODES)
def test_failing_start_arcs(machine: MachineFactory, mode: str) -> None:
    """A failure in either phase of the start leaves the device RUNNING."""
    m = machine(mode)
    m.add_vfio_device(
        profile=Profile(
            name="badp1", faults={"STOP>RUNNING_P2P": Fault("errno", times=1)}
        )
    )
    m.add_vfio_device(
        profile=Profile(
            name="badp2", faults={"RUNNING_P2P>RUNNING": Fault("errno", times=1)}
        )
    )
    m.add_vfio_device()
    m.start(run=False)
    # the very first vm_start: RUNNING -> RUNNING_P2P -> RUNNING, vf1 fails
    m.vm_start()
    assert states(m) == [S.RUNNING] * 3
    assert [getattr(e, "device", None) for e in m.errors] == ["vf1"]
    m.vm_stop(RunState.PAUSED)
    assert states(m) == [S.STOP] * 3
    m.vm_start()  # vf0 fails entering RUNNING_P2P: reset, RUNNING
    assert states(m) == real_states(m) == [S.RUNNING] * 3
    assert [getattr(e, "device", None) for e in m.errors] == ["vf1", "vf0"]
    assert arcs(m.last_report, "vf0") == ["STOP>RUNNING_P2P"]


# -- the PF concurrency gate ----------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_pf_gate_serialises_arcs(machine: MachineFactory, mode: str) -> None:
    """pf_concurrency=1: the VFs of one PF never run arcs at the same time."""
    one = Profile(name="onebyone", default_arc_ms=2.0, pf_concurrency=1)
    m = machine(mode)
    add_devices(m, 3, one)
    m.start()
    for d in m.devices:
        d.call("save_setup")
    m.vm_stop(RunState.FINISH_MIGRATE)
    starts = sorted(a.start_ns for arcs in m.last_report.arcs.values() for a in arcs)
    assert len(starts) == 6
    # an arc starts once the previous one released the PF, which was after
    # its 2 ms sleep (ArcRecord.end_ns is read after the release: not used)
    assert all(b - a >= 2_000_000 for a, b in pairwise(starts))
    assert states(m) == [S.STOP_COPY] * 3
    assert m.errors == []


@pytest.mark.timeout(20)
@pytest.mark.parametrize("mode", ["serial", "threads"])
def test_pf_gate_timeout_in_process(
    machine: MachineFactory, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A wedged PF: the arc gives up after the gate timeout (not never)."""
    import mpvfio.devices.emulated as emulated

    monkeypatch.setattr(emulated, "GATE_TIMEOUT_S", 0.05)
    m = machine(mode)
    add_devices(m, 2, Profile(name="gated", pf_concurrency=1))
    m.start()
    gate = m.devices[0].device._gate  # type: ignore[union-attr]
    assert gate is not None and gate.acquire(1.0)  # wedge the PF
    try:
        m.vm_stop(RunState.FINISH_MIGRATE)
    finally:
        gate.release()
    # both failed (prepare and main step) and were reset
    assert states(m) == [S.RUNNING, S.RUNNING]
    assert all("PF busy" in str(e) and "ETIMEDOUT" in str(e) for e in m.errors)
    assert sorted(getattr(e, "device", "") for e in m.errors) == [
        "vf0",
        "vf0",
        "vf1",
        "vf1",
    ]
