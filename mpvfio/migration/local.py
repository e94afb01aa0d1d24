"""Source and target on this machine: ``mpvfio migrate --local`` (layer 4).

:func:`run_local` forks the **target** into its own process (its own
Machine, its own device workers, its own interpreter lock), waits until it
listens on a UNIX socket, then runs the **source** here and migrates.  Both
sides read the one host's CLOCK_MONOTONIC, so the downtime is measured as
QEMU measures it: from the source's vm_stop to the target's VM running.

:func:`compare` runs the rows of the seed's table on fresh machines:
serial transitions, parallel transitions, parallel transitions + multifd.
:func:`timeline_text` and :func:`timeline_png` draw where the downtime went.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from dataclasses import asdict
from typing import Any

import multiprocess as mp

from mpvfio.devices.profiles import Profile, get_profile
from mpvfio.errors import MpvfioError, UsageError
from mpvfio.machine import Machine
from mpvfio.migration.engine import (
    MigrationError,
    MigrationInfo,
    MigrationParams,
    Span,
    incoming,
    migrate,
)
from mpvfio.migration.transport import listen
from mpvfio.vfiomig import MigrationProps
from mpvfio.vmstate import RunState

__all__ = ["ROWS", "compare", "run_local", "timeline_png", "timeline_text"]

#: The --compare rows: (label, machine mode, multifd on).
ROWS = (
    ("serial transitions", "serial", False),
    ("parallel transitions", "workers", False),
    ("parallel transitions + multifd data", "workers", True),
)


def _build(
    mode: str,
    vfs: int,
    profile: Profile,
    name: str,
    arch: str | None,
    props: MigrationProps,
) -> Machine:
    m = Machine(mode, name=name, arch=arch)
    for i in range(vfs):
        m.add_vfio_device(f"vf{i}", profile, props=props)
    return m


def _target_main(
    conn: Any,
    uri: str,
    mode: str,
    vfs: int,
    profile: Profile,
    params: MigrationParams,
    arch: str | None,
    props: MigrationProps,
) -> None:
    """The forked target process: listen, receive, report, exit."""
    import ctypes
    import signal

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(1, signal.SIGKILL, 0, 0, 0)  # die with the source
    result: dict[str, Any]
    try:
        with _build(mode, vfs, profile, "target", arch, props) as m:
            m.start(run=False, runstate=RunState.INMIGRATE)
            with listen(uri) as lst:
                conn.send(("listening", lst.uri.__str__()))
                info = incoming(m, lst, params)
            result = {"ok": True, "info": asdict(info)}
    except MigrationError as exc:
        result = {"ok": False, "error": str(exc), "stage": exc.stage}
    except BaseException as exc:  # noqa: BLE001 - reported to the source side
        result = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "stage": ""}
    with contextlib.suppress(OSError):
        conn.send(("done", result))


def run_local(
    vfs: int,
    profile: Profile | str = "fixed50",
    mode: str = "workers",
    params: MigrationParams | None = None,
    *,
    target_mode: str | None = None,
    arch: str | None = None,
    props: MigrationProps | None = None,
    progress: Any = None,
) -> tuple[MigrationInfo, dict[str, Any]]:
    """Migrate ``vfs`` emulated VFs from a source here to a forked target.

    :return: the source's :class:`MigrationInfo` and the target's report.
    :raise MigrationError: the migration failed (the source rolled back).
    """
    if vfs < 1:
        raise UsageError("a migration needs at least one VF (--vfs >= 1)")
    prof = get_profile(profile) if isinstance(profile, str) else profile
    p = params or MigrationParams()
    pr = props or MigrationProps(migration_events=True)
    tmp = tempfile.mkdtemp(prefix="mpvfio-mig-")
    uri = f"unix:{tmp}/migrate.sock"
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe()
    target = ctx.Process(
        target=_target_main,
        name="mpvfio-target",
        args=(child, uri, target_mode or mode, vfs, prof, p, arch, pr),
    )
    target.start()
    child.close()
    report: dict[str, Any] = {}
    try:
        if not parent.poll(60.0):
            raise MpvfioError("the target process did not start listening in 60 s")
        tag, _ = parent.recv()
        if tag != "listening":
            raise MpvfioError(f"target process: unexpected message {tag!r}")
        with _build(mode, vfs, prof, "source", arch, pr) as m:
            m.start()
            try:
                info = migrate(m, uri, p, progress=progress)
            finally:
                if parent.poll(p.timeout + 10):
                    _, report = parent.recv()
        return info, report
    finally:
        target.join(10.0)
        if target.is_alive():
            target.kill()
            target.join(5.0)
        parent.close()
        shutil.rmtree(tmp, ignore_errors=True)


def compare(
    vfs: int,
    profile: Profile | str,
    params: MigrationParams,
    channels: int,
    progress: Any = None,
) -> list[dict[str, Any]]:
    """The --compare rows, each on fresh machines (see :data:`ROWS`)."""
    rows = []
    for label, mode, multifd in ROWS:
        pr = MigrationParams(
            **{**asdict(params), "multifd_channels": channels if multifd else 0}
        )
        if progress:
            progress(f"{label}: migrating {vfs} VFs ...")
        info, _ = run_local(vfs, profile, mode, pr, progress=progress)
        rows.append({"label": label, "info": info})
    return rows


def _row_json(label: str, info: MigrationInfo) -> dict[str, Any]:
    return {
        "mode": label,
        "vfs": info.vfs,
        "downtime_ms": round(info.downtime_ms, 3),
        "stop_ms": round(info.stop_ms, 3),
        "transfer_ms": round(info.transfer_ms, 3),
        "start_ms": round(info.start_ms, 3),
    }


def rows_json(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The ``--json`` document of ``migrate --local``."""
    return {
        "rows": [_row_json(r["label"], r["info"]) for r in rows],
        "checksums_equal": all(r["info"].checksums_equal for r in rows),
    }


