"""The crash table: workers that die or hang during a notification (loky style).

Every case injects one worker fault (``Machine.inject_worker_fault``) on the
middle one of three P2P devices in workers mode, then notifies.  Whatever the
fault, the notification returns, the failed device is named with its exit
code or signal (or as hung), a fresh worker holds it (reset: RUNNING), the
other devices reach their final states, the next notification works and
nothing leaks (the conftest fixture checks child processes and /dev/shm).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

import psutil
import pytest

from mpvfio.errors import MpvfioError, WorkerCrashed, WorkerTimeout
from mpvfio.events import Event
from mpvfio.ipc.names import SHM_DIR, sweep_stale
from mpvfio.jobs.switchover import event_order_violations, run_switchover
from mpvfio.machine import Machine
from mpvfio.uapi.vfio import MigFlag, MigState
from mpvfio.vfiomig import MigrationProps
from mpvfio.vmstate import RunState
from mpvfio.workers.device import FAULT_KINDS, FAULT_POINTS

S = MigState
EVENTS = MigrationProps(migration_events=True)
VICTIM = "vf1"
#: What the error says for each fault kind (None: a WorkerTimeout).
EXPECTED = {"kill": "SIGKILL", "exit": "EXIT(7)", "segv": "SIGSEGV", "hang": None}
#: A hung worker is killed after this; healthy instant workers need a few ms.
HANG_TIMEOUT = 1.0

CRASH_CASES = [
    pytest.param("stop", point, kind, id=f"stop-{point}-{kind}")
    for point in FAULT_POINTS
    for kind in FAULT_KINDS
] + [
    pytest.param("start", point, kind, id=f"start-{point}-{kind}")
    for point in FAULT_POINTS
    for kind in ("kill", "hang")
]


@pytest.fixture
def closing() -> Iterator[list[Machine]]:
    """Machines appended here are closed at teardown (before the leak check)."""
    made: list[Machine] = []
    yield made
    for m in made:
        m.close()


def _machine(
    closing: list[Machine],
    n: int = 3,
    timeout: float = 10.0,
    relaxed: bool = False,
    devices: Sequence[dict[str, Any]] = (),
) -> tuple[Machine, list[Event]]:
    """A started workers-mode Machine with ``n`` VFs (or one per ``devices``
    entry: add_vfio_device's arguments, migration events on by default) and
    the list its VFIO_MIGRATION events go to."""
    m = Machine("workers", transition_timeout=timeout, relaxed_interlock=relaxed)
    closing.append(m)
    for kw in devices or [{}] * n:
        m.add_vfio_device(**{"props": EVENTS, **kw})
    events: list[Event] = []
    m.events.subscribe(events.append, ["VFIO_MIGRATION"])
    m.start()
    return m, events


def _wait_dead(pid: int, timeout: float = 10.0) -> bool:
    """Whether ``pid`` is gone (or a zombie) within ``timeout`` (not reaped)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.01)
    return False


def _check_error(err: MpvfioError, kind: str) -> None:
    want = EXPECTED[kind]
    assert getattr(err, "device", None) == VICTIM
    assert VICTIM in str(err)
    if want is None:
        assert isinstance(err, WorkerTimeout), repr(err)
    else:
        assert isinstance(err, WorkerCrashed), repr(err)
        assert want in str(err), str(err)


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("direction", "point", "kind"), CRASH_CASES)
def test_crash_table(
    closing: list[Machine], direction: str, point: str, kind: str
) -> None:
    m, events = _machine(closing, timeout=HANG_TIMEOUT if kind == "hang" else 10.0)
    for d in m.devices:
        d.call("save_setup")
    if direction == "start":
        m.vm_stop(RunState.FINISH_MIGRATE)
        assert [d.state for d in m.devices] == [S.STOP_COPY] * 3
    victim = m.device(VICTIM)
    assert victim.worker is not None
    old_pid = victim.worker.pid
    m.inject_worker_fault(VICTIM, point, kind)
    events.clear()
    n_errors = len(m.errors)
    if direction == "stop":
        m.vm_stop(RunState.FINISH_MIGRATE)
        final = S.STOP_COPY
    else:
        m.vm_start()
        final = S.RUNNING
    # the failed device is named, with its exit code / signal or as hung
    new = m.errors[n_errors:]
    assert len(new) == 1, [str(e) for e in new]
    _check_error(new[0], kind)
    assert m.last_report.errors == new
    assert victim.errors[-1] is new[0]
    # ... and recovered: a fresh worker, the device reset
    assert victim.worker is not None and victim.worker.alive()
    assert victim.worker.pid != old_pid
    assert _wait_dead(old_pid)
    assert victim.state == S.RUNNING
    assert victim.call("device_state") == S.RUNNING
    # the others reached their final states, in a legal order
    for d in m.devices:
        if d is not victim:
            assert d.state == final and d.call("device_state") == final, d
            assert d.errors == []
    assert event_order_violations(events, running=direction == "start") == []
    # the machine goes on: the next notifications work for every device
    if direction == "stop":
        m.vm_start()
    else:
        m.vm_stop(RunState.PAUSED)
        m.vm_start()
    assert [d.state for d in m.devices] == [S.RUNNING] * 3
    assert [d.call("device_state") for d in m.devices] == [S.RUNNING] * 3
    for d in m.devices:
        d.call("save_cleanup")
    n_errors = len(m.errors)
    result = run_switchover(m)
    assert m.errors[n_errors:] == []
    assert result.rounds[0].checksums_equal
    assert result.rounds[0].event_order == []
    m.close()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("relaxed", [False, True])
