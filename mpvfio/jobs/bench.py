"""The switchover benchmark: stop + start phase times per mode (layer 4).

:func:`bench_switchover` times the two notifications of a switchover that
the transitions add to the downtime, for every mode side by side:

* per profile and VF count, one started :class:`~mpvfio.machine.Machine`
  per mode, kept alive across rounds (worker start-up is not measured) and
  closed at the end, also on an error or Ctrl-C;
* before each round every device is put in PRE_COPY (``save_setup``) with
  its pre-copy data drained, as :mod:`mpvfio.jobs.switchover` does, so the stop
  takes the PRE_COPY -> PRE_COPY_P2P -> STOP_COPY arcs;
* a round is ``vm_stop(finish-migrate)`` then ``vm_start()`` (STOP_COPY ->
  STOP -> RUNNING_P2P -> RUNNING: QEMU's restart after a failed migration),
  then, untimed, ``save_cleanup`` (closes the saving fd, QEMU's
  migrate_fd_cleanup) and ``save_setup`` + drain for the next round;
* the modes' rounds are **interleaved** (round i of every mode, then round
  i+1; the order rotates each round) so machine noise hits every mode
  alike (PERF_LIMITS pitfall 9), after ``warmup`` discarded rounds;
* the times are :attr:`NotifyReport.ms` of each notification; the ideal is
  :meth:`NotifyReport.ideal_ms` (the slowest device's summed arc time, its
  sleep overshoot included), so ``ratio_to_ideal`` measures what the
  synchronisation adds.

``transports`` runs the same configurations with the devices behind
vfio-user sockets too: each mode's machine gets its own ``mpvfio
device-server`` process (one emulated PF, the same profile), so the rows
show what the socket round trips add to the in-process emulated backend.

For zero-latency profiles (``instant``) the result also gives the overhead
(downtime minus the ideal, in µs) against PERF_LIMITS.md's measured floor of
a full two-phase round with zero work; stop + start is two such rounds.

:func:`add_bench_arguments` and :func:`run_bench_cli` are what the
``mpvfio bench switchover`` subcommand and ``tools/bench_switchover.py``
call; :func:`main` is the tool's entry point.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import math
import os
import statistics
import sys
import tempfile
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mpvfio.argtypes import nonneg_int as _nonneg_int
from mpvfio.argtypes import positive_float as _positive_float
from mpvfio.argtypes import positive_int as _positive_int
from mpvfio.argtypes import run_main
from mpvfio.devices.profiles import Profile, get_profile
from mpvfio.errors import DeviceError, MigrationBlockedError, UsageError
from mpvfio.uapi.vfio import MigFlag, MigState
from mpvfio.vfiomig import MigrationProps
from mpvfio.vmstate import RunState

if TYPE_CHECKING:
    from mpvfio.machine import Machine

# mpvfio.machine (multiprocess, dill: ~0.2 s) is imported only when a
# benchmark runs, so a CLI that registers add_bench_arguments stays fast.

__all__ = [
    "ALL_MODES",
    "DEFAULT_MODES",
    "BenchResult",
    "ConfigResult",
    "Target",
    "add_bench_arguments",
    "bench_switchover",
    "floor_round_us",
    "format_text",
    "main",
    "run_bench_cli",
]

#: Where the devices live: in the workers (emulated) or behind a vfio-user
#: device server process.
TRANSPORTS = ("emulated", "vfio-user")

#: Every mode label the benchmark knows, in table order.
ALL_MODES = ("serial", "threads", "workers", "workers-relaxed")
DEFAULT_MODES = ("serial", "threads", "workers")
RELAXED = "workers-relaxed"

#: PERF_LIMITS.md table 4, design P1: median µs of one full two-phase round
#: with zero work (post -> every worker crossed the barrier -> parent sees
#: all done), by worker count.  Interpolated log-log in between.
FLOOR_ROUND_US: dict[int, float] = {
    1: 17.0,
    2: 53.0,
    4: 98.0,
    8: 161.0,
    16: 302.0,
    64: 1070.0,
    256: 6350.0,
}

#: A serial round estimated above this is skipped past ``max_serial_vfs``.
SERIAL_SKIP_S = 1.0

#: The arcs one benchmark round takes: save_setup, stop, start.
_ROUND_ARCS = (
    (MigState.RUNNING, MigState.PRE_COPY),
    (MigState.PRE_COPY, MigState.PRE_COPY_P2P),
    (MigState.PRE_COPY_P2P, MigState.STOP_COPY),
    (MigState.STOP_COPY, MigState.STOP),
    (MigState.STOP, MigState.RUNNING_P2P),
    (MigState.RUNNING_P2P, MigState.RUNNING),
)


def floor_round_us(n: int) -> float:
    """PERF_LIMITS' zero-work round floor (µs) for ``n`` workers.

    Log-log interpolation of :data:`FLOOR_ROUND_US`, extrapolated along
    the end segments outside 1..256.
    """
    if n < 1:
        raise UsageError(f"worker count must be >= 1, got {n}")
    if n in FLOOR_ROUND_US:
        return FLOOR_ROUND_US[n]
    keys = sorted(FLOOR_ROUND_US)
    lo, hi = keys[0], keys[1]
    for a, b in itertools.pairwise(keys):
        lo, hi = a, b
        if n < b:
            break
    x, x0, x1 = math.log(n), math.log(lo), math.log(hi)
    y0, y1 = math.log(FLOOR_ROUND_US[lo]), math.log(FLOOR_ROUND_US[hi])
    return math.exp(y0 + (y1 - y0) * (x - x0) / (x1 - x0))


def zero_work(profile: Profile) -> bool:
    """Whether the profile's arcs cost nothing configured (``instant``)."""
    return (
        profile.default_arc_ms == 0
        and not any(v > 0 for v in profile.arc_ms.values())
        and profile.jitter_ms == 0
    )


