"""Stress runs: many VFs, many stop/start rounds, random faults (layer 4).

:func:`run_stress` starts one machine and repeats rounds of
``vm_stop(paused)`` + ``vm_start()`` (or, with ``migrate=True``, full
source+target switchovers).  Before each round it draws faults from a seeded
RNG, so a failing run is reproducible with the same ``seed``:

``arc``    one arc of the round's path fails once with EIO (the device is
           reset to RUNNING per QEMU's set_state_or_reset),
``kill``   the device's worker is SIGKILLed at a random point of the round,
``hang``   the worker hangs at a random point past the transition deadline.

After every round it checks the invariants and records each violation:

* P2P-first: no phase-2 VFIO_MIGRATION event before a phase-1 one (O1/O7);
* final states when notify returns: after the stop every device is STOP
  (or RUNNING when it failed this round), after the start RUNNING (O4);
  the device's own state (asked from the device, not the cache) agrees;
* no lost device state: every device's checksum is unchanged by the round
  (state lives in shared memory, so it survives a killed worker);
* no leaked process or IPC object: exactly one live worker per device, and
  the machine's /dev/shm objects are exactly those it started with.
"""

from __future__ import annotations

import errno as _errno
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psutil

from mpvfio.devices.base import ArcRecord
from mpvfio.devices.profiles import Fault
from mpvfio.errors import MpvfioError
from mpvfio.events import Event
from mpvfio.jobs.switchover import event_order_violations, run_switchover
from mpvfio.machine import Machine, Mode
from mpvfio.uapi.vfio import MigState
from mpvfio.vmstate import RunState

__all__ = ["StressResult", "run_stress"]

FAULT_KINDS = ("arc", "kill", "hang")
_STOP_ARCS = ("RUNNING>RUNNING_P2P", "RUNNING_P2P>STOP")
_START_ARCS = ("STOP>RUNNING_P2P", "RUNNING_P2P>RUNNING")
_POINTS = ("before", "phase1", "barrier", "phase2", "join")


@dataclass
class StressResult:
    """What a stress run saw."""

    vfs: int
    rounds: int
    seed: int
    faults: dict[str, int] = field(default_factory=dict)
    device_errors: int = 0
    violations: list[str] = field(default_factory=list)
    stop_ms: list[float] = field(default_factory=list)
    start_ms: list[float] = field(default_factory=list)
    elapsed_s: float = 0.0
    #: every arc every device took, all rounds (``--arcs``: histograms)
    arcs: list[ArcRecord] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """No invariant was violated."""
        return not self.violations

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary."""

        def q(xs: list[float], p: float) -> float:
            if not xs:
                return 0.0
            s = sorted(xs)
            return round(s[min(len(s) - 1, int(p * len(s)))], 3)

        return {
            "vfs": self.vfs,
            "rounds": self.rounds,
            "seed": self.seed,
            "ok": self.ok,
            "faults": self.faults,
            "device_errors": self.device_errors,
            "violations": self.violations,
            "stop_ms": {
                "p50": q(self.stop_ms, 0.5),
                "p90": q(self.stop_ms, 0.9),
                "max": q(self.stop_ms, 1.0),
            },
            "start_ms": {
                "p50": q(self.start_ms, 0.5),
                "p90": q(self.start_ms, 0.9),
                "max": q(self.start_ms, 1.0),
            },
            "elapsed_s": round(self.elapsed_s, 2),
        }


def _shm_objects(machine: Machine) -> set[str]:
    reg = machine.registry
    if reg is None:
        return set()
    try:
        return {n for n in os.listdir("/dev/shm") if reg.prefix in n}
    except FileNotFoundError:
        return set()


def _live(proc: psutil.Process) -> bool:
    """Neither a zombie nor gone (it may exit after ``children()`` saw it)."""
    try:
        return bool(proc.status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def _arm(
    machine: Machine,
    rng: random.Random,
    rate: float,
    kinds: tuple[str, ...],
    result: StressResult,
) -> set[str]:
    """Draw this round's faults; return the devices expected to fail."""
    failing: set[str] = set()
    for d in machine.devices:
        if rng.random() >= rate:
            continue
        kind = rng.choice(kinds)
        if kind in ("kill", "hang") and machine.mode != Mode.WORKERS:
            kind = "arc"
        result.faults[kind] = result.faults.get(kind, 0) + 1
        failing.add(d.name)
        if kind == "arc":
            arc = rng.choice(_STOP_ARCS + _START_ARCS)
            d.call("arm_fault", arc, Fault("errno", err=_errno.EIO))
        else:
            point = rng.choice(_POINTS)
            machine.inject_worker_fault(d.name, point, kind)
    return failing


