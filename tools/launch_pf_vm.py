#!/usr/bin/env python3
"""Launch an emulated PF's device server and a VM that uses its VFs.

Starts ``mpvfio device-server`` (one emulated PF serving N VFs over
vfio-user, one UNIX socket each) and ``mpvfio run`` with one ``--device
vfio-user:SOCKET`` per VF and a QMP socket, all in a fresh private
directory under /tmp.  The VM's workers each hold one VF's socket, as they
would hold a real VF's fd: the setup to develop a management application
against, or to watch a switchover whose devices live in another process.

It prints the sockets and a qmp-shell command line, then waits.  Ctrl-C (or
SIGTERM) stops the VM first, then the device server, and deletes the
directory.

``--demo`` drives the VM itself with qemu.qmp instead of waiting: the
device query (each VF's backend is vfio-user), ``stop`` and ``cont`` with
the VFIO_MIGRATION events they cause, then ``quit``; it exits 0 when every
step behaved.

``--kill-server-after MS`` (with ``--demo``) SIGKILLs the device server that
many milliseconds into the ``stop``: the VM reports a device error per VF
and keeps serving QMP (a PF that crashed mid-transition).

Examples::

    tools/launch_pf_vm.py --vfs 4 --profile fixed50
    tools/launch_pf_vm.py --demo --vfs 2
    tools/launch_pf_vm.py --demo --vfs 2 --profile fixed50 --kill-server-after 30

Exit status: 0 after a clean stop or a demo that behaved, 1 if a process
failed or the demo saw something wrong, 2 for bad usage.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
READY_TIMEOUT_S = 30.0


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT), env.get("PYTHONPATH")) if p
    )
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Setup:
    """The device server, the VM and their directory (cleaned up by close)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.dir = Path(tempfile.mkdtemp(prefix="mpvfio-pf-", dir="/tmp"))
        self.prefix = str(self.dir / "vf")
        self.qmp = self.dir / "vm.qmp"
        self.server: Any = None
        self.vm: subprocess.Popen[bytes] | None = None
        self.vm_log = self.dir / "vm.log"

    def start(self) -> None:
        sys.path.insert(0, str(ROOT))
        from mpvfio.devices.vfio_user.server import ServerProcess

        a = self.args
        self.server = ServerProcess(self.prefix, a.vfs, a.profile, seed=a.seed)
        argv = [sys.executable, "-m", "mpvfio", "run", "--name", "pf-vm"]
        argv += ["--qmp", f"unix:{self.qmp}", "--mode", a.mode, "--migration-events"]
        for spec in self.server.specs():
            argv += ["--device", spec]
        with open(self.vm_log, "wb") as out:
            self.vm = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=_env()
            )
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not self.qmp.exists():
            if self.vm.poll() is not None:
                raise RuntimeError(
                    f"mpvfio run exited with {self.vm.returncode}:\n"
                    + self.vm_log.read_text(errors="replace")[-2000:]
                )
            if time.monotonic() > deadline:
                raise RuntimeError("mpvfio run did not create its QMP socket in time")
            time.sleep(0.05)

    def describe(self) -> str:
        lines = [f"device server (pid {self.server.pid}), one PF, {self.args.vfs} VFs:"]
        lines += [f"  {p}" for p in self.server.paths]
        assert self.vm is not None
        lines += [
            f"VM (pid {self.vm.pid}), log {self.vm_log}",
            f"  QMP: {self.qmp}",
            f"  qmp-shell {self.qmp}",
            "  try: __org.mpvfio_query-vfio-devices, stop, cont, quit",
        ]
        return "\n".join(lines)

    def close(self) -> int:
        """Stop the VM, then the server; 0 if both ended cleanly."""
        status = 0
        if self.vm is not None and self.vm.poll() is None:
            self.vm.send_signal(signal.SIGTERM)
            try:
                self.vm.wait(15)
            except subprocess.TimeoutExpired:
                self.vm.kill()
                self.vm.wait(5)
                status = 1
        if self.server is not None:
            code = self.server.stop()
            if code not in (0, -signal.SIGKILL) and not self.args.kill_server_after:
                status = 1
        shutil.rmtree(self.dir, ignore_errors=True)
        return status


