"""Tests of mpvfio.report.arcreport on hand-built arc records (no devices run)."""

from __future__ import annotations

import argparse
import errno
import io
import json
import math
import sys
from typing import Any
from unittest import mock

import pytest

from mpvfio.devices.base import ArcRecord
from mpvfio.errors import UsageError
from mpvfio.report import arcreport
from mpvfio.report.arcreport import BUCKET_EDGES_MS
from mpvfio.uapi.vfio import MigState

S = MigState
MS = 1_000_000  # ns per ms


def arc(
    dev: str, src: S, dst: S, start_ms: float, ms: float, err: int = 0
) -> ArcRecord:
    start = int(start_ms * MS)
    return ArcRecord(dev, src, dst, start, start + int(ms * MS), not err, err)


def switchover(devs: list[str]) -> list[ArcRecord]:
    """Stop arcs from t=0 (15 + 42 ms), start arcs from t=300 (36 ms)."""
    out = []
    for i, d in enumerate(devs):
        out.append(arc(d, S.PRE_COPY, S.PRE_COPY_P2P, i, 15))
        out.append(arc(d, S.PRE_COPY_P2P, S.STOP_COPY, i + 15, 42))
        out.append(arc(d, S.RESUMING, S.STOP, 300 + i, 36))
    return out


# --------------------------------------------------------------- percentiles
def test_nearest_rank_percentiles() -> None:
    values = [float(v) for v in range(1, 101)]
    assert arcreport.percentile(values, 50) == 50.0
    assert arcreport.percentile(values, 90) == 90.0
    assert arcreport.percentile(values, 99) == 99.0
    assert arcreport.percentile(values, 100) == 100.0
    assert arcreport.percentile(values, 0.1) == 1.0
    # always a measured value: 4 samples
    four = [10.0, 20.0, 30.0, 40.0]
    assert arcreport.percentile(four, 50) == 20.0
    assert arcreport.percentile(four, 51) == 30.0
    assert arcreport.percentile(four, 90) == 40.0
    assert arcreport.percentile([7.0], 99) == 7.0


@pytest.mark.parametrize("p", [0, -1, 100.5])
def test_percentile_out_of_range(p: float) -> None:
    with pytest.raises(ValueError, match="outside"):
        arcreport.percentile([1.0], p)


def test_percentile_of_nothing() -> None:
    with pytest.raises(ValueError, match="no values"):
        arcreport.percentile([], 50)


def test_arc_stats_values() -> None:
    # 20 arcs of one label with latencies 1..20 ms, 2 of them failed
    arcs = [
        arc(
            f"vf{i % 4}",
            S.RESUMING,
            S.STOP,
            i * 30,
            i + 1,
            errno.EIO if i in (3, 7) else 0,
        )
        for i in range(20)
    ]
    (st,) = arcreport.arc_stats(arcs)
    assert st.arc == "RESUMING>STOP"
    assert st.count == 20 and st.failed == 2
    assert dict(st.errors) == {"EIO": 2}
    assert st.min_ms == pytest.approx(1.0)
    assert st.p50_ms == pytest.approx(10.0)
    assert st.p90_ms == pytest.approx(18.0)
    assert st.p99_ms == pytest.approx(20.0)
    assert st.max_ms == pytest.approx(20.0)
    assert st.mean_ms == pytest.approx(10.5)
    assert sum(st.buckets) == 20


def test_arc_stats_group_in_order_of_first_run() -> None:
    arcs = switchover(["vf1", "vf0"])
    arcs.reverse()  # input order does not matter, time does
    stats = arcreport.arc_stats(arcs)
    assert [s.arc for s in stats] == [
        "PRE_COPY>PRE_COPY_P2P",
        "PRE_COPY_P2P>STOP_COPY",
        "RESUMING>STOP",
    ]
    assert [s.count for s in stats] == [2, 2, 2]
    assert stats[1].p50_ms == pytest.approx(42.0)
    assert arcreport.arc_stats([]) == []


# ------------------------------------------------------------------- buckets
def test_bucket_edges_are_1_2_5_per_decade() -> None:
    assert BUCKET_EDGES_MS[:4] == (0.01, 0.02, 0.05, 0.1)
    assert BUCKET_EDGES_MS[-3:] == (2000.0, 5000.0, 10000.0)
    assert len(BUCKET_EDGES_MS) == 19
    assert list(BUCKET_EDGES_MS) == sorted(BUCKET_EDGES_MS)