def _median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else math.nan


def _p90(xs: Sequence[float]) -> float:
    if len(xs) < 2:
        return _median(xs)
    return float(statistics.quantiles(xs, n=10, method="inclusive")[8])


def _r(x: float | None, nd: int = 3) -> float | None:
    if x is None or not math.isfinite(x):
        return None
    return round(x, nd)


# ---------------------------------------------------------------- results
@dataclass
class ConfigResult:
    """One mode x VF count x profile: the kept rounds' times (ms)."""

    mode: str
    vfs: int
    profile: str
    zero_work: bool = False
    stop_ms: list[float] = field(default_factory=list)
    start_ms: list[float] = field(default_factory=list)
    ideal_stop_ms: list[float] = field(default_factory=list)
    ideal_start_ms: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    #: the serial mode's downtime median of the same profile and VF count
    serial_downtime_ms: float | None = None
    #: ``emulated`` or ``vfio-user`` (:data:`TRANSPORTS`)
    transport: str = "emulated"

    @property
    def rounds(self) -> int:
        """How many rounds were kept (warm-up excluded)."""
        return len(self.stop_ms)

    @property
    def stop_ms_median(self) -> float:
        """Median wall time of vm_stop's handlers."""
        return _median(self.stop_ms)

    @property
    def stop_ms_p90(self) -> float:
        """90th percentile of the stop phase."""
        return _p90(self.stop_ms)

    @property
    def start_ms_median(self) -> float:
        """Median wall time of vm_start's handlers."""
        return _median(self.start_ms)

    @property
    def start_ms_p90(self) -> float:
        """90th percentile of the start phase."""
        return _p90(self.start_ms)

    @property
    def downtime_ms_median(self) -> float:
        """Stop median + start median: the downtime the transitions add."""
        return self.stop_ms_median + self.start_ms_median

    @property
    def ideal_ms(self) -> float:
        """Median stop ideal + median start ideal (perfect parallelism)."""
        return _median(self.ideal_stop_ms) + _median(self.ideal_start_ms)

    @property
    def ratio_to_ideal(self) -> float | None:
        """Downtime median / ideal (``None`` when the ideal is 0)."""
        ideal = self.ideal_ms
        if not ideal > 0:
            return None
        return self.downtime_ms_median / ideal

    @property
    def serial_over_mode(self) -> float | None:
        """Serial downtime median / this mode's (``None``: serial not run)."""
        if self.serial_downtime_ms is None or not self.downtime_ms_median > 0:
            return None
        return self.serial_downtime_ms / self.downtime_ms_median

    @property
    def overhead_us(self) -> float:
        """Downtime beyond the slowest device's own arc work, in µs."""
        return (self.downtime_ms_median - self.ideal_ms) * 1000.0

    @property
    def floor_us(self) -> float | None:
        """Zero-work floor of stop + start (two rounds), zero-work profiles."""
        if not self.zero_work:
            return None
        return 2.0 * floor_round_us(self.vfs)

    @property
    def overhead_vs_floor(self) -> float | None:
        """:attr:`overhead_us` / :attr:`floor_us` (zero-work profiles only)."""
        floor = self.floor_us
        if floor is None:
            return None
        return self.overhead_us / floor

    def to_json(self) -> dict[str, Any]:
        """One entry of ``results`` in the JSON output."""
        return {
            "mode": self.mode,
            "vfs": self.vfs,
            "profile": self.profile,
            "transport": self.transport,
            "rounds": self.rounds,
            "stop_ms_median": _r(self.stop_ms_median),
            "stop_ms_p90": _r(self.stop_ms_p90),
            "start_ms_median": _r(self.start_ms_median),
            "start_ms_p90": _r(self.start_ms_p90),
            "downtime_ms_median": _r(self.downtime_ms_median),
            "ideal_stop_ms": _r(_median(self.ideal_stop_ms)),
            "ideal_start_ms": _r(_median(self.ideal_start_ms)),
            "ideal_ms": _r(self.ideal_ms),
            "ratio_to_ideal": _r(self.ratio_to_ideal, 4),
            "serial_over_mode": _r(self.serial_over_mode),
            "overhead_us": _r(self.overhead_us, 1),
            "floor_us": _r(self.floor_us, 1),
            "overhead_vs_floor": _r(self.overhead_vs_floor, 2),
            "errors": list(self.errors),
        }