def _migrate_round(
    machine: Machine, i: int, failing: set[str], n_err: int, result: StressResult
) -> None:
    """One full switchover round and its invariants.

    A device that failed this round (an injected fault, a recovered worker)
    is reset to RUNNING and loses the round's data by QEMU's rules: its
    checksum and its event order are not held against it.
    """
    sw = run_switchover(machine)
    r = sw.rounds[0]
    result.arcs.extend(sw.arc_records())
    result.stop_ms.append(r.stop_ms)
    result.start_ms.append(r.start_ms)
    failed = failing | _failed_devices(machine, n_err)
    for v in r.event_order:
        # a failed device's reset emits "running" at once, in any phase
        # (R5.1): an order violation that names one is not a violation
        if not failed.intersection(v.split()):
            result.violations.append(f"round {i}: {v}")
    for dev in r.devices:
        if dev.name in failed:
            continue
        if not dev.checksum_equal:
            result.violations.append(
                f"round {i}: {dev.name} lost device state (resumed bytes differ "
                "from the bytes at the stop)"
            )
        if dev.final_state != MigState.RUNNING.name:
            result.violations.append(
                f"round {i}: {dev.name} ended the switchover in {dev.final_state}"
            )


def _failed_devices(machine: Machine, since: int) -> set[str]:
    """Devices named by the errors recorded since index ``since``."""
    return {str(getattr(e, "device", "")) for e in machine.errors[since:]}


def _check_round(
    machine: Machine,
    running: bool,
    failing: set[str],
    events: list[Event],
    where: str,
    out: list[str],
) -> None:
    for v in event_order_violations(events, running, failing):
        out.append(f"{where}: event order: {v}")
    for d in machine.devices:
        cached = d.state
        want = {MigState.RUNNING} if running else {MigState.STOP}
        if d.name in failing:
            want = want | {MigState.RUNNING}
        if cached not in want:
            out.append(
                f"{where}: {d.name} is {cached.name} when notify returned, "
                f"expected {'/'.join(s.name for s in want)}"
            )
        try:
            actual = MigState(d.call("device_state"))
        except MpvfioError as exc:
            out.append(f"{where}: {d.name}: cannot read its state: {exc}")
            continue
        if actual != cached:
            out.append(
                f"{where}: {d.name} cache says {cached.name} but the "
                f"device is {actual.name}"
            )


def run_stress(
    machine: Machine,
    rounds: int,
    rate: float = 0.0,
    seed: int = 0,
    kinds: tuple[str, ...] = FAULT_KINDS,
    migrate: bool = False,
    progress: Callable[[str], None] | None = None,
) -> StressResult:
    """Run ``rounds`` rounds on a started machine (see the module docstring).

    :param rate: probability per device per round of one injected fault.
    :param kinds: which fault kinds to draw from.
    :param migrate: full switchover rounds instead of stop/start.
    """
    rng = random.Random(seed)
    say = progress or (lambda _m: None)
    result = StressResult(len(machine.devices), rounds, seed)
    t0 = time.monotonic()
    shm0 = _shm_objects(machine)
    events: list[Event] = []
    sub = machine.events.subscribe(events.append, ["VFIO_MIGRATION"])
    try:
        if machine.vm.runstate != RunState.RUNNING:
            machine.vm_start()
        for i in range(rounds):
            n_err = len(machine.errors)
            # (a migration round changes the bytes on purpose: pre-copy
            # dirties them; it checks stopped == resumed instead)
            before = [] if migrate else [d.checksum() for d in machine.devices]
            failing = _arm(machine, rng, rate, kinds, result)
            if migrate:
                _migrate_round(machine, i, failing, n_err, result)
            else:
                events.clear()
                machine.vm_stop(RunState.PAUSED)
                result.stop_ms.append(machine.last_report.ms)
                result.arcs.extend(a for d in machine.devices for a in d.arcs)
                failed = failing | _failed_devices(machine, n_err)
                _check_round(
                    machine, False, failed, events, f"round {i} stop", result.violations
                )
                events.clear()
                n_mid = len(machine.errors)
                machine.vm_start()
                result.start_ms.append(machine.last_report.ms)
                result.arcs.extend(a for d in machine.devices for a in d.arcs)
                failed = failing | _failed_devices(machine, n_mid)
                _check_round(
                    machine, True, failed, events, f"round {i} start", result.violations
                )
                for d, b in zip(machine.devices, before, strict=True):
                    if d.checksum() != b:
                        result.violations.append(
                            f"round {i}: {d.name} lost device state (checksum changed)"
                        )
            if machine.mode == Mode.WORKERS:
                alive = [
                    d
                    for d in machine.devices
                    if d.worker is not None and d.worker.alive()
                ]
                if len(alive) != len(machine.devices):
                    result.violations.append(
                        f"round {i}: {len(machine.devices) - len(alive)} device(s) "
                        "without a live worker"
                    )
                kids = psutil.Process().children(recursive=True)
                pids = {d.worker.pid for d in machine.devices if d.worker is not None}
                extra = [p.pid for p in kids if p.pid not in pids and _live(p)]
                if extra:
                    result.violations.append(f"round {i}: stray processes {extra}")
            shm = _shm_objects(machine)
            if shm != shm0:
                result.violations.append(
                    f"round {i}: IPC objects changed: {sorted(shm ^ shm0)}"
                )
            result.device_errors += len(machine.errors) - n_err
            if (i + 1) % max(1, rounds // 20) == 0 or i + 1 == rounds:
                say(
                    f"round {i + 1}/{rounds}: {len(result.violations)} violation(s), "
                    f"{result.device_errors} injected/device error(s) handled"
                )
    finally:
        sub.cancel()
        result.elapsed_s = time.monotonic() - t0
    return result