def test_bucket_counts() -> None:
    counts = arcreport.bucket_counts(
        [0.005, 0.01, 0.015, 0.02, 9.99, 10.0, 15.0, 19.999, 20.0, 15000.0, -1.0]
    )
    assert len(counts) == len(BUCKET_EDGES_MS) + 1
    assert counts[0] == 2  # [0, 0.01): 0.005 and the negative one
    assert counts[1] == 2  # [0.01, 0.02)
    assert counts[2] == 1  # [0.02, 0.05)
    i10 = BUCKET_EDGES_MS.index(10.0) + 1  # [10, 20)
    assert counts[i10 - 1] == 1  # [5, 10): 9.99
    assert counts[i10] == 3  # 10, 15, 19.999
    assert counts[i10 + 1] == 1  # [20, 50)
    assert counts[-1] == 1  # [10000, inf)
    assert sum(counts) == 11


def test_histogram_text_shows_the_used_bucket_range() -> None:
    arcs = [
        arc("vf0", S.RESUMING, S.STOP, i * 100, ms)
        for i, ms in enumerate([12.0, 13.0, 14.0, 15.0, 160.0])
    ]
    text = arcreport.histogram_text(arcs, width=20)
    lines = text.splitlines()
    assert "p50" in lines[0] and "p99" in lines[0]
    row = next(line for line in lines if line.strip().startswith("RESUMING>STOP "))
    assert row.split()[1:] == ["5", "12.00", "14.00", "160.00", "160.00", "160.00", "0"]
    hist = [line for line in lines if " ms |" in line]
    # from [10, 20) to [100, 200): four buckets, the empty ones shown empty
    assert [h.split("|")[-1].strip() for h in hist] == ["4", "0", "0", "1"]
    assert hist[0].count("#") == 20  # the fullest bucket fills the bar
    assert hist[1].count("#") == 0
    assert hist[3].count("#") == 5
    assert "[    10,     20) ms" in hist[0]
    assert "[   100,    200) ms" in hist[3]
    assert arcreport.histogram_text([]) == "(no arcs)"


def test_histogram_text_names_failures() -> None:
    arcs = [
        arc("vf0", S.STOP, S.RESUMING, 0, 5, errno.EBUSY),
        arc("vf1", S.STOP, S.RESUMING, 0, 6),
    ]
    text = arcreport.histogram_text(arcs)
    assert "STOP>RESUMING: 2 arcs, 1 failed (EBUSY x1)" in text


# ------------------------------------------------------------------ timeline
def test_timeline_rows_in_natural_order_and_arcs_in_time_order() -> None:
    arcs = switchover(["vf10", "vf2", "vf1"])
    text = arcreport.timeline_text(arcs, width=40)
    lines = text.splitlines()
    assert lines[0].startswith("arc timeline: ")
    rows = lines[1:4]
    assert [r.split("|")[0].strip() for r in rows] == ["vf1", "vf2", "vf10"]
    for r in rows:
        bar = r.split("|")[1]
        assert len(bar) == 40
        # a = PRE_COPY>PRE_COPY_P2P, b = PRE_COPY_P2P>STOP_COPY, c = RESUMING>STOP
        assert bar.index("a") < bar.index("b") < bar.index("c")
        assert bar.rstrip().endswith("c")
        assert " " in bar[bar.rindex("b") : bar.index("c")]  # the gap (data)
        assert r.endswith("93.0 ms")  # 15 + 42 + 36
    assert lines[-1].split() == [
        "a",
        "PRE_COPY>PRE_COPY_P2P",
        "b",
        "PRE_COPY_P2P>STOP_COPY",
        "c",
        "RESUMING>STOP",
    ]


def test_timeline_marks_failed_arcs() -> None:
    arcs = [
        arc("vf0", S.RUNNING, S.RUNNING_P2P, 0, 10),
        arc("vf0", S.RUNNING_P2P, S.STOP, 10, 10, errno.EIO),
    ]
    text = arcreport.timeline_text(arcs, width=20)
    row = text.splitlines()[1].split("|")[1]
    assert row == "a" * 10 + "!" * 10
    assert "! a failed arc" in text.splitlines()[-1]
    assert arcreport.timeline_text([]) == "(no arcs)"


def test_a_short_arc_still_takes_a_column() -> None:
    arcs = [
        arc("vf0", S.STOP, S.RESUMING, 0, 0.001),
        arc("vf0", S.RESUMING, S.STOP, 999, 1),
    ]
    bar = arcreport.timeline_text(arcs, width=50).splitlines()[1].split("|")[1]
    assert bar[0] == "a" and bar[-1] == "b"


