"""The switchover benchmark: structure and consistency, never speed.

Tiny configurations (instant profile, 1-2 VFs, 2 rounds) run every mode
with real workers; the conftest fixture checks that every machine was
closed (no child process, no /dev/shm object left).
"""

from __future__ import annotations

import itertools
import json
import math

import pytest

from mpvfio.errors import UsageError
from mpvfio.jobs.bench import (
    ALL_MODES,
    BenchResult,
    ConfigResult,
    bench_switchover,
    build_parser,
    evaluate_targets,
    floor_round_us,
    format_text,
    main,
    run_bench_cli,
)

RESULT_KEYS = {
    "mode",
    "vfs",
    "profile",
    "stop_ms_median",
    "stop_ms_p90",
    "start_ms_median",
    "start_ms_p90",
    "ideal_ms",
    "ratio_to_ideal",
    "serial_over_mode",
}


@pytest.fixture(scope="module")
def tiny() -> BenchResult:
    lines: list[str] = []
    result = bench_switchover(
        vfs=(1, 2),
        profiles=("instant",),
        modes=("serial", "threads", "workers"),
        rounds=2,
        warmup=1,
        relaxed_interlock_too=True,
        progress=lines.append,
    )
    result.settings["progress_lines"] = len(lines)
    return result


def test_every_mode_and_count_ran(tiny: BenchResult) -> None:
    got = [(r.profile, r.vfs, r.mode) for r in tiny.results]
    assert got == [("instant", n, m) for n in (1, 2) for m in ALL_MODES]
    assert all(r.rounds == 2 for r in tiny.results)
    assert not tiny.errors
    # one progress line per round batch (+ one "starting" line per config)
    assert tiny.settings["progress_lines"] == 2 * (1 + 1 + 2)


def test_json_entries_are_complete_and_consistent(tiny: BenchResult) -> None:
    doc = json.loads(json.dumps(tiny.to_json()))
    assert set(doc) >= {"results", "targets"}
    for entry in doc["results"]:
        assert set(entry) >= RESULT_KEYS
        for key in (
            "stop_ms_median",
            "stop_ms_p90",
            "start_ms_median",
            "start_ms_p90",
            "ideal_ms",
        ):
            assert entry[key] is not None and entry[key] >= 0, key
        assert entry["stop_ms_p90"] >= entry["stop_ms_median"]
        assert entry["start_ms_p90"] >= entry["start_ms_median"]
        # serial ran for every count here
        assert entry["serial_over_mode"] is not None and entry["serial_over_mode"] > 0
        # instant is a zero-work profile: the floor comparison is present
        assert entry["floor_us"] == pytest.approx(
            2 * floor_round_us(entry["vfs"]), abs=0.1
        )
        assert entry["overhead_vs_floor"] is not None
    serial = [e for e in doc["results"] if e["mode"] == "serial"]
    assert all(e["serial_over_mode"] == 1.0 for e in serial)


def test_arcs_are_the_switchover_arcs(tiny: BenchResult) -> None:
    for r in tiny.results:
        # the stop and start phases did take arcs: their ideal is > 0
        assert all(x > 0 for x in r.ideal_stop_ms), r.mode
        assert all(x > 0 for x in r.ideal_start_ms), r.mode
        assert r.downtime_ms_median == pytest.approx(
            r.stop_ms_median + r.start_ms_median
        )


def test_no_targets_for_configurations_not_run(tiny: BenchResult) -> None:
    # targets are defined at 4+ VFs and for fixed50: none of that ran
    assert tiny.targets == {}
    assert tiny.to_json()["targets"] == {}


def test_text_table(tiny: BenchResult) -> None:
    text = format_text(tiny)
    lines = text.splitlines()
    head = next(i for i, ln in enumerate(lines) if ln.startswith("profile"))
    assert "x floor" in lines[head]
    assert set(lines[head + 1]) == {"-", " "}
    assert len(lines[head]) == len(lines[head + 1])  # header and rule align
    rows = [ln for ln in lines if ln.startswith("instant")]
    assert len(rows) == len(tiny.results)
    assert "load average" in text


def test_serial_over_mode_absent_without_serial() -> None:
    result = bench_switchover(
        vfs=(1,),
        profiles=("instant",),
        modes=("threads", "workers"),
        rounds=2,
        warmup=0,
    )
    assert [r.mode for r in result.results] == ["threads", "workers"]
    for entry in result.to_json()["results"]:
        assert entry["serial_over_mode"] is None


def test_serial_skipped_above_max_serial_vfs_only_when_slow() -> None:
    # fixed50 x 2 VFs serial would take 0.6 s a round: under the 1 s bar,
    # so even --max-serial-vfs 1 keeps it; nothing is run here (no modes
    # left) for a slow custom profile.
    from mpvfio.devices.profiles import get_profile

    slow = get_profile("fixed50").replace(name="slow", default_arc_ms=500.0)
    result = bench_switchover(
        vfs=(2,),
        profiles=(slow,),
        modes=("serial",),
        rounds=1,
        warmup=0,
        max_serial_vfs=1,
    )
    assert result.results == []
    assert len(result.notes) == 1 and "serial skipped" in result.notes[0]
    # instant is never skipped: its serial round is far under a second
    result = bench_switchover(
        vfs=(2,),
        profiles=("instant",),
        modes=("serial",),
        rounds=1,
        warmup=0,
        max_serial_vfs=1,
    )
    assert [r.mode for r in result.results] == ["serial"] and not result.notes


