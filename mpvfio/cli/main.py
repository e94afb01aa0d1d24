"""The ``mpvfio`` command line (console script ``mpvfio = mpvfio.cli.main:main``).

This module owns argument parsing and the subcommand registry; errors map
to exit status in :func:`mpvfio.argtypes.run_main`: 0 success, 1 the
operation failed (any other :class:`~mpvfio.errors.MpvfioError`), 2 bad usage
(:class:`~mpvfio.errors.UsageError` or an argparse error), 130 interrupted.

Each subcommand is registered by an ``_add_<name>(subparsers)`` function that
sets ``func`` to its ``_cmd_<name>(args) -> int`` handler.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import asdict
from typing import TYPE_CHECKING

from mpvfio import __version__
from mpvfio.argtypes import EXIT_FAILED, EXIT_OK, run_main
from mpvfio.argtypes import positive_float as _positive_float
from mpvfio.argtypes import positive_int as _positive_int
from mpvfio.errors import UsageError
from mpvfio.report import arcreport
from mpvfio.uapi import fsm
from mpvfio.uapi.vfio import MigState

if TYPE_CHECKING:  # imported lazily at run time (a fast --help)
    from mpvfio.devices.profiles import Profile
    from mpvfio.machine import Machine
    from mpvfio.migration.engine import MigrationParams

__all__ = ["build_parser", "main"]

_DEFAULT_FLAGS = "STOP_COPY,P2P,PRE_COPY"

_Subparsers = argparse._SubParsersAction  # argparse has no public name for it


def build_parser() -> argparse.ArgumentParser:
    """Build the top-level parser with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="mpvfio",
        description=(
            "Drive VFIO devices through the live-migration state machine and "
            "take many of them through the switchover in parallel."
        ),
        epilog="Run 'mpvfio COMMAND --help' for the options of one command.",
    )
    parser.add_argument("--version", action="version", version=__version__)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_fsm(subparsers)
    _add_switchover(subparsers)
    _add_bench(subparsers)
    _add_migrate(subparsers)
    _add_incoming(subparsers)
    _add_stress(subparsers)
    _add_device_server(subparsers)
    _add_run(subparsers)
    return parser


def _add_run(subparsers: _Subparsers[argparse.ArgumentParser]) -> None:
    from mpvfio.qmp.run import add_arguments

    p = subparsers.add_parser(
        "run",
        help="a long-running VM process that serves QMP (drive it like QEMU)",
    )
    add_arguments(p)