# ---------------------------------------------------------------------- JSON
def test_report_json_shape() -> None:
    arcs = [*switchover(["vf0", "vf1"]), arc("vf1", S.STOP, S.RESUMING, 400, 2, 5)]
    doc = arcreport.report_json(arcs)
    assert json.loads(json.dumps(doc)) == doc  # plain JSON, no inf / nan
    assert set(doc) == {
        "unit",
        "count",
        "failed",
        "window_ms",
        "bucket_edges_ms",
        "arcs",
        "timeline",
    }
    assert (doc["unit"], doc["count"], doc["failed"]) == ("ms", 7, 1)
    assert doc["window_ms"] == pytest.approx(402.0)
    assert doc["bucket_edges_ms"] == list(BUCKET_EDGES_MS)
    assert [a["arc"] for a in doc["arcs"]] == [
        "PRE_COPY>PRE_COPY_P2P",
        "PRE_COPY_P2P>STOP_COPY",
        "RESUMING>STOP",
        "STOP>RESUMING",
    ]
    first = doc["arcs"][0]
    assert set(first) == {
        "arc",
        "src",
        "dst",
        "count",
        "failed",
        "errors",
        "min_ms",
        "p50_ms",
        "p90_ms",
        "p99_ms",
        "max_ms",
        "mean_ms",
        "buckets",
    }
    assert (first["src"], first["dst"], first["count"]) == (
        "PRE_COPY",
        "PRE_COPY_P2P",
        2,
    )
    assert first["buckets"] == [{"lo_ms": 10.0, "hi_ms": 20.0, "count": 2}]
    assert doc["arcs"][3]["errors"] == {"EIO": 1}
    assert [t["device"] for t in doc["timeline"]] == ["vf0", "vf1"]
    vf1 = doc["timeline"][1]["arcs"]
    assert [a["arc"] for a in vf1] == [
        "PRE_COPY>PRE_COPY_P2P",
        "PRE_COPY_P2P>STOP_COPY",
        "RESUMING>STOP",
        "STOP>RESUMING",
    ]
    assert vf1[0]["start_ms"] == pytest.approx(1.0)  # since the first arc
    assert vf1[0]["end_ms"] == pytest.approx(16.0)
    assert vf1[-1]["ok"] is False and vf1[-1]["err"] == "EIO"
    assert vf1[0]["err"] is None


def test_the_unbounded_bucket_has_no_upper_edge() -> None:
    doc = arcreport.report_json([arc("vf0", S.STOP, S.RESUMING, 0, 20000)])
    assert doc["arcs"][0]["buckets"] == [{"lo_ms": 10000.0, "hi_ms": None, "count": 1}]


def test_empty_report_json() -> None:
    doc = arcreport.report_json([])
    assert doc["count"] == 0 and doc["arcs"] == [] and doc["timeline"] == []


def test_arcs_from_dicts_reads_records_and_spans() -> None:
    recs = [*switchover(["vf0"]), arc("vf0", S.STOP, S.RESUMING, 500, 1, 5)]
    back = arcreport.arcs_from_dicts([r.to_dict() for r in recs])
    assert back == recs
    spans = [
        {
            "device": "vf0",
            "what": "stop PRE_COPY>PRE_COPY_P2P",
            "start_ns": 0,
            "end_ns": 15 * MS,
        },
        {"device": "vf0", "what": "data", "start_ns": 15 * MS, "end_ns": 20 * MS},
        {
            "device": "vf0",
            "what": "start RESUMING>STOP",
            "start_ns": 30 * MS,
            "end_ns": 66 * MS,
        },
    ]
    got = arcreport.arcs_from_dicts(spans)
    assert [(a.src, a.dst, a.ms) for a in got] == [
        (S.PRE_COPY, S.PRE_COPY_P2P, 15.0),
        (S.RESUMING, S.STOP, 36.0),
    ]
    numeric = {"device": "x", "src": 1, "dst": "4", "start_ns": 0, "end_ns": 1}
    assert arcreport.arcs_from_dicts([numeric])[0].dst == S.RESUMING
    with pytest.raises(UsageError, match="BOGUS"):
        arcreport.arcs_from_dicts([{**numeric, "src": "BOGUS"}])


# ----------------------------------------------------------------------- PNG
def _no_matplotlib(monkeypatch: pytest.MonkeyPatch) -> None:
    # a None entry in sys.modules makes "import matplotlib" raise ImportError
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)


def test_png_without_matplotlib_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    _no_matplotlib(monkeypatch)
    path = tmp_path / "arcs.png"
    with pytest.raises(UsageError) as info:
        arcreport.write_png(switchover(["vf0"]), str(path))
    msg = str(info.value)
    assert "matplotlib" in msg
    assert "pip install -e '.[plot]'" in msg
    assert str(path) in msg
    assert not path.exists()


