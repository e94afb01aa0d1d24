"""The arc report options of the commands (``--arcs``, ``--arcs-json``)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from mpvfio.report.arcreport import JSON_KEY


def _mpvfio(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mpvfio", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_switchover_arcs_text() -> None:
    res = _mpvfio("switchover", "--vfs", "2", "--profile", "instant", "-q", "--arcs")
    assert res.returncode == 0, res.stderr
    assert "arc latency (ms)" in res.stdout
    assert "PRE_COPY_P2P>STOP_COPY" in res.stdout
    assert "arc timeline:" in res.stdout


def test_switchover_json_carries_the_arc_report() -> None:
    res = _mpvfio(
        "switchover", "--vfs", "2", "--profile", "fixed50", "--json", "--arcs-json"
    )
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)  # still one JSON document
    report = doc[JSON_KEY]
    assert report
    text = json.dumps(report)
    # fixed50: every stop/start arc of both VFs is there, each ~50 ms
    assert "PRE_COPY>PRE_COPY_P2P" in text and "RUNNING_P2P>RUNNING" in text


def test_migrate_arcs_json_without_json() -> None:
    res = _mpvfio(
        "migrate", "--local", "--vfs", "2", "--profile", "instant", "-q", "--arcs-json"
    )
    assert res.returncode == 0, res.stderr
    start = res.stdout.index("arc report (")
    blob = res.stdout[res.stdout.index("{", start) :]
    report = json.loads(blob)
    assert "PRE_COPY_P2P>STOP_COPY" in json.dumps(report)


def test_png_without_matplotlib_says_how_to_get_it() -> None:
    if importlib.util.find_spec("matplotlib") is not None:
        pytest.skip("matplotlib is installed: the missing-extra message cannot show")
    res = _mpvfio(
        "switchover", "--vfs", "1", "--profile", "instant", "-q", "--timeline",
        "/tmp/x.png",
    )  # fmt: skip
    assert res.returncode == 2
    assert "pip install" in res.stderr and "plot" in res.stderr