@dataclass
class Target:
    """One goal evaluated on this run's numbers."""

    goal: str
    measured: float | None
    met: bool

    def to_json(self) -> dict[str, Any]:
        """``{"goal", "measured", "met"}``."""
        return {"goal": self.goal, "measured": _r(self.measured, 4), "met": self.met}


@dataclass
class BenchResult:
    """Everything one benchmark run measured."""

    results: list[ConfigResult]
    targets: dict[str, Target]
    notes: list[str]
    settings: dict[str, Any]

    @property
    def errors(self) -> list[str]:
        """Every device error of every configuration."""
        return [
            f"{r.profile}/{r.vfs}/{r.mode}/{r.transport}: {e}"
            for r in self.results
            for e in r.errors
        ]

    @property
    def targets_met(self) -> bool:
        """Whether every evaluated target was met."""
        return all(t.met for t in self.targets.values())

    def find(
        self, profile: str, vfs: int, mode: str, transport: str = "emulated"
    ) -> ConfigResult | None:
        """The result of one configuration, if it ran."""
        for r in self.results:
            if (r.profile, r.vfs, r.mode, r.transport) == (
                profile,
                vfs,
                mode,
                transport,
            ):
                return r
        return None

    def to_json(self) -> dict[str, Any]:
        """``{"results": [...], "targets": {...}, "notes", "settings"}``."""
        return {
            "results": [r.to_json() for r in self.results],
            "targets": {k: t.to_json() for k, t in self.targets.items()},
            "notes": list(self.notes),
            "settings": dict(self.settings),
        }