async def demo(setup: Setup) -> bool:
    """Query, stop, cont, quit over QMP; whether everything behaved."""
    from qemu.qmp import QMPClient

    a = setup.args
    qmp = QMPClient("launch_pf_vm")
    await qmp.connect(str(setup.qmp))
    ok = True
    events: list[dict[str, Any]] = []

    async def listen() -> None:
        async for ev in qmp.events:
            events.append(dict(ev))

    task = asyncio.create_task(listen())
    try:
        devices = await qmp.execute("__org.mpvfio_query-vfio-devices")
        assert isinstance(devices, list)
        for d in devices:
            print(
                f"  {d.get('name')}: backend {d.get('backend')}, "
                f"{d.get('device-state')}, flags {d.get('flags')}"
            )
            ok &= d.get("backend") == "vfio-user"
        killer = None
        if a.kill_server_after:
            killer = threading.Timer(a.kill_server_after / 1000.0, setup.server.kill)
            killer.start()
        await qmp.execute("stop")
        if killer is not None:
            killer.join()
        status = await qmp.execute("query-status")
        print(f"  after stop: {status}")
        await qmp.execute("cont")
        status = await qmp.execute("query-status")
        print(f"  after cont: {status}")
        ok &= isinstance(status, dict) and status.get("running") is True
        await asyncio.sleep(0.2)
        for ev in events:
            data = ev.get("data", {})
            extra = (
                f" {data.get('device-id')} {data.get('device-state')}" if data else ""
            )
            print(f"  event {ev['event']}{extra}")
        vfio = [e for e in events if e["event"] == "VFIO_MIGRATION"]
        after = await qmp.execute("__org.mpvfio_query-vfio-devices")
        assert isinstance(after, list)
        for d in after:
            print(f"  {d.get('name')}: {d.get('errors')} device error(s)")
        if a.kill_server_after:
            # the stop failed on every VF: no stop event, every VF names its
            # error, and the VM still answers
            ok &= not any(e["data"]["device-state"] == "stop" for e in vfio)
            ok &= all(d.get("errors", 0) > 0 for d in after)
        else:
            ok &= len(vfio) == 4 * a.vfs  # running-p2p, stop, running-p2p, running
        with contextlib.suppress(Exception):
            await qmp.execute("quit")
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        with contextlib.suppress(Exception):
            await qmp.disconnect()
    return bool(ok)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description="Start an emulated PF's vfio-user device server and a VM "
        "(mpvfio run) whose VFs are that server's sockets.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("Examples::", 1)[1] if __doc__ else None,
    )
    p.add_argument("--vfs", type=int, default=4, metavar="N", help="VFs (default 4)")
    p.add_argument(
        "--profile", default="fixed50", help="the PF's device profile (default fixed50)"
    )
    p.add_argument(
        "--mode", default="workers", choices=["serial", "threads", "workers"]
    )
    p.add_argument("--seed", type=int, default=0, help="latency jitter seed")
    p.add_argument("--demo", action="store_true", help="drive it over QMP, then quit")
    p.add_argument(
        "--kill-server-after",
        type=float,
        default=0.0,
        metavar="MS",
        help="with --demo: SIGKILL the device server MS ms into the stop",
    )
    args = p.parse_args(argv)
    if args.vfs < 1:
        p.error("--vfs must be >= 1")
    if args.kill_server_after and not args.demo:
        p.error("--kill-server-after needs --demo")
    setup = Setup(args)
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    ok = False
    try:
        setup.start()
        print(setup.describe(), flush=True)
        if args.demo:
            ok = asyncio.run(demo(setup))
            assert setup.vm is not None
            setup.vm.wait(15)
        else:
            print("Ctrl-C stops both.", flush=True)
            while not stop.wait(0.5):
                if setup.vm is not None and setup.vm.poll() is not None:
                    print(f"the VM exited ({setup.vm.returncode})", file=sys.stderr)
                    break
            ok = True
    except Exception as exc:  # noqa: BLE001 - reported, then cleaned up
        print(f"launch_pf_vm: {exc}", file=sys.stderr)
        ok = False
    finally:
        status = setup.close()
        for s, h in old.items():
            signal.signal(s, h)
    print("result: " + ("OK" if ok and status == 0 else "FAILED"))
    return 0 if ok and status == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
