"""``mpvfio run`` and its QMP server, driven by the reference client qemu.qmp.

Every test starts ``mpvfio run`` processes (``python -m mpvfio run`` once the
cli has it, else :func:`mpvfio.qmp.run.main`), talks QMP to them over UNIX
sockets (or TCP) with ``qemu.qmp.QMPClient`` or a raw socket, and stops them
with ``quit`` or SIGTERM; a process still running at teardown is killed.
pytest-asyncio is not used: each test runs its coroutine with
``asyncio.run``, and every wait is bounded with ``asyncio.wait_for``
(qemu.qmp has no timeouts of its own, ../shared/spec/QMP.md §10.12).

The main test migrates between two ``mpvfio run`` processes purely over
QMP and checks the event order rules of ../shared/spec/QEMU.md §13/§14 on
both sides.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from _helpers import ROOT, child_env

from mpvfio.qmp.message import JSONStreamParser, Malformed, Parsed, encode

qmp = pytest.importorskip(
    "qemu.qmp", reason="the QMP tests need qemu.qmp (pip install qemu.qmp)"
)
from qemu.qmp import ExecuteError, QMPClient  # noqa: E402

RUN_MAIN = "import sys; from mpvfio.qmp.run import main; sys.exit(main(sys.argv[1:]))"
PREPARE_EVENT = "__org.mpvfio_VFIO_MIGRATION_PREPARE"
QUERY_DEVICES = "__org.mpvfio_query-vfio-devices"
EVENTS_ON = {"capabilities": [{"capability": "events", "state": True}]}
T = TypeVar("T")


def _run_argv() -> list[str]:
    """``python -m mpvfio run`` once the cli registers it, else run.main."""
    from mpvfio.cli import main as cli

    for action in cli.build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction) and "run" in action.choices:
            return [sys.executable, "-m", "mpvfio", "run"]
    return [sys.executable, "-c", RUN_MAIN]


# ---------------------------------------------------------------- processes
@dataclass
class VMProc:
    """One ``mpvfio run`` process."""

    name: str
    proc: subprocess.Popen[bytes]
    qmp: str  # the unix socket path ("" for tcp only)
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait(self, timeout: float = 60.0) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"{self.name} did not exit within {timeout} s:\n{self.output()}"
            ) from None


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A short private directory under /tmp (UNIX socket paths are short)."""
    path = Path(tempfile.mkdtemp(prefix="mpvfio-qmp-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def spawn(workdir: Path) -> Iterator[Callable[..., VMProc]]:
    """Start ``mpvfio run`` processes; SIGTERM (then kill) the survivors."""
    started: list[VMProc] = []
    env = child_env(PYTHONUNBUFFERED="1")
    argv = _run_argv()

    def start(
        name: str,
        *args: str,
        vfs: int = 2,
        profile: str = "instant",
        qmp_addr: str | None = None,
    ) -> VMProc:
        path = str(workdir / f"{name}.qmp")
        addr = qmp_addr or f"unix:{path}"
        log = workdir / f"{name}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [
                    *argv,
                    "--vfs",
                    str(vfs),
                    "--profile",
                    profile,
                    "--qmp",
                    addr,
                    "--name",
                    name,
                    *args,
                ],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                env=env,
            )
        vm = VMProc(name, proc, addr[5:] if addr.startswith("unix:") else "", log)
        started.append(vm)
        return vm

    try:
        yield start
    finally:
        for vm in started:
            if vm.proc.poll() is None:
                vm.proc.send_signal(signal.SIGTERM)
        for vm in started:
            try:
                vm.proc.wait(30)
            except subprocess.TimeoutExpired:
                vm.proc.kill()
                vm.proc.wait(10)


def _arun(coro: Awaitable[T], timeout: float = 120.0) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())


# ------------------------------------------------------------ qemu.qmp glue
async def connect(
    addr: str | tuple[str, int], timeout: float = 60.0, name: str = "test"
) -> QMPClient:
    """Connect and negotiate, retrying until the server listens."""
    deadline = time.monotonic() + timeout
    while True:
        client = QMPClient(name)
        try:
            await asyncio.wait_for(client.connect(addr), 15)
            return client
        except Exception:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.disconnect(), 5)
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


async def call(client: QMPClient, cmd: str, args: dict[str, Any] | None = None) -> Any:
    return await asyncio.wait_for(client.execute(cmd, args), 60)


async def close(client: QMPClient) -> None:
    """Disconnect; after ``quit`` the server hangs up first (EOFError)."""
    with contextlib.suppress(Exception):
        await asyncio.wait_for(client.disconnect(), 10)


async def quit_vm(client: QMPClient) -> None:
    await call(client, "quit")
    await close(client)


