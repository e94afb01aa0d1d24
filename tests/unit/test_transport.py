"""mpvfio.net.transport: URIs, listeners, connects, channel sessions."""

from __future__ import annotations

import contextlib
import errno
import os
import pickle
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from mpvfio.errors import MpvfioError, UsageError
from mpvfio.net.transport import (
    CHANNEL_MAGIC,
    PREAMBLE_SIZE,
    Cancel,
    Channels,
    PeerClosedError,
    TransportCancelled,
    TransportError,
    TransportTimeout,
    Uri,
    accept_channels,
    connect,
    listen,
    new_session,
    open_channels,
    pack_preamble,
    parse_uri,
    recv_exact,
    recv_into_exact,
    sendall_deadline,
    session_bytes,
    unpack_preamble,
)

HANG_GUARD = 2.0  # seconds: an upper bound only, to catch hangs


class Worker:
    """A thread that keeps its result or exception; always joined."""

    def __init__(self, fn: Callable[[], Any], delay: float = 0.0) -> None:
        self.result: Any = None
        self.error: BaseException | None = None
        self.fn = fn
        self.delay = delay
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        if self.delay:
            time.sleep(self.delay)
        try:
            self.result = self.fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised by join()
            self.error = exc

    def join(self, timeout: float = 10.0) -> Any:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "worker thread hung"
        if self.error is not None:
            raise self.error
        return self.result


@pytest.fixture
def sock_path(tmp_path: Path) -> Iterator[str]:
    """A short unix socket path (sun_path is only 108 bytes)."""
    path = tmp_path / "m.sock"
    yield str(path)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


def _deadline(seconds: float = 5.0) -> float:
    return time.monotonic() + seconds


# ----------------------------------------------------------------------- URIs


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("unix:/run/mig.sock", Uri("unix", path="/run/mig.sock")),
        ("unix:rel/mig.sock", Uri("unix", path="rel/mig.sock")),
        ("unix:a:b", Uri("unix", path="a:b")),
        ("tcp:127.0.0.1:4444", Uri("tcp", host="127.0.0.1", port=4444)),
        ("tcp:localhost:4444", Uri("tcp", host="localhost", port=4444)),
        ("tcp:dst-host.example.com:1", Uri("tcp", host="dst-host.example.com", port=1)),
        ("tcp:[::1]:4444", Uri("tcp", host="::1", port=4444)),
        ("tcp:[fe80::1%eth0]:80", Uri("tcp", host="fe80::1%eth0", port=80)),
        ("tcp:[::]:0", Uri("tcp", host="::", port=0)),
        ("tcp:0.0.0.0:65535", Uri("tcp", host="0.0.0.0", port=65535)),
        ("tcp::4444", Uri("tcp", host="", port=4444)),
    ],
)
def test_parse_uri_valid(text: str, expected: Uri) -> None:
    uri = parse_uri(text)
    assert uri == expected
    assert str(uri) == text
    assert parse_uri(uri) is uri


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", "missing scheme.*unix:PATH.*tcp:HOST:PORT"),
        ("/tmp/x.sock", "missing scheme"),
        ("rdma:1.2.3.4:5", "unknown scheme 'rdma'.*unix:PATH.*tcp:HOST:PORT"),
        ("exec:cat", "unknown scheme 'exec'"),
        ("unix:", "empty socket path"),
        ("unix:a\x00b", "NUL"),
        ("unix:/" + "x" * 200, "longer than 107 bytes"),
        ("tcp:127.0.0.1", "missing port"),
        ("tcp:127.0.0.1:", "missing port"),
        ("tcp:host:65536", "port 65536 out of range 0..65535"),
        ("tcp:host:99999999", "out of range"),
        ("tcp:host:-1", "not a decimal number"),
        ("tcp:host:http", "not a decimal number"),
        ("tcp:::1:4444", "IPv6 address must be in brackets"),
        ("tcp:fe80::1:4444", "IPv6 address must be in brackets"),
        ("tcp:[::1]", "missing port after"),
        ("tcp:[::1:4444", r"missing '\]'"),
        ("tcp:[::1]:", "missing port"),
        ("tcp:[1.2.3.4]:5", "not an IPv6 address"),
        ("tcp:[nonsense]:5", "not an IPv6 address"),
        ("tcp:bad host:5", "not a host name"),
        ("tcp:a/b:5", "not a host name"),
    ],
)
def test_parse_uri_errors(text: str, match: str) -> None:
    with pytest.raises(UsageError, match=match) as info:
        parse_uri(text)
    assert repr(text) in str(info.value)
    assert isinstance(info.value, ValueError)