def _add_stress(subparsers: _Subparsers[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "stress",
        help="many VFs, many rounds, random faults; invariants checked per round",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Start a VM with N emulated VFs and repeat vm_stop(paused) +\n"
            "vm_start() (or, with --migrate, full switchovers) for R rounds.\n"
            "Before each round, each VF gets a fault with probability RATE:\n"
            "a failing arc, its worker killed, or its worker hung (--kinds).\n"
            "After each round the invariants are checked: P2P-first event\n"
            "order, every device final when the notification returns, no\n"
            "device state lost, one live worker per device, no leaked IPC\n"
            "object.  The same --seed replays the same faults.\n\n"
            "Exit status: 0 no violation, 1 a violation, 2 bad usage."
        ),
        epilog=(
            "examples:\n"
            "  mpvfio stress --vfs 256 --rounds 20 --faults 0.01 --seed 7\n"
            "  mpvfio stress --vfs 16 --rounds 50 --faults 0.1 --kinds arc,kill\n"
            "  mpvfio stress --vfs 8 --rounds 5 --migrate --json"
        ),
    )
    _add_machine_options(p)
    p.set_defaults(profile="instant", vfs=64, timeout=5.0)
    p.add_argument("--rounds", type=_positive_int, default=20, metavar="R")
    p.add_argument(
        "--faults",
        type=float,
        default=0.0,
        metavar="RATE",
        help="probability per VF per round of an injected fault (0..1)",
    )
    p.add_argument(
        "--kinds",
        default="arc,kill,hang",
        help="fault kinds to draw from: arc, kill, hang (default all)",
    )
    p.add_argument(
        "--migrate",
        action="store_true",
        help="full source+target switchover rounds instead of stop/start",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    arcreport.add_arguments(p, png_option="--timeline")
    p.set_defaults(func=_cmd_stress)


def _cmd_stress(args: argparse.Namespace) -> int:
    import time

    import psutil

    from mpvfio.devices.profiles import get_profile
    from mpvfio.ipc.limits import check_limits
    from mpvfio.jobs.stress import FAULT_KINDS, run_stress
    from mpvfio.machine import Machine
    from mpvfio.vfiomig import MigrationProps

    if not 0.0 <= args.faults <= 1.0:
        raise UsageError(f"--faults is a probability 0..1, got {args.faults}")
    kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip())
    bad = [k for k in kinds if k not in FAULT_KINDS]
    if bad or not kinds:
        raise UsageError(
            f"unknown fault kind(s) {bad}; valid: {', '.join(FAULT_KINDS)}"
        )
    profile = get_profile(args.profile)
    say = _progress(not args.quiet)
    if args.mode == "workers":
        check_limits(args.vfs, sems_per_worker=1, fds_per_worker=4)
    with Machine(
        args.mode,
        relaxed_interlock=args.relaxed_interlock,
        transition_timeout=args.timeout,
        seed=args.seed,
    ) as m:
        for _ in range(args.vfs):
            m.add_vfio_device(
                profile=profile, props=MigrationProps(migration_events=True)
            )
        t0 = time.perf_counter()
        m.start()
        start_s = time.perf_counter() - t0
        uss: list[int] = []
        for d in m.devices:
            if d.worker is not None and d.worker.pid is not None:
                try:
                    uss.append(psutil.Process(d.worker.pid).memory_full_info().uss)
                except psutil.Error:
                    pass
        uss.sort()
        uss_median_mib = uss[len(uss) // 2] / 2**20 if uss else 0.0
        say(
            f"{args.vfs} VFs started in {start_s:.2f} s ({args.mode} mode)"
            + (f", worker USS median {uss_median_mib:.1f} MiB" if uss else "")
        )
        result = run_stress(
            m, args.rounds, args.faults, args.seed, kinds, args.migrate, progress=say
        )
    summary = result.to_dict()
    summary["startup_s"] = round(start_s, 3)
    if uss:
        summary["worker_uss_mib"] = {
            "median": round(uss_median_mib, 2),
            "max": round(uss[-1] / 2**20, 2),
        }
    report = arcreport.emit(args, result.arcs) if args.json else None
    if args.json:
        if report is not None:
            summary[arcreport.JSON_KEY] = report
        print(json.dumps(summary, indent=2))
    else:
        print(
            f"stress: {args.vfs} VFs x {args.rounds} rounds, mode {args.mode}, "
            f"profile {profile.name}, fault rate {args.faults}, seed {args.seed}"
        )
        print(
            f"  start-up {start_s:.2f} s"
            + (
                f", worker USS median {summary['worker_uss_mib']['median']} MiB, "
                f"max {summary['worker_uss_mib']['max']} MiB"
                if uss
                else ""
            )
        )
        print(
            f"  faults injected: {summary['faults'] or 'none'}; device errors "
            f"handled: {summary['device_errors']}"
        )
        if summary["stop_ms"]["p50"]:
            print(
                f"  stop ms p50/p90/max {summary['stop_ms']['p50']}/"
                f"{summary['stop_ms']['p90']}/{summary['stop_ms']['max']}, start "
                f"ms {summary['start_ms']['p50']}/{summary['start_ms']['p90']}/"
                f"{summary['start_ms']['max']}"
            )
        for v in result.violations[:50]:
            print(f"  VIOLATION {v}")
        arcreport.emit(args, result.arcs)
        print(
            f"  {len(result.violations)} violation(s) in {result.elapsed_s:.1f} s: "
            + ("OK" if result.ok else "FAILED")
        )
    return EXIT_OK if result.ok else EXIT_FAILED


def _add_device_server(subparsers: _Subparsers[argparse.ArgumentParser]) -> None:
    from mpvfio.devices.vfio_user import server as vfio_user_server

    p = subparsers.add_parser(
        "device-server",
        help="serve emulated VFs of one PF over vfio-user (one socket each)",
        description=(
            "Serve N emulated VFs of one emulated PF over the vfio-user "
            "protocol, one UNIX socket per VF (PATH_PREFIX<i>.sock), with the "
            "profile's latencies, PF concurrency limit, P2P / PRE_COPY flags "
            "and fault injection.  Stops cleanly on Ctrl-C or SIGTERM."
        ),
    )
    vfio_user_server.add_arguments(p)
    p.set_defaults(func=vfio_user_server.run)


def _cmd_seed_table(args: argparse.Namespace) -> int:
    from mpvfio.jobs import seedtable

    try:
        vfs = tuple(int(v) for v in args.vfs.split(","))
    except ValueError:
        raise UsageError(f"--vfs takes numbers like 1,2,4, got {args.vfs!r}") from None
    if not vfs or min(vfs) < 1:
        raise UsageError("--vfs needs VF counts >= 1")
    fixed = seedtable.FIXED_MS if args.fixed_ms is None else args.fixed_ms
    rows = seedtable.run_seed_table(
        args.profile,
        vfs,
        args.rounds,
        fixed,
        progress=_progress(not args.quiet and not args.json),
    )
    if args.plot:
        seedtable.plot(rows, args.plot)
    if args.json:
        print(json.dumps({"rows": [r.to_json() for r in rows]}, indent=2))
    else:
        print(seedtable.format_table(rows))
    return EXIT_OK


def _add_migration_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--multifd-channels",
        type=int,
        default=0,
        metavar="C",
        help="extra channels carrying the device state, sent by each "
        "device's worker in parallel (default 0: all data on the main "
        "channel); both sides must agree",
    )
    p.add_argument(
        "--downtime-limit",
        type=_positive_float,
        default=300.0,
        metavar="MS",
        help="switch over once the estimated stop-copy time fits (default 300 ms)",
    )
    p.add_argument(
        "--config-after-iter",
        default="auto",
        choices=["on", "off", "auto"],
        help="x-migration-load-config-after-iter (auto: on for aarch64)",
    )
    p.add_argument(
        "--max-queued-buffers-size",
        type=int,
        default=2**64 - 1,
        metavar="BYTES",
        help="target: out-of-order multifd bytes a "
        "device may queue (x-migration-max-queued-buffers-size)",
    )
    p.add_argument(
        "--net-timeout",
        type=_positive_float,
        default=60.0,
        metavar="S",
        help="seconds one network step may block (60)",
    )


