"""Migration transport across two network namespaces joined by a veth pair.

The :func:`netns_pair` fixture builds::

    netns mpvfio-a-<pid>                      netns mpvfio-b-<pid>
      mpva<pid> 10.231.0.1/24  <== veth ==>   mpvb<pid> 10.231.0.2/24

Everything (namespaces, both veth ends, addresses) lives only inside the two
namespaces the fixture creates; deleting them at teardown removes it all,
even when the test fails.  Without iproute2 or without the privilege to
create namespaces (root / CAP_SYS_ADMIN + CAP_NET_ADMIN) the tests skip.

The fixture is meant to be reused (a 4-VF migration test will run a source
in namespace A and a target in namespace B); it may move to conftest.py.
"""

from __future__ import annotations

import os
import selectors
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
IP_TIMEOUT = 15.0  # seconds for one `ip` command


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", *args],
        capture_output=True,
        text=True,
        timeout=IP_TIMEOUT,
        check=False,
    )


def _ip_ok(*args: str) -> None:
    res = _ip(*args)
    if res.returncode != 0:
        raise RuntimeError(f"`ip {' '.join(args)}` failed: {res.stderr.strip()}")


@dataclass
class NetnsPair:
    """Two namespaces joined by a veth pair; run commands inside them."""

    ns_a: str
    ns_b: str
    dev_a: str
    dev_b: str
    addr_a: str = "10.231.0.1"
    addr_b: str = "10.231.0.2"
    prefix: int = 24
    procs: list[subprocess.Popen[str]] = field(default_factory=list)

    def argv(self, ns: str, *cmd: str) -> list[str]:
        """``ip netns exec NS CMD...``"""
        return ["ip", "netns", "exec", ns, *cmd]

    def env(self) -> dict[str, str]:
        """The environment for children: this checkout's mpvfio first."""
        env = dict(os.environ)
        path = env.get("PYTHONPATH")
        env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{path}" if path else str(ROOT)
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def python(self, ns: str, code: str, *args: str) -> subprocess.Popen[str]:
        """Start ``python -c CODE ARGS...`` inside ``ns`` (reaped at teardown)."""
        proc = subprocess.Popen(
            self.argv(ns, sys.executable, "-c", textwrap.dedent(code), *args),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env=self.env(),
        )
        self.procs.append(proc)
        return proc

    def reap(self, timeout: float = 5.0) -> None:
        """Kill and wait for every child still running (idempotent)."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            try:
                proc.communicate(timeout=timeout)
            except (subprocess.TimeoutExpired, ValueError):
                pass
        self.procs.clear()


def _destroy(names: list[str]) -> list[str]:
    """Delete the namespaces (their veth ends go with them); return failures."""
    failed = []
    for ns in reversed(names):
        res = _ip("netns", "del", ns)
        if res.returncode != 0 and ns in _ip("netns", "list").stdout.split():
            failed.append(f"{ns}: {res.stderr.strip()}")
    return failed


@pytest.fixture
def netns_pair() -> Iterator[NetnsPair]:
    """Two fresh network namespaces joined by a veth pair (10.231.0.0/24)."""
    if shutil.which("ip") is None:
        pytest.skip(
            "`ip` not found: install the iproute2 package "
            "(apt-get install iproute2) to run the netns tests"
        )
    pid = os.getpid()
    pair = NetnsPair(
        ns_a=f"mpvfio-a-{pid}",
        ns_b=f"mpvfio-b-{pid}",
        dev_a=f"mpva{pid}",  # <= 15 chars (IFNAMSIZ) for any Linux pid
        dev_b=f"mpvb{pid}",
    )
    created: list[str] = []
    try:
        for ns in (pair.ns_a, pair.ns_b):
            res = _ip("netns", "add", ns)
            if res.returncode != 0:
                reason = res.stderr.strip() or f"exit {res.returncode}"
                pytest.skip(
                    f"cannot create network namespace {ns} (needs root or "
                    f"CAP_SYS_ADMIN+CAP_NET_ADMIN): {reason}"
                )
            created.append(ns)
        a, b = pair.ns_a, pair.ns_b
        # Both veth ends are born inside the namespaces: none in the host's.
        _ip_ok(
            "-n", a, "link", "add", pair.dev_a, "type", "veth",
            "peer", "name", pair.dev_b, "netns", b,
        )  # fmt: skip
        ends = ((a, pair.dev_a, pair.addr_a), (b, pair.dev_b, pair.addr_b))
        for ns, dev, addr in ends:
            _ip_ok("-n", ns, "addr", "add", f"{addr}/{pair.prefix}", "dev", dev)
            _ip_ok("-n", ns, "link", "set", "lo", "up")
            _ip_ok("-n", ns, "link", "set", dev, "up")
        yield pair
    finally:
        pair.reap()
        failed = _destroy(created)
        assert not failed, f"could not delete network namespaces: {failed}"


ECHO_SERVER = """
    import sys, time
    from mpvfio.net.transport import (
        accept_channels, listen, recv_exact, sendall_deadline)

    with listen(sys.argv[1]) as lst:
        print(lst.uri, flush=True)
        with accept_channels(lst, int(sys.argv[2]), timeout=20) as chans:
            print("peer", chans.main.getpeername()[0], flush=True)
            for sock in chans:
                deadline = time.monotonic() + 20
                size = int.from_bytes(recv_exact(sock, 4, deadline), "big")
                sendall_deadline(sock, recv_exact(sock, size, deadline), deadline)