async def wait_history(
    client: QMPClient,
    cond: Callable[[list[dict[str, Any]]], bool],
    timeout: float = 30.0,
) -> list[dict[str, Any]]:
    """Wait until the client's event history satisfies ``cond``; return it
    (events as dicts, oldest first)."""
    deadline = time.monotonic() + timeout
    while True:
        history = [dict(m) for m in client.events.history]
        if cond(history):
            return history
        if time.monotonic() > deadline:
            names = [_label(e) for e in history]
            raise AssertionError(f"event not seen within {timeout} s; got {names}")
        await asyncio.sleep(0.02)


async def wait_event(
    client: QMPClient,
    pred: Callable[[dict[str, Any]], bool],
    timeout: float = 30.0,
) -> list[dict[str, Any]]:
    """Wait until some event in the client's history satisfies ``pred``."""
    return await wait_history(client, lambda h: any(pred(e) for e in h), timeout)


def _label(ev: dict[str, Any]) -> str:
    data = ev.get("data") or {}
    extra = data.get("device-state") or data.get("status") or ""
    dev = data.get("device-id", "")
    return " ".join(x for x in (ev["event"], dev, extra) if x)


def _is(name: str, **data: str) -> Callable[[dict[str, Any]], bool]:
    def pred(ev: dict[str, Any]) -> bool:
        d = ev.get("data") or {}
        return ev["event"] == name and all(d.get(k) == v for k, v in data.items())

    return pred


async def wait_migration(
    client: QMPClient, timeout: float = 60.0, until: tuple[str, ...] = ()
) -> dict[str, Any]:
    """Poll query-migrate until a final status (or one of ``until``)."""
    final = ("completed", "failed", "cancelled", *until)
    deadline = time.monotonic() + timeout
    while True:
        info: dict[str, Any] = await call(client, "query-migrate")
        if info.get("status") in final:
            return info
        if time.monotonic() > deadline:
            raise AssertionError(f"migration still {info} after {timeout} s")
        await asyncio.sleep(0.05)


async def wait_status(client: QMPClient, status: str, timeout: float = 30.0) -> None:
    """Poll query-status until the run state is ``status``."""
    deadline = time.monotonic() + timeout
    while (await call(client, "query-status"))["status"] != status:
        assert time.monotonic() < deadline, f"never {status}"
        await asyncio.sleep(0.02)


