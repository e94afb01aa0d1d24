#!/usr/bin/env python3
"""Measure how late QMP events reach a client: event decision -> receipt.

Starts ``mpvfio run --event-mono-ns`` (every event then carries
``__org.mpvfio_mono-ns``, the ``CLOCK_MONOTONIC`` time at which the event
happened: for a VFIO_MIGRATION event, when the device's worker decided the
transition), connects one raw QMP client over the UNIX socket, and runs
ROUNDS of ``stop`` + ``cont``.  For every event the client reads
``time.monotonic_ns()`` as soon as the event's line arrives; the latency is
receipt - mono-ns (one host, one clock: comparable across processes).

It prints p50 / p90 / p99 / max per event kind and device state, and
overall.  The latency includes everything between the worker and the
client: the worker -> parent event pipe, the Machine's delivery to its
EventBus (today at the P2P interlock and at the joins: batched), the QMP
server's hand-off into its event loop, and the socket.

Usage::

    tools/qmp_event_latency.py [--vfs 4] [--profile fixed50] [--mode workers]
                               [--rounds 50] [--json]

Exit status 0, or 1 if the server could not be driven.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MONO = "__org.mpvfio_mono-ns"
RUN_ARGV = [sys.executable, "-m", "mpvfio", "run"]


def pct(values: list[float], p: float) -> float:
    """The p-th percentile (nearest rank) of ``values``."""
    s = sorted(values)
    k = max(0, min(len(s) - 1, round(p / 100 * len(s) + 0.5) - 1))
    return s[k]


class RawClient:
    """A minimal QMP client that timestamps every line on arrival."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer
        self.events: list[tuple[int, dict[str, Any]]] = []
        self._id = 0

    @classmethod
    async def connect(cls, path: str, timeout: float) -> RawClient:
        deadline = time.monotonic() + timeout
        while True:
            try:
                r, w = await asyncio.wait_for(
                    asyncio.open_unix_connection(path, limit=1 << 24), 5
                )
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05)
        c = cls(r, w)
        greeting = await c._read()
        if "QMP" not in greeting:
            raise RuntimeError(f"not a QMP greeting: {greeting}")
        await c.execute("qmp_capabilities")
        return c

    async def _read(self) -> dict[str, Any]:
        line = await asyncio.wait_for(self.reader.readline(), 60)
        now = time.monotonic_ns()
        if not line:
            raise EOFError("server closed the connection")
        msg: dict[str, Any] = json.loads(line)
        if "event" in msg:
            self.events.append((now, msg))
        return msg

    async def execute(self, cmd: str, args: dict[str, Any] | None = None) -> Any:
        self._id += 1
        req: dict[str, Any] = {"execute": cmd, "id": self._id}
        if args:
            req["arguments"] = args
        self.writer.write(json.dumps(req).encode())
        await self.writer.drain()
        while True:
            msg = await self._read()
            if msg.get("id") == self._id:
                if "error" in msg:
                    raise RuntimeError(f"{cmd}: {msg['error']}")
                return msg["return"]

    async def settle(self, seconds: float) -> None:
        """Read events for ``seconds`` more (those that follow a reply)."""
        end = time.monotonic() + seconds
        with contextlib.suppress(asyncio.TimeoutError):
            while (left := end - time.monotonic()) > 0:
                await asyncio.wait_for(self._read(), left)


async def measure(path: str, rounds: int) -> list[tuple[int, dict[str, Any]]]:
    c = await RawClient.connect(path, 60)
    try:
        for _ in range(rounds):
            await c.execute("stop")
            await c.execute("cont")
        await c.settle(0.5)
        await c.execute("quit")
        with contextlib.suppress(EOFError, asyncio.TimeoutError):
            while True:
                await c._read()
    finally:
        c.writer.close()
    return c.events


def report(events: list[tuple[int, dict[str, Any]]]) -> dict[str, Any]:
    groups: dict[str, list[float]] = defaultdict(list)
    for recv, msg in events:
        if MONO not in msg:
            continue
        ms = (recv - int(msg[MONO])) / 1e6
        name = msg["event"]
        key = name
        if name == "VFIO_MIGRATION":
            key = f"VFIO_MIGRATION {msg['data']['device-state']}"
        groups[key].append(ms)
        if name.startswith("VFIO_MIGRATION"):
            groups["all VFIO_MIGRATION"].append(ms)
        groups["all events"].append(ms)
    out = {}
    for key in sorted(groups):
        v = groups[key]
        out[key] = {
            "n": len(v),
            "p50_ms": round(pct(v, 50), 3),
            "p90_ms": round(pct(v, 90), 3),
            "p99_ms": round(pct(v, 99), 3),
            "max_ms": round(max(v), 3),
            "mean_ms": round(statistics.fmean(v), 3),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vfs", type=int, default=4)
    ap.add_argument("--profile", default="fixed50")
    ap.add_argument("--mode", default="workers")
    ap.add_argument("--rounds", type=int, default=50)
    ap.add_argument(
        "--jitter-ms",
        type=float,
        default=0.0,
        help="add 0..J ms of random latency to every arc, so devices finish "
        "a phase at different times (shows batching in the delivery)",
    )
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    tmp = tempfile.mkdtemp(prefix="mpvfio-lat-", dir="/tmp")
    sock = os.path.join(tmp, "qmp.sock")
    profile = args.profile
    if args.jitter_ms:
        profile = os.path.join(tmp, "profile.json")
        with open(profile, "w") as f:
            json.dump(
                {"name": "jittered", "base": args.profile, "jitter_ms": args.jitter_ms},
                f,
            )
    cmd = [
        *RUN_ARGV,
        "--vfs", str(args.vfs),
        "--profile", profile,
        "--mode", args.mode,
        "--qmp", f"unix:{sock}",
        "--migration-events",
        "--event-mono-ns",
    ]  # fmt: skip
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(ROOT), env.get("PYTHONPATH")])
    )
    proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL)
    try:
        events = asyncio.run(measure(sock, args.rounds))
        proc.wait(60)
    except Exception as exc:  # noqa: BLE001 - a tool: say what failed
        print(f"qmp_event_latency: {exc!r}", file=sys.stderr)
        return 1
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    table = report(events)
    if args.json:
        print(json.dumps({"config": vars(args), "latency": table}, indent=2))
        return 0
    print(
        f"QMP event latency (event mono-ns -> client receipt), {args.vfs} VFs, "
        f"profile {args.profile} + jitter {args.jitter_ms:g} ms, mode {args.mode}, "
        f"{args.rounds} stop+cont rounds"
    )
    print(f"  {'event':<36}{'n':>6}{'p50':>9}{'p90':>9}{'p99':>9}{'max':>9}  (ms)")
    for key, row in table.items():
        print(
            f"  {key:<36}{row['n']:>6}{row['p50_ms']:>9.3f}{row['p90_ms']:>9.3f}"
            f"{row['p99_ms']:>9.3f}{row['max_ms']:>9.3f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