def _synthetic(
    profile: str,
    vfs: int,
    mode: str,
    stop: float,
    start: float,
    ideal: float,
    zero: bool = False,
) -> ConfigResult:
    return ConfigResult(
        mode,
        vfs,
        profile,
        zero,
        [stop],
        [start],
        [ideal / 2],
        [ideal / 2],
    )


def test_targets_evaluated_only_for_configs_that_ran() -> None:
    rs = [
        _synthetic("fixed50", 4, "serial", 400.0, 600.0, 250.0),
        _synthetic("fixed50", 4, "threads", 102.0, 152.0, 250.0),
        _synthetic("fixed50", 4, "workers", 101.0, 151.0, 250.0),
        _synthetic("instant", 4, "workers", 0.5, 0.5, 0.1, zero=True),
    ]
    for r in rs:
        if r.profile == "fixed50":
            r.serial_downtime_ms = 1000.0
    result = BenchResult(rs, {}, [], {})
    targets = evaluate_targets(result)
    assert set(targets) == {
        "fixed50.vfs4.workers.ratio_to_ideal",
        "fixed50.vfs4.serial_over_workers",
        "instant.vfs4.workers.overhead_vs_floor",
        "fixed50.vfs4.threads_over_workers",
    }
    ratio = targets["fixed50.vfs4.workers.ratio_to_ideal"]
    assert ratio.measured == pytest.approx(252.0 / 250.0) and ratio.met
    assert targets["fixed50.vfs4.serial_over_workers"].met  # 1000/252
    assert targets["fixed50.vfs4.threads_over_workers"].met  # 254/252
    over = targets["instant.vfs4.workers.overhead_vs_floor"]
    assert over.measured == pytest.approx(900.0 / (2 * 98.0)) and not over.met
    for t in targets.values():
        assert set(t.to_json()) == {"goal", "measured", "met"}


def test_floor_interpolation() -> None:
    assert floor_round_us(4) == 98.0
    assert floor_round_us(64) == 1070.0
    assert 302.0 < floor_round_us(32) < 1070.0
    xs = [floor_round_us(n) for n in range(1, 300)]
    assert all(b >= a for a, b in itertools.pairwise(xs))
    assert all(math.isfinite(x) for x in xs)
    with pytest.raises(UsageError, match="must be >= 1"):
        floor_round_us(0)


def test_bad_arguments() -> None:
    with pytest.raises(UsageError, match="unknown mode"):
        bench_switchover(vfs=(1,), profiles=("instant",), modes=("fast",))
    with pytest.raises(UsageError, match="VF counts"):
        bench_switchover(vfs=(0,), profiles=("instant",))
    with pytest.raises(UsageError, match="rounds"):
        bench_switchover(vfs=(1,), profiles=("instant",), rounds=0)


def test_cli_helper_prints_json(capfd: pytest.CaptureFixture[str]) -> None:
    args = build_parser().parse_args(
        [
            "--vfs",
            "1",
            "--profile",
            "instant",
            "--modes",
            "serial,workers",
            "--rounds",
            "2",
            "--warmup",
            "0",
            "--json",
            "--quiet",
        ]
    )
    assert run_bench_cli(args) == 0
    out, err = capfd.readouterr()
    doc = json.loads(out)
    assert [e["mode"] for e in doc["results"]] == ["serial", "workers"]
    assert all(set(e) >= RESULT_KEYS for e in doc["results"])
    assert doc["targets"] == {}
    assert err == ""  # --quiet: no progress


def test_cli_main_text_and_usage(capfd: pytest.CaptureFixture[str]) -> None:
    assert (
        main(
            [
                "--vfs",
                "1",
                "--profile",
                "instant",
                "--modes",
                "workers",
                "--rounds",
                "1",
                "--warmup",
                "0",
            ]
        )
        == 0
    )
    out, err = capfd.readouterr()
    assert "instant" in out and "workers" in out
    assert "round 1/1" in err
    assert main(["--modes", "bogus"]) == 2
    assert main(["--vfs", "1", "--profile", "nope", "--quiet"]) == 2


def test_interrupt_mid_run_closes_every_machine() -> None:
    # Ctrl-C after the first round batch: every machine (workers included)
    # is closed on the way out; the conftest fixture checks for leaks.
    def interrupt(msg: str) -> None:
        if "warm-up 1/" in msg:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        bench_switchover(
            vfs=(2,),
            profiles=("instant",),
            modes=ALL_MODES,
            rounds=1,
            warmup=1,
            progress=interrupt,
        )
