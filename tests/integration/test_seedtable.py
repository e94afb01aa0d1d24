"""The seed table: its rows, its JSON, its arithmetic (no speed asserted)."""

from __future__ import annotations

import json

import pytest

from mpvfio import seedtable
from mpvfio.cli import main


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
