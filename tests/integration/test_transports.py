"""The engine over real transports: device specs, device-server processes.

Issue 6's end-to-end checks: VFs given as device specs are opened in their
workers (or in-process), a local migration between two ``mpvfio
device-server`` PFs keeps every device's bytes, the switchover benchmark
runs over vfio-user, and a device server killed in the middle of a
transition gives a clear device error within bounded time.
"""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mpvfio.devices.vfio_user.client import VFIOUserDevice
from mpvfio.devices.vfio_user.server import ServerProcess
from mpvfio.errors import DeviceError, UsageError
from mpvfio.jobs.bench import bench_switchover
from mpvfio.machine import Machine
from mpvfio.migration.engine import MigrationParams
from mpvfio.migration.local import run_local
from mpvfio.uapi.vfio import MigFlag, MigState

S = MigState


def _profile(tmp: Path, name: str, **fields: object) -> str:
    path = tmp / f"{name}.json"
    path.write_text(json.dumps({"name": name, **fields}))
    return str(path)


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    # UNIX socket paths are limited to 108 bytes: pytest's tmp_path is long
    import tempfile

    with tempfile.TemporaryDirectory(prefix="mpvfio-t-") as d:
        yield Path(d)


def _checksums(paths: list[str]) -> list[str]:
    out = []
    for p in paths:
        with VFIOUserDevice(p, timeout=10) as dev:
            out.append(dev.checksum())
    return out


# ------------------------------------------------------------ machines


@pytest.mark.parametrize("mode", ["workers", "threads", "serial"])
def test_vfio_user_devices_take_the_switchover_arcs(short_tmp: Path, mode: str) -> None:
    with ServerProcess(str(short_tmp / "pf-vf"), 3, "instant") as srv:
        with Machine(mode) as m:
            for spec in srv.specs():
                m.add_vfio_device(spec=spec)
            m.start()
            assert [d.backend for d in m.devices] == ["vfio-user"] * 3
            # the flags were read from the server, not from a profile
            assert all(d.flags == MigFlag(7) and d.has_p2p for d in m.devices)
            m.vm_stop()
            assert [d.state for d in m.devices] == [S.STOP] * 3
            stops = [[(a.src, a.dst) for a in d.arcs] for d in m.devices]
            m.vm_start()
            assert [d.state for d in m.devices] == [S.RUNNING] * 3
            starts = [[(a.src, a.dst) for a in d.arcs] for d in m.devices]
            assert m.errors == []
        # the arc records come from the client (one per SET request)
        assert stops == [[(S.RUNNING, S.RUNNING_P2P), (S.RUNNING_P2P, S.STOP)]] * 3
        assert starts == [[(S.STOP, S.RUNNING_P2P), (S.RUNNING_P2P, S.RUNNING)]] * 3


def test_mixed_backends_in_one_machine(short_tmp: Path) -> None:
    with (
        ServerProcess(str(short_tmp / "pf-vf"), 2, "instant") as srv,
        Machine("workers") as m,
    ):
        m.add_vfio_device("e0", spec="emulated:instant")
        m.add_vfio_device("u0", spec=srv.specs()[0])
        m.add_vfio_device("e1", "instant")
        m.add_vfio_device("u1", spec=srv.specs()[1])
        m.start()
        before = {d.name: d.checksum() for d in m.devices}
        m.vm_stop()
        m.vm_start()
        assert m.errors == []
        assert [d.backend for d in m.devices] == [
            "emulated",
            "vfio-user",
            "emulated",
            "vfio-user",
        ]
        assert {d.name: d.checksum() for d in m.devices} == before