# ---------------------------------------------------------------- running
def _machine_mode(label: str) -> str:
    return "workers" if label == RELAXED else label


def _prepare(machine: Machine) -> None:
    """Untimed: close the old saving fd, save_setup, drain the pre-copy data."""
    for d in machine.devices:
        d.call("save_cleanup")
        d.call("save_setup")
        if d.state == MigState.PRE_COPY:
            d.call("drain", False)
    want = MigState.PRE_COPY
    for d in machine.devices:
        expect = want if d.flags & MigFlag.PRE_COPY else MigState.RUNNING
        if d.state != expect:
            raise DeviceError(
                f"benchmark setup left the device in {d.state.name}, expected "
                f"{expect.name}",
                d.name,
            )


def _estimated_serial_s(profile: Profile, vfs: int) -> float:
    per_dev = sum(
        profile.latency_ms(a, b) + profile.jitter_ms / 2 for a, b in _ROUND_ARCS
    )
    return vfs * per_dev / 1000.0


def _skip_serial(profile: Profile, vfs: int, max_serial_vfs: int) -> str | None:
    if max_serial_vfs <= 0 or vfs <= max_serial_vfs:
        return None
    est = _estimated_serial_s(profile, vfs)
    if est < SERIAL_SKIP_S:
        return None
    return (
        f"serial skipped for {profile.name} x {vfs} VFs: more than "
        f"--max-serial-vfs {max_serial_vfs} (a serial round would take "
        f"~{est:.1f} s)"
    )


def _run_config(
    profile: Profile,
    vfs: int,
    modes: Sequence[str],
    rounds: int,
    warmup: int,
    transition_timeout: float,
    seed: int,
    events: bool,
    say: Callable[[str], None],
    transport: str = "emulated",
    profile_spec: str | None = None,
) -> list[ConfigResult]:
    from mpvfio.machine import Machine

    zw = zero_work(profile)
    results = {
        m: ConfigResult(m, vfs, profile.name, zw, transport=transport) for m in modes
    }
    with ExitStack() as stack:
        machines: dict[str, Machine] = {}
        servers: dict[str, list[str]] = {}
        if transport == "vfio-user":
            from mpvfio.devices.vfio_user.server import ServerProcess

            if profile_spec is None:
                raise UsageError(
                    "the vfio-user transport needs the profile by name or JSON "
                    "path (the device server loads it)"
                )
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="mpvfio-b-"))
            for label in modes:  # one PF (server process) per mode's machine
                srv = stack.enter_context(
                    ServerProcess(f"{tmp}/{label}-vf", vfs, profile_spec, seed=seed)
                )
                servers[label] = srv.specs()
        # Fork the workers before anything in this process starts a thread
        # (threads mode does, PERF_LIMITS pitfall 7): workers modes first.
        for label in sorted(modes, key=lambda m: _machine_mode(m) != "workers"):
            m = stack.enter_context(
                Machine(
                    _machine_mode(label),
                    relaxed_interlock=label == RELAXED,
                    transition_timeout=transition_timeout,
                    seed=seed,
                )
            )
            props = MigrationProps(migration_events=events)
            if label in servers:
                for spec in servers[label]:
                    m.add_vfio_device(profile=profile, spec=spec, props=props)
            else:
                for _ in range(vfs):
                    m.add_vfio_device(profile=profile, props=props)
            blockers = m.migration_blockers()
            if blockers:
                raise MigrationBlockedError("; ".join(blockers))
            m.start()
            _prepare(m)
            machines[label] = m
        total = warmup + rounds
        for i in range(total):
            k = i % len(modes)
            order = [*modes[k:], *modes[:k]]  # rotate: no mode always first
            gc.collect()
            line: dict[str, str] = {}
            for label in order:
                m = machines[label]
                n_err = len(m.errors)
                m.vm_stop(RunState.FINISH_MIGRATE)
                stop = m.last_report
                m.vm_start()
                start = m.last_report
                res = results[label]
                res.errors.extend(str(e) for e in m.errors[n_err:])
                if i >= warmup:
                    res.stop_ms.append(stop.ms)
                    res.start_ms.append(start.ms)
                    res.ideal_stop_ms.append(stop.ideal_ms())
                    res.ideal_start_ms.append(start.ideal_ms())
                _prepare(m)
                line[label] = f"{label} {stop.ms:.1f}+{start.ms:.1f}"
            what = (
                f"warm-up {i + 1}/{warmup}"
                if i < warmup
                else f"round {i - warmup + 1}/{rounds}"
            )
            say(
                f"{profile.name} {vfs} VFs {transport} {what}: "
                + " | ".join(line[m] for m in modes)
                + " ms (stop+start)"
            )
    out = [results[m] for m in modes]
    serial = results.get("serial")
    if serial is not None:
        for r in out:
            r.serial_downtime_ms = serial.downtime_ms_median
    return out