def test_parse_uri_rejects_non_str() -> None:
    with pytest.raises(UsageError, match="must be a str"):
        parse_uri(b"unix:/x")  # type: ignore[arg-type]


# --------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "cls", [TransportError, TransportTimeout, TransportCancelled, PeerClosedError]
)
def test_errors_pickle_and_name_uri_and_errno(cls: type[TransportError]) -> None:
    exc = cls("cannot connect", "tcp:h:1", errno.ECONNREFUSED)
    assert isinstance(exc, MpvfioError)
    back = pickle.loads(pickle.dumps(exc))
    assert type(back) is cls
    assert back.args == exc.args
    assert (back.uri, back.errno) == ("tcp:h:1", errno.ECONNREFUSED)
    assert str(back) == str(exc)
    assert "cannot connect" in str(exc)
    assert "tcp:h:1" in str(exc) and "ECONNREFUSED" in str(exc)
    assert str(cls("plain")) == "plain"


# ----------------------------------------------------------------- unix sockets


def test_unix_round_trip_mode_0600_and_unlink(sock_path: str) -> None:
    with listen(f"unix:{sock_path}") as lst:
        assert str(lst.uri) == f"unix:{sock_path}"
        st = os.lstat(sock_path)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o600
        with connect(lst.uri, timeout=2) as c, lst.accept(2) as s:
            assert s.gettimeout() is None and c.gettimeout() is None
            sendall_deadline(c, b"hello", _deadline())
            assert recv_exact(s, 5, _deadline()) == b"hello"
            sendall_deadline(s, b"back", _deadline())
            assert recv_exact(c, 4, _deadline()) == b"back"
    assert not os.path.exists(sock_path)
    lst.close()  # idempotent
    assert lst.closed


def test_unix_relative_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with listen("unix:rel.sock") as lst:
        assert (tmp_path / "rel.sock").exists()
        with connect("unix:rel.sock", timeout=2) as c, lst.accept(2) as s:
            c.sendall(b"x")
            assert recv_exact(s, 1, _deadline()) == b"x"
    assert not (tmp_path / "rel.sock").exists()


def test_unix_refuses_to_replace_live_socket(sock_path: str) -> None:
    with listen(f"unix:{sock_path}") as first:
        with pytest.raises(TransportError, match="live socket") as info:
            listen(f"unix:{sock_path}")
        assert info.value.errno == errno.EADDRINUSE
        assert sock_path in str(info.value)
        # The probe connection is just a connection; drop it.
        first.accept(2).close()
        assert os.path.exists(sock_path)
        with connect(first.uri, timeout=2) as c, first.accept(2) as s:
            c.sendall(b"still mine")
            assert recv_exact(s, 10, _deadline()) == b"still mine"


def test_unix_replaces_stale_socket(sock_path: str) -> None:
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(sock_path)
    dead.listen(1)
    dead.close()  # the file stays: a stale socket
    assert stat.S_ISSOCK(os.lstat(sock_path).st_mode)
    with listen(f"unix:{sock_path}") as lst:
        assert stat.S_IMODE(os.lstat(sock_path).st_mode) == 0o600
        with connect(lst.uri, timeout=2) as c, lst.accept(2) as s:
            c.sendall(b"ok")
            assert recv_exact(s, 2, _deadline()) == b"ok"


def test_unix_refuses_to_remove_regular_file(sock_path: str) -> None:
    Path(sock_path).write_text("precious")
    with pytest.raises(TransportError, match="not a socket") as info:
        listen(f"unix:{sock_path}")
    assert info.value.errno == errno.EEXIST
    assert Path(sock_path).read_text() == "precious"


def test_close_leaves_a_newer_listener_alone(sock_path: str) -> None:
    old = listen(f"unix:{sock_path}")
    os.unlink(sock_path)  # someone removed it and listened again
    with listen(f"unix:{sock_path}") as new:
        old.close()
        assert os.path.exists(sock_path)
        with connect(new.uri, timeout=2) as c, new.accept(2):
            assert c.fileno() >= 0


def test_listen_bad_backlog(sock_path: str) -> None:
    with pytest.raises(UsageError, match="backlog"):
        listen(f"unix:{sock_path}", backlog=0)


