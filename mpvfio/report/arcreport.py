"""Seeing the downtime: per-arc latency histograms and arc timelines (layer 4).

This module owns how a run's :class:`~mpvfio.devices.base.ArcRecord` list
is *shown*: it measures nothing and drives no device.  Every command that
takes devices through the switchover (``switchover``, ``migrate``,
``bench``) hands its arcs to :func:`emit`, which prints or draws what the
user asked for with the options :func:`add_arguments` adds:

``--arcs``
    per-arc latency statistics and text histograms, then a per-device
    timeline of the arcs (:func:`histogram_text`, :func:`timeline_text`);
``--arcs-json``
    the same as one JSON object (:func:`report_json`); with the command's
    own ``--json`` it goes into that document instead (key ``arc_report``);
``--timeline FILE.png``
    a PNG with a histogram panel and a timeline panel (:func:`write_png`,
    needs matplotlib: ``pip install -e '.[plot]'``).

Arcs are grouped by their label ``"SRC>DST"`` (uAPI state names), in the
order each label first ran.  Percentiles are nearest-rank: ``pN`` is the
smallest latency with at least N % of the arcs at or below it, so it is
always a latency that was measured.  Histogram buckets are fixed and
log-spaced (1-2-5 per decade, :data:`BUCKET_EDGES_MS`), so histograms of two
runs line up.  A failed arc (``ok`` false) counts in its arc's latencies
(the VM was stopped while it ran) and is also counted, with its errno, as a
failure.

Only the standard library, :mod:`mpvfio.devices.base`, :mod:`mpvfio.uapi`
and :mod:`mpvfio.errors` are imported; matplotlib is imported lazily by
:func:`write_png`.
"""

from __future__ import annotations

import argparse
import bisect
import json
import math
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from mpvfio.devices.base import ArcRecord
from mpvfio.errors import UsageError, errno_name
from mpvfio.uapi.vfio import MigState

__all__ = [
    "BUCKET_EDGES_MS",
    "JSON_KEY",
    "ArcStat",
    "add_arguments",
    "arc_label",
    "arc_stats",
    "arcs_from_dicts",
    "bucket_counts",
    "emit",
    "histogram_text",
    "percentile",
    "report_json",
    "text_report",
    "timeline_text",
    "write_png",
]

#: Bucket edges (ms): 1-2-5 per decade from 10 us to 10 s.  The first bucket
#: is [0, 0.01), the last [10000, inf).
BUCKET_EDGES_MS: tuple[float, ...] = (
    *(round(m * 10.0**e, 6) for e in range(-2, 4) for m in (1, 2, 5)),
    10000.0,
)
#: The key of the arc report inside a command's own ``--json`` document.
JSON_KEY = "arc_report"
#: Timeline symbols, one per arc label in order of first appearance.
_SYMBOLS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
#: Timeline symbol of a failed arc.
_FAILED = "!"
_BAR_WIDTH = 40


def arc_label(arc: ArcRecord) -> str:
    """``"PRE_COPY>PRE_COPY_P2P"``: an arc's uAPI state names."""
    return f"{MigState(arc.src).name}>{MigState(arc.dst).name}"