def bench_switchover(
    vfs: Sequence[int] = (4, 16, 64),
    profiles: Sequence[str | Profile] = ("fixed50",),
    modes: Sequence[str] = DEFAULT_MODES,
    *,
    rounds: int = 5,
    warmup: int = 2,
    relaxed_interlock_too: bool = False,
    max_serial_vfs: int = 16,
    transition_timeout: float = 30.0,
    seed: int = 0,
    events: bool = False,
    progress: Callable[[str], None] | None = None,
    transports: Sequence[str] = ("emulated",),
) -> BenchResult:
    """Time the stop and start phases of every mode (module docstring).

    :param vfs: VF counts, each a separate machine per mode.
    :param profiles: profile names (or JSON paths, or :class:`Profile`).
    :param modes: labels from :data:`ALL_MODES`.
    :param rounds: kept rounds per configuration.
    :param warmup: discarded rounds before them.
    :param relaxed_interlock_too: add the ``workers-relaxed`` mode.
    :param max_serial_vfs: above this VF count serial mode is skipped (with
        a note) when its round would take over a second; 0: never skipped.
    :param transition_timeout: the machines' hung-worker deadline (s).
    :param seed: the devices' jitter seed.
    :param events: devices emit VFIO_MIGRATION events.
    :param progress: called with one line per round batch.
    :param transports: from :data:`TRANSPORTS`; ``vfio-user`` puts each
        mode's devices behind a device server process.
    :raise UsageError: bad arguments.
    :raise MigrationBlockedError: the profile cannot migrate with 2+ VFs.
    """
    mode_list = list(dict.fromkeys(modes))
    if relaxed_interlock_too and RELAXED not in mode_list:
        mode_list.append(RELAXED)
    bad = [m for m in mode_list if m not in ALL_MODES]
    if bad or not mode_list:
        raise UsageError(
            f"unknown mode(s) {', '.join(bad) or '(none)'}; valid: "
            f"{', '.join(ALL_MODES)}"
        )
    mode_list.sort(key=ALL_MODES.index)
    vfs_list = list(dict.fromkeys(vfs))
    if not vfs_list or any(n < 1 for n in vfs_list):
        raise UsageError(f"VF counts must be >= 1, got {vfs_list}")
    if rounds < 1 or warmup < 0:
        raise UsageError("rounds must be >= 1 and warm-up rounds >= 0")
    profs = [get_profile(p) if isinstance(p, str) else p for p in profiles]
    if not profs:
        raise UsageError("at least one profile is needed")
    specs = [p if isinstance(p, str) else None for p in profiles]
    trans = list(dict.fromkeys(transports))
    bad_t = [t for t in trans if t not in TRANSPORTS]
    if bad_t or not trans:
        raise UsageError(
            f"unknown transport(s) {', '.join(bad_t) or '(none)'}; valid: "
            f"{', '.join(TRANSPORTS)}"
        )
    if "vfio-user" in trans and any(sp is None for sp in specs):
        raise UsageError(
            "the vfio-user transport needs every profile by name or JSON path "
            "(the device server process loads it)"
        )
    say = progress or (lambda _msg: None)
    load_before = os.getloadavg()[0]
    results: list[ConfigResult] = []
    notes: list[str] = []
    for prof, spec in zip(profs, specs, strict=True):
        for n, transport in itertools.product(vfs_list, trans):
            run_modes = list(mode_list)
            skip = (
                _skip_serial(prof, n, max_serial_vfs) if "serial" in run_modes else None
            )
            if skip is not None:
                run_modes.remove("serial")
                notes.append(skip)
                say(skip)
            if not run_modes:
                continue
            say(
                f"{prof.name} {n} VFs ({transport}): starting {', '.join(run_modes)} "
                f"({warmup} warm-up + {rounds} rounds, interleaved)"
            )
            results.extend(
                _run_config(
                    prof,
                    n,
                    run_modes,
                    rounds,
                    warmup,
                    transition_timeout,
                    seed,
                    events,
                    say,
                    transport,
                    spec,
                )
            )
    notes.extend(_transport_notes(results))
    settings = {
        "vfs": vfs_list,
        "profiles": [p.name for p in profs],
        "modes": mode_list,
        "rounds": rounds,
        "warmup": warmup,
        "max_serial_vfs": max_serial_vfs,
        "events": events,
        "transports": trans,
        "seed": seed,
        "cpus": os.cpu_count(),
        # other load on the machine skews every number (PERF_LIMITS pitfall 9)
        "loadavg_1min_before": round(load_before, 2),
        "loadavg_1min_after": round(os.getloadavg()[0], 2),
    }
    result = BenchResult(results, {}, notes, settings)
    result.targets = evaluate_targets(result)
    return result


