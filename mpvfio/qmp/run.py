"""``mpvfio run``: a long-running VM process serving QMP (layer 5).

::

    mpvfio run --vfs N [--profile P] [--mode M] --qmp unix:PATH|tcp:HOST:PORT
               [--incoming URI|defer] [--migration-events] [--prepare-events]

builds a :class:`~mpvfio.machine.Machine` with the emulated VFs
``vf0..vfN-1``, starts it (running; ``inmigrate`` with ``--incoming``, where
a URI starts receiving at once in the background like QEMU's ``-incoming``
and ``defer`` waits for ``migrate-incoming``; ``prelaunch`` with ``-S``),
then serves QMP (:mod:`mpvfio.qmp.server`) on every ``--qmp`` address until
``quit``, SIGTERM or SIGINT.  Then it cancels a running migration, sends
SHUTDOWN, closes every session and the machine (workers reaped, IPC objects
unlinked, socket files removed) and exits 0; 1 when an incoming migration
failed (QEMU's ``exit-on-error``).

The cli wires it as ``from mpvfio.qmp.run import add_arguments, run``;
:func:`main` runs it standalone (``python -c "import sys; from
mpvfio.qmp.run import main; sys.exit(main(sys.argv[1:]))" ARGS``).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from typing import TYPE_CHECKING

from mpvfio.argtypes import positive_float as _positive_float
from mpvfio.argtypes import positive_int as _positive_int
from mpvfio.argtypes import run_main
from mpvfio.errors import UsageError
from mpvfio.net.transport import Listener, listen, parse_uri

if TYPE_CHECKING:
    from mpvfio.qmp.server import MachineService

__all__ = ["add_arguments", "main", "run"]

_log = logging.getLogger(__name__)

DESCRIPTION = """\
Run a VM with N emulated VFIO devices (vf0..vfN-1) as a long-running process
and serve the QEMU Machine Protocol on it, so QMP clients (qemu.qmp,
qmp-shell, libvirt-style tools) can drive it: query-status, stop, cont,
migrate / migrate-incoming / migrate_cancel / query-migrate,
migrate-set-capabilities (events), __org.mpvfio_query-vfio-devices, quit.
Events: STOP, RESUME, MIGRATION, VFIO_MIGRATION (--migration-events) and
__org.mpvfio_VFIO_MIGRATION_PREPARE (--prepare-events).

The process runs until the QMP command quit, SIGTERM or SIGINT; it then
shuts down cleanly and exits 0 (1 if an incoming migration failed)."""

EPILOG = """\
examples:
  mpvfio run --vfs 4 --qmp unix:/tmp/src.qmp --migration-events &
  mpvfio run --vfs 4 --qmp unix:/tmp/dst.qmp --incoming defer \\
             --migration-events &
  qmp-shell /tmp/dst.qmp      # migrate-incoming uri=unix:/tmp/mig.sock
  qmp-shell /tmp/src.qmp      # migrate uri=unix:/tmp/mig.sock
  tools/launch_qmp_pair.py    # both, in a temp dir, with the commands"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``mpvfio run``'s options to ``parser`` (sets ``func`` to :func:`run`)."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = DESCRIPTION
    parser.epilog = EPILOG
    parser.add_argument(
        "--qmp",
        action="append",
        required=True,
        metavar="ADDR",
        help="serve QMP on unix:PATH (mode 0600; refuses a path where a live "
        "server listens) or tcp:HOST:PORT (tcp:[::1]:4444 for IPv6); "
        "may be repeated",
    )
    parser.add_argument(
        "--vfs",
        type=_positive_int,
        default=None,
        metavar="N",
        help="number of emulated VFs vf0..vfN-1 (default 4)",
    )
    parser.add_argument(
        "--profile",
        default="fixed50",
        metavar="P",
        help="device profile: instant, fixed50, cx7 or a JSON file (default fixed50)",
    )
    parser.add_argument(
        "--device",
        action="append",
        default=None,
        metavar="SPEC",
        dest="devices",
        help="a VF instead of --vfs emulated ones (repeat, one per VF: vf0, "
        "vf1, ...): emulated:PROFILE, vfio-user:SOCKET_PATH or "
        "vfio:/dev/vfio/devices/vfioN",
    )
    parser.add_argument(
        "--mode",
        default="workers",
        choices=["serial", "threads", "workers"],
        help="how VFIO transitions run (default workers)",
    )
    parser.add_argument(
        "--incoming",
        metavar="URI",
        help="start in run state inmigrate and receive one migration on URI "
        "(unix:PATH or tcp:HOST:PORT), or 'defer': wait for migrate-incoming",
    )
    parser.add_argument(
        "-S",
        dest="paused",
        action="store_true",
        help="do not start the VM (run state prelaunch) until 'cont'; with "
        "--incoming: stay paused after the migration",
    )
    parser.add_argument(
        "--migration-events",
        action="store_true",
        help="devices emit VFIO_MIGRATION events (vfio-pci migration-events=on)",
    )
    parser.add_argument(
        "--prepare-events",
        action="store_true",
        help="devices emit __org.mpvfio_VFIO_MIGRATION_PREPARE before every "
        "state change (seed 003 v1; not upstream)",
    )
    parser.add_argument(
        "--multifd-channels",
        type=_positive_int,
        metavar="C",
        help="start with the multifd capability on and C channels (both sides "
        "must agree; default: off, 2 channels once switched on)",
    )
    parser.add_argument(
        "--name", help="the VM's name (query-name; default: unique per process)"
    )
    parser.add_argument(
        "--timeout",
        type=_positive_float,
        default=30.0,
        metavar="S",
        help="seconds a worker may take for one notification (default 30)",
    )
    parser.add_argument(
        "--net-timeout",
        type=_positive_float,
        default=60.0,
        metavar="S",
        help="seconds one migration network step may block (default 60)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the devices' latency jitter"
    )
    parser.add_argument(
        "--event-mono-ns",
        action="store_true",
        help="add __org.mpvfio_mono-ns (CLOCK_MONOTONIC of the event, ns) to "
        "every event: for latency measurements (tools/qmp_event_latency.py)",
    )
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="log more (-vv: debug)"
    )
    parser.set_defaults(func=run)