def _fake_matplotlib(monkeypatch: pytest.MonkeyPatch) -> tuple[Any, Any, Any, Any]:
    fig, ax_h, ax_t = mock.MagicMock(), mock.MagicMock(), mock.MagicMock()
    plt = mock.MagicMock()
    plt.subplots.return_value = (fig, (ax_h, ax_t))
    mpl = mock.MagicMock()
    mpl.pyplot = plt
    monkeypatch.setitem(sys.modules, "matplotlib", mpl)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", plt)
    return plt, fig, ax_h, ax_t


def test_png_draws_both_panels(monkeypatch: pytest.MonkeyPatch) -> None:
    plt, fig, ax_h, ax_t = _fake_matplotlib(monkeypatch)
    arcs = switchover(["vf0", "vf1", "vf2"])
    arcreport.write_png(arcs, "out.png", title="t")
    assert ax_h.hist.call_count == 3  # one histogram per arc label
    for call in ax_h.hist.call_args_list:
        bins = call.kwargs["bins"]
        assert bins == sorted(bins) and all(b > 0 for b in bins)  # log axis
    assert ax_t.broken_barh.call_count == len(arcs)  # one bar per arc
    fig.savefig.assert_called_once_with("out.png", dpi=110)
    plt.close.assert_called_once_with(fig)


def test_png_of_nothing_is_a_usage_error(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_matplotlib(monkeypatch)
    with pytest.raises(UsageError, match="no arcs"):
        arcreport.write_png([], "out.png")


# ----------------------------------------------------------- options, emit
def _parse(argv: list[str], **kw: Any) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--json", action="store_true")
    arcreport.add_arguments(p, **kw)
    return p.parse_args(argv)


def test_add_arguments_defaults() -> None:
    args = _parse([])
    assert (args.arcs_text, args.arcs_json, args.arcs_png) == (False, False, None)
    assert _parse(["--timeline", "x.png"]).arcs_png == "x.png"
    assert _parse(["--arcs-png", "y.png"], png_option="--arcs-png").arcs_png == "y.png"
    with pytest.raises(SystemExit):
        _parse(["--timeline", "x.png"], png_option=None)


def test_emit_text_and_json() -> None:
    arcs = switchover(["vf0", "vf1"])
    out = io.StringIO()
    assert arcreport.emit(_parse(["--arcs"]), arcs, out) is None
    text = out.getvalue()
    assert "RESUMING>STOP" in text and "arc timeline:" in text
    out = io.StringIO()
    assert arcreport.emit(_parse(["--arcs-json"]), arcs, out) is None
    assert json.loads(out.getvalue()) == arcreport.report_json(arcs)
    out = io.StringIO()
    assert arcreport.emit(_parse([]), arcs, out) is None
    assert out.getvalue() == ""


def test_emit_under_json_returns_the_report_and_prints_nothing() -> None:
    arcs = switchover(["vf0"])
    for flag in ("--arcs", "--arcs-json"):
        out = io.StringIO()
        doc = arcreport.emit(_parse(["--json", flag]), arcs, out)
        assert out.getvalue() == ""
        assert doc == arcreport.report_json(arcs)
    assert arcreport.emit(_parse(["--json"]), arcs, io.StringIO()) is None
    assert arcreport.JSON_KEY == "arc_report"


def test_emit_png_without_matplotlib_is_a_usage_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _no_matplotlib(monkeypatch)
    out = io.StringIO()
    with pytest.raises(UsageError, match=r"pip install -e '\.\[plot\]'"):
        arcreport.emit(
            _parse(["--arcs", "--timeline", "x.png"]), switchover(["a"]), out
        )
    assert "arc timeline:" in out.getvalue()  # the text came first


def test_emit_png(monkeypatch: pytest.MonkeyPatch) -> None:
    _, fig, _, _ = _fake_matplotlib(monkeypatch)
    out = io.StringIO()
    arcreport.emit(_parse(["--timeline", "x.png"]), switchover(["vf0"]), out)
    fig.savefig.assert_called_once()
    assert out.getvalue().strip() == "arc report drawn to x.png"


def test_no_nan_or_inf_in_stats() -> None:
    st = arcreport.arc_stats(switchover(["vf0"]))
    for s in st:
        for v in (s.min_ms, s.p50_ms, s.p90_ms, s.p99_ms, s.max_ms, s.mean_ms):
            assert math.isfinite(v)