def _transport_notes(results: list[ConfigResult]) -> list[str]:
    """What vfio-user adds over in-process emulated devices, per config."""
    base = {(r.profile, r.vfs, r.mode): r for r in results if r.transport == "emulated"}
    notes = []
    for r in results:
        e = base.get((r.profile, r.vfs, r.mode))
        if r.transport == "emulated" or e is None or not r.rounds or not e.rounds:
            continue
        if not e.downtime_ms_median > 0:
            continue
        extra = r.downtime_ms_median - e.downtime_ms_median
        notes.append(
            f"{r.transport} over emulated, {r.profile} {r.vfs} VFs {r.mode}: "
            f"downtime {r.downtime_ms_median:.2f} vs {e.downtime_ms_median:.2f} ms "
            f"({extra:+.2f} ms, x{r.downtime_ms_median / e.downtime_ms_median:.3f}"
            ")"
        )
    return notes


def evaluate_targets(result: BenchResult) -> dict[str, Target]:
    """The project's goals, for the configurations this run covered."""
    out: dict[str, Target] = {}
    for n, limit in ((4, 1.02), (64, 1.05)):
        r = result.find("fixed50", n, "workers")
        if r is not None:
            ratio = r.ratio_to_ideal
            out[f"fixed50.vfs{n}.workers.ratio_to_ideal"] = Target(
                f"fixed50 workers downtime/ideal <= {limit} at {n} VFs",
                ratio,
                ratio is not None and ratio <= limit,
            )
    r = result.find("fixed50", 4, "workers")
    if r is not None and r.serial_over_mode is not None:
        out["fixed50.vfs4.serial_over_workers"] = Target(
            "fixed50 serial/workers downtime >= 3.8 at 4 VFs",
            r.serial_over_mode,
            r.serial_over_mode >= 3.8,
        )
    for r in result.results:
        if (
            r.mode == "workers"
            and r.vfs == 4
            and r.zero_work
            and r.transport == TRANSPORTS[0]
        ):
            ovf = r.overhead_vs_floor
            out[f"{r.profile}.vfs4.workers.overhead_vs_floor"] = Target(
                f"{r.profile} workers overhead at 4 VFs <= 3x the zero-work floor "
                f"({r.floor_us:.0f} us per stop+start)",
                ovf,
                ovf is not None and ovf <= 3.0,
            )
    for w in result.results:
        if w.mode != "workers" or w.vfs < 4 or w.transport != TRANSPORTS[0]:
            continue
        t = result.find(w.profile, w.vfs, "threads")
        if t is None or not w.downtime_ms_median > 0:
            continue
        ratio = t.downtime_ms_median / w.downtime_ms_median
        out[f"{w.profile}.vfs{w.vfs}.threads_over_workers"] = Target(
            f"{w.profile} workers at least as fast as threads at {w.vfs} VFs "
            "(threads/workers downtime >= 1)",
            ratio,
            ratio >= 1.0,
        )
    return out


