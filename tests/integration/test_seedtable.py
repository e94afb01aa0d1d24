"""The seed table: its rows, its JSON, its arithmetic (no speed asserted)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from mpvfio.cli.main import main
from mpvfio.devices.profiles import get_profile
from mpvfio.errors import UsageError
from mpvfio.jobs import seedtable


def test_row_arithmetic_and_json() -> None:
    row = seedtable.SeedRow("serial", "x", 4, 1454.25, 1385.0)
    assert row.diff_pct == pytest.approx(5.0)
    assert row.to_json() == {
        "label": "x",
        "vfs": 4,
        "downtime_ms": 1454.2,
        "seed_ms": 1385.0,
        "diff_pct": 5.0,
    }
    own = seedtable.SeedRow("workers", "y", 1, 100.0, None)
    assert own.diff_pct is None and own.to_json()["diff_pct"] is None


def test_the_seeds_six_numbers() -> None:
    assert seedtable.SEED_MS[("serial", 4)] == 1385.0
    assert seedtable.SEED_MS[("threads", 4)] == 986.0
    assert len(seedtable.SEED_MS) == 6


@pytest.mark.parametrize(("key", "vfs"), sorted(seedtable.SEED_MS))
def test_the_model_lands_within_5_percent_of_the_seed(key: str, vfs: int) -> None:
    seed = seedtable.SEED_MS[(key, vfs)]
    model = seedtable.MODEL.downtime_ms(key, vfs)
    assert abs(model - seed) / seed < 0.05, (key, vfs, model, seed)


def test_model_arithmetic() -> None:
    m = seedtable.Model(fixed_ms=200, transition_ms=100, data_ms=10, pf_concurrency=2)
    assert m.downtime_ms("serial", 4) == 200 + 4 * 110
    assert m.downtime_ms("threads", 1) == 200 + 100 + 10
    assert m.downtime_ms("threads", 3) == 200 + 2 * 100 + 3 * 10  # two waves
    assert m.downtime_ms("workers", 4) == m.downtime_ms("threads", 4)
    assert m.downtime_ms("workers+multifd", 4) == 200 + 2 * 100 + 10
    free = seedtable.Model(fixed_ms=200, transition_ms=100, data_ms=10)
    assert free.downtime_ms("threads", 64) == 200 + 100 + 640  # no PF limit
    with pytest.raises(UsageError, match="nosuch"):
        m.downtime_ms("nosuch", 1)
    with pytest.raises(UsageError):
        m.downtime_ms("serial", 0)


def test_the_fit_needs_a_pf_limit_of_at_least_4() -> None:
    """A PF limit of 2 puts the enabled 4-VF figure far outside 5 %."""
    two = dataclasses.replace(seedtable.MODEL, pf_concurrency=2)
    seed = seedtable.SEED_MS[("threads", 4)]
    assert two.downtime_ms("threads", 4) / seed - 1 > 0.10
    assert seedtable.MODEL.pf_concurrency == get_profile("cx7").pf_concurrency == 4


@pytest.mark.timeout(300)
def test_seed_table_cli_json_runs_every_row(capfd: pytest.CaptureFixture[str]) -> None:
    rc = main(
        [
            "bench",
            "seed-table",
            "--profile",
            "instant",
            "--vfs",
            "1",
            "--fixed-ms",
            "5",
            "--json",
        ]
    )
    out = json.loads(capfd.readouterr().out)
    assert rc == 0
    labels = [r["label"] for r in out["rows"]]
    assert len(labels) == 4 and len(set(labels)) == 4
    for r in out["rows"]:
        assert r["vfs"] == 1 and r["downtime_ms"] > 5.0  # the fixed part is in it
        assert (r["seed_ms"] is None) == (r["diff_pct"] is None)