def timeline_text(info: MigrationInfo, width: int = 64) -> str:
    """Per-device bars over the downtime window (s stop, d data, r start)."""
    spans = info.timeline
    if not spans:
        return "(no timeline)"
    t0 = min(s.start_ns for s in spans)
    t1 = max(s.end_ns for s in spans)
    scale = max(1, t1 - t0) / width
    marks = {"stop": "s", "data": "d", "load": "l", "start": "r"}
    devices = sorted({s.device for s in spans}, key=lambda n: (len(n), n))
    lines = [
        f"timeline: {(t1 - t0) / 1e6:.1f} ms wide, 1 column = "
        f"{scale / 1e6:.2f} ms (s stop arcs, d data, l load, r start arcs)"
    ]
    for dev in devices:
        row = [" "] * width
        for s in spans:
            if s.device != dev:
                continue
            a = int((s.start_ns - t0) / scale)
            b = max(a + 1, int((s.end_ns - t0) / scale))
            ch = marks.get(s.what.split()[0], "?")
            for i in range(max(0, a), min(width, b)):
                row[i] = ch
        lines.append(f"  {dev:<6}|{''.join(row)}|")
    return "\n".join(lines)


def timeline_png(info: MigrationInfo, path: str) -> None:
    """Draw the timeline as a PNG (needs matplotlib: ``mpvfio[plot]``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError(
            "--timeline FILE.png needs matplotlib: pip install 'mpvfio[plot]' "
            "(the text timeline is printed anyway)"
        ) from None
    spans: list[Span] = info.timeline
    if not spans:
        raise UsageError("nothing to draw: the migration recorded no timeline")
    t0 = min(s.start_ns for s in spans)
    devices = sorted({s.device for s in spans}, key=lambda n: (len(n), n))
    colors = {
        "stop": "tab:red",
        "data": "tab:blue",
        "load": "tab:cyan",
        "start": "tab:green",
    }
    fig, ax = plt.subplots(figsize=(10, 1 + 0.45 * len(devices)))
    for y, dev in enumerate(devices):
        for s in spans:
            if s.device != dev:
                continue
            kind = s.what.split()[0]
            ax.broken_barh(
                [((s.start_ns - t0) / 1e6, (s.end_ns - s.start_ns) / 1e6)],
                (y - 0.35, 0.7),
                color=colors.get(kind, "gray"),
            )
    ax.set_yticks(range(len(devices)), devices)
    ax.set_xlabel("ms since the source's vm_stop")
    ax.set_title(
        f"{info.mode}: {info.vfs} VFs, downtime {info.downtime_ms:.1f} ms "
        f"(red stop arcs, blue data, cyan load, green start arcs)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