# ---------------------------------------------------------------- output
def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None or not math.isfinite(x) else format(x, spec)


def format_text(result: BenchResult) -> str:
    """An aligned table of every configuration, then notes and targets."""
    zw = any(r.zero_work for r in result.results)
    head = [
        "profile",
        "VFs",
        "mode",
        "devices",
        "stop med",
        "stop p90",
        "start med",
        "start p90",
        "downtime",
        "ideal",
        "x ideal",
        "serial/x",
    ]
    if zw:
        head += ["ovh us", "floor us", "x floor"]
    rows: list[list[str]] = []
    for r in result.results:
        row = [
            r.profile,
            str(r.vfs),
            r.mode,
            r.transport,
            _fmt(r.stop_ms_median, ".2f"),
            _fmt(r.stop_ms_p90, ".2f"),
            _fmt(r.start_ms_median, ".2f"),
            _fmt(r.start_ms_p90, ".2f"),
            _fmt(r.downtime_ms_median, ".2f"),
            _fmt(r.ideal_ms, ".2f"),
            _fmt(r.ratio_to_ideal, ".3f"),
            _fmt(r.serial_over_mode, ".2f"),
        ]
        if zw:
            row += [
                _fmt(r.overhead_us if r.zero_work else None, ".0f"),
                _fmt(r.floor_us, ".0f"),
                _fmt(r.overhead_vs_floor, ".1f"),
            ]
        rows.append(row)
    widths = [
        max(len(h), *(len(row[i]) for row in rows)) if rows else len(h)
        for i, h in enumerate(head)
    ]
    left = 4  # profile, VFs, mode, devices: left-aligned

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i < left else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    s = result.settings
    out = [
        f"switchover benchmark: {s.get('rounds')} rounds after "
        f"{s.get('warmup')} warm-up, modes interleaved; times in ms "
        "(stop = vm_stop(finish-migrate), start = vm_start(); downtime = "
        "stop med + start med; ideal = slowest device's arc time)",
        f"machine: {s.get('cpus')} CPUs, 1-min load average "
        f"{s.get('loadavg_1min_before')} before, {s.get('loadavg_1min_after')} after",
        line(head).rstrip(),
        line(["-" * w for w in widths]),
    ]
    out += [line(row).rstrip() for row in rows]
    out += [f"note: {n}" for n in result.notes]
    for err in result.errors:
        out.append(f"device error: {err}")
    if result.targets:
        out.append("targets:")
        for t in result.targets.values():
            out.append(
                f"  {'met   ' if t.met else 'MISSED'}  {t.goal}: "
                f"measured {_fmt(t.measured, '.3f')}"
            )
    return "\n".join(out)


# ---------------------------------------------------------------- command
def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of integers"
        ) from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"every count must be >= 1, got {text!r}")
    return values


def _str_list(text: str) -> list[str]:
    values = [x.strip() for x in text.split(",") if x.strip()]
    if not values:
        raise argparse.ArgumentTypeError("an empty list")
    return values


