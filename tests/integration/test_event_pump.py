"""Workers mode delivers worker events while the transitions still run.

The VFIO_MIGRATION_PREPARE event (seed 003) exists so a management
application can act *before* a slow transition finishes; these tests check
that it, and the other per-device events, reach subscribers during the
notification, not batched at its end, and that the live delivery keeps the
order rules (every P2P event before any STOP / STOP_COPY event).
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator

import pytest

from mpvfio.devices.profiles import get_profile, profile_from_dict
from mpvfio.events import Event
from mpvfio.jobs.switchover import event_order_violations
from mpvfio.machine import Machine
from mpvfio.uapi.vfio import MigState
from mpvfio.vfiomig import MigrationProps
from mpvfio.vmstate import RunState

S = MigState
PROPS = MigrationProps(migration_events=True, prepare_events=True)


class Receipts:
    """Events with the monotonic time each reached the subscriber."""

    def __init__(self, m: Machine) -> None:
        self.got: list[tuple[int, Event]] = []
        self.lock = threading.Lock()
        m.events.subscribe(self._on)

    def _on(self, ev: Event) -> None:
        with self.lock:
            self.got.append((time.monotonic_ns(), ev))

    def vfio(self) -> list[Event]:
        with self.lock:
            return [e for _, e in self.got if e.name == "VFIO_MIGRATION"]


@pytest.fixture
def slow_machine() -> Iterator[Machine]:
    prof = profile_from_dict(
        {
            "name": "slowstop",
            "base": "instant",
            "arc_ms": {"PRE_COPY_P2P>STOP_COPY": 400, "RUNNING_P2P>STOP": 400},
        }
    )
    with Machine("workers") as m:
        for _ in range(3):
            m.add_vfio_device(profile=prof, props=PROPS)
        m.start()
        yield m


def test_events_arrive_before_the_slow_transition_ends(slow_machine: Machine) -> None:
    m = slow_machine
    rec = Receipts(m)
    t0 = time.monotonic_ns()
    m.vm_stop(RunState.PAUSED)
    t1 = time.monotonic_ns()
    assert t1 - t0 >= 390e6  # the 400 ms arcs ran
    with rec.lock:
        got = list(rec.got)
    prepares = [(t, e) for t, e in got if e.name == "VFIO_MIGRATION_PREPARE"]
    p2p = [
        (t, e)
        for t, e in got
        if e.name == "VFIO_MIGRATION" and e.data["device-state"] == "running-p2p"
    ]
    stops = [
        (t, e)
        for t, e in got
        if e.name == "VFIO_MIGRATION" and e.data["device-state"] == "stop"
    ]
    assert len(p2p) == 3 and len(stops) == 3
    # the P2P events and the prepare events of the stop arcs reached us
    # while the 400 ms arcs were still running, not at the join
    for t, _ in p2p:
        assert t - t0 < 200e6, (t - t0) / 1e6
    stop_prepares = [(t, e) for t, e in prepares if e.data["device-state"] == "stop"]
    assert len(stop_prepares) == 3
    for t, _ in stop_prepares:
        assert t1 - t > 150e6, (t1 - t) / 1e6
    # every event of the notification is out when vm_stop returns
    assert all(t <= t1 for t, _ in got)
    assert event_order_violations(rec.vfio(), running=False) == []


def test_the_pump_delivers_on_its_own(slow_machine: Machine) -> None:
    m = slow_machine
    pump = m._pump
    assert pump is not None
    before = pump.pumped
    m.vm_stop(RunState.PAUSED)
    m.vm_start()
    assert pump.pumped > before


@pytest.mark.parametrize("n", [4, 16])
def test_live_delivery_keeps_the_order_with_jitter(n: int) -> None:
    """Random per-arc latencies: devices finish phases at different times."""
    base = get_profile("instant")
    rng = random.Random(n)
    with Machine("workers") as m:
        for i in range(n):
            prof = profile_from_dict(
                {
                    "name": f"j{i}",
                    "base": base.name,
                    "arc_ms": {
                        "RUNNING>RUNNING_P2P": rng.uniform(0, 8),
                        "RUNNING_P2P>STOP": rng.uniform(0, 8),
                        "STOP>RUNNING_P2P": rng.uniform(0, 8),
                        "RUNNING_P2P>RUNNING": rng.uniform(0, 8),
                    },
                }
            )
            m.add_vfio_device(profile=prof, props=MigrationProps(migration_events=True))
        rec = Receipts(m)
        m.start()
        for _ in range(15):
            with rec.lock:
                rec.got.clear()
            m.vm_stop(RunState.PAUSED)
            assert event_order_violations(rec.vfio(), running=False) == []
            assert len(rec.vfio()) == 2 * n
            with rec.lock:
                rec.got.clear()
            m.vm_start()
            assert event_order_violations(rec.vfio(), running=True) == []
            assert len(rec.vfio()) == 2 * n
        assert m.errors == []
        assert {d.state for d in m.devices} == {S.RUNNING}
