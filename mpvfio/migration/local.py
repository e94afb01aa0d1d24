"""Source and target on this machine: ``mpvfio migrate --local`` (layer 4).

:func:`run_local` forks the **target** into its own process (its own
Machine, its own device workers, its own interpreter lock), waits until it
listens on a UNIX socket, then runs the **source** here and migrates.  Both
sides read the one host's CLOCK_MONOTONIC, so the downtime is measured as
QEMU measures it: from the source's vm_stop to the target's VM running.

:func:`migrate_pair` migrates between two machines of one process (the
target in a thread), returning both sides' results: the tests' harness.

:func:`compare` runs the rows of the seed's table on fresh machines:
serial transitions, parallel transitions, parallel transitions + multifd.
:func:`timeline_text` and :func:`timeline_png` draw where the downtime went.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import multiprocess as mp

from mpvfio.devices.profiles import Profile, get_profile
from mpvfio.devices.registry import device_identity
from mpvfio.errors import MpvfioError, UsageError
from mpvfio.ipc.names import sweep_stale
from mpvfio.machine import Machine
from mpvfio.migration.engine import (
    IncomingInfo,
    MigrationError,
    MigrationInfo,
    MigrationParams,
    Span,
    incoming,
    migrate,
)
from mpvfio.net.transport import Cancel, listen
from mpvfio.uapi.vfio import MigState
from mpvfio.vfiomig import MigrationProps
from mpvfio.vmstate import RunState

__all__ = [
    "ROWS",
    "PairResult",
    "compare",
    "migrate_pair",
    "run_local",
    "timeline_png",
    "timeline_text",
]

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
    devices: Sequence[str] | None = None,
) -> Machine:
    """A machine of ``vfs`` emulated VFs, or one VF per device spec."""
    m = Machine(mode, name=name, arch=arch)
    if devices:
        for i, spec in enumerate(devices):
            m.add_vfio_device(f"vf{i}", spec=spec, props=props)
        return m
    for i in range(vfs):
        m.add_vfio_device(f"vf{i}", profile, props=props)
    return m


def _check_specs(
    devices: Sequence[str] | None, target_devices: Sequence[str] | None
) -> int | None:
    """How many VFs the spec lists give (``None``: no lists); both must match."""
    if devices is None and target_devices is None:
        return None
    if devices is None or target_devices is None:
        raise UsageError(
            "device specs are given for both sides or for neither: the source "
            "and the target cannot share a device (give --device and "
            "--target-device once per VF)"
        )
    if len(devices) != len(target_devices) or not devices:
        raise UsageError(
            f"{len(devices)} source device(s) but {len(target_devices)} target "
            "device(s): a migration pairs them one to one"
        )
    src = {device_identity(s): s for s in devices}
    for spec in target_devices:
        ident = device_identity(spec)
        if ident is not None and ident in src:
            raise UsageError(
                f"{spec} is both a source and a target device: a real device "
                "cannot be on both sides of a migration"
            )
    return len(devices)


def _target_main(
    conn: Any,
    uri: str,
    mode: str,
    vfs: int,
    profile: Profile,
    params: MigrationParams,
    arch: str | None,
    props: MigrationProps,
    devices: Sequence[str] | None = None,
) -> None:
    """The forked target process: listen, receive, report, exit.

    The report says how it ended and what the target's VM and devices look
    like afterwards (run state, whether it ever ran, device states).
    """
    import ctypes
    import signal

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(1, signal.SIGKILL, 0, 0, 0)  # die with the source
    result: dict[str, Any] = {"ok": False, "error": "", "stage": ""}
    try:
        with _build(mode, vfs, profile, "target", arch, props, devices) as m:
            m.start(run=False, runstate=RunState.INMIGRATE)
            try:
                with listen(uri) as lst:
                    conn.send(("listening", str(lst.uri), os.getpid()))
                    info = incoming(m, lst, params)
                result = {"ok": True, "info": asdict(info)}
            except MigrationError as exc:
                result = {"ok": False, "error": str(exc), "stage": exc.stage}
            result["runstate"] = str(m.vm.runstate)
            result["ran"] = any(
                t.new == RunState.RUNNING for t in m.vm.runstate_history
            )
            result["device_states"] = {
                d.name: MigState(d.call("device_state")).name for d in m.devices
            }
            result["checksums"] = {d.name: d.checksum() for d in m.devices}
            result["configs"] = {d.name: d.config.hex() for d in m.devices}
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
    uri: str | None = None,
    target_profile: Profile | str | None = None,
    target_arch: str | None = None,
    target_params: MigrationParams | None = None,
    cancel: Cancel | None = None,
    on_stage: Callable[[str], None] | None = None,
    on_target: Callable[[int], None] | None = None,
    source: Machine | None = None,
    devices: Sequence[str] | None = None,
    target_devices: Sequence[str] | None = None,
) -> tuple[MigrationInfo, dict[str, Any]]:
    """Migrate ``vfs`` emulated VFs from a source here to a forked target.

    :param uri: where the target listens (default: a UNIX socket in a fresh
        temporary directory); ``tcp:127.0.0.1:0`` picks a free port.
    :param target_profile: the target's device profile (default: ``profile``).
    :param target_arch: the target's architecture (default: ``arch``).
    :param target_params: the target's parameters (default: ``params``).
    :param cancel: cancels the source's :func:`migrate`.
    :param on_stage: the source's stage hook (see :func:`migrate`).
    :param on_target: called with the target process's pid once it listens.
    :param source: migrate this started, running machine (the caller owns
        and closes it) instead of building one from ``mode``, ``vfs`` and
        ``profile`` (the target is still built from them).
    :param devices: the source's device specs, one VF each (e.g.
        ``vfio-user:/run/pf-src/vf0.sock``), in place of ``vfs`` emulated
        VFs; ``target_devices`` must then list the target's, as many.
    :return: the source's :class:`MigrationInfo` and the target's report.
    :raise MigrationError: the migration failed (the source rolled back);
        its ``target_report`` holds the target's report if it sent one.
    """
    n_specs = _check_specs(devices, target_devices)
    if n_specs is not None:
        vfs = n_specs
    if vfs < 1:
        raise UsageError("a migration needs at least one VF (--vfs >= 1)")
    prof = get_profile(profile) if isinstance(profile, str) else profile
    tprof = prof
    if target_profile is not None:
        tprof = (
            get_profile(target_profile)
            if isinstance(target_profile, str)
            else target_profile
        )
    p = params or MigrationParams()
    tp = target_params or p
    pr = props or MigrationProps(migration_events=True)
    tmp = tempfile.mkdtemp(prefix="mpvfio-mig-")
    where = uri or f"unix:{tmp}/migrate.sock"
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe()
    target = ctx.Process(
        target=_target_main,
        name="mpvfio-target",
        args=(
            child,
            where,
            target_mode or mode,
            vfs,
            tprof,
            tp,
            target_arch or arch,
            pr,
            list(target_devices) if target_devices else None,
        ),
    )
    try:
        target.start()
    except BaseException:
        parent.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        child.close()
    report: dict[str, Any] = {}
    try:
        if not parent.poll(60.0):
            raise MpvfioError("the target process did not start listening in 60 s")
        msg = parent.recv()
        if msg[0] == "done":
            raise MpvfioError(f"the target process failed: {msg[1].get('error')}")
        if msg[0] != "listening":
            raise MpvfioError(f"target process: unexpected message {msg[0]!r}")
        bound, pid = str(msg[1]), int(msg[2])
        if on_target is not None:
            on_target(pid)
        with contextlib.ExitStack() as stack:
            m = source
            if m is None:
                m = stack.enter_context(
                    _build(mode, vfs, prof, "source", arch, pr, devices)
                )
                m.start()
            try:
                info = migrate(
                    m, bound, p, progress=progress, cancel=cancel, on_stage=on_stage
                )
            except MigrationError as exc:
                # the source closed its channels: a live target fails fast
                exc.target_report = _report(parent, min(tp.timeout + 10, 20.0)) or None
                raise
            report = _report(parent, p.timeout + 10)
        return info, report
    finally:
        target.join(10.0)
        if target.is_alive():
            target.kill()
            target.join(5.0)
        if target.exitcode != 0:
            # a killed target cannot unlink its POSIX IPC objects: do it
            # for it (only objects of dead processes are touched)
            with contextlib.suppress(MpvfioError):
                sweep_stale()
        parent.close()
        shutil.rmtree(tmp, ignore_errors=True)


def _report(conn: Any, timeout: float) -> dict[str, Any]:
    """The target's ``done`` report; ``{}`` if it died without one."""
    try:
        if not conn.poll(timeout):
            return {}
        msg = conn.recv()
    except (EOFError, OSError):  # the target process is gone
        return {}
    if msg[0] != "done" or not isinstance(msg[1], dict):
        return {}
    return dict(msg[1])