def test_device_without_p2p_over_vfio_user(short_tmp: Path) -> None:
    prof = _profile(short_tmp, "nop2p", base="instant", flags=["STOP_COPY"])
    with ServerProcess(str(short_tmp / "pf-vf"), 2, prof) as srv:
        with Machine("workers") as m:
            m.add_vfio_device(spec=srv.specs()[0])
            m.start()
            assert not m.devices[0].has_p2p
            assert m.migration_blockers() == []
            m.vm_stop()
            assert [(a.src, a.dst) for a in m.devices[0].arcs] == [(S.RUNNING, S.STOP)]
            m.vm_start()
            assert [(a.src, a.dst) for a in m.devices[0].arcs] == [(S.STOP, S.RUNNING)]
            assert m.errors == []
        with Machine("workers") as m:  # R4.6: two without P2P cannot migrate
            for spec in srv.specs():
                m.add_vfio_device(spec=spec)
            m.start()
            (blocker,) = m.migration_blockers()
            assert "P2P" in blocker or "Multiple" in blocker


def test_a_device_left_stopped_is_reset_when_a_machine_opens_it(
    short_tmp: Path,
) -> None:
    with ServerProcess(str(short_tmp / "pf-vf"), 1, "instant") as srv:
        with Machine("workers") as m:
            m.add_vfio_device(spec=srv.specs()[0])
            m.start()
            m.vm_stop()  # a source after a migration: its VF stays in STOP
        with VFIOUserDevice(srv.paths[0], timeout=10) as dev:
            assert dev.get_state() == S.STOP
        with Machine("workers") as m:
            m.add_vfio_device(spec=srv.specs()[0])
            m.start()
            assert m.devices[0].call("device_state") == S.RUNNING


def test_emulated_only_hooks_say_so(short_tmp: Path) -> None:
    with (
        ServerProcess(str(short_tmp / "pf-vf"), 1, "instant") as srv,
        Machine("workers") as m,
    ):
        m.add_vfio_device(spec=srv.specs()[0])
        m.start()
        with pytest.raises(UsageError, match="arm_fault needs a device"):
            m.devices[0].call("arm_fault", "RUNNING>RUNNING_P2P", None)
        # a real device validates its data itself (RESUMING -> STOP)
        assert m.devices[0].call("check_resume") is None


def test_spec_and_profile_together_is_a_usage_error() -> None:
    with Machine("serial") as m:
        with pytest.raises(UsageError, match="names its profile"):
            m.add_vfio_device(spec="emulated:instant", profile="fixed50")
        with pytest.raises(UsageError, match="bad device spec"):
            m.add_vfio_device(spec="pci:0000:01:00.1")


def test_unreachable_server_fails_start_with_the_path(short_tmp: Path) -> None:
    m = Machine("workers")
    m.add_vfio_device(spec=f"vfio-user:{short_tmp}/nobody.sock")
    with pytest.raises(DeviceError, match=r"nobody\.sock"):
        m.start()
    m.close()


# ---------------------------------------------------------- migration


def test_local_migration_of_8_vfs_between_two_device_servers(
    short_tmp: Path,
) -> None:
    with (
        ServerProcess(str(short_tmp / "src-vf"), 8, "instant") as src,
        ServerProcess(str(short_tmp / "dst-vf"), 8, "instant", seed=1) as dst,
    ):
        # different PFs: the target's VFs start out with other bytes
        assert _checksums(src.paths) != _checksums(dst.paths)
        for channels in (0, 4):
            info, report = run_local(
                8,
                mode="workers",
                params=MigrationParams(multifd_channels=channels),
                devices=src.specs(),
                target_devices=dst.specs(),
            )
            assert report["ok"], report
            assert info.checksums_equal
            assert set(report["device_states"].values()) == {"RUNNING"}
            assert _checksums(src.paths) == _checksums(dst.paths)


def test_local_migration_needs_both_sides_specs(short_tmp: Path) -> None:
    with pytest.raises(UsageError, match="both sides"):
        run_local(1, devices=["emulated:instant"])
    with pytest.raises(UsageError, match="one to one"):
        run_local(
            1,
            devices=["emulated:instant"],
            target_devices=["emulated:instant", "emulated:instant"],
        )
    with pytest.raises(UsageError, match="both a source and a target"):
        run_local(
            1,
            devices=[f"vfio-user:{short_tmp}/a.sock"],
            target_devices=[f"vfio-user:{short_tmp}/a.sock"],
        )


