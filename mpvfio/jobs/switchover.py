"""The switchover job: one machine plays source, then target (layer 4).

:func:`run_switchover` takes every VFIO device of a started
:class:`~mpvfio.machine.Machine` through what a live migration does to it,
in QEMU's order (../shared/spec/QEMU.md R8-R9, §13):

source  save_setup (RUNNING -> PRE_COPY where supported), drain the pre-copy
        data to ENOMSG, **vm_stop(finish-migrate)** (PRE_COPY -> PRE_COPY_P2P
        -> STOP_COPY, or RUNNING -> RUNNING_P2P -> STOP), save_complete
        (-> STOP_COPY, a no-op when pre-copied) and the STOP_COPY data read,
        save_cleanup (STOP_COPY -> STOP, outside the downtime window);
target  load_setup (STOP -> RESUMING), the saved bytes written back, then
        **vm_start()** (RESUMING -> RUNNING_P2P -> RUNNING) and load_cleanup.

Each device's state checksum at the stop must come back unchanged.  The
result reports the wall time of each phase (the stop and start phases are
the downtime the transitions add), the data time, each device's arcs, and
whether the VFIO_MIGRATION events kept the P2P-first order.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from mpvfio.devices.base import ArcRecord
from mpvfio.errors import DeviceError, MigrationBlockedError, MpvfioError
from mpvfio.events import Event
from mpvfio.machine import Machine, NotifyReport, VFIODevice
from mpvfio.report.arcreport import arcs_from_dicts
from mpvfio.uapi.vfio import MigState
from mpvfio.vmstate import RunState

__all__ = [
    "DeviceResult",
    "RoundResult",
    "SwitchoverResult",
    "event_order_violations",
    "run_switchover",
]

P2P_EVENTS = frozenset({"running-p2p", "pre-copy-p2p", "pre-copy-p2p-prepare"})
STOP_EVENTS = frozenset({"stop", "stop-copy"})


def event_order_violations(
    events: list[Event], running: bool, ignore: set[str] | frozenset[str] = frozenset()
) -> list[str]:
    """Check O1/O7 on the VFIO_MIGRATION events of one notification.

    Every phase-1 (P2P) event must come before any phase-2 event (STOP /
    STOP_COPY on stop, RUNNING on start), and each device's
    ``pre-copy-p2p-prepare`` before its own ``pre-copy-p2p``.

    :param ignore: devices that failed in this notification: a failed
        transition is reset to RUNNING and QEMU emits that ``running`` event
        at once, in whatever phase it happened (R5.1), so their events do
        not follow the phase order.
    :return: human-readable violations (empty when the order is legal).
    """
    phase2 = frozenset({"running"}) if running else STOP_EVENTS
    out: list[str] = []
    first_phase2: Event | None = None
    prepared: set[str] = set()
    for ev in events:
        if ev.name != "VFIO_MIGRATION":
            continue
        state = ev.data.get("device-state")
        dev = str(ev.data.get("device-id"))
        if dev in ignore:
            continue
        if state in phase2 and first_phase2 is None:
            first_phase2 = ev
        elif state in P2P_EVENTS and first_phase2 is not None:
            out.append(
                f"{dev} {state} came after {first_phase2.data.get('device-id')} "
                f"{first_phase2.data.get('device-state')}"
            )
        if state == "pre-copy-p2p-prepare":
            prepared.add(dev)
        elif state == "pre-copy-p2p" and dev not in prepared:
            out.append(f"{dev} pre-copy-p2p without pre-copy-p2p-prepare before it")
    return out


@dataclass
class DeviceResult:
    """One device's part of one switchover round."""

    name: str
    checksum_stop: str
    checksum_resumed: str
    precopy_bytes: int
    stopcopy_bytes: int
    final_state: str
    errors: list[str] = field(default_factory=list)
    arcs: dict[str, list[dict[str, object]]] = field(default_factory=dict)

    @property
    def checksum_equal(self) -> bool:
        """Whether the resumed state is byte-identical to the stopped one."""
        return self.checksum_stop == self.checksum_resumed


@dataclass
class RoundResult:
    """Wall times (ms) of one source+target round."""

    round: int
    stop_ms: float
    data_ms: float
    load_ms: float
    start_ms: float
    cleanup_ms: float
    precopy_ms: float
    ideal_stop_ms: float
    ideal_start_ms: float
    event_order: list[str]
    devices: list[DeviceResult]

    @property
    def downtime_ms(self) -> float:
        """Stop phase + data read + data load + start phase."""
        return self.stop_ms + self.data_ms + self.load_ms + self.start_ms

    @property
    def checksums_equal(self) -> bool:
        """Every device resumed byte-identical."""
        return all(d.checksum_equal for d in self.devices)