def _warn_if_exposed(address: str) -> None:
    """QMP has no authentication: say so when it listens beyond loopback."""
    import ipaddress

    uri = parse_uri(address)
    if uri.kind != "tcp":
        return
    host = uri.host or ""
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
        _say(
            f"warning: QMP on {address} is not loopback-only; whoever can reach "
            "it controls the VM (QMP has no authentication)"
        )


def _say(msg: str) -> None:
    print(f"mpvfio run: {msg}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    """Run the VM and its QMP server until quit or a signal; the exit status.

    :raises UsageError: bad options (a malformed address, unknown profile).
    :raises MpvfioError: the VM or a QMP socket could not be set up (e.g. a
        live server already listens on the unix path).
    """
    from mpvfio.devices.profiles import get_profile
    from mpvfio.machine import Machine
    from mpvfio.migration.engine import MigrationParams
    from mpvfio.qmp.protocol import qmp_check_address, qmp_listen
    from mpvfio.qmp.server import MachineService
    from mpvfio.vfiomig import MigrationProps
    from mpvfio.vmstate import RunState

    level = (logging.WARNING, logging.INFO, logging.DEBUG)[min(args.verbose, 2)]
    logging.basicConfig(
        level=level, format="mpvfio run: %(levelname)s %(name)s: %(message)s"
    )
    profile = get_profile(args.profile)
    if args.devices and args.vfs is not None and args.vfs != len(args.devices):
        raise UsageError(
            f"--vfs {args.vfs} but {len(args.devices)} --device spec(s): give one "
            "or the other"
        )
    vfs = 4 if args.vfs is None else args.vfs
    incoming = args.incoming
    if incoming is not None and incoming != "defer":
        parse_uri(incoming)
    for address in args.qmp:
        qmp_check_address(address)  # before any worker is forked
        _warn_if_exposed(address)
    params = MigrationParams(timeout=args.net_timeout)

    listeners: list[Listener] = []
    machine = Machine(
        args.mode,
        name=args.name,
        transition_timeout=args.timeout,
        seed=args.seed,
    )
    try:
        props = MigrationProps(
            migration_events=args.migration_events,
            prepare_events=args.prepare_events,
        )
        if args.devices:
            for i, spec in enumerate(args.devices):
                machine.add_vfio_device(f"vf{i}", spec=spec, props=props)
        else:
            for i in range(vfs):
                machine.add_vfio_device(f"vf{i}", profile, props=props)
        if incoming is not None:
            machine.start(run=False, runstate=RunState.INMIGRATE)
        elif args.paused:
            machine.start(run=False, runstate=RunState.PRELAUNCH)
        else:
            machine.start()
        # Sockets after the workers are forked: they must not inherit them.
        for address in args.qmp:
            listeners.append(qmp_listen(address))
        mig_listener = None
        if incoming is not None and incoming != "defer":
            mig_listener = listen(incoming)
            listeners.append(mig_listener)
        service = MachineService(
            machine,
            params=params,
            incoming_allowed=incoming is not None,
            event_mono_ns=args.event_mono_ns,
            multifd_channels=args.multifd_channels or 2,
            multifd_on=args.multifd_channels is not None,
        )
        if incoming is not None and args.paused:
            service.autostart = False  # QEMU: -S with -incoming stays paused
        what = (
            "devices " + ", ".join(args.devices)
            if args.devices
            else f"profile {profile.name}"
        )
        desc = (
            f"VM {machine.name}: {len(machine.devices)} VFs ({args.mode} mode, "
            f"{what}), pid {os.getpid()}"
        )
        return asyncio.run(_serve(service, listeners, mig_listener, desc))
    finally:
        for lst in listeners:
            lst.close()
        machine.close()


async def _serve(
    service: MachineService,
    listeners: list[Listener],
    mig_listener: Listener | None,
    desc: str,
) -> int:
    loop = asyncio.get_running_loop()
    server = service.make_server()
    signals = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    for sig in signals:
        loop.add_signal_handler(sig, service.request_shutdown, "host-signal")
    try:
        for lst in listeners:
            if lst is not mig_listener:
                await server.serve(lst)
        if mig_listener is not None:
            service.start_incoming(mig_listener)
        _say(f"{desc}, run state {service.machine.vm.runstate.value}")
        for address in server.addresses:
            _say(f"QMP listening on {address}")
        if mig_listener is not None:
            _say(f"waiting for an incoming migration on {mig_listener.uri}")
        reason = await service.wait_shutdown()
        _say(f"shutting down ({reason})")
    finally:
        await service.shutdown()
        for sig in signals:
            loop.remove_signal_handler(sig)
    return service.exit_code


def build_parser() -> argparse.ArgumentParser:
    """A standalone ``mpvfio run`` parser (the cli adds a subparser instead)."""
    parser = argparse.ArgumentParser(prog="mpvfio run")
    add_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``mpvfio run ARGV``; return the exit status (like ``mpvfio.cli.main``)."""
    return run_main(build_parser(), argv, run)


if __name__ == "__main__":
    raise SystemExit(main())