def _mpvfio(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mpvfio", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_cli_migrate_local_with_device_specs(short_tmp: Path) -> None:
    with (
        ServerProcess(str(short_tmp / "src-vf"), 2, "instant") as src,
        ServerProcess(str(short_tmp / "dst-vf"), 2, "instant") as dst,
    ):
        args = ["migrate", "--local", "--json", "--multifd-channels", "2"]
        for s, t in zip(src.specs(), dst.specs(), strict=True):
            args += ["--device", s, "--target-device", t]
        res = _mpvfio(*args)
        assert res.returncode == 0, res.stderr
        doc = json.loads(res.stdout)
        assert doc["checksums_equal"] is True
        assert doc["rows"][0]["vfs"] == 2


def test_cli_device_usage_errors(short_tmp: Path) -> None:
    res = _mpvfio("migrate", "--local", "--device", "emulated:instant")
    assert res.returncode == 2
    assert "--target-device" in res.stderr
    res = _mpvfio("switchover", "--vfs", "3", "--device", "emulated:instant")
    assert res.returncode == 2
    assert "--vfs 3 but 1 --device" in res.stderr
    res = _mpvfio("switchover", "--device", "tcp:1.2.3.4")
    assert res.returncode == 2
    assert "bad device spec" in res.stderr


def test_cli_switchover_over_vfio_user(short_tmp: Path) -> None:
    with ServerProcess(str(short_tmp / "pf-vf"), 2, "instant") as srv:
        args = ["switchover", "--json", "-q"]
        for s in srv.specs():
            args += ["--device", s]
        res = _mpvfio(*args)
        assert res.returncode == 0, res.stderr
        doc = json.loads(res.stdout)
        assert doc["ok"] is True
        assert doc["vfs"] == 2


def test_switchover_bench_over_vfio_user() -> None:
    result = bench_switchover(
        [2],
        ["instant"],
        ["serial", "workers"],
        rounds=2,
        warmup=1,
        transports=["emulated", "vfio-user"],
    )
    assert result.errors == []
    got = {(r.mode, r.transport) for r in result.results}
    assert got == {
        ("serial", "emulated"),
        ("workers", "emulated"),
        ("serial", "vfio-user"),
        ("workers", "vfio-user"),
    }
    for r in result.results:
        assert r.rounds == 2 and r.downtime_ms_median > 0
    notes = [n for n in result.notes if n.startswith("vfio-user over emulated")]
    assert len(notes) == 2
    with pytest.raises(UsageError, match="unknown transport"):
        bench_switchover([1], ["instant"], ["serial"], transports=["rdma"])


# ------------------------------------------------------- server crash


SLOW = {"base": "fixed50", "arc_ms": {"PRE_COPY_P2P>STOP_COPY": 600}}


@pytest.mark.parametrize("mode", ["workers", "threads", "serial"])
def test_killing_the_device_server_mid_transition(short_tmp: Path, mode: str) -> None:
    prof = _profile(short_tmp, "slowstop", **SLOW)
    srv = ServerProcess(str(short_tmp / "pf-vf"), 4, prof)
    try:
        with Machine(mode, transition_timeout=10) as m:
            for spec in srv.specs():
                m.add_vfio_device(spec=spec)
            m.start()
            for d in m.devices:
                d.call("save_setup")
            assert {d.state for d in m.devices} == {S.PRE_COPY}
            killer = threading.Timer(0.25, srv.kill)  # inside the 600 ms arcs
            killer.start()
            t0 = time.monotonic()
            m.vm_stop()
            took = time.monotonic() - t0
            killer.join()
            assert took < 5.0  # bounded: no transition timeout involved
            names = sorted(e.device for e in m.errors if isinstance(e, DeviceError))
            assert names == ["vf0", "vf1", "vf2", "vf3"]
            for e in m.errors:
                assert isinstance(e, DeviceError)
                assert e.errno == errno.ENOTCONN
                assert "the server closed the connection" in str(e)
            # the next notification fails fast too, naming the cause
            n = len(m.errors)
            t0 = time.monotonic()
            m.vm_start()
            assert time.monotonic() - t0 < 5.0
            assert len(m.errors) > n
            assert all("unusable" in str(e) for e in m.errors[n:])
    finally:
        srv.stop()
    assert all(not os.path.exists(p) for p in srv.paths)


def test_server_killed_while_idle_fails_the_next_stop_fast(short_tmp: Path) -> None:
    srv = ServerProcess(str(short_tmp / "pf-vf"), 2, "instant")
    try:
        with Machine("workers", transition_timeout=10) as m:
            for spec in srv.specs():
                m.add_vfio_device(spec=spec)
            m.start()
            srv.kill()
            srv.proc.wait(5)
            t0 = time.monotonic()
            m.vm_stop()
            assert time.monotonic() - t0 < 5.0
            assert sorted(e.device for e in m.errors) == ["vf0", "vf1"]
    finally:
        srv.stop()


# ------------------------------------------------- mpvfio run over a PF

TOOL = Path(__file__).resolve().parents[2] / "tools" / "launch_pf_vm.py"


@pytest.mark.parametrize("kill_ms", [0, 30])
def test_launch_pf_vm_demo_drives_a_vm_on_a_device_server(kill_ms: int) -> None:
    """`mpvfio run --device vfio-user:...` over QMP; a PF killed mid-stop."""
    args = [sys.executable, str(TOOL), "--demo", "--vfs", "2"]
    args += ["--profile", "fixed50" if kill_ms else "instant"]
    if kill_ms:
        args += ["--kill-server-after", str(kill_ms)]
    res = subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "backend vfio-user" in res.stdout
    assert res.stdout.rstrip().endswith("result: OK")
    if kill_ms:
        assert re.search(r"vf0: [1-9]\d* device error", res.stdout), res.stdout
    else:
        assert res.stdout.count("event VFIO_MIGRATION") == 8


def test_one_device_cannot_be_two_vfs(short_tmp: Path) -> None:
    with Machine("workers") as m:
        m.add_vfio_device(spec=f"vfio-user:{short_tmp}/pf/vf0.sock")
        with pytest.raises(UsageError, match="already vf0"):
            m.add_vfio_device(spec=f"vfio-user:{short_tmp}/pf/../pf/vf0.sock")
        m.add_vfio_device(spec="emulated:instant")
        m.add_vfio_device(spec="emulated:instant")  # emulated: new each time
    here = os.getcwd()
    os.chdir(short_tmp)
    try:
        with pytest.raises(UsageError, match="both a source and a target"):
            run_local(
                1,
                devices=["vfio-user:a.sock"],
                target_devices=[f"vfio-user:{short_tmp}/a.sock"],
            )
    finally:
        os.chdir(here)


def test_bench_refuses_vfio_user_with_a_profile_object_before_running() -> None:
    from mpvfio.devices.profiles import get_profile

    with pytest.raises(UsageError, match="by name or JSON path"):
        bench_switchover(
            [1],
            ["instant", get_profile("instant")],
            ["serial"],
            transports=["vfio-user"],
        )


def test_a_subscriber_that_calls_into_the_machine_does_not_deadlock() -> None:
    """Found in review: a flush reached from inside a delivery waited forever."""
    from mpvfio.events import Event
    from mpvfio.vfiomig import MigrationProps

    with Machine("workers", transition_timeout=10) as m:
        for _ in range(2):
            m.add_vfio_device(profile="instant", props=MigrationProps(True))
        m.start()
        seen: list[str] = []

        def cb(ev: Event) -> None:
            seen.append(str(ev.data.get("device-state")))
            m.events  # noqa: B018 - touching the machine is fine
            m._flush_events()  # what d.call() does in its finally

        sub = m.events.subscribe(cb, ["VFIO_MIGRATION"])
        done = threading.Event()

        def stop() -> None:
            m.vm_stop()
            done.set()

        t = threading.Thread(target=stop, daemon=True)
        t.start()
        assert done.wait(20), "vm_stop deadlocked in a subscriber's flush"
        t.join(5)
        sub.cancel()
        assert seen.count("stop") == 2