def test_listen_failure_after_bind_removes_the_socket_file(
    sock_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(path: str, mode: int) -> None:
        raise PermissionError(errno.EPERM, "chmod refused")

    monkeypatch.setattr(os, "chmod", refuse)
    with pytest.raises(TransportError, match="cannot listen") as info:
        listen(f"unix:{sock_path}")
    assert info.value.errno == errno.EPERM
    assert not os.path.lexists(sock_path)


# ------------------------------------------------------------------ tcp sockets


def _tcp_round_trip(lst_uri: str, expect_host: str) -> None:
    with listen(lst_uri) as lst:
        assert lst.uri.kind == "tcp"
        assert lst.uri.host == expect_host
        assert 0 < lst.uri.port < 65536
        with connect(lst.uri, timeout=2) as c, lst.accept(2) as s:
            assert c.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            payload = os.urandom(1 << 20)
            sender = Worker(lambda: sendall_deadline(c, payload, _deadline()))
            assert recv_exact(s, len(payload), _deadline()) == payload
            sender.join()


def test_tcp_ipv4_ephemeral_port() -> None:
    _tcp_round_trip("tcp:127.0.0.1:0", "127.0.0.1")


def test_tcp_ipv6_loopback() -> None:
    if not _ipv6_loopback():
        pytest.skip("IPv6 loopback [::1] is unavailable on this host")
    _tcp_round_trip("tcp:[::1]:0", "::1")
    with listen("tcp:[::1]:0") as lst:
        assert str(lst.uri) == f"tcp:[::1]:{lst.uri.port}"


def test_tcp_hostname_localhost() -> None:
    with listen("tcp:127.0.0.1:0") as lst:
        port = lst.uri.port
        with connect(f"tcp:localhost:{port}", timeout=2) as c, lst.accept(2) as s:
            c.sendall(b"hi")
            assert recv_exact(s, 2, _deadline()) == b"hi"


def test_tcp_reuseaddr_allows_quick_relisten() -> None:
    with listen("tcp:127.0.0.1:0") as lst:
        port = lst.uri.port
        with connect(lst.uri, timeout=2) as c, lst.accept(2) as s:
            s.close()  # server side closes first: TIME_WAIT on the port
            c.close()
    with listen(f"tcp:127.0.0.1:{port}") as again:
        assert again.uri.port == port


def test_tcp_port_in_use() -> None:
    with listen("tcp:127.0.0.1:0") as lst:
        with pytest.raises(TransportError, match="cannot listen") as info:
            listen(lst.uri)
        assert info.value.errno == errno.EADDRINUSE
        assert str(lst.uri) in str(info.value)


def test_connect_needs_host_and_port() -> None:
    with pytest.raises(UsageError, match="names no host"):
        connect("tcp::4444", timeout=1)
    with pytest.raises(UsageError, match="port 0"):
        connect("tcp:127.0.0.1:0", timeout=1)


# ------------------------------------------------------- timeouts and retries


def test_accept_timeout_names_uri(sock_path: str) -> None:
    with listen(f"unix:{sock_path}") as lst:
        t0 = time.monotonic()
        with pytest.raises(TransportTimeout, match=r"no connection within 0\.2 s") as i:
            lst.accept(0.2)
        assert 0.15 <= time.monotonic() - t0 < HANG_GUARD
        assert sock_path in str(i.value)


def test_accept_on_closed_listener(sock_path: str) -> None:
    lst = listen(f"unix:{sock_path}")
    lst.close()
    with pytest.raises(TransportError, match="listener is closed"):
        lst.accept(1)


def test_connect_refused_names_uri_and_errno(sock_path: str) -> None:
    with pytest.raises(TransportError, match="cannot connect") as info:
        connect(f"unix:{sock_path}", timeout=1)
    assert info.value.errno == errno.ENOENT
    assert "ENOENT" in str(info.value) and sock_path in str(info.value)
    with listen("tcp:127.0.0.1:0") as lst:
        port = lst.uri.port
    with pytest.raises(TransportError) as info:
        connect(f"tcp:127.0.0.1:{port}", timeout=1)
    assert info.value.errno == errno.ECONNREFUSED
    assert f"tcp:127.0.0.1:{port}" in str(info.value)


def test_connect_retries_until_listener_appears(sock_path: str) -> None:
    holder: list[Any] = []

    def start_listener() -> None:
        holder.append(listen(f"unix:{sock_path}"))

    starter = Worker(start_listener, delay=0.3)
    t0 = time.monotonic()
    try:
        with connect(f"unix:{sock_path}", timeout=1, retry_until=5) as c:
            elapsed = time.monotonic() - t0
            starter.join()
            with holder[0].accept(2) as s:
                c.sendall(b"late")
                assert recv_exact(s, 4, _deadline()) == b"late"
        assert 0.25 <= elapsed < 5
    finally:
        starter.join()
        for lst in holder:
            lst.close()


def test_connect_retry_gives_up(sock_path: str) -> None:
    t0 = time.monotonic()
    with pytest.raises(TransportError, match="retried for") as info:
        connect(f"unix:{sock_path}", timeout=1, retry_until=0.3)
    assert 0.25 <= time.monotonic() - t0 < HANG_GUARD
    assert info.value.errno == errno.ENOENT


# -------------------------------------------------------------- stream helpers


def test_recv_exact_peer_close() -> None:
    a, b = socket.socketpair()
    with a, b:
        b.sendall(b"abc")
        b.close()
        with pytest.raises(
            PeerClosedError, match="connection closed by peer after 3 of 10 bytes"
        ):
            recv_exact(a, 10, _deadline())


def test_recv_exact_timeout() -> None:
    a, b = socket.socketpair()
    with a, b:
        b.sendall(b"ab")
        with pytest.raises(TransportTimeout, match="after 2 of 4 bytes"):
            recv_exact(a, 4, time.monotonic() + 0.1)


def test_recv_into_exact_fills_view_and_leaves_the_rest() -> None:
    a, b = socket.socketpair()
    with a, b:
        b.sendall(b"0123456789")
        buf = bytearray(8)
        recv_into_exact(a, memoryview(buf)[2:6], _deadline())
        assert buf == b"\0\x000123\0\0"
        assert recv_exact(a, 6, _deadline()) == b"456789"
        assert recv_exact(a, 0, _deadline()) == b""
        with pytest.raises(UsageError, match="writable"):
            recv_into_exact(a, memoryview(b"ro"), _deadline())


def test_sendall_deadline_times_out_when_peer_does_not_read() -> None:
    a, b = socket.socketpair()
    with a, b, pytest.raises(TransportTimeout, match="send timed out after"):
        sendall_deadline(a, bytes(64 << 20), time.monotonic() + 0.2)


def test_sendall_deadline_broken_pipe() -> None:
    a, b = socket.socketpair()
    with a:
        b.close()
        with pytest.raises(TransportError, match="send failed") as info:
            sendall_deadline(a, b"x" * 100, _deadline())
        assert info.value.errno == errno.EPIPE


# -------------------------------------------------------------------- channels


def test_preamble_layout() -> None:
    session = bytes(range(16))
    raw = pack_preamble(3, session)
    assert len(raw) == PREAMBLE_SIZE == 32
    assert raw[:8] == CHANNEL_MAGIC == b"MPVFCH\x00\x01"
    assert raw[8:12] == b"\x00\x00\x00\x03"
    assert raw[12:28] == session
    assert raw[28:] == b"\0\0\0\0"
    assert unpack_preamble(raw) == (3, session)
    with pytest.raises(TransportError, match="magic"):
        unpack_preamble(b"X" * 32)
    with pytest.raises(TransportError, match="reserved"):
        unpack_preamble(raw[:28] + b"\0\0\0\1")
    with pytest.raises(TransportError, match="31 bytes"):
        unpack_preamble(raw[:31])
    with pytest.raises(UsageError, match="16 bytes"):
        pack_preamble(0, b"short")
    assert len(new_session()) == 16 and new_session() != new_session()


def test_session_as_hex_string() -> None:
    session = new_session()
    assert session_bytes(session) is session
    assert session_bytes(session.hex()) == session
    assert pack_preamble(1, session.hex()) == pack_preamble(1, session)
    for bad in ("xyz", session.hex().upper(), session.hex()[:-2], b"x" * 15):
        with pytest.raises(UsageError, match="session id"):
            session_bytes(bad)


def _check_channel_order(src: Channels, dst: Channels) -> None:
    """Each source channel i reaches destination channel i, both ways."""
    assert len(src) == len(dst)
    for i, (s, d) in enumerate(zip(src, dst, strict=True)):
        sendall_deadline(s, bytes([i]) * 5, _deadline())
        assert recv_exact(d, 5, _deadline()) == bytes([i]) * 5
        sendall_deadline(d, bytes([100 + i]), _deadline())
        assert recv_exact(s, 1, _deadline()) == bytes([100 + i])


def test_open_and_accept_channels(sock_path: str) -> None:
    session = new_session()
    with listen(f"unix:{sock_path}") as lst:
        target = Worker(lambda: accept_channels(lst, 3, timeout=5))
        try:
            src = open_channels(lst.uri, 3, session, timeout=5)
        finally:
            dst = target.join()
        with src, dst:
            assert src.session == dst.session == session
            assert len(dst.extra) == 3
            _check_channel_order(src, dst)
        assert dst.closed
        dst.close()  # idempotent
        assert dst.main.fileno() == -1 and all(s.fileno() == -1 for s in dst.extra)


def test_accept_channels_rejects_garbage_and_groups_by_session() -> None:
    session = new_session()
    other = new_session()
    keep: list[socket.socket] = []
    with listen("tcp:127.0.0.1:0") as lst:
        target = Worker(lambda: accept_channels(lst, 3, timeout=5))

        def dial(preamble: bytes) -> socket.socket:
            sock = connect(lst.uri, timeout=2)
            keep.append(sock)
            sock.sendall(preamble)
            return sock

        try:
            # Out of order, with strangers in between.
            dial(pack_preamble(2, session))
            garbage = dial(b"GET / HTTP/1.0\r\n\r\n" + bytes(14))
            dial(pack_preamble(0, session))
            stranger = dial(pack_preamble(0, other))  # another session
            too_big = dial(pack_preamble(4, session))  # index > n_extra
            dial(pack_preamble(3, session))
            silent = dial(b"")  # connects and never speaks
            dial(pack_preamble(1, session))
            dst = target.join()
        except BaseException:
            target.thread.join(10)
            for s in keep:
                s.close()
            raise
        with dst, contextlib.ExitStack() as stack:
            for s in keep:
                stack.enter_context(s)
            assert dst.session == session
            # The rejected and the leftover connections were closed.
            for s in (garbage, stranger, too_big, silent):
                assert recv_exact_or_eof(s) == b""
            chans = [keep[2], keep[0], keep[7], keep[5]]  # index 0, 2, 1, 3
            src = Channels(chans[0], [chans[2], chans[1], chans[3]], session)
            _check_channel_order(src, dst)


def recv_exact_or_eof(sock: socket.socket) -> bytes:
    """What is left before EOF (bounded wait)."""
    sock.settimeout(5)
    try:
        return sock.recv(100)
    except ConnectionResetError:
        return b""


def test_accept_channels_duplicate_index_is_rejected(sock_path: str) -> None:
    session = new_session()
    with listen(f"unix:{sock_path}") as lst:
        target = Worker(lambda: accept_channels(lst, 1, timeout=5))
        first = connect(lst.uri, timeout=2)
        dup = connect(lst.uri, timeout=2)
        with first, dup:
            first.sendall(pack_preamble(0, session))
            time.sleep(0.1)
            dup.sendall(pack_preamble(0, session))
            assert recv_exact_or_eof(dup) == b""
            extra = open_channels_rest(lst.uri, session)
            with extra, target.join() as dst:
                first.sendall(b"M")
                assert recv_exact(dst.main, 1, _deadline()) == b"M"
                extra.sendall(b"E")
                assert recv_exact(dst.extra[0], 1, _deadline()) == b"E"


def open_channels_rest(uri: Uri, session: bytes) -> socket.socket:
    sock = connect(uri, timeout=2)
    sock.sendall(pack_preamble(1, session))
    return sock


def test_accept_channels_timeout_reports_progress(sock_path: str) -> None:
    session = new_session()
    with listen(f"unix:{sock_path}") as lst, connect(lst.uri, timeout=2) as main:
        main.sendall(pack_preamble(0, session))
        with pytest.raises(TransportTimeout, match="only 1 of 3 channels") as i:
            accept_channels(lst, 2, timeout=0.3)
        assert sock_path in str(i.value)
        assert recv_exact_or_eof(main) == b""  # closed by the target


def test_open_channels_zero_extra_and_bad_args(sock_path: str) -> None:
    session = new_session()
    with listen(f"unix:{sock_path}") as lst:
        target = Worker(lambda: accept_channels(lst, 0, timeout=5))
        src = open_channels(lst.uri, 0, session, timeout=5)
        with src, target.join() as dst:
            assert src.extra == [] and dst.extra == []
            _check_channel_order(src, dst)
        with pytest.raises(UsageError, match="16 bytes"):
            open_channels(lst.uri, 1, b"x", timeout=1)
        with pytest.raises(UsageError, match="n_extra"):
            open_channels(lst.uri, -1, session, timeout=1)


def test_open_channels_retries_and_fails_cleanly(sock_path: str) -> None:
    with pytest.raises(TransportError, match="cannot connect") as info:
        open_channels(f"unix:{sock_path}", 2, new_session(), timeout=1)
    assert info.value.errno == errno.ENOENT
    holder: list[Any] = []
    starter = Worker(lambda: holder.append(listen(f"unix:{sock_path}")), delay=0.3)
    try:
        with open_channels(
            f"unix:{sock_path}", 2, new_session(), timeout=2, retry_until=5
        ) as src:
            starter.join()
            with accept_channels(holder[0], 2, timeout=5) as dst:
                _check_channel_order(src, dst)
    finally:
        starter.join()
        for lst in holder:
            lst.close()


# ---------------------------------------------------------------- cancellation


def test_cancel_token() -> None:
    token = Cancel()
    assert not token.cancelled and token.reason == ""
    token.check()
    token.cancel("operator abort")
    token.cancel("second reason loses")
    assert token.cancelled and token.reason == "operator abort"
    with pytest.raises(TransportCancelled, match=r"^cancelled: operator abort$"):
        token.check()
    assert "operator abort" in repr(token)


def _cancel_later(token: Cancel, delay: float = 0.2) -> Worker:
    return Worker(lambda: token.cancel("test abort"), delay=delay)


def test_cancel_interrupts_blocked_accept(sock_path: str) -> None:
    token = Cancel()
    with listen(f"unix:{sock_path}") as lst:
        canceller = _cancel_later(token)
        t0 = time.monotonic()
        with pytest.raises(TransportCancelled, match="cancelled: test abort"):
            lst.accept(None, cancel=token)
        assert time.monotonic() - t0 < HANG_GUARD
        canceller.join()


def test_cancel_interrupts_blocked_recv() -> None:
    token = Cancel()
    a, b = socket.socketpair()
    with a, b:
        canceller = _cancel_later(token)
        t0 = time.monotonic()
        with pytest.raises(TransportCancelled, match="cancelled: test abort"):
            recv_exact(a, 10, None, cancel=token)
        assert time.monotonic() - t0 < HANG_GUARD
        canceller.join()


def test_cancel_interrupts_blocked_send() -> None:
    token = Cancel()
    a, b = socket.socketpair()
    with a, b:
        canceller = _cancel_later(token)
        t0 = time.monotonic()
        with pytest.raises(TransportCancelled):
            sendall_deadline(a, bytes(64 << 20), None, cancel=token)
        assert time.monotonic() - t0 < HANG_GUARD
        canceller.join()


def test_cancel_interrupts_connect_retry_and_accept_channels(sock_path: str) -> None:
    token = Cancel()
    canceller = _cancel_later(token)
    t0 = time.monotonic()
    with pytest.raises(TransportCancelled):
        connect(f"unix:{sock_path}", timeout=1, retry_until=60, cancel=token)
    assert time.monotonic() - t0 < HANG_GUARD
    canceller.join()

    token = Cancel()
    with listen(f"unix:{sock_path}") as lst, connect(lst.uri, timeout=2) as half:
        half.sendall(pack_preamble(0, new_session()))
        canceller = _cancel_later(token)
        t0 = time.monotonic()
        with pytest.raises(TransportCancelled):
            accept_channels(lst, 1, timeout=60, cancel=token)
        assert time.monotonic() - t0 < HANG_GUARD
        canceller.join()
        assert recv_exact_or_eof(half) == b""


def test_cancelled_token_stops_before_blocking() -> None:
    token = Cancel()
    token.cancel("early")
    a, b = socket.socketpair()
    with a, b:
        b.sendall(b"data")
        with pytest.raises(TransportCancelled, match="early"):
            recv_exact(a, 4, _deadline(), cancel=token)


def test_closing_from_another_thread_interrupts_accept_and_recv(
    sock_path: str,
) -> None:
    lst = listen(f"unix:{sock_path}")
    closer = Worker(lst.close, delay=0.2)
    t0 = time.monotonic()
    with pytest.raises(TransportError, match="closed"):
        lst.accept(None)
    assert time.monotonic() - t0 < HANG_GUARD
    closer.join()

    a, b = socket.socketpair()
    with a, b:
        closer = Worker(a.close, delay=0.2)
        t0 = time.monotonic()
        with pytest.raises(TransportError, match="closed"):
            recv_exact(a, 10, None)
        assert time.monotonic() - t0 < HANG_GUARD
        closer.join()