def percentile(sorted_ms: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of an ascending, non-empty sequence.

    The smallest value with at least ``p`` % of the values at or below it
    (``p`` in (0, 100]; ``p`` = 100 is the maximum).
    """
    if not sorted_ms:
        raise ValueError("percentile of no values")
    if not 0 < p <= 100:
        raise ValueError(f"percentile {p} is outside (0, 100]")
    rank = math.ceil(p / 100.0 * len(sorted_ms))
    return float(sorted_ms[max(1, rank) - 1])


def bucket_counts(values_ms: Iterable[float]) -> list[int]:
    """Counts per bucket: ``len(BUCKET_EDGES_MS) + 1`` of them.

    Bucket 0 is [0, edge 0), bucket i is [edge i-1, edge i), the last one
    [last edge, inf).  A negative latency (clock trouble) counts in bucket 0.
    """
    counts = [0] * (len(BUCKET_EDGES_MS) + 1)
    for v in values_ms:
        counts[bisect.bisect_right(BUCKET_EDGES_MS, v)] += 1
    return counts


def _bucket_bounds(i: int) -> tuple[float, float]:
    lo = 0.0 if i == 0 else BUCKET_EDGES_MS[i - 1]
    hi = BUCKET_EDGES_MS[i] if i < len(BUCKET_EDGES_MS) else math.inf
    return lo, hi


@dataclass(frozen=True)
class ArcStat:
    """Latency statistics of one arc label over every device (ms)."""

    arc: str
    count: int
    failed: int
    min_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    mean_ms: float
    #: counts per bucket of :data:`BUCKET_EDGES_MS` (see :func:`bucket_counts`)
    buckets: tuple[int, ...]
    #: errno name -> how many arcs failed with it
    errors: Mapping[str, int]

    def to_json(self) -> dict[str, Any]:
        """JSON form: the statistics (ms, 3 decimals) and non-empty buckets."""
        src, _, dst = self.arc.partition(">")
        return {
            "arc": self.arc,
            "src": src,
            "dst": dst,
            "count": self.count,
            "failed": self.failed,
            "errors": dict(self.errors),
            "min_ms": round(self.min_ms, 3),
            "p50_ms": round(self.p50_ms, 3),
            "p90_ms": round(self.p90_ms, 3),
            "p99_ms": round(self.p99_ms, 3),
            "max_ms": round(self.max_ms, 3),
            "mean_ms": round(self.mean_ms, 3),
            "buckets": [_bucket_json(i, n) for i, n in enumerate(self.buckets) if n],
        }


def _bucket_json(i: int, n: int) -> dict[str, Any]:
    lo, hi = _bucket_bounds(i)
    return {"lo_ms": lo, "hi_ms": None if math.isinf(hi) else hi, "count": n}


def _grouped(arcs: Iterable[ArcRecord]) -> dict[str, list[ArcRecord]]:
    """Arcs by label, labels in order of their first start (then by name)."""
    groups: dict[str, list[ArcRecord]] = {}
    for a in arcs:
        groups.setdefault(arc_label(a), []).append(a)
    order = sorted(groups, key=lambda k: (min(a.start_ns for a in groups[k]), k))
    return {k: groups[k] for k in order}


def arc_stats(arcs: Iterable[ArcRecord]) -> list[ArcStat]:
    """One :class:`ArcStat` per arc label, in order of first appearance."""
    out: list[ArcStat] = []
    for label, group in _grouped(arcs).items():
        ms = sorted(a.ms for a in group)
        errors: dict[str, int] = {}
        for a in group:
            if not a.ok:
                name = errno_name(a.err) if a.err else "failed"
                errors[name] = errors.get(name, 0) + 1
        out.append(
            ArcStat(
                arc=label,
                count=len(ms),
                failed=sum(errors.values()),
                min_ms=ms[0],
                p50_ms=percentile(ms, 50),
                p90_ms=percentile(ms, 90),
                p99_ms=percentile(ms, 99),
                max_ms=ms[-1],
                mean_ms=sum(ms) / len(ms),
                buckets=tuple(bucket_counts(ms)),
                errors=errors,
            )
        )
    return out


def _fmt_edge(v: float) -> str:
    return "inf" if math.isinf(v) else f"{v:g}"


def histogram_text(arcs: Iterable[ArcRecord], width: int = _BAR_WIDTH) -> str:
    """The statistics table, then one text histogram per arc label.

    Each histogram shows the buckets from its first to its last non-empty
    one; bars are scaled to the fullest bucket of that arc.
    """
    stats = arc_stats(arcs)
    if not stats:
        return "(no arcs)"
    name_w = max(24, *(len(s.arc) for s in stats))
    lines = [
        f"  {'arc latency (ms)':<{name_w}}{'count':>6}{'min':>9}{'p50':>9}"
        f"{'p90':>9}{'p99':>9}{'max':>9}{'failed':>8}"
    ]
    for s in stats:
        lines.append(
            f"  {s.arc:<{name_w}}{s.count:>6}{s.min_ms:>9.2f}{s.p50_ms:>9.2f}"
            f"{s.p90_ms:>9.2f}{s.p99_ms:>9.2f}{s.max_ms:>9.2f}{s.failed:>8}"
        )
    for s in stats:
        used = [i for i, n in enumerate(s.buckets) if n]
        top = max(s.buckets)
        errs = ", ".join(f"{k} x{v}" for k, v in s.errors.items())
        lines.append("")
        lines.append(
            f"{s.arc}: {s.count} arc{'s' if s.count != 1 else ''}"
            + (f", {s.failed} failed ({errs})" if s.failed else "")
        )
        for i in range(used[0], used[-1] + 1):
            lo, hi = _bucket_bounds(i)
            n = s.buckets[i]
            bar = "#" * (max(1, round(n / top * width)) if n else 0)
            lines.append(
                f"  [{_fmt_edge(lo):>6}, {_fmt_edge(hi):>6}) ms |{bar:<{width}}| {n}"
            )
    return "\n".join(lines)


def _natural(name: str) -> tuple[Any, ...]:
    """``vf2`` before ``vf10``."""
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name))


def _devices(arcs: Sequence[ArcRecord]) -> list[str]:
    return sorted({a.device for a in arcs}, key=_natural)


def timeline_text(arcs: Iterable[ArcRecord], width: int = 64) -> str:
    """One row per device (natural order), its arcs as bars over time.

    Every arc label gets a symbol (legend below the rows, in order of first
    appearance); a failed arc is drawn ``!``.  An arc shorter than a column
    still takes one.  Each row ends with the device's summed arc time.
    """
    items = list(arcs)
    if not items:
        return "(no arcs)"
    labels = list(_grouped(items))
    sym = {
        label: _SYMBOLS[i] if i < len(_SYMBOLS) else "?"
        for i, label in enumerate(labels)
    }
    t0 = min(a.start_ns for a in items)
    t1 = max(a.end_ns for a in items)
    scale = max(1, t1 - t0) / width
    devices = _devices(items)
    name_w = max(6, *(len(d) for d in devices))
    lines = [
        f"arc timeline: {(t1 - t0) / 1e6:.1f} ms wide, 1 column = {scale / 1e6:.2f} ms"
    ]
    for dev in devices:
        row = [" "] * width
        total = 0.0
        for a in sorted(
            (a for a in items if a.device == dev), key=lambda a: a.start_ns
        ):
            total += a.ms
            lo = int((a.start_ns - t0) / scale)
            hi = max(lo + 1, int((a.end_ns - t0) / scale))
            ch = sym[arc_label(a)] if a.ok else _FAILED
            for i in range(max(0, lo), min(width, hi)):
                row[i] = ch
        lines.append(f"  {dev:<{name_w}}|{''.join(row)}|{total:9.1f} ms")
    legend = [f"{sym[label]} {label}" for label in labels]
    if any(not a.ok for a in items):
        legend.append(f"{_FAILED} a failed arc")
    lines.append("  " + "  ".join(legend))
    return "\n".join(lines)


def text_report(arcs: Iterable[ArcRecord]) -> str:
    """What ``--arcs`` prints: :func:`histogram_text`, then :func:`timeline_text`."""
    items = list(arcs)
    return histogram_text(items) + "\n\n" + timeline_text(items)


def report_json(arcs: Iterable[ArcRecord]) -> dict[str, Any]:
    """The report as a JSON-able dict::

        {"unit": "ms", "count": N, "failed": F, "window_ms": W,
         "bucket_edges_ms": [...],
         "arcs": [ArcStat.to_json(), ...],
         "timeline": [{"device": "vf0",
                       "arcs": [{"arc", "start_ms", "end_ms", "ms", "ok",
                                 "err"}, ...]}, ...]}

    Timeline times are ms since the first arc started; ``err`` is the errno
    name of a failed arc, else ``None``.
    """
    items = list(arcs)
    t0 = min((a.start_ns for a in items), default=0)
    t1 = max((a.end_ns for a in items), default=0)
    return {
        "unit": "ms",
        "count": len(items),
        "failed": sum(1 for a in items if not a.ok),
        "window_ms": round((t1 - t0) / 1e6, 3),
        "bucket_edges_ms": list(BUCKET_EDGES_MS),
        "arcs": [s.to_json() for s in arc_stats(items)],
        "timeline": [
            {
                "device": dev,
                "arcs": [
                    {
                        "arc": arc_label(a),
                        "start_ms": round((a.start_ns - t0) / 1e6, 3),
                        "end_ms": round((a.end_ns - t0) / 1e6, 3),
                        "ms": round(a.ms, 3),
                        "ok": a.ok,
                        "err": None if a.ok else (errno_name(a.err) if a.err else None),
                    }
                    for a in sorted(
                        (a for a in items if a.device == dev), key=lambda a: a.start_ns
                    )
                ],
            }
            for dev in _devices(items)
        ],
    }


def arcs_from_dicts(items: Iterable[Mapping[str, Any]]) -> list[ArcRecord]:
    """Arc records back from their JSON forms.

    Takes :meth:`ArcRecord.to_dict` dicts (``device, src, dst, start_ns,
    end_ns[, ok, err]``; states by name or number) and timeline spans
    (``device, what, start_ns, end_ns`` with ``what`` such as
    ``"stop PRE_COPY>PRE_COPY_P2P"``).  Spans that are not arcs (``data``,
    ``load``) are skipped.

    :raise UsageError: a dict names an unknown state.
    """
    out: list[ArcRecord] = []
    for d in items:
        if "what" in d and "src" not in d:
            label = str(d["what"]).split()[-1]
            src, sep, dst = label.partition(">")
            if not sep:
                continue  # "data", "load": not an arc
        else:
            src, dst = d["src"], d["dst"]
        out.append(
            ArcRecord(
                str(d["device"]),
                _state(src),
                _state(dst),
                int(d["start_ns"]),
                int(d["end_ns"]),
                bool(d.get("ok", True)),
                int(d.get("err", 0)),
            )
        )
    return out


def _state(value: Any) -> MigState:
    try:
        if isinstance(value, str) and not value.isdigit():
            return MigState[value]
        return MigState(int(value))
    except (KeyError, ValueError):
        raise UsageError(
            f"unknown VFIO migration state {value!r}; valid: "
            f"{', '.join(MigState.__members__)}"
        ) from None


def write_png(arcs: Iterable[ArcRecord], path: str, title: str | None = None) -> None:
    """Draw the histograms (top) and the per-device timeline (bottom) as a PNG.

    :raise UsageError: matplotlib is not installed, or there are no arcs.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError(
            f"drawing {path} needs matplotlib: pip install -e '.[plot]' "
            "(--arcs prints the same report as text)"
        ) from None
    items = list(arcs)
    if not items:
        raise UsageError(f"nothing to draw in {path}: no arcs were recorded")
    groups = _grouped(items)
    labels = list(groups)
    devices = _devices(items)
    cmap = plt.get_cmap("tab20")
    color = {label: cmap(i % 20) for i, label in enumerate(labels)}
    t0 = min(a.start_ns for a in items)
    fig, (ax_h, ax_t) = plt.subplots(
        2,
        1,
        figsize=(10, 4.5 + 0.4 * len(devices)),
        gridspec_kw={"height_ratios": [3, max(2, len(devices))]},
    )
    # Histograms: the fixed log-spaced buckets that hold any arc.
    all_counts = bucket_counts(a.ms for a in items)
    used = [i for i, n in enumerate(all_counts) if n]
    lo_edge = max(_bucket_bounds(used[0])[0], BUCKET_EDGES_MS[0] / 2)
    hi_b = _bucket_bounds(used[-1])[1]
    hi_edge = hi_b if math.isfinite(hi_b) else 2 * BUCKET_EDGES_MS[-1]
    edges = [lo_edge, *(e for e in BUCKET_EDGES_MS if lo_edge < e < hi_edge), hi_edge]
    for label, group in groups.items():
        ms = [min(max(a.ms, lo_edge), hi_edge) for a in group]
        ax_h.hist(
            ms,
            bins=edges,
            histtype="step",
            linewidth=1.5,
            color=color[label],
            label=f"{label} (n={len(ms)})",
        )
    ax_h.set_xscale("log")
    ax_h.set_xlabel("arc latency (ms, log scale)")
    ax_h.set_ylabel("arcs")
    ax_h.legend(fontsize=7, loc="upper right")
    # Timeline: one row per device, one bar per arc.
    for y, dev in enumerate(devices):
        for a in items:
            if a.device != dev:
                continue
            ax_t.broken_barh(
                [((a.start_ns - t0) / 1e6, max(a.ms, 1e-3))],
                (y - 0.35, 0.7),
                facecolor=color[arc_label(a)],
                edgecolor="red" if not a.ok else "none",
                hatch="xx" if not a.ok else None,
            )
    ax_t.set_yticks(range(len(devices)), devices)
    ax_t.invert_yaxis()
    ax_t.set_xlabel("ms since the first arc started (red hatched: failed)")
    fig.suptitle(title or f"{len(items)} arcs on {len(devices)} devices")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def add_arguments(
    parser: argparse.ArgumentParser, *, png_option: str | None = "--timeline"
) -> None:
    """Add ``--arcs``, ``--arcs-json`` and the PNG option to a command.

    :param png_option: the PNG option's name; ``None`` leaves it out (for a
        command that already has a ``--timeline`` of its own, pass e.g.
        ``"--arcs-png"``).  Its value lands in ``args.arcs_png`` either way.
    """
    g = parser.add_argument_group("arc report (where the downtime went)")
    g.add_argument(
        "--arcs",
        action="store_true",
        dest="arcs_text",
        help="print per-arc latency statistics with text histograms, and a "
        "per-device arc timeline",
    )
    g.add_argument(
        "--arcs-json",
        action="store_true",
        dest="arcs_json",
        help=f"print the arc report as one JSON object (with --json it goes "
        f"into that document under {JSON_KEY!r})",
    )
    if png_option:
        g.add_argument(
            png_option,
            metavar="FILE.png",
            dest="arcs_png",
            default=None,
            help="draw the arc histograms and timeline as a PNG (matplotlib: "
            "pip install -e '.[plot]')",
        )


def emit(
    args: argparse.Namespace, arcs: Iterable[ArcRecord], out: TextIO | None = None
) -> dict[str, Any] | None:
    """Print and draw what the :func:`add_arguments` options asked for.

    Without the command's own ``--json``: ``--arcs`` prints
    :func:`text_report`, ``--arcs-json`` prints :func:`report_json` as one
    JSON object, and ``None`` is returned.  With ``args.json`` true nothing
    is printed (stdout stays one JSON document): the report is returned when
    ``--arcs`` or ``--arcs-json`` was given, for the caller to put under
    :data:`JSON_KEY`.  The PNG is drawn last, in both cases.

    :raise UsageError: the PNG was asked for but matplotlib is missing.
    """
    stream = sys.stdout if out is None else out
    items = list(arcs)
    want_text = bool(getattr(args, "arcs_text", False))
    want_json = bool(getattr(args, "arcs_json", False))
    png = getattr(args, "arcs_png", None)
    result: dict[str, Any] | None = None
    if getattr(args, "json", False):
        if want_text or want_json:
            result = report_json(items)
    else:
        if want_text:
            print(text_report(items), file=stream)
        if want_json:
            print(json.dumps(report_json(items), indent=2), file=stream)
    if png:
        write_png(items, str(png))
        if not getattr(args, "json", False):
            print(f"arc report drawn to {png}", file=stream)
    return result
