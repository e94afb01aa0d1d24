#!/usr/bin/env python3
"""Launch a source and a target ``mpvfio run`` to migrate between over QMP.

Both VMs get the same emulated VFs (vf0..vfN-1).  Their QMP sockets are
created in a fresh private directory under /tmp; the target starts in run
state ``inmigrate`` with ``--incoming defer`` (it waits for
``migrate-incoming``), so a QMP client drives the whole migration, exactly
as a management application drives two QEMUs.  The script prints the
socket paths, the qmp-shell command lines and the QMP commands to type, then
waits.  Ctrl-C (or SIGTERM) stops both VMs (SIGTERM: they cancel a running
migration, send SHUTDOWN and exit), deletes what it created and exits.

With ``--netns`` (root only) each VM runs in its own network namespace
(``ip netns``), joined by a veth pair: source 10.231.1.1, target
10.231.1.2; the migration then goes over TCP between the namespaces.  The
QMP sockets stay reachable from the host (a UNIX socket path is not bound
to a network namespace).  The namespaces are deleted on exit, also after an
error.

``--demo`` drives one migration itself with qemu.qmp (capabilities
``events`` on both sides, ``migrate-incoming``, ``migrate``,
``query-migrate``), prints every event both sides received, then quits both
VMs: a self-test of the whole setup.

Examples::

    tools/launch_qmp_pair.py --vfs 4 --migration-events
    sudo tools/launch_qmp_pair.py --netns --vfs 4 --profile cx7
    tools/launch_qmp_pair.py --demo --vfs 2 --migration-events

Exit status: 0 after a clean stop (or a completed demo), 1 if a VM failed
or the demo's migration did not complete, 2 for bad usage (e.g. --netns
without root).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RUN_ARGV = [sys.executable, "-m", "mpvfio", "run"]
NET = "10.231.1"
PORT = 4444
IP_TIMEOUT = 15.0


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(
        ["ip", *args], capture_output=True, text=True, timeout=IP_TIMEOUT, check=False
    )
    if check and res.returncode != 0:
        raise RuntimeError(f"`ip {' '.join(args)}` failed: {res.stderr.strip()}")
    return res


class Pair:
    """The two VMs and everything created for them (cleaned up by close)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.dir = Path(tempfile.mkdtemp(prefix="mpvfio-pair-", dir="/tmp"))
        self.src_qmp = self.dir / "src.qmp"
        self.dst_qmp = self.dir / "dst.qmp"
        self.namespaces: list[str] = []
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.logs: dict[str, Path] = {}
        pid = os.getpid()
        self.ns = {"src": f"mpvfio-src-{pid}", "dst": f"mpvfio-dst-{pid}"}
        if args.netns:
            self.mig_uri = f"tcp:{NET}.2:{PORT}"
        else:
            self.mig_uri = f"unix:{self.dir / 'mig.sock'}"

    # ------------------------------------------------------------ netns
    def make_netns(self) -> None:
        src, dst = self.ns["src"], self.ns["dst"]
        for ns in (src, dst):
            _ip("netns", "add", ns)
            self.namespaces.append(ns)
        pid = os.getpid()
        dev_s, dev_d = f"mpqs{pid}"[:15], f"mpqd{pid}"[:15]
        _ip("-n", src, "link", "add", dev_s, "type", "veth", "peer", "name", dev_d,
            "netns", dst)  # fmt: skip
        for ns, dev, host in ((src, dev_s, 1), (dst, dev_d, 2)):
            _ip("-n", ns, "addr", "add", f"{NET}.{host}/24", "dev", dev)
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "link", "set", dev, "up")

    # ------------------------------------------------------------- VMs
    def start(self) -> None:
        a = self.args
        common = ["--vfs", str(a.vfs), "--profile", a.profile, "--mode", a.mode]
        if a.migration_events:
            common.append("--migration-events")
        if a.prepare_events:
            common.append("--prepare-events")
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(ROOT), env.get("PYTHONPATH")) if p
        )
        env["PYTHONUNBUFFERED"] = "1"
        dst = ["--name", "dst", "--qmp", f"unix:{self.dst_qmp}", "--incoming", "defer"]
        roles = {
            "src": [*common, "--name", "src", "--qmp", f"unix:{self.src_qmp}"],
            "dst": [*common, *dst],
        }
        for role, extra in roles.items():
            argv = [*RUN_ARGV, *extra]
            if a.netns:
                argv = ["ip", "netns", "exec", self.ns[role], *argv]
            log = self.dir / f"{role}.log"
            self.logs[role] = log
            with open(log, "wb") as out:
                self.procs[role] = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    cwd=ROOT,
                    env=env,
                    start_new_session=True,  # Ctrl-C is ours to forward
                )

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        for role, path in (("src", self.src_qmp), ("dst", self.dst_qmp)):
            while not self._listening(path):
                if self.procs[role].poll() is not None:
                    raise RuntimeError(f"{role} exited:\n{self.log(role)}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{role} not ready in {timeout} s")
                time.sleep(0.05)

    @staticmethod
    def _listening(path: Path) -> bool:
        import socket

        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.settimeout(1.0)
            s.connect(str(path))
            s.recv(1)  # the greeting: the server is serving
            return True
        except OSError:
            return False
        finally:
            s.close()

    def log(self, role: str) -> str:
        try:
            return self.logs[role].read_text(errors="replace")
        except OSError:
            return ""

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM both VMs, wait, kill stragglers; the worst exit status."""
        worst = 0
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for role, proc in self.procs.items():
            try:
                code = proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait()
                print(f"{role}: killed after {timeout} s", file=sys.stderr)
            if code != 0:
                worst = 1
                print(f"{role} exited {code}:\n{self.log(role)}", file=sys.stderr)
        return worst

    def close(self) -> None:
        for ns in reversed(self.namespaces):
            _ip("netns", "del", ns, check=False)
        self.namespaces.clear()
        shutil.rmtree(self.dir, ignore_errors=True)

    # ------------------------------------------------------------ help
    def instructions(self) -> str:
        caps = '[{"capability":"events","state":true}]'
        netns = ""
        if self.args.netns:
            netns = (
                f"  network namespaces: {self.ns['src']} ({NET}.1), "
                f"{self.ns['dst']} ({NET}.2)\n"
            )
        return (
            f"source VM: pid {self.procs['src'].pid}, QMP {self.src_qmp}\n"
            f"target VM: pid {self.procs['dst'].pid}, QMP {self.dst_qmp} "
            "(inmigrate, --incoming defer)\n"
            f"{netns}"
            f"logs: {self.logs['src']}, {self.logs['dst']}\n\n"
            "In one terminal (target):\n"
            f"  qmp-shell -p {self.dst_qmp}\n"
            f"  (QEMU) migrate-set-capabilities capabilities={caps}\n"
            f"  (QEMU) migrate-incoming uri={self.mig_uri}\n\n"
            "In another (source):\n"
            f"  qmp-shell -p {self.src_qmp}\n"
            f"  (QEMU) migrate-set-capabilities capabilities={caps}\n"
            f"  (QEMU) migrate uri={self.mig_uri}\n"
            "  (QEMU) query-migrate\n"
            "  (QEMU) __org.mpvfio_query-vfio-devices\n"
            "  (QEMU)                 <- an empty line prints the events\n\n"
            "Ctrl-C here stops both VMs and cleans up."
        )


async def demo(pair: Pair) -> bool:
    """Drive one migration with qemu.qmp; print what both sides saw."""
    from qemu.qmp import QMPClient

    async def connect(path: Path, name: str) -> QMPClient:
        c = QMPClient(name)
        await asyncio.wait_for(c.connect(str(path)), 30)
        return c

    async def call(c: QMPClient, cmd: str, args: dict[str, Any] | None = None) -> Any:
        print(f"{c.name} <- {cmd} {json.dumps(args) if args else ''}")
        ret = await asyncio.wait_for(c.execute(cmd, args), 60)
        print(f"{c.name} -> {json.dumps(ret)}")
        return ret

    s = await connect(pair.src_qmp, "src")
    d = await connect(pair.dst_qmp, "dst")
    caps = {"capabilities": [{"capability": "events", "state": True}]}
    try:
        await call(d, "migrate-set-capabilities", caps)
        await call(s, "migrate-set-capabilities", caps)
        await call(d, "migrate-incoming", {"uri": pair.mig_uri})
        await call(s, "migrate", {"uri": pair.mig_uri})
        deadline = time.monotonic() + 300
        while True:
            info = await asyncio.wait_for(s.execute("query-migrate"), 60)
            if info.get("status") in ("completed", "failed", "cancelled"):
                break
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        print(f"src -> query-migrate {json.dumps(info, indent=2)}")
        await asyncio.sleep(0.5)
        for c in (s, d):
            for ev in c.events.history:
                data = ev.get("data")
                print(
                    f"{c.name} event {ev['event']} {json.dumps(data) if data else ''}"
                )
        await call(d, "query-status")
        return bool(info.get("status") == "completed")
    finally:
        for c in (s, d):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(c.execute("quit"), 10)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(c.disconnect(), 10)


def main(argv: list[str] | None = None) -> int:
    doc = __doc__ or ""
    ap = argparse.ArgumentParser(
        description=doc.split("\n\n")[0],
        epilog=doc.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--vfs", type=int, default=4, help="VFs per VM (default 4)")
    ap.add_argument("--profile", default="fixed50", help="device profile (fixed50)")
    ap.add_argument(
        "--mode", default="workers", choices=["serial", "threads", "workers"]
    )
    ap.add_argument(
        "--migration-events", action="store_true", help="VFIO_MIGRATION events"
    )
    ap.add_argument(
        "--prepare-events",
        action="store_true",
        help="__org.mpvfio_VFIO_MIGRATION_PREPARE events (seed 003)",
    )
    ap.add_argument(
        "--netns",
        action="store_true",
        help="run each VM in its own network namespace (root); migrate over TCP",
    )
    ap.add_argument(
        "--demo",
        action="store_true",
        help="drive one migration with qemu.qmp, print the events, stop",
    )
    args = ap.parse_args(argv)
    if args.netns and (os.geteuid() != 0 or shutil.which("ip") is None):
        print(
            "launch_qmp_pair: --netns needs root and iproute2 ('ip')",
            file=sys.stderr,
        )
        return 2
    pair = Pair(args)
    stop = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    old = {
        sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)
    }
    status = 0
    try:
        if args.netns:
            pair.make_netns()
        pair.start()
        pair.wait_ready()
        if args.demo:
            ok = asyncio.run(demo(pair))
            status = 0 if ok else 1
        else:
            print(pair.instructions(), flush=True)
            while not stop and all(p.poll() is None for p in pair.procs.values()):
                time.sleep(0.2)
            print("\nstopping both VMs ...", flush=True)
    except Exception as exc:  # noqa: BLE001 - a tool: report, then clean up
        print(f"launch_qmp_pair: {exc}", file=sys.stderr)
        status = 1
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        worst = pair.stop()
        pair.close()
    return status or worst


if __name__ == "__main__":
    raise SystemExit(main())