@dataclass
class PairResult:
    """What :func:`migrate_pair` saw on both sides."""

    info: MigrationInfo | None = None
    error: BaseException | None = None
    target_info: IncomingInfo | None = None
    target_error: BaseException | None = None

    @property
    def ok(self) -> bool:
        """Both sides completed."""
        return self.error is None and self.target_error is None


def migrate_pair(
    source: Machine,
    target: Machine,
    params: MigrationParams | None = None,
    *,
    uri: str | None = None,
    target_params: MigrationParams | None = None,
    cancel: Cancel | None = None,
    target_cancel: Cancel | None = None,
    on_stage: Callable[[str], None] | None = None,
    target_on_stage: Callable[[str], None] | None = None,
) -> PairResult:
    """Migrate between two machines of this process: target in a thread.

    ``source`` runs (``start()``), ``target`` waits (``start(run=False,
    runstate=INMIGRATE)``); the caller owns and closes both.  The target
    listens on ``uri`` (default: a UNIX socket in a fresh temporary
    directory; ``tcp:127.0.0.1:0`` picks a free port).  Both sides' errors
    are returned, not raised; the target thread is always joined (a target
    still waiting for its channels after the source failed is cancelled).
    """
    p = params or MigrationParams()
    tp = target_params or p
    tcancel = target_cancel or Cancel()
    tmp = tempfile.mkdtemp(prefix="mpvfio-pair-")
    res = PairResult()
    try:
        lst = listen(uri or f"unix:{tmp}/migrate.sock")

        def run_target() -> None:
            try:
                res.target_info = incoming(
                    target, lst, tp, cancel=tcancel, on_stage=target_on_stage
                )
            except BaseException as exc:  # noqa: BLE001 - returned to the caller
                res.target_error = exc
            finally:
                lst.close()

        t = threading.Thread(target=run_target, name="mpvfio-pair-target")
        t.start()
        try:
            res.info = migrate(
                source, str(lst.uri), p, cancel=cancel, on_stage=on_stage
            )
        except BaseException as exc:  # noqa: BLE001 - returned to the caller
            res.error = exc
        finally:
            if res.error is not None:
                # a source that failed before connecting leaves the target
                # waiting for channels: give it a moment, then cancel it
                t.join(min(0.5, tp.timeout))
                if t.is_alive():
                    tcancel.cancel("the source gave up")
            t.join(tp.timeout + 10)
            if t.is_alive():
                lst.close()
                t.join(10)
                if t.is_alive():
                    raise MpvfioError("the target thread did not finish")
        return res
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def compare(
    vfs: int,
    profile: Profile | str,
    params: MigrationParams,
    channels: int,
    progress: Any = None,
    *,
    devices: Sequence[str] | None = None,
    target_devices: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """The --compare rows, each on fresh machines (see :data:`ROWS`).

    With device specs the same real devices serve every row, one row after
    the other (each row's source takes the devices where the last left them).
    """
    rows = []
    for label, mode, multifd in ROWS:
        pr = MigrationParams(
            **{**asdict(params), "multifd_channels": channels if multifd else 0}
        )
        if progress:
            progress(f"{label}: migrating {vfs} VFs ...")
        info, _ = run_local(
            vfs,
            profile,
            mode,
            pr,
            progress=progress,
            devices=devices,
            target_devices=target_devices,
        )
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


def rows_json(infos: list[tuple[str, MigrationInfo]]) -> dict[str, Any]:
    """The ``--json`` document of ``migrate``: one row per (label, result)."""
    return {
        "rows": [_row_json(label, info) for label, info in infos],
        "checksums_equal": all(info.checksums_equal for _, info in infos),
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