def _mode_list(text: str) -> list[str]:
    values = _str_list(text)
    bad = [v for v in values if v not in ALL_MODES]
    if bad:
        raise argparse.ArgumentTypeError(
            f"unknown mode(s) {', '.join(bad)}; valid: {', '.join(ALL_MODES)}"
        )
    return values


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``mpvfio bench switchover`` (and the tool script)."""
    parser.add_argument(
        "--vfs",
        type=_int_list,
        default=[4, 16, 64],
        metavar="N[,N...]",
        help="VF counts to measure (default 4,16,64)",
    )
    parser.add_argument(
        "--profile",
        type=_str_list,
        default=["fixed50"],
        metavar="P[,P...]",
        help="device profiles: instant, fixed50, cx7 or JSON files (default fixed50)",
    )
    parser.add_argument(
        "--modes",
        type=_mode_list,
        default=list(DEFAULT_MODES),
        metavar="M[,M...]",
        help=f"modes to compare, from {', '.join(ALL_MODES)} "
        f"(default {','.join(DEFAULT_MODES)})",
    )
    parser.add_argument(
        "--rounds",
        type=_positive_int,
        default=5,
        metavar="R",
        help="kept rounds per configuration (default 5)",
    )
    parser.add_argument(
        "--warmup",
        type=_nonneg_int,
        default=2,
        metavar="W",
        help="discarded warm-up rounds first (default 2)",
    )
    parser.add_argument(
        "--relaxed-interlock-too",
        action="store_true",
        help="also measure workers mode with relaxed_interlock "
        "(mode 'workers-relaxed')",
    )
    parser.add_argument(
        "--max-serial-vfs",
        type=_nonneg_int,
        default=16,
        metavar="N",
        help="skip serial mode above N VFs when its round would "
        "take over a second (default 16; 0: never skip)",
    )
    parser.add_argument(
        "--timeout",
        type=_positive_float,
        default=30.0,
        metavar="S",
        help="seconds before a worker counts as hung (default 30)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the devices' latency jitter (default 0)",
    )
    parser.add_argument(
        "--events",
        action="store_true",
        help="devices emit VFIO_MIGRATION events (default off)",
    )
    parser.add_argument(
        "--transport",
        type=_str_list,
        default=["emulated"],
        metavar="T[,T...]",
        help="where the devices live: emulated (in the workers) and/or "
        "vfio-user (behind a device-server process per mode); default emulated",
    )
    parser.add_argument(
        "--check-targets", action="store_true", help="exit 1 when a target is missed"
    )
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object instead of the table"
    )
    parser.add_argument(
        "-q", "--quiet", action="store_true", help="no progress lines on stderr"
    )


def run_bench_cli(args: argparse.Namespace) -> int:
    """Run the benchmark from parsed :func:`add_bench_arguments` options.

    Prints the table (or JSON) on stdout, progress on stderr.

    :return: 0, or 1 when a device failed (or, with ``--check-targets``, a
        target was missed).
    :raise MpvfioError: as :func:`bench_switchover` (UsageError: bad usage).
    """

    def say(msg: str) -> None:
        if not args.quiet:
            print(f"mpvfio: bench: {msg}", file=sys.stderr, flush=True)

    result = bench_switchover(
        args.vfs,
        args.profile,
        args.modes,
        rounds=args.rounds,
        warmup=args.warmup,
        relaxed_interlock_too=args.relaxed_interlock_too,
        max_serial_vfs=args.max_serial_vfs,
        transition_timeout=args.timeout,
        seed=args.seed,
        events=args.events,
        progress=say,
        transports=args.transport,
    )
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        print(format_text(result))
    if result.errors:
        return 1
    if args.check_targets and not result.targets_met:
        return 1
    return 0


def build_parser(prog: str = "bench_switchover") -> argparse.ArgumentParser:
    """A stand-alone parser (the tool script's)."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Time the stop and start phases of a switchover in every "
        "mode (serial, threads, workers), interleaved, against the ideal.",
    )
    add_bench_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """The tool's entry point: exit 0 / 1 failed / 2 usage / 130 Ctrl-C."""
    return run_main(build_parser(), argv, run_bench_cli, prog="bench_switchover")