def test_two_workers_fail_in_one_round(closing: list[Machine], relaxed: bool) -> None:
    m, events = _machine(closing, n=4, relaxed=relaxed)
    for d in m.devices:
        d.call("save_setup")
    m.inject_worker_fault("vf0", "phase1", "kill")
    m.inject_worker_fault("vf2", "phase2", "segv")
    m.vm_stop(RunState.FINISH_MIGRATE)
    assert sorted(getattr(e, "device", "") for e in m.errors) == ["vf0", "vf2"]
    assert all(isinstance(e, WorkerCrashed) for e in m.errors)
    assert [d.state for d in m.devices] == [
        S.RUNNING,
        S.STOP_COPY,
        S.RUNNING,
        S.STOP_COPY,
    ]
    assert event_order_violations(events, running=False) == []
    m.vm_start()
    assert [d.call("device_state") for d in m.devices] == [S.RUNNING] * 4


@pytest.mark.timeout(30)
def test_idle_worker_killed_is_found_at_dispatch(closing: list[Machine]) -> None:
    m, events = _machine(closing)
    for d in m.devices:
        d.call("save_setup")
    victim = m.device(VICTIM)
    assert victim.worker is not None and victim.worker.pid is not None
    old_pid = victim.worker.pid
    os.kill(old_pid, signal.SIGKILL)
    assert _wait_dead(old_pid)
    events.clear()
    m.vm_stop(RunState.FINISH_MIGRATE)
    assert len(m.errors) == 1
    _check_error(m.errors[0], "kill")
    assert "before dispatch" in str(m.errors[0])
    # recovered (reset: RUNNING) before the dispatch, then stopped with the rest
    assert victim.worker is not None and victim.worker.pid != old_pid
    assert [d.state for d in m.devices] == [S.STOP_COPY, S.STOP, S.STOP_COPY]
    assert [d.call("device_state") for d in m.devices] == [
        S.STOP_COPY,
        S.STOP,
        S.STOP_COPY,
    ]
    assert event_order_violations(events, running=False) == []
    m.vm_start()
    assert [d.state for d in m.devices] == [S.RUNNING] * 3
    assert len(m.errors) == 1


@pytest.mark.timeout(30)
def test_idle_worker_killed_is_found_at_a_call(closing: list[Machine]) -> None:
    m, _ = _machine(closing)
    victim = m.device(VICTIM)
    assert victim.worker is not None and victim.worker.pid is not None
    old_pid = victim.worker.pid
    os.kill(old_pid, signal.SIGKILL)
    assert _wait_dead(old_pid)
    with pytest.raises(WorkerCrashed, match="SIGKILL"):
        victim.call("device_state")
    assert victim.worker.pid != old_pid
    assert victim.call("device_state") == S.RUNNING
    m.vm_stop(RunState.FINISH_MIGRATE)
    assert [d.state for d in m.devices] == [S.STOP] * 3
    assert len(m.errors) == 1


@pytest.mark.timeout(30)
def test_idle_kill_of_a_device_without_p2p(closing: list[Machine]) -> None:
    """The only device, no P2P: found dead at its main-entry dispatch."""
    from mpvfio.devices.profiles import Profile

    m = Machine("workers")
    closing.append(m)
    m.add_vfio_device(
        profile=Profile(name="nop2p", flags=MigFlag.STOP_COPY | MigFlag.PRE_COPY)
    )
    m.start()
    d = m.devices[0]
    assert d.worker is not None and d.worker.pid is not None
    old_pid = d.worker.pid
    os.kill(old_pid, signal.SIGKILL)
    assert _wait_dead(old_pid)
    m.vm_stop(RunState.FINISH_MIGRATE)
    assert len(m.errors) == 1
    assert isinstance(m.errors[0], WorkerCrashed) and "SIGKILL" in str(m.errors[0])
    assert d.state == S.STOP and d.call("device_state") == S.STOP
    m.vm_start()
    assert d.state == S.RUNNING


# -- the parent dies ------------------------------------------------------------------