def _params(args: argparse.Namespace) -> MigrationParams:
    from mpvfio.migration.engine import MigrationParams

    return MigrationParams(
        multifd_channels=args.multifd_channels,
        downtime_limit_ms=args.downtime_limit,
        config_after_iter=args.config_after_iter,
        max_queued_buffers_size=args.max_queued_buffers_size,
        timeout=args.net_timeout,
    )


def _add_migrate(subparsers: _Subparsers[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "migrate",
        help="live-migrate emulated VFs (to a target, or --local)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Run the source of a live migration: save_setup (-> PRE_COPY),\n"
            "pre-copy iterations, the parallel stop, the STOP_COPY data (on the\n"
            "main channel or, with --multifd-channels, from every device's\n"
            "worker in parallel), the config, then the target's answer.  On any\n"
            "failure the source VM runs again with its devices unchanged.\n\n"
            "--local forks a target on this machine (a UNIX socket) and prints\n"
            "the downtime with its breakdown; --compare runs the seed's rows:\n"
            "serial transitions, parallel transitions, parallel + multifd data."
        ),
        epilog=(
            "examples:\n"
            "  mpvfio migrate --vfs 4 --local --compare\n"
            "  mpvfio migrate --vfs 4 --local --compare --profile cx7 --json\n"
            "  mpvfio migrate --vfs 4 --local --multifd-channels 4 --timeline t.png\n"
            "  mpvfio incoming --listen tcp:[::1]:4444 --vfs 2 &\n"
            "  mpvfio migrate --to tcp:[::1]:4444 --vfs 2\n"
            "  mpvfio migrate --local --arcs \\\n"
            "      --device vfio-user:/tmp/src-vf0.sock "
            "--target-device vfio-user:/tmp/dst-vf0.sock"
        ),
    )
    _add_machine_options(p)
    _add_migration_options(p)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument(
        "--to", metavar="URI", help="target URI: unix:PATH or tcp:HOST:PORT"
    )
    where.add_argument(
        "--local",
        action="store_true",
        help="fork a target on this machine and migrate to it",
    )
    p.add_argument(
        "--target-device",
        action="append",
        default=None,
        metavar="SPEC",
        dest="target_devices",
        help="with --local and --device: the target's VF (repeat, one per "
        "--device, in the same order)",
    )
    p.add_argument(
        "--compare",
        action="store_true",
        help="with --local: serial, parallel and parallel+multifd rows",
    )
    p.add_argument(
        "--timeline",
        metavar="FILE.png",
        help="also draw the per-device timeline as a PNG (matplotlib)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    arcreport.add_arguments(p, png_option="--arcs-png")
    p.set_defaults(func=_cmd_migrate)


def _add_incoming(subparsers: _Subparsers[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "incoming",
        help="start a target VM that waits for one incoming migration",
        description=(
            "Build a VM with the same VFs as the source (vf0..vfN-1: --vfs N "
            "emulated ones, or one --device SPEC each), "
            "keep it in run state inmigrate, listen on URI, load one migration "
            "and start the VM (RESUMING -> RUNNING_P2P -> RUNNING).  On failure "
            "its devices are reset and the VM never runs."
        ),
    )
    _add_machine_options(p)
    _add_migration_options(p)
    p.add_argument(
        "--listen",
        required=True,
        metavar="URI",
        help="unix:PATH or tcp:HOST:PORT (tcp:[::1]:4444 for IPv6)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_cmd_incoming)


def _print_rows(rows: list[dict[str, object]]) -> None:
    print(f"  {'mode':<38}{'downtime':>10}{'stop':>9}{'transfer':>10}{'start':>9}")
    for r in rows:
        print(
            f"  {r['mode']!s:<38}{r['downtime_ms']:>10.1f}{r['stop_ms']:>9.1f}"
            f"{r['transfer_ms']:>10.1f}{r['start_ms']:>9.1f}"
        )


def _cmd_migrate(args: argparse.Namespace) -> int:
    from mpvfio.devices.profiles import get_profile
    from mpvfio.machine import Machine
    from mpvfio.migration import local
    from mpvfio.migration.engine import MigrationInfo, migrate

    profile = get_profile(args.profile)
    say = _progress(not args.quiet and not args.json)
    params = _params(args)
    if args.compare and not args.local:
        raise UsageError("--compare needs --local")
    vfs = _vfs(args)
    if args.target_devices and not args.local:
        raise UsageError(
            "--target-device is for --local (with --to, the target names its "
            "own devices: mpvfio incoming --device ...)"
        )
    if args.local and args.devices and not args.target_devices:
        raise UsageError(
            "--local with --device needs the target's devices too: give "
            "--target-device SPEC once per --device (a VF cannot be on both sides)"
        )
    specs = {"devices": args.devices, "target_devices": args.target_devices}
    infos: list[tuple[str, MigrationInfo]] = []
    if args.local and args.compare:
        channels = args.multifd_channels or vfs
        for r in local.compare(vfs, profile, params, channels, say, **specs):
            infos.append((str(r["label"]), r["info"]))
    elif args.local:
        info, _ = local.run_local(
            vfs, profile, args.mode, params, progress=say, **specs
        )
        label = f"{args.mode}" + (" + multifd" if params.multifd_channels else "")
        infos.append((label, info))
    else:
        with Machine(
            args.mode,
            relaxed_interlock=args.relaxed_interlock,
            transition_timeout=args.timeout,
            seed=args.seed,
            name="source",
        ) as m:
            _add_vfs(m, args, profile)
            m.start()
            info = migrate(m, args.to, params, progress=say)
        infos.append((args.mode, info))
    doc = local.rows_json(infos)
    rows, equal = doc["rows"], doc["checksums_equal"]
    if args.timeline:
        local.timeline_png(infos[-1][1], args.timeline)
    # the arc report of the last row (with --compare: parallel + multifd)
    arcs = arcreport.arcs_from_dicts(asdict(s) for s in infos[-1][1].timeline)
    if args.json:
        report = arcreport.emit(args, arcs)
        if report is not None:
            doc[arcreport.JSON_KEY] = report
        print(json.dumps(doc, indent=2))
        return EXIT_OK if equal else EXIT_FAILED
    what = "device specs" if args.devices else f"profile {profile.name}"
    print(
        f"migration of {vfs} VFs, {what}; times in ms "
        "(downtime = source vm_stop -> target VM running)"
    )
    _print_rows(rows)
    for label, info in infos:
        print(f"\n{label}:")
        print(local.timeline_text(info))
        for note in info.notes:
            print(f"  note: {note}")
    print(
        "\nchecksums: "
        + ("source at stop == target after start, every device" if equal else "DIFFER")
    )
    if args.timeline:
        print(f"timeline drawn to {args.timeline}")
    if getattr(args, "arcs_text", False) or getattr(args, "arcs_json", False):
        print(f"\narc report ({infos[-1][0]}):")
    arcreport.emit(args, arcs)
    return EXIT_OK if equal else EXIT_FAILED


def _cmd_incoming(args: argparse.Namespace) -> int:
    from mpvfio.devices.profiles import get_profile
    from mpvfio.machine import Machine
    from mpvfio.migration.engine import incoming
    from mpvfio.vmstate import RunState

    profile = get_profile(args.profile)
    params = _params(args)
    say = _progress(not args.json)
    with Machine(
        args.mode,
        relaxed_interlock=args.relaxed_interlock,
        transition_timeout=args.timeout,
        seed=args.seed,
        name="target",
    ) as m:
        _add_vfs(m, args, profile)
        m.start(run=False, runstate=RunState.INMIGRATE)
        say(f"waiting for a migration on {args.listen}")
        info = incoming(m, args.listen, params, progress=say)
    if args.json:
        print(json.dumps(asdict(info), indent=2, default=str))
    else:
        print(
            f"incoming migration completed: load {info.load_ms:.1f} ms, start "
            f"{info.start_ms:.1f} ms, {info.received_bytes} bytes received"
        )
    return EXIT_OK


def _add_bench(subparsers: _Subparsers[argparse.ArgumentParser]) -> None:
    from mpvfio.jobs.bench import add_bench_arguments, run_bench_cli

    p = subparsers.add_parser(
        "bench",
        help="benchmarks (switchover: serial vs threads vs workers)",
        description="Benchmarks that print ratios measured in one run.",
    )
    sub = p.add_subparsers(dest="bench", metavar="BENCH", required=True)
    s = sub.add_parser(
        "switchover",
        help="stop+start phase times per mode, rounds interleaved",
        description=(
            "Run serial, threads and workers mode side by side on the same "
            "VF counts and profiles, rounds interleaved to cancel machine "
            "noise, and report per mode the median and p90 stop-phase and "
            "start-phase wall times, the ideal (the slowest device's own "
            "arcs), downtime/ideal and serial/mode, plus the project's "
            "targets evaluated on this run."
        ),
    )
    add_bench_arguments(s)
    s.set_defaults(func=run_bench_cli)
    t = sub.add_parser(
        "seed-table",
        help="the seed's downtime table (1, 2, 4 VFs) beside mpvfio's rows",
        description=(
            "Migrate 1, 2 and 4 VFs (profile cx7) with QEMU's serial "
            "transitions, the seed's threads, mpvfio's workers and workers + "
            "multifd data, and print each downtime beside the seed's "
            "measurement with the difference in %."
        ),
    )
    t.add_argument("--profile", default="cx7", metavar="P")
    t.add_argument("--vfs", default="1,2,4", metavar="N[,N...]")
    t.add_argument("--rounds", type=_positive_int, default=1, metavar="R")
    t.add_argument(
        "--fixed-ms",
        type=float,
        default=None,
        metavar="MS",
        help="how long the source's priority-0 handler sleeps on stop: the "
        "model's fixed downtime F (RAM, other devices) minus the ~8 ms the "
        "engine's own fixed steps take (default: seedtable.FIXED_MS)",
    )
    t.add_argument("--plot", metavar="FILE.png", help="draw it (matplotlib)")
    t.add_argument("--json", action="store_true", help="print one JSON object")
    t.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    t.set_defaults(func=_cmd_seed_table)


def _add_machine_options(p: argparse.ArgumentParser) -> None:
    """Options every command that builds a machine of VFs takes."""
    p.add_argument(
        "--vfs",
        type=_positive_int,
        default=None,
        metavar="N",
        help="number of emulated VFs, each behind its own root port (default 4)",
    )
    p.add_argument(
        "--device",
        action="append",
        default=None,
        metavar="SPEC",
        dest="devices",
        help="a VF to drive instead of --vfs emulated ones (repeat, one per "
        "VF: vf0, vf1, ...): emulated:PROFILE, vfio-user:SOCKET_PATH (a "
        "vfio-user server, e.g. `mpvfio device-server`) or "
        "vfio:/dev/vfio/devices/vfioN (a kernel VFIO cdev)",
    )
    p.add_argument(
        "--profile",
        default="fixed50",
        metavar="P",
        help="device profile: instant, fixed50, cx7 or a JSON file "
        "(default fixed50: every arc takes 50 ms)",
    )
    p.add_argument(
        "--mode",
        default="workers",
        choices=["serial", "threads", "workers"],
        help="serial: QEMU today; threads: the seed series; workers: "
        "one process per device with a P2P barrier (default)",
    )
    p.add_argument(
        "--relaxed-interlock",
        action="store_true",
        help="workers mode: let non-VFIO main callbacks run before "
        "every device reached P2P",
    )
    p.add_argument(
        "--timeout",
        type=_positive_float,
        default=30.0,
        metavar="S",
        help="seconds a worker may take for one notification's "
        "transitions before it counts as hung (default 30)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the devices' latency jitter (default 0)",
    )


def _add_switchover(subparsers: _Subparsers[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "switchover",
        help="run a source + target switchover on emulated VFs and time it",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Build a VM with N emulated VFs, put them in PRE_COPY (RUNNING\n"
            "where the profile has none), drain the pre-copy data, then play\n"
            "the source side of a switchover (vm_stop(finish-migrate): PRE_COPY\n"
            "-> PRE_COPY_P2P -> STOP_COPY; read the STOP_COPY data; save\n"
            "cleanup STOP_COPY -> STOP) and the target side on the same devices\n"
            "(STOP -> RESUMING, write the bytes back, vm_start(): RESUMING ->\n"
            "RUNNING_P2P -> RUNNING).  Every device's state checksum must come\n"
            "back unchanged.  Reports the wall time of each phase (the stop and\n"
            "start phases are the downtime the transitions add), the data\n"
            "time, and each device's arcs.\n\n"
            "Exit status: 0 ok, 1 a checksum differed, a device failed or the\n"
            "event order was illegal, 2 bad usage."
        ),
        epilog=(
            "examples:\n"
            "  mpvfio switchover --vfs 4\n"
            "  mpvfio switchover --vfs 16 --mode serial --profile instant\n"
            "  mpvfio switchover --vfs 4 --profile cx7 --rounds 3 --json\n"
            "  mpvfio switchover --vfs 4 --profile cx7 --arcs\n"
            "  mpvfio switchover --device vfio-user:/tmp/pf-vf0.sock "
            "--device emulated:fixed50"
        ),
    )
    _add_machine_options(p)
    p.add_argument(
        "--rounds",
        type=_positive_int,
        default=1,
        metavar="R",
        help="repeat the switchover R times; medians are reported",
    )
    p.add_argument(
        "--json", action="store_true", help="print one JSON object (for scripts)"
    )
    p.add_argument(
        "-q", "--quiet", action="store_true", help="no progress lines on stderr"
    )
    arcreport.add_arguments(p, png_option="--timeline")
    p.set_defaults(func=_cmd_switchover)


def _vfs(args: argparse.Namespace) -> int:
    """How many VFs the command drives: ``--device`` specs or ``--vfs``."""
    if args.devices:
        if args.vfs is not None and args.vfs != len(args.devices):
            raise UsageError(
                f"--vfs {args.vfs} but {len(args.devices)} --device spec(s): "
                "give one or the other"
            )
        return len(args.devices)
    return 4 if args.vfs is None else int(args.vfs)


def _add_vfs(machine: Machine, args: argparse.Namespace, profile: Profile) -> None:
    """Add the command's VFs: one per ``--device`` spec, else ``--vfs`` emulated."""
    from mpvfio.vfiomig import MigrationProps

    props = MigrationProps(migration_events=True)
    if args.devices:
        _vfs(args)
        for i, spec in enumerate(args.devices):
            machine.add_vfio_device(f"vf{i}", spec=spec, props=props)
        return
    for i in range(_vfs(args)):
        machine.add_vfio_device(f"vf{i}", profile, props=props)


def _progress(enabled: bool) -> Callable[[str], None]:
    def say(msg: str) -> None:
        if enabled:
            print(f"mpvfio: {msg}", file=sys.stderr, flush=True)

    return say


def _cmd_switchover(args: argparse.Namespace) -> int:
    from mpvfio.devices.profiles import get_profile
    from mpvfio.jobs.switchover import run_switchover
    from mpvfio.machine import Machine

    profile = get_profile(args.profile)
    vfs = _vfs(args)
    say = _progress(
        not args.quiet
        and (args.rounds > 1 or profile.state_size > 1 << 24 or bool(args.devices))
    )
    with Machine(
        args.mode,
        relaxed_interlock=args.relaxed_interlock,
        transition_timeout=args.timeout,
        seed=args.seed,
    ) as machine:
        _add_vfs(machine, args, profile)
        what = (
            f"{vfs} device(s) " + ", ".join(args.devices)
            if args.devices
            else f"{vfs} VFs (profile {profile.name})"
        )
        say(f"starting {what} in {args.mode} mode")
        machine.start()
        result = run_switchover(machine, rounds=args.rounds, progress=say)
    arcs = result.arc_records()
    if args.json:
        doc = result.to_dict()
        report = arcreport.emit(args, arcs)
        if report is not None:
            doc[arcreport.JSON_KEY] = report
        print(json.dumps(doc, indent=2))
        return EXIT_OK if result.ok else EXIT_FAILED
    med = result.median
    print(
        f"switchover: {result.vfs} VFs, profile {result.profile}, mode "
        f"{result.mode}, {len(result.rounds)} round(s); medians in ms"
    )
    ideal_stop, ideal_start = med("ideal_stop_ms"), med("ideal_start_ms")
    rows = [
        ("stop phase (vm_stop)", med("stop_ms"), ideal_stop),
        ("STOP_COPY data read", med("data_ms"), None),
        ("target data load", med("load_ms"), None),
        ("start phase (vm_start)", med("start_ms"), ideal_start),
        ("downtime", med("downtime_ms"), None),
        ("save cleanup (not downtime)", med("cleanup_ms"), None),
    ]
    for label, ms, ideal in rows:
        extra = ""
        if ideal:
            extra = f"  ideal {ideal:9.1f}  x{ms / ideal:.3f}"
        print(f"  {label:<30}{ms:9.1f}{extra}")
    final = result.rounds[-1]
    print("per device (last round): stop arcs | start arcs")
    for dev in final.devices:
        stop = ", ".join(
            f"{a['src']}>{a['dst']} {a['ms']:.1f}" for a in dev.arcs["stop"]
        )
        start = ", ".join(
            f"{a['src']}>{a['dst']} {a['ms']:.1f}" for a in dev.arcs["start"]
        )
        same = "checksum equal" if dev.checksum_equal else "CHECKSUM DIFFERS"
        print(f"  {dev.name:<6} {stop} | {start} | {dev.final_state}, {same}")
    order = [v for r in result.rounds for v in r.event_order]
    print("event order: " + ("P2P-first holds" if not order else "; ".join(order)))
    for err in result.errors:
        print(f"device error: {err}")
    arcreport.emit(args, arcs)
    print("result: " + ("OK" if result.ok else "FAILED"))
    return EXIT_OK if result.ok else EXIT_FAILED


def _add_fsm(subparsers: _Subparsers[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "fsm",
        help="show the kernel's path (or EINVAL) for a migration state change",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Compute what one VFIO_DEVICE_FEATURE SET of MIG_DEVICE_STATE does\n"
            "on a device advertising FLAGS, in state CUR, asked for NEW: the\n"
            "arcs the driver carries out (the path, starting with CUR) or the\n"
            "EINVAL the kernel returns.  This models vfio_mig_get_next_state()\n"
            "with its fix: blocked arcs such as STOP_COPY -> PRE_COPY fail with\n"
            "EINVAL (kernels v6.2 up to the fix hang instead).  No device is\n"
            "touched.\n\n"
            "States are uAPI names (STOP_COPY), QAPI names (stop-copy) or\n"
            "numbers 0..7.  FLAGS are VFIO_MIGRATION_* names separated by ','\n"
            "or '|' (STOP_COPY is mandatory) or a number such as 0x5.\n\n"
            "Exit status: 0 success, 1 EINVAL, 2 bad usage."
        ),
        epilog=(
            "examples:\n"
            "  mpvfio fsm RUNNING STOP\n"
            "      RUNNING -> RUNNING_P2P -> STOP (2 arcs)\n"
            "  mpvfio fsm --flags STOP_COPY running stop-copy\n"
            "      RUNNING -> STOP -> STOP_COPY (2 arcs, data_fd returned)\n"
            "  mpvfio fsm --flags 0x5 STOP_COPY PRE_COPY\n"
            "      EINVAL: STOP_COPY -> PRE_COPY is a blocked arc  (exit 1)\n"
            "  mpvfio fsm --json PRE_COPY STOP_COPY\n"
            "  mpvfio fsm --flags STOP_COPY,P2P --table\n"
            "  mpvfio fsm --table --json > fsm-0x7.json"
        ),
    )
    p.add_argument(
        "--flags",
        default=_DEFAULT_FLAGS,
        metavar="FLAGS",
        help=f"the device's VFIO_MIGRATION_* flags (default: {_DEFAULT_FLAGS})",
    )
    p.add_argument(
        "--table",
        action="store_true",
        help="print the outcome of all 64 (CUR, NEW) pairs instead of one",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help='print JSON: {"cur", "new", "path", "error"} (a list with --table)',
    )
    p.add_argument("cur", nargs="?", metavar="CUR", help="the current state")
    p.add_argument("new", nargs="?", metavar="NEW", help="the requested state")
    p.set_defaults(func=_cmd_fsm)


def _cmd_fsm(args: argparse.Namespace) -> int:
    flags = fsm.parse_flags(args.flags)
    if args.table:
        if args.cur is not None:
            raise UsageError("--table takes no CUR NEW")
        rows = fsm.table(flags)
        if args.json:
            print(json.dumps(rows, indent=2))
            return EXIT_OK
        width = max(len(s.name) for s in MigState) + 2
        print(f"flags {fsm.flags_name(flags)} ({int(flags):#x})")
        print(f"{'CUR':<{width}}{'NEW':<{width}}RESULT")
        for cur in MigState:
            for new in MigState:
                line = fsm.explain(flags, cur, new)
                print(f"{cur.name:<{width}}{new.name:<{width}}{line}")
        ok = [r["path"] for r in rows if r["path"] is not None]
        fds = sum(fsm.returns_data_fd([MigState[n] for n in p]) for p in ok)
        print(
            f"{len(ok)} succeed, {len(rows) - len(ok)} EINVAL, {fds} return a data_fd"
        )
        return EXIT_OK
    if args.cur is None or args.new is None:
        raise UsageError("fsm needs CUR and NEW (or --table)")
    cur, new = fsm.parse_state(args.cur), fsm.parse_state(args.new)
    result = fsm.row(flags, cur, new)
    if args.json:
        print(json.dumps(result))
    else:
        print(fsm.explain(flags, cur, new))
    return EXIT_OK if result["error"] is None else EXIT_FAILED


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit status (never raises SystemExit)."""
    return run_main(build_parser(), argv)
