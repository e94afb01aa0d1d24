"""Property test: random machines against a model of QEMU's rules (R5, R6, O1-O6).

Each example builds its own machine (mode, 1-6 devices, random per-arc
latencies of 0-5 ms, random one-shot errno faults on arcs of the start and
stop paths), runs start / save_setup / vm_stop(finish-migrate) / vm_start,
and checks after every notification, against an independent model of the
device FSM and of the VFIO handlers:

* every device's arcs (failed ones included), state (QEMU's cached one and
  the device's own) and error count are the model's: failed devices are
  reset to RUNNING, the walk goes on;
* O1 by timestamps: every prepare-step arc ended before any main-step arc
  began, and the VFIO_MIGRATION events keep the P2P-first order;
* the example finishes (no deadlock), and after ``close()`` no child
  process and no /dev/shm object of the machine is left.

The examples are derandomized: the same ones run every time.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from itertools import pairwise

import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mpvfio.devices.profiles import Fault, Profile
from mpvfio.events import Event
from mpvfio.jobs.switchover import event_order_violations
from mpvfio.machine import Machine
from mpvfio.uapi import fsm
from mpvfio.uapi.vfio import MigFlag, MigState
from mpvfio.vfiomig import MigrationProps
from mpvfio.vmstate import RunState

S = MigState
SC, P2P, PRE = MigFlag.STOP_COPY, MigFlag.P2P, MigFlag.PRE_COPY
STOP_PATH = [
    "PRE_COPY>PRE_COPY_P2P",
    "PRE_COPY_P2P>STOP_COPY",
    "RUNNING>RUNNING_P2P",
    "RUNNING_P2P>STOP",
    "PRE_COPY>STOP_COPY",
    "RUNNING>STOP",
]
START_PATH = [
    "STOP_COPY>STOP",
    "STOP>RUNNING_P2P",
    "RUNNING_P2P>RUNNING",
    "STOP>RUNNING",
]
ARCS = STOP_PATH + START_PATH
MODES = ["serial", "threads", "workers", "workers-relaxed"]


# -- the model ----------------------------------------------------------------------


@dataclass
class Model:
    """One device as QEMU's handlers and the kernel's FSM would move it."""

    flags: MigFlag
    faults: dict[str, int]  # arc -> failures left
    state: MigState = S.RUNNING
    errors: int = 0

    def set_state_or_reset(self, new: MigState) -> tuple[list[str], bool]:
        """R5.1/R5.2: the arcs walked; on a failed arc: reset to RUNNING."""
        if new == self.state:
            return [], True
        walked = []
        for a, b in pairwise(fsm.walk(self.flags, self.state, new)):
            key = f"{a.name}>{b.name}"
            walked.append(key)
            if self.faults.get(key, 0) > 0:
                self.faults[key] -= 1
                self.state = S.RUNNING
                self.errors += 1
                return walked, False
        self.state = new
        return walked, True

    def notify(self, running: bool, runstate: RunState) -> tuple[list[str], int, bool]:
        """R6.1 + R6.2: (arcs, how many belong to the prepare step, prep ok)."""
        prep: list[str] = []
        ok = True
        if self.flags & P2P:
            target = S.PRE_COPY_P2P if self.state == S.PRE_COPY else S.RUNNING_P2P
            prep, ok = self.set_state_or_reset(target)
        if running:
            target = S.RUNNING
        elif self.state in (S.PRE_COPY, S.PRE_COPY_P2P) and runstate in (
            RunState.FINISH_MIGRATE,
            RunState.PAUSED,
        ):
            target = S.STOP_COPY
        else:
            target = S.STOP
        main, _ = self.set_state_or_reset(target)
        return prep + main, len(prep), ok

    def save_setup(self) -> None:
        if self.flags & PRE and self.state == S.RUNNING:
            self.state = S.PRE_COPY  # no fault is ever put on this arc


# -- strategies -----------------------------------------------------------------------


@dataclass
class Spec:
    flags: MigFlag
    arc_ms: dict[str, int]
    faults: list[str] = field(default_factory=list)


@st.composite
def machines(draw: st.DrawFn) -> tuple[str, list[Spec]]:
    n = draw(st.integers(1, 6))
    flag_sets = [SC | P2P | PRE, SC | P2P]
    if n == 1:  # R4.6: only a single device may lack P2P
        flag_sets += [SC | PRE, SC]
    specs = [
        Spec(
            flags=draw(st.sampled_from(flag_sets)),
            arc_ms=draw(
                st.dictionaries(st.sampled_from(ARCS), st.integers(0, 5), max_size=4)
            ),
            faults=draw(st.lists(st.sampled_from(ARCS), max_size=2, unique=True)),
        )
        for _ in range(n)
    ]
    return draw(st.sampled_from(MODES)), specs


# -- checks ---------------------------------------------------------------------------


def _order_ok(
    report_arcs: dict[str, list[tuple[int, int]]], phase1: dict[str, int]
) -> bool:
    ends = [e for n, k in phase1.items() for _, e in report_arcs[n][:k]]
    starts = [s for n, k in phase1.items() for s, _ in report_arcs[n][k:]]
    return not ends or not starts or max(ends) <= min(starts)


def _check_notify(
    m: Machine,
    models: list[Model],
    running: bool,
    runstate: RunState,
    events: list[Event],
) -> None:
    report = m.last_report
    phase1: dict[str, int] = {}
    prep_failed: set[str] = set()
    for d, model in zip(m.devices, models, strict=True):
        want_arcs, k, ok = model.notify(running, runstate)
        got = [f"{a.src.name}>{a.dst.name}" for a in report.arcs[d.name]]
        assert got == want_arcs, d.name
        assert d.state == model.state, d.name
        assert d.call("device_state") == model.state, d.name
        assert len(d.errors) == model.errors, (d.name, [str(e) for e in d.errors])
        assert all(d.name in str(e) for e in d.errors)
        phase1[d.name] = k
        if not ok:
            prep_failed.add(d.name)
    times = {
        n: [(a.start_ns, a.end_ns) for a in arcs] for n, arcs in report.arcs.items()
    }
    assert _order_ok(times, phase1)
    # a reset during the prepare step emits "running": on start that is not
    # the device's main step (which then has nothing to do)
    evs = [
        e
        for e in events
        if not (
            running
            and e.data["device-id"] in prep_failed
            and e.data["device-state"] == "running"
        )
    ]
    assert event_order_violations(evs, running) == []
    assert len(m.errors) == sum(x.errors for x in models)


def _assert_no_leaks(prefix: str | None) -> None:
    deadline = time.monotonic() + 5.0
    kids = psutil.Process().children(recursive=True)
    while kids and time.monotonic() < deadline:
        _, kids = psutil.wait_procs(kids, timeout=0.1)
    assert not kids, kids
    if prefix is not None:
        assert [e for e in os.listdir("/dev/shm") if prefix in e] == []


# -- the property ---------------------------------------------------------------------


@pytest.mark.timeout(120)
@settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(machines())
def test_random_machines_follow_the_model(case: tuple[str, list[Spec]]) -> None:
    mode, specs = case
    m = Machine(
        mode.removesuffix("-relaxed"), relaxed_interlock=mode.endswith("-relaxed")
    )
    try:
        models = []
        for i, spec in enumerate(specs):
            profile = Profile(
                name=f"p{i}",
                flags=spec.flags,
                arc_ms=spec.arc_ms,
                faults={arc: Fault("errno", times=1) for arc in spec.faults},
            )
            m.add_vfio_device(
                profile=profile, props=MigrationProps(migration_events=True)
            )
            models.append(Model(spec.flags, dict.fromkeys(spec.faults, 1)))
        events: list[Event] = []
        m.events.subscribe(events.append, ["VFIO_MIGRATION"])
        m.start()  # the first vm_start: RUNNING -> RUNNING_P2P -> RUNNING
        _check_notify(m, models, True, RunState.RUNNING, events)
        for d, model in zip(m.devices, models, strict=True):
            d.call("save_setup")
            model.save_setup()
            assert d.state == model.state
        events.clear()
        m.vm_stop(RunState.FINISH_MIGRATE)
        _check_notify(m, models, False, RunState.FINISH_MIGRATE, events)
        assert {d.state for d in m.devices} <= {S.STOP_COPY, S.STOP, S.RUNNING}
        events.clear()
        m.vm_start()
        _check_notify(m, models, True, RunState.RUNNING, events)
        assert {d.state for d in m.devices} == {S.RUNNING}
    finally:
        prefix = m.registry.prefix if m.registry is not None else None
        m.close()
    _assert_no_leaks(prefix)