_PARENT = r"""
import json, sys
from mpvfio.machine import Machine
from mpvfio.vmstate import RunState

m = Machine("workers", transition_timeout=60.0)
for _ in range(3):
    m.add_vfio_device()
m.start()
info = {"pid": m.registry.creator_pid, "prefix": m.registry.prefix,
        "workers": [d.worker.pid for d in m.devices]}
print(json.dumps(info), flush=True)
if sys.argv[1] == "busy":
    # vf1 hangs after phase 1: the others wait at the barrier, the parent
    # in the P2P interlock, when it is killed
    m.inject_worker_fault("vf1", "barrier", "hang")
    print("stopping", flush=True)
    m.vm_stop(RunState.FINISH_MIGRATE)
else:
    print("idle", flush=True)
sys.stdin.read()  # until killed
"""


def _entries(prefix: str) -> list[str]:
    return sorted(e for e in os.listdir(SHM_DIR) if prefix in e)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("when", ["idle", "busy"])
def test_parent_killed(when: str) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", _PARENT, when],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        info = json.loads(proc.stdout.readline())
        assert info["pid"] == proc.pid
        assert proc.stdout.readline().strip() in ("idle", "stopping")
        if when == "busy":
            time.sleep(0.3)  # let the round reach the barrier
        assert _entries(info["prefix"]), "the machine's IPC objects exist"
        assert all(psutil.pid_exists(p) for p in info["workers"])
    finally:
        proc.kill()
        proc.wait(10)
        if proc.stdin is not None:
            proc.stdin.close()
        if proc.stdout is not None:
            proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    # PR_SET_PDEATHSIG: every worker dies with its parent
    for pid in info["workers"]:
        assert _wait_dead(pid), f"worker {pid} outlived its parent"
    # the objects outlive a SIGKILLed creator until a sweep removes them
    left = _entries(info["prefix"])
    assert left
    removed = sweep_stale()
    assert set(left) <= set(removed)
    assert _entries(info["prefix"]) == []


@pytest.mark.timeout(30)
@pytest.mark.parametrize("point", FAULT_POINTS)
def test_crash_of_a_serial_device(closing: list[Machine], point: str) -> None:
    """Parallel states off: the worker is still a barrier party (see machine)."""
    serial = MigrationProps(migration_events=True, parallel_states=False)
    m, events = _machine(closing, devices=[{}, {"props": serial}, {}])
    for d in m.devices:
        d.call("save_setup")
    victim = m.device(VICTIM)
    assert victim.worker is not None
    old_pid = victim.worker.pid
    m.inject_worker_fault(VICTIM, point, "kill")
    events.clear()
    m.vm_stop(RunState.FINISH_MIGRATE)
    assert len(m.errors) == 1
    _check_error(m.errors[0], "kill")
    assert victim.worker.pid != old_pid and victim.worker.alive()
    assert [d.state for d in m.devices] == [S.STOP_COPY, S.RUNNING, S.STOP_COPY]
    assert [d.call("device_state") for d in m.devices] == [
        S.STOP_COPY,
        S.RUNNING,
        S.STOP_COPY,
    ]
    assert event_order_violations(events, running=False) == []
    m.vm_start()
    assert [d.call("device_state") for d in m.devices] == [S.RUNNING] * 3
    assert len(m.errors) == 1


@pytest.mark.timeout(60)
@pytest.mark.parametrize("direction", ["stop", "start"])
def test_a_dead_party_does_not_release_the_others_before_a_slow_one(
    closing: list[Machine], direction: str
) -> None:
    """Found by the 256-VF migration stress: a party that died at once used
    to break the barrier, so fast parties ran phase 2 (STOP_COPY) while a
    slow one was still entering P2P.  The parent now crosses without the
    dead party (ProcessBarrier.leave): O1 holds."""
    from mpvfio.devices.profiles import profile_from_dict

    slow = profile_from_dict(
        {
            "name": "slowp2p",
            "base": "instant",
            "arc_ms": {"PRE_COPY>PRE_COPY_P2P": 400, "STOP_COPY>STOP": 400},
        }
    )
    m, events = _machine(
        closing,
        devices=[{"name": "vf0"}, {"name": VICTIM}, {"name": "vf2", "profile": slow}],
    )
    for d in m.devices:
        d.call("save_setup")
    if direction == "start":
        m.vm_stop(RunState.FINISH_MIGRATE)
    events.clear()
    m.inject_worker_fault(VICTIM, "before", "kill")
    if direction == "stop":
        m.vm_stop(RunState.FINISH_MIGRATE)
    else:
        m.vm_start()
    assert [e.device for e in m.errors if hasattr(e, "device")] == [VICTIM]
    assert (
        event_order_violations(events, running=direction == "start", ignore={VICTIM})
        == []
    )
    final = S.STOP_COPY if direction == "stop" else S.RUNNING
    assert m.device("vf0").state == final and m.device("vf2").state == final
    assert not m.barrier.broken if m.barrier is not None else True
