"""Stress runs: invariants hold across rounds with random faults.

CI runs the 64-VF configuration; the 256-VF one is opt-in (--run-stress).
"""

from __future__ import annotations

import json

import pytest

from mpvfio.cli.main import main
from mpvfio.jobs.stress import run_stress
from mpvfio.machine import Machine
from mpvfio.vfiomig import MigrationProps


def _machine(n: int, mode: str = "workers", timeout: float = 2.0) -> Machine:
    m = Machine(mode, transition_timeout=timeout)
    for _ in range(n):
        m.add_vfio_device(
            profile="instant", props=MigrationProps(migration_events=True)
        )
    m.start()
    return m


@pytest.mark.timeout(300)
def test_64_vfs_20_rounds_with_arc_faults_and_kills() -> None:
    with _machine(64) as m:
        result = run_stress(m, rounds=20, rate=0.02, seed=11, kinds=("arc", "kill"))
    assert result.ok, result.violations
    assert sum(result.faults.values()) > 0, "the seed should inject some faults"
    assert result.device_errors >= sum(result.faults.values())


@pytest.mark.timeout(120)
def test_same_seed_same_faults() -> None:
    runs = []
    for _ in range(2):
        with _machine(8, mode="threads") as m:
            runs.append(run_stress(m, rounds=5, rate=0.3, seed=5, kinds=("arc",)))
    assert runs[0].faults == runs[1].faults
    assert runs[0].ok and runs[1].ok


@pytest.mark.timeout(120)
def test_hangs_are_detected_and_recovered() -> None:
    with _machine(4, timeout=1.0) as m:
        result = run_stress(m, rounds=3, rate=0.5, seed=2, kinds=("hang",))
    assert result.ok, result.violations
    assert result.faults.get("hang", 0) > 0


@pytest.mark.timeout(300)
def test_stress_cli_json(capfd: pytest.CaptureFixture[str]) -> None:
    rc = main(
        [
            "stress",
            "--vfs",
            "8",
            "--rounds",
            "3",
            "--faults",
            "0.2",
            "--kinds",
            "arc,kill",
            "--seed",
            "4",
            "--json",
            "--arcs-json",
            "-q",
        ]
    )
    out = json.loads(capfd.readouterr().out)
    assert rc == 0
    assert out["ok"] is True and out["vfs"] == 8 and out["rounds"] == 3
    assert out["startup_s"] >= 0 and out["worker_uss_mib"]["median"] > 0
    # the arc report covers every round: 8 VFs x 3 rounds x 4 arcs, at most
    # (a failed arc's device walks a shorter path)
    report = out["arc_report"]
    assert 8 * 3 * 2 < report["count"] <= 8 * 3 * 4
    labels = {a["arc"] for a in report["arcs"]}
    assert {"RUNNING_P2P>STOP", "STOP>RUNNING_P2P"} <= labels


def test_stress_cli_bad_input(capfd: pytest.CaptureFixture[str]) -> None:
    assert main(["stress", "--faults", "1.5"]) == 2
    assert "probability" in capfd.readouterr().err
    assert main(["stress", "--kinds", "arc,explode"]) == 2
    assert "explode" in capfd.readouterr().err


@pytest.mark.stress
@pytest.mark.timeout(1800)
def test_256_vfs_stress() -> None:
    with _machine(256, timeout=5.0) as m:
        result = run_stress(m, rounds=20, rate=0.01, seed=1)
    assert result.ok, result.violations[:20]


@pytest.mark.timeout(300)
def test_migrate_rounds_with_faults_hold_the_invariants() -> None:
    """--migrate: the bytes at the stop come back after the load, for every
    device that did not fail; pre-copy dirtying is not a lost state."""
    with _machine(16) as m:
        result = run_stress(m, rounds=10, rate=0.05, seed=3, migrate=True)
    assert result.ok, result.violations
    assert sum(result.faults.values()) > 0
    assert len(result.stop_ms) == 10


def test_migrate_round_reports_a_healthy_device_with_other_bytes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import mpvfio.jobs.stress as stress_mod
    from mpvfio.jobs.switchover import run_switchover as real

    def corrupting(machine: Machine) -> object:
        res = real(machine)
        dev = res.rounds[0].devices[1]
        dev.checksum_resumed = "0" * 64  # as if vf1 resumed other bytes
        return res

    monkeypatch.setattr(stress_mod, "run_switchover", corrupting)
    with _machine(2) as m:
        result = run_stress(m, rounds=1, migrate=True)
    assert result.violations == [
        "round 0: vf1 lost device state (resumed bytes differ from the bytes "
        "at the stop)"
    ]
