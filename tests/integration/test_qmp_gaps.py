"""``mpvfio run`` where it used to differ from QEMU, driven by qemu.qmp.

* ``stop`` during an outgoing migration pauses the VM and the migration
  goes on; ``cont`` is refused only in ``finish-migrate`` (QEMU's
  ``qmp_cont``: "Migration is not finalized yet") and works after the
  migration, failed or completed;
* a failed outgoing migration sends ``MIGRATION failed`` and then
  ``RESUME`` (QEMU.md R7.2: FAILED is set before
  ``migration_iteration_finish`` restarts the VM);
* ``-S`` with ``--incoming``: the target stays ``paused`` with its devices
  in RESUMING after the migration, and ``cont`` starts it (R9.6 step 6);
* ``query-migrate`` has live ``ram``/``vfio`` byte counters while active.

The processes, the sessions and the bounded waits are test_qmp's.  Slow
device profiles (JSON files) give the tests time windows of about a second
in which to act; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip(
    "qemu.qmp", reason="the QMP tests need qemu.qmp (pip install qemu.qmp)"
)

from qemu.qmp import ExecuteError
from test_qmp import (
    EVENTS_ON,
    QUERY_DEVICES,
    VMProc,
    _arun,
    _is,
    _label,
    _raw,
    call,
    connect,
    quit_vm,
    spawn,
    wait_event,
    wait_migration,
    workdir,
)

#: test_qmp's fixtures: imported (and named here) so that pytest finds them
_FIXTURES = (spawn, workdir)
MiB = 1024 * 1024

#: 4 MiB of state, all of it pre-copied, at 4 MiB/s: one VF pre-copies for
#: about a second (and sends its STOP_COPY data for about another).
SLOWDATA = {
    "name": "slowdata",
    "base": "instant",
    "state_size": 4 * MiB,
    "precopy_initial": 4 * MiB,
    "precopy_dirty": 0,
    "bandwidth": 4 * MiB,
}
#: No pre-copy, and STOP -> STOP_COPY (save_complete, after the VM stopped)
#: takes a second: the source sits in finish-migrate that long.
SLOWSAVE = {
    "name": "slowsave",
    "base": "instant",
    "flags": ["STOP_COPY", "P2P"],
    "arc_ms": {"STOP>STOP_COPY": 1000},
}
#: The stop's last arc fails once per device: the migration fails after
#: the VM stopped (R6.1: the error goes to the outgoing migration).
FAULTY_STOP = {
    "name": "faultystop",
    "base": "instant",
    "faults": {"PRE_COPY_P2P>STOP_COPY": {"kind": "errno", "errno": "EIO", "times": 1}},
}


def profile_file(workdir: Path, profile: dict[str, Any]) -> str:
    path = workdir / f"{profile['name']}.json"
    path.write_text(json.dumps(profile))
    return str(path)


def names(hist: list[dict[str, Any]]) -> list[str]:
    return [_label(e) for e in hist]


def migration_statuses(hist: list[dict[str, Any]]) -> list[str]:
    return [e["data"]["status"] for e in hist if e["event"] == "MIGRATION"]


def index_of(hist: list[dict[str, Any]], pred: Callable[[dict[str, Any]], bool]) -> int:
    found = [i for i, e in enumerate(hist) if pred(e)]
    assert found, names(hist)
    return found[0]


# ================================================================== gap 1
def test_stop_during_outgoing_migration_pauses_and_it_completes(
    spawn: Callable[..., VMProc], workdir: Path
) -> None:
    """QEMU allows stop while migrating: STOP, paused, the pre-copying
    devices wait in STOP_COPY (R6.2), the switchover stops a VM that is not
    live (no handler, no second STOP: O9), the source ends postmigrate and
    the target, told the source's run state (QEMU's global state), stays
    paused until cont."""
    prof = profile_file(workdir, SLOWDATA)
    mig_uri = f"unix:{workdir / 'mig.sock'}"
    src = spawn("src", "--migration-events", vfs=1, profile=prof)
    dst = spawn("dst", "--migration-events", "--incoming", "defer", vfs=1, profile=prof)

    async def main() -> None:
        s = await connect(src.qmp, name="src")
        d = await connect(dst.qmp, name="dst")
        for c in (s, d):
            await call(c, "migrate-set-capabilities", EVENTS_ON)
        await call(d, "migrate-incoming", {"uri": mig_uri})
        await call(s, "migrate", {"uri": mig_uri})
        await wait_event(s, _is("MIGRATION", status="active"))
        assert await call(s, "stop") == {}
        await wait_event(s, _is("STOP"))
        # paused; with nothing left to pre-copy the switchover follows at
        # once, and stops the paused VM (finish-migrate) without a handler
        st = await call(s, "query-status")
        assert st["status"] in ("paused", "finish-migrate"), st
        assert st["running"] is False
        assert (await call(s, "query-migrate"))["status"] in ("active", "device")
        for dev in await call(s, QUERY_DEVICES):
            assert dev["device-state"] == "stop-copy"  # R6.2: paused + precopy
        assert await call(s, "stop") == {}  # stopped already: no-op

        info = await wait_migration(s)
        assert info["status"] == "completed", info
        assert info["__org.mpvfio_switchover"]["target-started"] is False
        hist = await wait_event(s, _is("MIGRATION", status="completed"))
        assert migration_statuses(hist) == ["setup", "active", "device", "completed"]
        assert [e["event"] for e in hist if e["event"] in ("STOP", "RESUME")] == [
            "STOP"
        ], names(hist)
        assert index_of(hist, _is("STOP")) < index_of(
            hist, _is("MIGRATION", status="device")
        )
        assert (await call(s, "query-status"))["status"] == "postmigrate"
        for dev in await call(s, QUERY_DEVICES):
            assert dev["device-state"] == "stop" and dev["errors"] == 0

        assert (await wait_migration(d))["status"] == "completed"
        assert await call(d, "query-status") == {"status": "paused", "running": False}
        for dev in await call(d, QUERY_DEVICES):
            assert dev["device-state"] == "resuming"
        await call(d, "cont")
        await wait_event(d, _is("RESUME"))
        assert (await call(d, "query-status"))["status"] == "running"
        for dev in await call(d, QUERY_DEVICES):
            assert dev["device-state"] == "running" and dev["errors"] == 0
        await quit_vm(s)
        await quit_vm(d)

    _arun(main())
    for vm in (src, dst):
        assert vm.wait() == 0, vm.output()


def test_stop_from_a_client_that_hangs_up_during_a_migration(
    spawn: Callable[..., VMProc], workdir: Path
) -> None:
    """The stop waits for the migration's safe point; its client is gone by
    then: the stop still happens once, the migration completes, and the
    other sessions are served throughout."""
    prof = profile_file(workdir, SLOWDATA)
    mig_uri = f"unix:{workdir / 'mig.sock'}"
    src = spawn("src", vfs=1, profile=prof)
    dst = spawn("dst", "--incoming", mig_uri, vfs=1, profile=prof)

    async def main() -> None:
        s = await connect(src.qmp, name="observer")
        await call(s, "migrate-set-capabilities", EVENTS_ON)
        await call(s, "migrate", {"uri": mig_uri})
        await wait_event(s, _is("MIGRATION", status="active"))
        r = _raw(src.qmp)
        r.send(b'{"execute": "stop", "id": "gone"}')
        r.close()
        await wait_event(s, _is("STOP"))
        assert (await call(s, "query-status"))["running"] is False
        info = await wait_migration(s)
        assert info["status"] == "completed", info
        assert [e["event"] for e in s.events.history].count("STOP") == 1
        assert (await call(s, "query-status"))["status"] == "postmigrate"
        await quit_vm(s)
        d = await connect(dst.qmp, name="dst")
        assert (await call(d, "query-status"))["status"] == "paused"
        await quit_vm(d)

    _arun(main())
    for vm in (src, dst):
        assert vm.wait() == 0, vm.output()


def test_cont_refused_in_finish_migrate_and_allowed_after(
    spawn: Callable[..., VMProc], workdir: Path
) -> None:
    """QEMU's qmp_cont: "Migration is not finalized yet" (GenericError) in
    finish-migrate, where stop is a no-op; after the migration cont restarts
    the source VM (QEMU allows it; the management decides)."""
    prof = profile_file(workdir, SLOWSAVE)
    mig_uri = f"unix:{workdir / 'mig.sock'}"
    src = spawn("src", vfs=2, profile=prof)
    dst = spawn("dst", "--incoming", mig_uri, vfs=2, profile=prof)

    async def main() -> None:
        s = await connect(src.qmp, name="src")
        await call(s, "migrate", {"uri": mig_uri})
        await wait_event(s, _is("STOP"))  # save_complete takes a second now
        assert (await call(s, "query-status"))["status"] == "finish-migrate"
        with pytest.raises(ExecuteError) as exc:
            await call(s, "cont")
        assert exc.value.error_class == "GenericError"
        assert str(exc.value) == "Migration is not finalized yet"
        assert await call(s, "stop") == {}  # not live: nothing to do
        info = await wait_migration(s)
        assert info["status"] == "completed", info
        assert (await call(s, "query-status"))["status"] == "postmigrate"
        assert not [e for e in s.events.history if e["event"] == "RESUME"]
        await call(s, "cont")
        await wait_event(s, _is("RESUME"))
        assert (await call(s, "query-status"))["running"] is True
        for dev in await call(s, QUERY_DEVICES):
            assert dev["device-state"] == "running" and dev["errors"] == 0
        await quit_vm(s)
        d = await connect(dst.qmp, name="dst")
        assert (await call(d, "query-status"))["status"] == "running"
        await quit_vm(d)

    _arun(main())
    for vm in (src, dst):
        assert vm.wait() == 0, vm.output()


# ================================================================== gap 2
@pytest.mark.parametrize("how", ["target-killed", "device-error"])
def test_failed_migration_sends_failed_then_resume(
    spawn: Callable[..., VMProc], workdir: Path, how: str
) -> None:
    """After the VM stopped, the migration fails: MIGRATION failed, then
    RESUME as the source restarts (R7.2), devices RUNNING, query-migrate
    failed with error-desc; cont afterwards is a no-op (running)."""
    prof = profile_file(workdir, SLOWSAVE if how == "target-killed" else FAULTY_STOP)
    mig_uri = f"unix:{workdir / 'mig.sock'}"
    src = spawn("src", vfs=2, profile=prof)
    dst = spawn("dst", "--incoming", mig_uri, vfs=2, profile=prof)

    async def main() -> None:
        s = await connect(src.qmp, name="src")
        await call(s, "migrate-set-capabilities", EVENTS_ON)
        await call(s, "migrate", {"uri": mig_uri})
        if how == "target-killed":
            await wait_event(s, _is("STOP"))  # the source is in save_complete
            dst.proc.send_signal(signal.SIGKILL)
        info = await wait_migration(s)
        assert info["status"] == "failed", info
        assert info.get("error-desc"), info
        assert "ram" not in info and "total-time" not in info
        hist = await wait_event(s, _is("RESUME"))
        statuses = migration_statuses(hist)
        assert statuses[0] == "setup" and statuses[-1] == "failed", names(hist)
        stop = index_of(hist, _is("STOP"))
        failed = index_of(hist, _is("MIGRATION", status="failed"))
        resume = index_of(hist, _is("RESUME"))
        assert stop < failed < resume, names(hist)
        assert await call(s, "query-status") == {"status": "running", "running": True}
        for dev in await call(s, QUERY_DEVICES):
            assert dev["device-state"] == "running"
        assert await call(s, "cont") == {}  # after a failed migration: fine
        await quit_vm(s)

    _arun(main())
    assert src.wait() == 0, src.output()
    if how == "target-killed":
        assert dst.wait() == -signal.SIGKILL
        from mpvfio.ipc.names import sweep_stale

        sweep_stale()  # the killed target's IPC objects
    else:  # the source hung up; the target exits 1 (exit-on-error)
        assert dst.wait() == 1, dst.output()


# ================================================================== gap 3
@pytest.mark.parametrize("cont_first", [False, True])
def test_incoming_with_S_stays_paused_until_cont(
    spawn: Callable[..., VMProc], workdir: Path, cont_first: bool
) -> None:
    """-S --incoming URI: after the migration the target is paused, no
    handler ran (no STOP, no RESUME), its devices in RESUMING (R9.6 step
    6); cont then takes them RESUMING -> RUNNING_P2P -> RUNNING, RESUME
    first and P2P first (R2.6, O1).  cont in inmigrate sets autostart."""
    vfs = 2
    mig_uri = f"unix:{workdir / 'mig.sock'}"
    src = spawn("src", vfs=vfs)
    dst = spawn("dst", "-S", "--incoming", mig_uri, "--migration-events", vfs=vfs)

    async def main() -> None:
        d = await connect(dst.qmp, name="dst")
        assert await call(d, "query-status") == {
            "status": "inmigrate",
            "running": False,
        }
        if cont_first:
            assert await call(d, "cont") == {}  # autostart on after all
            assert (await call(d, "query-status"))["status"] == "inmigrate"
        s = await connect(src.qmp, name="src")
        await call(s, "migrate", {"uri": mig_uri})
        info = await wait_migration(s)
        assert info["status"] == "completed", info
        sw = info["__org.mpvfio_switchover"]
        assert sw["target-started"] is cont_first
        dinfo = await wait_migration(d)
        assert dinfo["status"] == "completed", dinfo
        assert dinfo["__org.mpvfio_incoming"]["started"] is cont_first
        if cont_first:
            assert sw["checksums-equal"] is True
            await wait_event(d, _is("RESUME"))
            assert (await call(d, "query-status"))["status"] == "running"
        else:
            assert await call(d, "query-status") == {
                "status": "paused",
                "running": False,
            }
            for dev in await call(d, QUERY_DEVICES):
                assert dev["device-state"] == "resuming"
            hist = [dict(e) for e in d.events.history]
            assert not {"STOP", "RESUME"} & {e["event"] for e in hist}, names(hist)
            assert await call(d, "stop") == {}  # not live: nothing happens
            mark = len(d.events.history)
            await call(d, "cont")
            hist = await wait_event(d, _is("RESUME"))
            hist = [dict(e) for e in d.events.history][mark:]
            resume = index_of(hist, _is("RESUME"))
            p2p = [
                i
                for i, e in enumerate(hist)
                if e["event"] == "VFIO_MIGRATION"
                and e["data"]["device-state"] == "running-p2p"
            ]
            running = [
                i
                for i, e in enumerate(hist)
                if e["event"] == "VFIO_MIGRATION"
                and e["data"]["device-state"] == "running"
            ]
            assert len(p2p) == len(running) == vfs, names(hist)
            assert resume < min(p2p) and max(p2p) < min(running), names(hist)
            assert await call(d, "query-status") == {
                "status": "running",
                "running": True,
            }
        for dev in await call(d, QUERY_DEVICES):
            assert dev["device-state"] == "running" and dev["errors"] == 0
        await quit_vm(s)
        await quit_vm(d)

    _arun(main())
    for vm in (src, dst):
        assert vm.wait() == 0, vm.output()


# ================================================================== gap 4
def test_query_migrate_live_counters_while_active(
    spawn: Callable[..., VMProc], workdir: Path
) -> None:
    """While active, ram/vfio transferred only grow (at least once), vfio
    <= ram, total-time grows; setup shows the status only; once completed
    the totals are at least the last live values and add up."""
    prof = profile_file(workdir, SLOWDATA)
    mig_uri = f"unix:{workdir / 'mig.sock'}"
    src = spawn("src", vfs=1, profile=prof)
    dst = spawn("dst", "--incoming", mig_uri, vfs=1, profile=prof)

    async def main() -> None:
        s = await connect(src.qmp, name="src")
        await call(s, "migrate", {"uri": mig_uri})
        live: list[dict[str, Any]] = []
        deadline = time.monotonic() + 60
        while True:
            info: dict[str, Any] = await call(s, "query-migrate")
            status = info["status"]
            if status in ("completed", "failed", "cancelled"):
                break
            if status == "setup":
                assert set(info) <= {"status"}, info
            else:
                assert status in ("active", "device"), info
                assert {"total-time", "expected-downtime", "ram", "vfio"} <= set(info)
                live.append(info)
            assert time.monotonic() < deadline, info
            await asyncio.sleep(0.05)
        assert info["status"] == "completed", info
        assert len(live) >= 2, live
        ram = [i["ram"]["transferred"] for i in live]
        vfio = [i["vfio"]["transferred"] for i in live]
        times = [i["total-time"] for i in live]
        assert ram == sorted(ram) and vfio == sorted(vfio) and times == sorted(times)
        assert len(set(vfio)) >= 2 and len(set(ram)) >= 2, (ram, vfio)
        assert all(v <= r for v, r in zip(vfio, ram, strict=True))
        last = live[-1]
        assert info["ram"]["transferred"] >= last["ram"]["transferred"]
        assert info["vfio"]["transferred"] >= last["vfio"]["transferred"]
        assert info["ram"]["precopy-bytes"] >= last["ram"]["precopy-bytes"] > 0
        assert (
            info["vfio"]["transferred"]
            == info["ram"]["precopy-bytes"] + info["ram"]["downtime-bytes"]
        )
        assert info["ram"]["transferred"] >= info["vfio"]["transferred"]
        assert "expected-downtime" not in info and "downtime" in info
        await quit_vm(s)
        d = await connect(dst.qmp, name="dst")
        await quit_vm(d)

    _arun(main())
    for vm in (src, dst):
        assert vm.wait() == 0, vm.output()
    assert not os.path.exists(src.qmp)