# --------------------------------------------------------- raw QMP sessions
class Raw:
    """A raw QMP socket: send bytes, read CRLF-terminated JSON lines."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.buf = b""
        try:
            self.sock.settimeout(30)
            self.sock.connect(path)
            self.greeting = self.read()
        except BaseException:
            self.sock.close()  # _raw retries until the server listens
            raise

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read(self, timeout: float = 30.0) -> dict[str, Any]:
        self.sock.settimeout(timeout)
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("server closed the connection")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        assert line.endswith(b"\r"), f"not CRLF-terminated: {line!r}"
        msg: dict[str, Any] = json.loads(line)
        return msg

    def reply(self, timeout: float = 30.0) -> dict[str, Any]:
        """The next message that is not an event."""
        while True:
            msg = self.read(timeout)
            if "event" not in msg:
                return msg

    def nothing_within(self, seconds: float) -> bool:
        try:
            self.read(seconds)
        except TimeoutError:
            return True
        return False

    def close(self) -> None:
        self.sock.close()


def _raw(path: str, timeout: float = 60.0, negotiate: bool = True) -> Raw:
    deadline = time.monotonic() + timeout
    while True:
        try:
            r = Raw(path)
            break
        except (FileNotFoundError, ConnectionRefusedError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    if negotiate:
        r.send(b'{"execute": "qmp_capabilities"}')
        assert r.reply() == {"return": {}}
    return r


# ===================================================== message framing (unit)
def test_stream_parser_splits_back_to_back_and_partial_messages() -> None:
    p = JSONStreamParser(max_size=64, max_depth=4)
    assert p.feed(b'{"execute":"a"}{"execute":"b","id":1}\r\n {"ex') == [
        Parsed({"execute": "a"}),
        Parsed({"execute": "b", "id": 1}),
    ]
    assert p.pending
    assert p.feed(b'ecute": "c\\"}", "id": {"a": [1, "}"]}}') == [
        Parsed({"execute": 'c"}', "id": {"a": [1, "}"]}})
    ]
    assert p.feed(b"42 ") == [Parsed(42)]
    # oversize and too deep: one error each, then the next message parses
    items = p.feed(b'{"a": "' + b"x" * 100 + b'"}{"ok": 1}[[[[[1]]]]]{"ok": 2}')
    assert [type(i) for i in items] == [Malformed, Parsed, Malformed, Parsed]
    assert "size limit" in items[0].desc and "nesting" in items[2].desc
    # a control byte resets a partial message
    items = p.feed(b'{"a": 1\xff{"ok": 3}')
    assert items == [Malformed("JSON parse error, stray '\\xff'"), Parsed({"ok": 3})]
    bad = p.feed(b'{"a": 1, "a": 2}{"b": NaN}{"c": "\xc3\x28"}{"d": tru}}')
    assert all(isinstance(i, Malformed) for i in bad) and len(bad) == 5
    assert p.pending == 0


def test_stream_parser_byte_by_byte() -> None:
    p = JSONStreamParser()
    blob = b'{"execute": "x", "arguments": {"k": [1, "}\\\\", {}]}, "id": "\\u00e9"}'
    items = [i for b in blob for i in p.feed(bytes([b]))]
    assert items == [Parsed(json.loads(blob))]


def test_encode_is_one_crlf_ascii_line() -> None:
    out = encode({"event": "X", "data": {"s": "é\n"}})
    assert out.endswith(b"\r\n") and out.count(b"\n") == 1
    assert out.isascii()


# ===================================================== one VM, qemu.qmp client
def test_session_commands_and_stop_resume_events(
    spawn: Callable[..., VMProc],
) -> None:
    vm = spawn("vm", "--migration-events", vfs=3, profile="fixed50")

    async def main() -> None:
        c = await connect(vm.qmp)
        ver = await call(c, "query-version")
        assert set(ver["qemu"]) == {"major", "minor", "micro"}
        assert ver["package"].startswith("mpvfio")
        assert await call(c, "query-status") == {"status": "running", "running": True}
        assert await call(c, "query-name") == {"name": "vm"}
        names = {x["name"] for x in await call(c, "query-commands")}
        assert {
            "qmp_capabilities", "query-status", "stop", "cont", "migrate",
            "migrate-incoming", "migrate_cancel", "query-migrate",
            "migrate-set-capabilities", QUERY_DEVICES, "quit",
        } <= names  # fmt: skip
        devs = await call(c, QUERY_DEVICES)
        assert [d["name"] for d in devs] == ["vf0", "vf1", "vf2"]
        for d in devs:
            assert d["device-state"] == "running"
            assert d["qom-path"] == f"/machine/peripheral/{d['name']}"
            assert set(d["flags"]) == {"stop-copy", "p2p", "pre-copy"}
            assert d["backend"] == "emulated" and d["mode"] == "workers"

        await call(c, "stop")
        hist = await wait_event(c, _is("STOP"))
        assert await call(c, "query-status") == {"status": "paused", "running": False}
        vfio = [e["data"] for e in hist if e["event"] == "VFIO_MIGRATION"]
        assert set(vfio[0]) == {"device-id", "qom-path", "device-state"}
        states = [d["device-state"] for d in vfio]
        assert states.count("running-p2p") == 3 and states.count("stop") == 3
        assert max(i for i, s in enumerate(states) if s == "running-p2p") < min(
            i for i, s in enumerate(states) if s == "stop"
        ), "a device stopped before every device reached RUNNING_P2P (O1)"
        assert hist[-1]["event"] == "STOP", "STOP comes after the devices stopped"
        ts = hist[-1]["timestamp"]
        assert isinstance(ts["seconds"], int) and 0 <= ts["microseconds"] < 10**6
        assert abs(ts["seconds"] - time.time()) < 60
        assert all(d["device-state"] == "stop" for d in await call(c, QUERY_DEVICES))

        await call(c, "stop")  # already stopped: succeeds, no event
        n = len(c.events.history)
        await call(c, "cont")
        hist = await wait_history(
            c, lambda h: sum(e["event"] == "VFIO_MIGRATION" for e in h[n:]) >= 6
        )
        new = hist[n:]
        assert new[0]["event"] == "RESUME" and "data" not in new[0]
        assert sum(e["event"] == "STOP" for e in new) == 0
        assert await call(c, "query-status") == {"status": "running", "running": True}
        await call(c, "cont")  # already running: succeeds
        await quit_vm(c)

    _arun(main())
    assert vm.wait() == 0, vm.output()
    assert not os.path.exists(vm.qmp), "the QMP socket file was left behind"


def _device_state_pred(state: str) -> Callable[[dict[str, Any]], bool]:
    return lambda e: (
        e["event"] == "VFIO_MIGRATION" and e["data"]["device-state"] == state
    )


def test_quit_shutdown_event_and_sigterm(spawn: Callable[..., VMProc]) -> None:
    a = spawn("a")
    b = spawn("b")

    async def main() -> None:
        ca = await connect(a.qmp)
        cb = await connect(b.qmp)
        await call(ca, "quit")
        await wait_event(ca, _is("SHUTDOWN", reason="host-qmp-quit"))
        await close(ca)
        await call(cb, "query-status")
        b.proc.send_signal(signal.SIGTERM)
        hist = await wait_event(cb, _is("SHUTDOWN", reason="host-signal"))
        assert hist[-1]["data"]["guest"] is False
        await close(cb)

    _arun(main())
    for vm in (a, b):
        assert vm.wait() == 0, vm.output()
        assert not os.path.exists(vm.qmp)


# ============================================================ wire protocol
def test_raw_framing_negotiation_and_id_echo(spawn: Callable[..., VMProc]) -> None:
    vm = spawn("vm", "--migration-events")

    async def other_client_stops() -> None:
        c = await connect(vm.qmp)
        await call(c, "stop")
        await call(c, "cont")
        await close(c)

    r = _raw(vm.qmp, negotiate=False)
    try:
        g = r.greeting["QMP"]
        assert g["capabilities"] == [], "oob must not be offered"
        assert set(g["version"]["qemu"]) == {"major", "minor", "micro"}
        # negotiation mode: every other command is CommandNotFound, id echoed
        r.send(b'{"execute": "query-status", "id": 1}')
        assert r.reply() == {
            "error": {
                "class": "CommandNotFound",
                "desc": "Expecting capabilities negotiation with 'qmp_capabilities'",
            },
            "id": 1,
        }
        # no events reach a session still negotiating
        _arun(other_client_stops())
        assert r.nothing_within(0.5), "an event reached a negotiating session"
        # back to back, no separator, no newline: two replies
        r.send(b'{"execute":"qmp_capabilities"}{"execute":"query-status","id":7}')
        assert r.reply() == {"return": {}}
        rep = r.reply()
        assert rep["id"] == 7 and rep["return"]["status"] == "running"
        # one request split over several writes, whitespace between requests
        r.send(b'\r\n  {"execute": "query-st')
        time.sleep(0.1)
        r.send(b'atus", "id": "a"}\n\n{"execute": "query-name"}\r\n')
        assert r.reply()["id"] == "a"
        assert r.reply() == {"return": {"name": "vm"}}  # no id: none echoed
        # ids are echoed as the same JSON value, whatever it is
        for rid in ({"a": [1, "}"]}, [1, 2], 3.5, None, True, "__qmp#00000"):
            req = {"execute": "query-status", "id": rid}
            r.send(json.dumps(req).encode())
            rep = r.reply()
            assert "id" in rep and rep["id"] == rid and type(rep["id"]) is type(rid)
        # a pretty-printed (multi-line) request is fine on input
        r.send(b'{\n  "execute": "query-name",\n  "id": 9\n}\n')
        assert r.reply() == {"return": {"name": "vm"}, "id": 9}
        # a second qmp_capabilities is refused
        r.send(b'{"execute": "qmp_capabilities", "id": 2}')
        rep = r.reply()
        assert rep["error"]["class"] == "CommandNotFound" and rep["id"] == 2
        assert "already complete" in rep["error"]["desc"]
        # events now flow to this session
        _arun(other_client_stops())
        seen = []
        while "RESUME" not in seen:
            seen.append(r.read(30)["event"])
        assert seen.index("STOP") < seen.index("RESUME")
    finally:
        r.close()


BAD_INPUT = [
    # (bytes sent, error class, desc (substring), id echoed or None)
    (b'{"execute": }', "GenericError", "JSON parse error", None),
    (b'{"execute": "stop", "a": 1, "a": 2}', "GenericError", "duplicate key", None),
    (b"[1, 2]", "GenericError", "QMP input must be a JSON object", None),
    (b"42 ", "GenericError", "QMP input must be a JSON object", None),
    (b"\xff", "GenericError", "JSON parse error", None),
    (b'{"id": 5}', "GenericError", "QMP input lacks member 'execute'", 5),
    (
        b'{"execute": 5, "id": "x"}',
        "GenericError",
        "QMP input member 'execute' must be a string",
        "x",
    ),
    (
        b'{"execute": "stop", "arguments": [], "id": 1}',
        "GenericError",
        "QMP input member 'arguments' must be an object",
        1,
    ),
    (
        b'{"execute": "stop", "foo": 1, "id": 2}',
        "GenericError",
        "QMP input member 'foo' is unexpected",
        2,
    ),
    (
        b'{"exec-oob": "stop", "id": 3}',
        "GenericError",
        "QMP input member 'exec-oob' is unexpected",
        3,
    ),
    (
        b'{"execute": "no-such-command", "id": 4}',
        "CommandNotFound",
        "The command no-such-command has not been found",
        4,
    ),
    (
        b'{"execute": "migrate", "arguments": {"uri": 5}, "id": 6}',
        "GenericError",
        "Invalid parameter type for 'uri', expected: string",
        6,
    ),
    (
        b'{"execute": "query-status", "arguments": {"x": 1}, "id": 7}',
        "GenericError",
        "Parameter 'x' is unexpected",
        7,
    ),
    (
        b'{"execute": "migrate-set-capabilities", "arguments": {}, "id": 8}',
        "GenericError",
        "Parameter 'capabilities' is missing",
        8,
    ),
    (
        b'{"execute": "migrate-set-capabilities", "arguments": {"capabilities":'
        b' [{"capability": "warp", "state": true}]}, "id": 9}',
        "GenericError",
        "does not accept value 'warp'",
        9,
    ),
    (
        b'{"execute": "migrate-set-capabilities", "arguments": {"capabilities":'
        b' [{"capability": "postcopy-ram", "state": true}]}, "id": 10}',
        "GenericError",
        "not supported",
        10,
    ),
    (b'{"execute": "migrate", "id": 11}', "GenericError", "'uri' or 'channels'", 11),
    (
        b'{"execute": "migrate-incoming", "arguments": {"uri": "unix:/x"}, "id": 12}',
        "GenericError",
        "'-incoming' was not specified",
        12,
    ),
    (b'{"execute": "qmp_capabilities", "id": 13}', "CommandNotFound", "complete", 13),
    (
        b'{"execute": "' + b"x" * (2 << 20) + b'"}',
        "GenericError",
        "size limit",
        None,
    ),
]


def test_bad_input_keeps_every_session_alive(spawn: Callable[..., VMProc]) -> None:
    vm = spawn("vm")

    async def main() -> None:
        other = await connect(vm.qmp)
        r = _raw(vm.qmp)
        try:
            for data, cls, desc, rid in BAD_INPUT:
                r.send(data)
                rep = r.reply()
                label = data[:60]
                assert set(rep) <= {"error", "id"}, (label, rep)
                assert rep["error"]["class"] == cls, (label, rep)
                assert desc in rep["error"]["desc"], (label, rep)
                if rid is None:
                    assert "id" not in rep, (label, rep)
                else:
                    assert rep["id"] == rid, (label, rep)
                # this session and the other client still work
                r.send(b'{"execute": "query-status", "id": "ok"}')
                assert r.reply()["id"] == "ok"
                st = await call(other, "query-status")
                assert st["status"] == "running"
            # the same errors through qemu.qmp: ExecuteError, session kept
            with pytest.raises(ExecuteError) as exc:
                await call(other, "no-such-command")
            assert exc.value.error_class == "CommandNotFound"
            with pytest.raises(ExecuteError) as exc:
                await call(other, "migrate", {"uri": 42})
            assert exc.value.error_class == "GenericError"
            assert "expected: string" in str(exc.value)
            with pytest.raises(ExecuteError) as exc:
                await call(other, "migrate", {"uri": "bogus:scheme"})
            assert exc.value.error_class == "GenericError"
            assert (await call(other, "query-status"))["running"] is True
            await quit_vm(other)
        finally:
            r.close()

    _arun(main())
    assert vm.wait() == 0, vm.output()


def test_tcp_address(spawn: Callable[..., VMProc]) -> None:
    vm = spawn("vm", qmp_addr="tcp:127.0.0.1:0")
    deadline = time.monotonic() + 60
    port = None
    while port is None:
        m = re.search(r"QMP listening on tcp:127\.0\.0\.1:(\d+)", vm.output())
        if m:
            port = int(m.group(1))
            break
        assert vm.proc.poll() is None, vm.output()
        assert time.monotonic() < deadline, vm.output()
        time.sleep(0.05)

    async def main() -> None:
        c = await connect(("127.0.0.1", port))
        assert (await call(c, "query-status"))["status"] == "running"
        await quit_vm(c)

    _arun(main())
    assert vm.wait() == 0, vm.output()


# ================================================================ sockets
def test_unix_socket_mode_live_refusal_and_stale_reuse(
    spawn: Callable[..., VMProc], workdir: Path
) -> None:
    a = spawn("a")
    _raw(a.qmp).close()  # a is serving
    st = os.lstat(a.qmp)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600

    # a second server on the same path refuses to start, a keeps serving
    b = spawn("b", qmp_addr=f"unix:{a.qmp}")
    assert b.wait() == 1, b.output()
    assert "live socket" in b.output(), b.output()
    assert os.path.exists(a.qmp)
    r = _raw(a.qmp)
    r.send(b'{"execute": "quit"}')
    assert r.reply() == {"return": {}}
    r.close()
    assert a.wait() == 0, a.output()
    assert not os.path.exists(a.qmp)

    # a stale socket file (its server is gone) is replaced
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(a.qmp)
    stale.close()
    c = spawn("c", qmp_addr=f"unix:{a.qmp}")
    r = _raw(c.qmp)
    r.send(b'{"execute": "quit"}')
    assert r.reply() == {"return": {}}
    r.close()
    assert c.wait() == 0, c.output()

    # anything that is not a socket is left alone
    plain = workdir / "plain.qmp"
    plain.write_text("keep me")
    d = spawn("d", qmp_addr=f"unix:{plain}")
    assert d.wait() == 1, d.output()
    assert plain.read_text() == "keep me"


# ============================================================== migration
def _order_checks_source(hist: list[dict[str, Any]], vfs: int) -> None:
    names = [_label(e) for e in hist]
    mig = [e["data"]["status"] for e in hist if e["event"] == "MIGRATION"]
    assert mig == ["setup", "active", "device", "completed"], names

    def idx(pred: Callable[[dict[str, Any]], bool]) -> list[int]:
        return [i for i, e in enumerate(hist) if pred(e)]

    active = idx(_is("MIGRATION", status="active"))[0]
    stop = idx(_is("STOP"))
    assert len(stop) == 1, names
    device = idx(_is("MIGRATION", status="device"))[0]
    completed = idx(_is("MIGRATION", status="completed"))[0]
    prepare = idx(_device_state_pred("pre-copy-p2p-prepare"))
    p2p = idx(_device_state_pred("pre-copy-p2p"))
    stop_copy = idx(_device_state_pred("stop-copy"))
    assert len(prepare) == len(p2p) == len(stop_copy) == vfs, names
    # save_setup (-> pre-copy) during setup, before active
    assert all(i < active for i in idx(_device_state_pred("pre-copy"))), names
    # the switchover after the migration went active
    assert active < min(prepare), names
    # P2P first (O1): every device in PRE_COPY_P2P before any STOP_COPY
    assert max(prepare + p2p) < min(stop_copy), names
    # per device: the 11.0 prepare state before its own pre-copy-p2p
    for dev in {hist[i]["data"]["device-id"] for i in p2p}:
        first_prep = min(i for i in prepare if hist[i]["data"]["device-id"] == dev)
        first_p2p = min(i for i in p2p if hist[i]["data"]["device-id"] == dev)
        assert first_prep < first_p2p, (dev, names)
    # STOP after every device reached its final stop state (O4), then device
    assert max(stop_copy) < stop[0] < device < completed, names
    # seed 003's opt-in event under its downstream name, before each arc
    for i in p2p + stop_copy:
        d = hist[i]["data"]
        before = [
            e
            for e in hist[:i]
            if e["event"] == PREPARE_EVENT
            and e["data"]["device-id"] == d["device-id"]
            and e["data"]["device-state"] == d["device-state"]
        ]
        assert before, (i, names)
    assert "VFIO_MIGRATION_PREPARE" not in {e["event"] for e in hist}


def _order_checks_target(hist: list[dict[str, Any]], vfs: int) -> None:
    names = [_label(e) for e in hist]
    mig = [e["data"]["status"] for e in hist if e["event"] == "MIGRATION"]
    assert mig == ["setup", "active", "completed"], names

    def idx(pred: Callable[[dict[str, Any]], bool]) -> list[int]:
        return [i for i, e in enumerate(hist) if pred(e)]

    resuming = idx(_device_state_pred("resuming"))
    p2p = idx(_device_state_pred("running-p2p"))
    running = idx(_device_state_pred("running"))
    resume = idx(_is("RESUME"))
    completed = idx(_is("MIGRATION", status="completed"))[0]
    assert len(resuming) == len(p2p) == len(running) == vfs, names
    assert len(resume) == 1, names
    assert idx(_is("MIGRATION", status="active"))[0] < min(resuming), names
    assert max(resuming) < resume[0] < min(p2p), names
    assert max(p2p) < min(running), "P2P first on start (O1)"
    assert max(running) < completed, "devices RUNNING before completed (O4)"
    assert "STOP" not in {e["event"] for e in hist}, names


@pytest.mark.parametrize("incoming", ["defer", "cli-uri"])
def test_migration_between_two_vms_over_qmp(
    spawn: Callable[..., VMProc], workdir: Path, incoming: str
) -> None:
    vfs = 3
    mig_uri = f"unix:{workdir / 'mig.sock'}"
    src = spawn(
        "src", "--migration-events", "--prepare-events", vfs=vfs, profile="fixed50"
    )
    dst = spawn(
        "dst",
        "--migration-events",
        "--incoming",
        "defer" if incoming == "defer" else mig_uri,
        vfs=vfs,
        profile="fixed50",
    )

    async def main() -> None:
        s = await connect(src.qmp, name="src")
        d = await connect(dst.qmp, name="dst")
        try:
            assert (await call(d, "query-status"))["status"] == "inmigrate"
            await call(s, "migrate-set-capabilities", EVENTS_ON)
            await call(d, "migrate-set-capabilities", EVENTS_ON)
            caps = await call(s, "query-migrate-capabilities")
            assert {"capability": "events", "state": True} in caps
            assert await call(s, "query-migrate") == {}
            if incoming == "defer":
                await call(d, "migrate-incoming", {"uri": mig_uri})
                with pytest.raises(ExecuteError) as exc:
                    await call(d, "migrate-incoming", {"uri": mig_uri})
                assert "already been started" in str(exc.value)
            await call(s, "migrate", {"uri": mig_uri})
            with pytest.raises(ExecuteError) as exc:
                await call(s, "migrate", {"uri": mig_uri})
            assert "in progress" in str(exc.value)

            info = await wait_migration(s)
            assert info["status"] == "completed", info
            assert isinstance(info["downtime"], int) and info["downtime"] >= 0
            assert info["total-time"] >= info["downtime"]
            assert info["vfio"]["transferred"] > 0
            assert info["ram"]["transferred"] >= info["vfio"]["transferred"]
            assert info["__org.mpvfio_switchover"]["checksums-equal"] is True
            dinfo = await wait_migration(d)
            assert dinfo["status"] == "completed", dinfo

            src_hist = await wait_event(s, _is("MIGRATION", status="completed"))
            dst_hist = await wait_event(d, _is("MIGRATION", status="completed"))
            if incoming == "defer":
                _order_checks_target(dst_hist, vfs)
            else:  # receiving began before the capability was set: no setup
                _order_checks_target(
                    [{"event": "MIGRATION", "data": {"status": "setup"}}, *dst_hist],
                    vfs,
                )
            _order_checks_source(src_hist, vfs)

            assert (await call(s, "query-status"))["status"] == "postmigrate"
            assert await call(d, "query-status") == {
                "status": "running",
                "running": True,
            }
            for dev in await call(d, QUERY_DEVICES):
                assert dev["device-state"] == "running" and dev["errors"] == 0
            for dev in await call(s, QUERY_DEVICES):
                assert dev["device-state"] == "stop" and dev["errors"] == 0
        finally:
            await quit_vm(s)
            await quit_vm(d)

    _arun(main(), timeout=180)
    for vm in (src, dst):
        assert vm.wait() == 0, vm.output()
        assert not os.path.exists(vm.qmp)
    assert not os.path.exists(workdir / "mig.sock")


def test_client_disconnecting_mid_command_does_not_disturb_the_vm(
    spawn: Callable[..., VMProc], workdir: Path
) -> None:
    mig_uri = f"unix:{workdir / 'mig.sock'}"
    src = spawn("src", "--migration-events", vfs=2, profile="fixed50")
    dst = spawn("dst", "--incoming", mig_uri, vfs=2, profile="fixed50")

    # a raw client sends `stop` and hangs up before the reply
    r = _raw(src.qmp)
    r.send(b'{"execute": "stop", "id": 1}')
    r.close()

    async def main() -> None:
        s = await connect(src.qmp, name="observer")
        await wait_status(s, "paused")
        await call(s, "cont")
        assert (await call(s, "query-status"))["running"] is True

        # another client starts the migration and vanishes at once
        r2 = _raw(src.qmp)
        req = {"execute": "migrate", "arguments": {"uri": mig_uri}, "id": 2}
        r2.send(json.dumps(req).encode())
        r2.close()
        info = await wait_migration(s)
        assert info["status"] == "completed", info
        d = await connect(dst.qmp, name="dst")
        assert (await call(d, "query-status"))["status"] == "running"
        assert (await call(s, "query-status"))["status"] == "postmigrate"
        await quit_vm(d)
        await quit_vm(s)

    _arun(main())
    for vm in (src, dst):
        assert vm.wait() == 0, vm.output()


def test_migrate_cancel_and_failed_incoming_exit(
    spawn: Callable[..., VMProc], workdir: Path
) -> None:
    nobody = f"unix:{workdir / 'nobody.sock'}"  # no target listens here
    src = spawn("src", "--migration-events", vfs=2)
    dst = spawn("dst", "--incoming", "defer", vfs=1)  # wrong device set

    async def main() -> None:
        s = await connect(src.qmp, name="src")
        await call(s, "migrate-set-capabilities", EVENTS_ON)
        await call(s, "migrate", {"uri": nobody})
        info = await call(s, "query-migrate")
        assert info["status"] in ("setup", "cancelling", "failed"), info
        await call(s, "migrate_cancel")
        info = await wait_migration(s)
        assert info["status"] == "cancelled", info
        assert "error-desc" in info
        hist = await wait_event(s, _is("MIGRATION", status="cancelled"))
        mig = [e["data"]["status"] for e in hist if e["event"] == "MIGRATION"]
        assert mig == ["setup", "cancelling", "cancelled"], mig
        assert (await call(s, "query-status"))["running"] is True
        for dev in await call(s, QUERY_DEVICES):
            assert dev["device-state"] == "running"
        await call(s, "migrate_cancel")  # nothing to cancel: fine

        # the target expects one VF, the source sends two: the incoming
        # migration fails and the target exits 1 (exit-on-error)
        d = await connect(dst.qmp, name="dst")
        uri = f"unix:{workdir / 'mig.sock'}"
        await call(d, "migrate-incoming", {"uri": uri})
        await call(s, "migrate", {"uri": uri})
        info = await wait_migration(s)
        assert info["status"] == "failed", info
        await close(d)
        assert (await call(s, "query-status"))["running"] is True
        await quit_vm(s)

    _arun(main())
    assert src.wait() == 0, src.output()
    assert dst.wait() == 1, dst.output()
    assert not os.path.exists(dst.qmp)


def test_multifd_migration_into_a_paused_target(
    spawn: Callable[..., VMProc], workdir: Path
) -> None:
    mig_uri = f"unix:{workdir / 'mig.sock'}"
    src = spawn("src", "--migration-events", vfs=2, profile="fixed50")
    dst = spawn("dst", "--incoming", "defer", "-S", vfs=2, profile="fixed50")
    caps = {
        "capabilities": [
            {"capability": "events", "state": True},
            {"capability": "multifd", "state": True},
        ]
    }

    async def main() -> None:
        s = await connect(src.qmp, name="src")
        d = await connect(dst.qmp, name="dst")
        for c in (s, d):
            await call(c, "migrate-set-capabilities", caps)
            await call(c, "migrate-set-parameters", {"multifd-channels": 2})
            params = await call(c, "query-migrate-parameters")
            assert params["multifd-channels"] == 2
        await call(d, "migrate-incoming", {"uri": mig_uri})
        await call(s, "migrate", {"uri": mig_uri})
        info = await wait_migration(s)
        assert info["status"] == "completed", info
        assert info["__org.mpvfio_switchover"]["multifd-channels"] == 2
        # a paused target checks its devices' data when it starts
        assert info["__org.mpvfio_switchover"]["target-started"] is False
        assert "checksums-equal" not in info["__org.mpvfio_switchover"]
        await wait_migration(d)
        # -S with --incoming: the target never ran, it is paused (R9.6)
        assert (await call(d, "query-status"))["status"] == "paused"
        for dev in await call(d, QUERY_DEVICES):
            assert dev["device-state"] == "resuming"
        await call(d, "cont")
        await wait_event(d, _is("RESUME"))
        assert (await call(d, "query-status"))["status"] == "running"
        for dev in await call(d, QUERY_DEVICES):
            assert dev["device-state"] == "running" and dev["errors"] == 0
        names = {e["event"] for e in d.events.history}
        assert "STOP" not in names, names
        await quit_vm(s)
        await quit_vm(d)

    _arun(main())
    for vm in (src, dst):
        assert vm.wait() == 0, vm.output()


# ============================================= protocol in-process (no VM)
def test_protocol_slow_reader_dropped_bad_handler_and_abandoned_command(
    workdir: Path,
) -> None:
    from mpvfio.qmp.protocol import Arg, Command, QMPServer, qmp_listen

    finished: list[str] = []

    async def boom(args: dict[str, Any]) -> Any:
        raise RuntimeError("bug")

    async def slow(args: dict[str, Any]) -> Any:
        await asyncio.sleep(args["s"])
        finished.append("slow")
        return {"slept": args["s"]}

    commands = {
        c.name: c
        for c in (
            Command("boom", boom),
            Command("slow", slow, (Arg("s", "number"),)),
        )
    }
    version = {"qemu": {"major": 11, "minor": 0, "micro": 0}, "package": "test"}
    path = str(workdir / "p.qmp")

    async def raw_session() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        r, w = await asyncio.open_unix_connection(path, limit=1 << 20)
        assert "QMP" in json.loads(await r.readline())
        w.write(b'{"execute": "qmp_capabilities"}')
        assert json.loads(await r.readline()) == {"return": {}}
        return r, w

    async def main() -> None:
        server = QMPServer(commands, version, max_output=1 << 20)
        await server.serve(qmp_listen(f"unix:{path}"))
        try:
            c = await connect(path)
            with pytest.raises(ExecuteError) as exc:
                await call(c, "boom")
            assert exc.value.error_class == "GenericError"
            assert "internal error" in str(exc.value)
            assert (await call(c, "slow", {"s": 0}))["slept"] == 0

            await close(c)

            # a client that sends a command and hangs up: it still runs
            _, w1 = await raw_session()
            w1.write(b'{"execute": "slow", "arguments": {"s": 0.3}, "id": 1}')
            await w1.drain()
            w1.close()
            await asyncio.sleep(0.6)
            assert finished == ["slow", "slow"]

            # a negotiated client that never reads is dropped; others live on
            _, w2 = await raw_session()
            r3, w3 = await raw_session()
            replies: list[dict[str, Any]] = []

            async def drain_events() -> None:
                while line := await r3.readline():
                    msg = json.loads(line)
                    if "event" not in msg:
                        replies.append(msg)

            reader = asyncio.create_task(drain_events())
            assert server.negotiated_sessions == 2
            blob = {"event": "BIG", "data": {"x": "y" * 65536}}
            deadline = time.monotonic() + 30
            while server.negotiated_sessions > 1:
                assert time.monotonic() < deadline, "slow reader never dropped"
                for _ in range(4):
                    server.emit(blob)
                await asyncio.sleep(0.02)
            w3.write(b'{"execute": "slow", "arguments": {"s": 0}, "id": "x"}')
            while not replies:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)
            assert replies == [{"return": {"slept": 0}, "id": "x"}]
            reader.cancel()
            w2.close()
            w3.close()
        finally:
            await server.aclose()
        assert not os.path.exists(path)

    _arun(main(), timeout=60)