"""

ECHO_CLIENT = """
    import os, sys, time
    from mpvfio.net.transport import (
        new_session, open_channels, recv_exact, sendall_deadline)

    with open_channels(sys.argv[1], int(sys.argv[2]), new_session(), 10) as chans:
        print("local", chans.main.getsockname()[0], flush=True)
        payloads = []
        for i, sock in enumerate(chans):
            data = bytes([i]) * 16 + os.urandom(256 * 1024)
            payloads.append(data)
            deadline = time.monotonic() + 20
            sendall_deadline(sock, len(data).to_bytes(4, "big") + data, deadline)
        for sock, data in zip(chans, payloads):
            assert recv_exact(sock, len(data), time.monotonic() + 20) == data
        print("ok", len(payloads), flush=True)
"""


def _first_line(proc: subprocess.Popen[str], timeout: float) -> str:
    """The first stdout line of ``proc`` within ``timeout`` seconds."""
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            raise AssertionError(f"no output within {timeout} s")
    return proc.stdout.readline().strip()


@pytest.mark.timeout(120)
def test_netns_fixture_builds_the_link(netns_pair: NetnsPair) -> None:
    res = _ip("-n", netns_pair.ns_b, "-brief", "addr", "show", netns_pair.dev_b)
    assert res.returncode == 0, res.stderr
    assert f"{netns_pair.addr_b}/24" in res.stdout
    assert res.stdout.split()[1] == "UP", res.stdout
    host = _ip("-brief", "link", "show").stdout
    assert netns_pair.dev_a not in host and netns_pair.dev_b not in host


@pytest.mark.timeout(120)
def test_tcp_echo_between_namespaces(netns_pair: NetnsPair) -> None:
    n_extra = 2
    server = netns_pair.python(
        netns_pair.ns_b, ECHO_SERVER, f"tcp:{netns_pair.addr_b}:0", str(n_extra)
    )
    try:
        uri = _first_line(server, 30)
    except AssertionError:
        uri = ""
    if not uri.startswith(f"tcp:{netns_pair.addr_b}:"):
        server.kill()
        _, err = server.communicate(timeout=10)
        pytest.fail(f"echo server did not start (said {uri!r}): {err}")
    port = int(uri.rpartition(":")[2])
    assert port > 0

    client = netns_pair.python(netns_pair.ns_a, ECHO_CLIENT, uri, str(n_extra))
    t0 = time.monotonic()
    c_out, c_err = client.communicate(timeout=60)
    s_out, s_err = server.communicate(timeout=max(60 - (time.monotonic() - t0), 5))
    assert client.returncode == 0, f"client failed:\n{c_err}\nserver:\n{s_err}"
    assert server.returncode == 0, f"server failed:\n{s_err}"
    assert f"local {netns_pair.addr_a}" in c_out
    assert f"ok {n_extra + 1}" in c_out
    assert f"peer {netns_pair.addr_a}" in s_out


MPVFIO_CLI = """
    import sys
    from mpvfio.cli.main import main

    raise SystemExit(main(sys.argv[1:]))
"""


def _expected_source_checksums(vfs: int) -> dict[str, str]:
    """What the CLI source's VFs hold at the stop, computed independently.

    ``mpvfio migrate --to`` names its machine ``source``, so VF i's state is
    keyed ``source/vf<i>``; pre-copy reads its initial data, after which the
    emulated device dirties its state once (deterministically).
    """
    from mpvfio.devices.emulated import EmulatedDevice
    from mpvfio.devices.profiles import get_profile
    from mpvfio.uapi.vfio import MigState

    out = {}
    for i in range(vfs):
        dev = EmulatedDevice(f"vf{i}", get_profile("instant"), key=f"source/vf{i}")
        fd = dev.set_state(MigState.PRE_COPY)
        assert fd is not None
        try:
            while dev.read_data(fd, 1 << 20) is not None:
                pass
            out[f"vf{i}"] = dev.checksum()
        finally:
            dev.close()
            os.close(fd)
    return out


@pytest.mark.timeout(180)
def test_migrate_four_vfs_over_tcp_between_namespaces(netns_pair: NetnsPair) -> None:
    """``mpvfio incoming`` in namespace B, ``mpvfio migrate --to`` in A."""
    import json

    uri = f"tcp:{netns_pair.addr_b}:47000"
    common = ["--vfs", "4", "--profile", "instant", "--json"]
    target = netns_pair.python(
        netns_pair.ns_b, MPVFIO_CLI, "incoming", "--listen", uri, *common
    )
    # the source retries while the target is not listening yet
    source = netns_pair.python(
        netns_pair.ns_a, MPVFIO_CLI, "migrate", "--to", uri, *common
    )
    t0 = time.monotonic()
    s_out, s_err = source.communicate(timeout=120)
    t_out, t_err = target.communicate(timeout=max(120 - (time.monotonic() - t0), 10))
    assert source.returncode == 0, f"source failed:\n{s_err}\ntarget:\n{t_err}"
    assert target.returncode == 0, f"target failed:\n{t_err}\nsource:\n{s_err}"
    sdoc = json.loads(s_out)
    tdoc = json.loads(t_out)
    assert sdoc["checksums_equal"] is True
    [row] = sdoc["rows"]
    assert row["vfs"] == 4
    assert row["downtime_ms"] > 0 and row["downtime_ms"] >= row["stop_ms"]
    assert tdoc["status"] == "completed" and tdoc["started"] is True
    assert tdoc["received_bytes"] > 4 * 64 * 1024
    # the target holds exactly what the source's VFs held at the stop
    assert tdoc["checksums"] == _expected_source_checksums(4)