@dataclass
class SwitchoverResult:
    """All rounds of a switchover run."""

    mode: str
    vfs: int
    profile: str
    rounds: list[RoundResult]
    errors: list[str]

    @property
    def ok(self) -> bool:
        """Checksums equal, legal event order, no device error, every round."""
        return not self.errors and all(
            r.checksums_equal and not r.event_order for r in self.rounds
        )

    def median(self, attr: str) -> float:
        """Median of one RoundResult attribute over the rounds."""
        return float(statistics.median(getattr(r, attr) for r in self.rounds))

    def arc_records(self) -> list[ArcRecord]:
        """Every device's stop and start arcs, all rounds (for :mod:`arcreport`)."""
        return arcs_from_dicts(
            a
            for rnd in self.rounds
            for dev in rnd.devices
            for phase in ("stop", "start")
            for a in dev.arcs.get(phase, [])
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (what ``mpvfio switchover --json`` prints)."""
        rounds = []
        for r in self.rounds:
            d = asdict(r)
            d["downtime_ms"] = round(r.downtime_ms, 3)
            d["checksums_equal"] = r.checksums_equal
            for k in (
                "stop_ms",
                "data_ms",
                "load_ms",
                "start_ms",
                "cleanup_ms",
                "precopy_ms",
                "ideal_stop_ms",
                "ideal_start_ms",
            ):
                d[k] = round(d[k], 3)
            rounds.append(d)
        return {
            "mode": self.mode,
            "vfs": self.vfs,
            "profile": self.profile,
            "ok": self.ok,
            "errors": self.errors,
            "median": {
                k: round(self.median(k), 3)
                for k in (
                    "stop_ms",
                    "start_ms",
                    "data_ms",
                    "load_ms",
                    "downtime_ms",
                    "ideal_stop_ms",
                    "ideal_start_ms",
                )
            },
            "rounds": rounds,
        }


def _arcs(report: NotifyReport, name: str) -> list[dict[str, object]]:
    return [a.to_dict() for a in report.arcs.get(name, [])]


def _timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1000.0


def run_switchover(
    machine: Machine,
    rounds: int = 1,
    progress: Callable[[str], None] | None = None,
) -> SwitchoverResult:
    """Run ``rounds`` source+target switchovers on a started machine.

    :raise MigrationBlockedError: the device set cannot migrate (R4.6).
    :raise MpvfioError: a device operation failed outside the handler walk
        (the message names the device and the step).
    """
    blockers = machine.migration_blockers()
    if blockers:
        raise MigrationBlockedError("; ".join(blockers))
    if rounds < 1:
        raise MpvfioError("rounds must be >= 1")
    results: list[RoundResult] = []
    say = progress or (lambda _msg: None)
    for i in range(rounds):
        results.append(_one_round(machine, i, say))
        r = results[-1]
        say(
            f"round {i + 1}/{rounds}: stop {r.stop_ms:.1f} ms, data "
            f"{r.data_ms:.1f} ms, load {r.load_ms:.1f} ms, start "
            f"{r.start_ms:.1f} ms, checksums "
            f"{'equal' if r.checksums_equal else 'DIFFER'}"
        )
    errors = [str(e) for e in machine.errors]
    prof = {d.profile.name for d in machine.devices}
    return SwitchoverResult(
        machine.mode.value,
        len(machine.devices),
        ",".join(sorted(prof)),
        results,
        errors,
    )


def _step(devs: list[VFIODevice], what: str, *args: Any) -> list[Any]:
    out = []
    for d in devs:
        try:
            out.append(d.call(what, *args))
        except MpvfioError as exc:
            raise DeviceError(f"{what} failed: {exc}", d.name) from exc
    return out


def _one_round(machine: Machine, index: int, say: Callable[[str], None]) -> RoundResult:
    devs = machine.devices
    events: list[Event] = []
    sub = machine.events.subscribe(events.append, ["VFIO_MIGRATION"])
    try:
        if machine.vm.runstate != RunState.RUNNING:
            machine.vm_start()
        # ---- source: setup and pre-copy while the VM runs
        t = time.perf_counter()
        _step(devs, "save_setup")
        precopy = [
            d.call("drain", False) if d.state == MigState.PRE_COPY else b""
            for d in devs
        ]
        precopy_ms = (time.perf_counter() - t) * 1000.0
        # ---- the stop: downtime starts
        events.clear()
        machine.vm_stop(RunState.FINISH_MIGRATE)
        stop = machine.last_report
        order = event_order_violations(events, running=False)
        sums = _step(devs, "checksum")
        data: list[bytes] = []

        def read_all() -> None:
            _step(devs, "save_complete")
            data.extend(_step(devs, "drain", True))

        data_ms = _timed(read_all)
        cleanup_ms = _timed(lambda: _step(devs, "save_cleanup"))
        # ---- the target: the same devices take the saved bytes back
        _step(devs, "load_setup")

        def load_all() -> None:
            for d, pre, rest in zip(devs, precopy, data, strict=True):
                d.call("write_all", pre + rest)

        load_ms = _timed(load_all)
        events.clear()
        machine.vm_start()
        start = machine.last_report
        order += event_order_violations(events, running=True)
        _step(devs, "load_cleanup")
        after = _step(devs, "checksum")
    finally:
        sub.cancel()
    dev_results = [
        DeviceResult(
            d.name,
            s,
            a,
            len(p),
            len(x),
            d.state.name,
            [str(e) for e in d.errors],
            {"stop": _arcs(stop, d.name), "start": _arcs(start, d.name)},
        )
        for d, s, a, p, x in zip(devs, sums, after, precopy, data, strict=True)
    ]
    return RoundResult(
        index,
        stop.ms,
        data_ms,
        load_ms,
        start.ms,
        cleanup_ms,
        precopy_ms,
        stop.ideal_ms(),
        start.ideal_ms(),
        order,
        dev_results,
    )
