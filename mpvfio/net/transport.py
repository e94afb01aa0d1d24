"""Sockets for migration streams: URIs, listeners, connects, channel sessions.

URIs are spelled the way QEMU spells ``migrate`` URIs::

    unix:PATH              absolute or relative path of a socket file
    tcp:HOST:PORT          IPv4 address or host name
    tcp:[V6ADDR]:PORT      IPv6 address, always in brackets
    tcp::PORT              every address (listen only)

Port 0 on :func:`listen` asks the kernel for an ephemeral port;
:attr:`Listener.uri` reports the port actually bound.

A migration uses a *session of channels* (QEMU.md section 10: one main
channel plus N multifd channels).  The source opens them with
:func:`open_channels`; every connection starts with a 32-byte preamble::

    offset size field
         0    8 magic    b"MPVFCH\\x00\\x01" (name, NUL, format version 1)
         8    4 index    be32; 0 = main channel, 1..N = extra channels
        12   16 session  random id shared by every channel of one migration
        28    4 reserved must be zero

The target's :func:`accept_channels` reads each preamble under the deadline,
groups connections by session id, drops (closes) connections whose preamble
is bad without disturbing the others, and returns once the main channel and
all N extra channels of one session are in.

Every blocking call takes a deadline and an optional :class:`Cancel` token;
waits are sliced (at most :data:`POLL_SLICE` seconds) so another thread can
cancel a blocked transfer, or close its socket, and have it stop promptly.
Returned sockets are in blocking mode; the helpers here never depend on that
(they poll, then use ``MSG_DONTWAIT``).

Layering: this module imports only the standard library and
:mod:`mpvfio.errors`.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import re
import select
import socket
import stat
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Literal

from mpvfio.errors import (
    PeerClosedError,
    TransportCancelled,
    TransportError,
    TransportTimeout,
    UsageError,
    errno_name,
)
from mpvfio.ipc.inherit import parent_only

__all__ = [
    "BUFFER_SIZE",
    "CHANNEL_MAGIC",
    "POLL_SLICE",
    "PREAMBLE_SIZE",
    "SESSION_SIZE",
    "Cancel",
    "Channels",
    "Listener",
    "PeerClosedError",
    "TransportCancelled",
    "TransportError",
    "TransportTimeout",
    "Uri",
    "accept_channels",
    "connect",
    "listen",
    "new_session",
    "open_channels",
    "pack_preamble",
    "parse_uri",
    "recv_exact",
    "recv_into_exact",
    "sendall_deadline",
    "session_bytes",
    "unpack_preamble",
]

#: Longest wait between two looks at a :class:`Cancel` token (seconds).
POLL_SLICE = 0.05
#: Socket buffer size asked for on every stream socket (best effort).
BUFFER_SIZE = 4 * 1024 * 1024
#: First 8 bytes of every channel preamble: name, NUL, format version 1.
CHANNEL_MAGIC = b"MPVFCH\x00\x01"
#: Length of a session id (bytes).
SESSION_SIZE = 16
_PREAMBLE = struct.Struct(">8sI16s4s")
#: Length of the preamble that starts every channel (bytes).
PREAMBLE_SIZE = _PREAMBLE.size
#: Connections whose preamble is still incomplete that accept_channels keeps.
_MAX_PENDING = 64
#: Longest pause between two connect attempts while retrying.
_RETRY_MAX_PAUSE = 0.1
#: sun_path is 108 bytes, and CPython wants room for the NUL.
_UNIX_PATH_MAX = 107
_SCHEMES = ("unix:PATH", "tcp:HOST:PORT", "tcp:[IPV6]:PORT")
_HOST_RE = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9._-]*[A-Za-z0-9_])?\.?")
_RETRYABLE = frozenset({errno.ECONNREFUSED, errno.ENOENT})


# --------------------------------------------------------------------- errors


# ---------------------------------------------------------------------- URIs


@dataclass(frozen=True)
class Uri:
    """A parsed migration URI.

    :param kind: ``"unix"`` or ``"tcp"``.
    :param path: the socket path (unix), else ``""``.
    :param host: host name or address without brackets (tcp); ``""`` means
        every address (listen only).
    :param port: the TCP port (0 = ephemeral, listen only); 0 for unix.
    """

    kind: Literal["unix", "tcp"]
    path: str = ""
    host: str = ""
    port: int = 0

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp:{host}:{self.port}"


def _usage(text: str, why: str) -> UsageError:
    return UsageError(f"bad migration URI {text!r}: {why}")


def _parse_port(text: str, port: str) -> int:
    if not port:
        raise _usage(text, "missing port (expected tcp:HOST:PORT)")
    if not port.isascii() or not port.isdigit():
        raise _usage(text, f"port {port!r} is not a decimal number")
    value = int(port)
    if value > 65535:
        raise _usage(text, f"port {value} out of range 0..65535")
    return value


def parse_uri(text: str | Uri) -> Uri:
    """Parse a QEMU-style migration URI (``unix:PATH``, ``tcp:HOST:PORT``).

    :raises UsageError: naming what is wrong (unknown scheme, empty path,
        missing or out-of-range port, unbracketed IPv6 address, ...).
    """
    if isinstance(text, Uri):
        return text
    if not isinstance(text, str):
        raise UsageError(f"migration URI must be a str, not {type(text).__name__}")
    valid = ", ".join(_SCHEMES)
    scheme, sep, rest = text.partition(":")
    if not sep:
        raise _usage(text, f"missing scheme; valid forms: {valid}")
    if scheme == "unix":
        if not rest:
            raise _usage(text, "empty socket path")
        if "\x00" in rest:
            raise _usage(text, "NUL byte in socket path")
        if len(os.fsencode(rest)) > _UNIX_PATH_MAX:
            raise _usage(
                text, f"socket path longer than {_UNIX_PATH_MAX} bytes (sun_path)"
            )
        return Uri("unix", path=rest)
    if scheme != "tcp":
        raise _usage(text, f"unknown scheme {scheme!r}; valid forms: {valid}")
    if rest.startswith("["):
        host, bracket, tail = rest[1:].partition("]")
        if not bracket:
            raise _usage(text, "missing ']' after IPv6 address")
        if not tail.startswith(":"):
            raise _usage(text, "missing port after ']' (expected tcp:[IPV6]:PORT)")
        try:
            addr = ipaddress.ip_address(host)
        except ValueError:
            raise _usage(text, f"{host!r} is not an IPv6 address") from None
        if addr.version != 6:
            raise _usage(text, f"{host!r} in brackets is not an IPv6 address")
        return Uri("tcp", host=host, port=_parse_port(text, tail[1:]))
    if rest.count(":") > 1:
        raise _usage(text, "IPv6 address must be in brackets: tcp:[ADDR]:PORT")
    host, colon, port = rest.partition(":")
    if not colon:
        raise _usage(text, "missing port (expected tcp:HOST:PORT)")
    if host and not _HOST_RE.fullmatch(host):
        raise _usage(text, f"{host!r} is not a host name or IPv4 address")
    return Uri("tcp", host=host, port=_parse_port(text, port))


# -------------------------------------------------------------- cancellation


class Cancel:
    """A cancellation token shared between a blocked transfer and its owner.

    Any thread may call :meth:`cancel`; every blocking call in this module
    that was given the token raises :class:`TransportCancelled` within about
    :data:`POLL_SLICE` seconds.  The first reason given wins.
    """

    def __init__(self) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._reason = ""

    def cancel(self, reason: str = "cancelled by request") -> None:
        """Cancel every operation watching this token (idempotent)."""
        with self._lock:
            if not self._event.is_set():
                self._reason = reason
                self._event.set()

    @property
    def cancelled(self) -> bool:
        """Whether :meth:`cancel` was called."""
        return self._event.is_set()

    @property
    def reason(self) -> str:
        """The reason given to the first :meth:`cancel`, else ``""``."""
        with self._lock:
            return self._reason

    def check(self, uri: str = "") -> None:
        """Raise :class:`TransportCancelled` if the token is cancelled."""
        if self._event.is_set():
            raise TransportCancelled(f"cancelled: {self.reason}", uri)

    def wait(self, timeout: float | None = None) -> bool:
        """Sleep until cancelled or ``timeout`` passes; return :attr:`cancelled`."""
        return self._event.wait(timeout)

    def __repr__(self) -> str:
        state = f"cancelled: {self.reason!r}" if self.cancelled else "active"
        return f"<Cancel {state}>"


# ------------------------------------------------------------ deadline waits


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else deadline - time.monotonic()


def _slice(deadline: float | None) -> float:
    """How long one wait may block: at most :data:`POLL_SLICE` seconds.

    Waits are always sliced, with or without a :class:`Cancel`, so that a
    socket closed by another thread is noticed too (``fileno() == -1``).
    """
    left = _remaining(deadline)
    return POLL_SLICE if left is None else max(min(left, POLL_SLICE), 0.0)


def _fd(sock: socket.socket, uri: str) -> int:
    fd = sock.fileno()
    if fd < 0:
        raise TransportError("socket is closed", uri, errno.EBADF)
    return fd


def _poll(sock: socket.socket, events: int, timeout: float, uri: str) -> bool:
    """Wait up to ``timeout`` seconds for ``events``; True if any (or error)."""
    poller = select.poll()
    poller.register(_fd(sock, uri), events)
    ready = poller.poll(timeout * 1000.0)
    for _, revents in ready:
        if revents & select.POLLNVAL:
            raise TransportError("socket is closed", uri, errno.EBADF)
    return bool(ready)


def _sleep(seconds: float, cancel: Cancel | None, uri: str) -> None:
    if cancel is None:
        time.sleep(max(seconds, 0.0))
        return
    if cancel.wait(max(seconds, 0.0)):
        cancel.check(uri)


def _os_error(what: str, uri: str, exc: OSError) -> TransportError:
    err = exc.errno or 0
    return TransportError(what, uri, err)


# ----------------------------------------------------------------- tuning


def _sysctl_int(name: str) -> int:
    try:
        with open(f"/proc/sys/net/core/{name}", encoding="ascii") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


def _tune_buffers(sock: socket.socket) -> None:
    """Ask for :data:`BUFFER_SIZE` socket buffers (best effort).

    Setting ``SO_RCVBUF``/``SO_SNDBUF`` on a TCP socket turns off the
    kernel's buffer autotuning, so for TCP they are set only when the
    ``net.core`` limits grant the full size; unix sockets have no
    autotuning and always get it (capped by the kernel).  Call before
    connect/listen so the TCP window scale sees the size.
    """
    tcp = sock.family in (socket.AF_INET, socket.AF_INET6)
    for opt, limit in (
        (socket.SO_SNDBUF, "wmem_max"),
        (socket.SO_RCVBUF, "rmem_max"),
    ):
        if tcp and _sysctl_int(limit) < BUFFER_SIZE:
            continue
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, opt, BUFFER_SIZE)


def _tune_stream(sock: socket.socket) -> None:
    """Blocking mode and, for TCP, no Nagle delay on a connected socket.

    The socket is also closed in every child forked later (a replacement
    worker must not keep a channel alive past the migration).
    """
    parent_only(sock)
    sock.setblocking(True)
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _close_quietly(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()


def _sockaddr_uri(sock: socket.socket) -> Uri:
    name = sock.getsockname()
    return Uri("tcp", host=str(name[0]), port=int(name[1]))


# ------------------------------------------------------------------ listen


class Listener:
    """A listening socket for one migration URI; see :func:`listen`."""

    def __init__(
        self,
        sock: socket.socket,
        uri: Uri,
        unix_id: tuple[int, int] | None = None,
    ) -> None:
        self._sock = sock
        self._uri = uri
        self._unix_id = unix_id
        self._lock = threading.Lock()
        self._closed = False

    @property
    def uri(self) -> Uri:
        """The URI actually bound (the real port when 0 was asked for)."""
        return self._uri

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def fileno(self) -> int:
        """The listening socket's file descriptor (-1 once closed)."""
        return self._sock.fileno()

    def accept(
        self, timeout: float | None, cancel: Cancel | None = None
    ) -> socket.socket:
        """Accept one connection within ``timeout`` seconds (``None``: no limit).

        :returns: the connected socket, in blocking mode (TCP_NODELAY for tcp).
        :raises TransportTimeout: naming the URI when nobody connected in time.
        :raises TransportCancelled: when ``cancel`` fires.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        conn = self._accept_until(deadline, cancel)
        if conn is None:
            raise TransportTimeout(
                f"no connection within {timeout:g} s", str(self._uri), errno.ETIMEDOUT
            )
        return conn

    def _accept_until(
        self, deadline: float | None, cancel: Cancel | None
    ) -> socket.socket | None:
        """Accept one connection, or return ``None`` when the deadline passes."""
        uri = str(self._uri)
        while True:
            if cancel is not None:
                cancel.check(uri)
            if self._closed:
                raise TransportError("listener is closed", uri, errno.EBADF)
            conn = self._try_accept()
            if conn is not None:
                return conn
            left = _remaining(deadline)
            if left is not None and left <= 0:
                return None
            _poll(self._sock, select.POLLIN, _slice(deadline), uri)

    def _try_accept(self) -> socket.socket | None:
        """One non-blocking accept: a tuned socket, or ``None`` if none waits."""
        try:
            conn, _ = self._sock.accept()
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as exc:
            if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
                return None  # the peer gave up while queued
            if self._closed:
                raise TransportError(
                    "listener is closed", str(self._uri), errno.EBADF
                ) from None
            raise _os_error("accept failed", str(self._uri), exc) from exc
        _tune_stream(conn)
        return conn

    def close(self) -> None:
        """Close the socket and unlink the unix socket file it made (idempotent).

        The file is removed only if it is still the one this listener bound,
        so a newer listener on the same path is left alone.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
        with contextlib.suppress(OSError):
            self._sock.close()
        if self._unix_id is not None:
            path = self._uri.path
            with contextlib.suppress(OSError):
                st = os.lstat(path)
                if (st.st_dev, st.st_ino) == self._unix_id:
                    os.unlink(path)

    def __enter__(self) -> Listener:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = " closed" if self._closed else ""
        return f"<Listener {self._uri}{state}>"


def _unix_is_live(path: str) -> bool:
    """Whether something accepts connections on the unix socket ``path``."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except OSError:
        return True  # EAGAIN (backlog full), timeout, EACCES: assume alive
    finally:
        probe.close()
    return True


def _listen_unix(uri: Uri, backlog: int) -> Listener:
    path = uri.path
    text = str(uri)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise _os_error("cannot inspect socket path", text, exc) from exc
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise TransportError(
                "path exists and is not a socket; refusing to remove it",
                text,
                errno.EEXIST,
            )
        if _unix_is_live(path):
            raise TransportError(
                "a live socket is listening on this path; refusing to replace it",
                text,
                errno.EADDRINUSE,
            )
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # stale socket file of a dead listener
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    bound = False
    try:
        _tune_buffers(sock)
        # umask is process-wide: another thread creating a file right now
        # would also get 0600.  The chmod below closes any gap the other way.
        old = os.umask(0o177)
        try:
            sock.bind(path)
        finally:
            os.umask(old)
        bound = True
        os.chmod(path, 0o600)
        st = os.lstat(path)
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException as exc:
        sock.close()
        if bound:  # do not leave the socket file of a listener that never was
            with contextlib.suppress(OSError):
                os.unlink(path)
        if isinstance(exc, OSError):
            raise _os_error("cannot listen", text, exc) from exc
        raise
    parent_only(sock)
    return Listener(sock, uri, (st.st_dev, st.st_ino))


def _listen_tcp(uri: Uri, backlog: int) -> Listener:
    text = str(uri)
    try:
        infos = socket.getaddrinfo(
            uri.host or None,
            uri.port,
            socket.AF_UNSPEC,
            socket.SOCK_STREAM,
            0,
            socket.AI_PASSIVE,
        )
    except socket.gaierror as exc:
        raise TransportError(f"cannot resolve host: {exc.strerror}", text) from exc
    last: OSError | None = None
    for family, socktype, proto, _, addr in infos:
        sock = socket.socket(family, socktype, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            _tune_buffers(sock)
            sock.bind(addr)
            sock.listen(backlog)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            last = exc
            continue
        parent_only(sock)
        return Listener(sock, _sockaddr_uri(sock))
    if last is None:
        raise TransportError("host resolved to no address", text)
    raise _os_error("cannot listen", text, last) from last


def listen(uri: str | Uri, backlog: int = 16) -> Listener:
    """Listen on a migration URI.

    unix: refuses to replace a socket something is listening on, removes a
    stale socket file, creates the new one with mode 0600.  tcp: resolves
    the host with getaddrinfo (IPv6 works), sets SO_REUSEADDR; port 0 picks
    an ephemeral port, reported by :attr:`Listener.uri`.

    :raises UsageError: for a malformed URI.
    :raises TransportError: when the socket cannot be bound.
    """
    parsed = parse_uri(uri)
    if backlog < 1:
        raise UsageError(f"listen backlog must be >= 1, got {backlog}")
    if parsed.kind == "unix":
        return _listen_unix(parsed, backlog)
    return _listen_tcp(parsed, backlog)


# ----------------------------------------------------------------- connect


def _addresses(uri: Uri) -> list[tuple[int, int, int, object]]:
    """(family, type, proto, sockaddr) to try for ``uri``, in order."""
    if uri.kind == "unix":
        return [(socket.AF_UNIX, socket.SOCK_STREAM, 0, uri.path)]
    try:
        infos = socket.getaddrinfo(
            uri.host, uri.port, socket.AF_UNSPEC, socket.SOCK_STREAM
        )
    except socket.gaierror as exc:
        raise TransportError(f"cannot resolve host: {exc.strerror}", str(uri)) from exc
    return [(fam, typ, proto, addr) for fam, typ, proto, _, addr in infos]


def _connect_one(
    family: int,
    socktype: int,
    proto: int,
    addr: object,
    deadline: float,
    cancel: Cancel | None,
    uri: str,
) -> socket.socket:
    """One non-blocking connect attempt; OSError carries the errno."""
    sock = socket.socket(family, socktype, proto)
    try:
        _tune_buffers(sock)
        sock.setblocking(False)
        err = sock.connect_ex(addr)  # type: ignore[arg-type]
        while err in (errno.EAGAIN, errno.EINTR):  # unix backlog full
            if time.monotonic() >= deadline:
                raise TimeoutError(errno.ETIMEDOUT, os.strerror(errno.ETIMEDOUT))
            _sleep(min(0.01, max(deadline - time.monotonic(), 0.0)), cancel, uri)
            err = sock.connect_ex(addr)  # type: ignore[arg-type]
        if err == errno.EINPROGRESS:
            while True:
                if cancel is not None:
                    cancel.check(uri)
                if _poll(sock, select.POLLOUT, _slice(deadline), uri):
                    break
                if time.monotonic() >= deadline:
                    raise TimeoutError(errno.ETIMEDOUT, os.strerror(errno.ETIMEDOUT))
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            raise OSError(err, os.strerror(err))
        _tune_stream(sock)
    except BaseException:
        sock.close()
        raise
    return sock


def connect(
    uri: str | Uri,
    timeout: float,
    retry_until: float | None = None,
    cancel: Cancel | None = None,
) -> socket.socket:
    """Connect to a migration URI.

    :param timeout: seconds one connection attempt may take.
    :param retry_until: if given, keep retrying for this many seconds (from
        the call) while the target is not listening yet (``ECONNREFUSED``,
        or ``ENOENT`` for a missing unix socket); the last attempt still
        gets its own ``timeout``.
    :param cancel: stops the attempt (and the retries) promptly.
    :returns: the connected socket, blocking, with large buffers and (tcp)
        TCP_NODELAY.
    :raises UsageError: for a malformed URI or one that cannot be dialled
        (no host, port 0).
    :raises TransportError: naming the URI and the errno.
    """
    parsed = parse_uri(uri)
    text = str(parsed)
    if parsed.kind == "tcp" and not parsed.host:
        raise UsageError(f"cannot connect to {text}: it names no host")
    if parsed.kind == "tcp" and parsed.port == 0:
        raise UsageError(f"cannot connect to {text}: port 0")
    if timeout <= 0:
        raise UsageError(f"connect timeout must be > 0, got {timeout}")
    start = time.monotonic()
    retry_end = start + retry_until if retry_until else start
    pause = 0.01
    while True:
        if cancel is not None:
            cancel.check(text)
        deadline = time.monotonic() + timeout
        last: OSError | None = None
        for family, socktype, proto, addr in _addresses(parsed):
            try:
                return _connect_one(
                    family, socktype, proto, addr, deadline, cancel, text
                )
            except TimeoutError:
                raise TransportTimeout(
                    f"connect timed out after {timeout:g} s", text, errno.ETIMEDOUT
                ) from None
            except OSError as exc:
                last = exc
        if last is None:
            raise TransportError("host resolved to no address", text)
        now = time.monotonic()
        if last.errno not in _RETRYABLE or now >= retry_end:
            waited = f" (retried for {now - start:.3g} s)" if retry_until else ""
            raise _os_error(f"cannot connect{waited}", text, last) from last
        _sleep(min(pause, retry_end - now), cancel, text)
        pause = min(pause * 2, _RETRY_MAX_PAUSE)


# ------------------------------------------------------------ stream helpers


def _as_bytes_view(buf: bytes | bytearray | memoryview) -> memoryview:
    view = memoryview(buf)
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


def recv_into_exact(
    sock: socket.socket,
    view: memoryview | bytearray,
    deadline: float | None,
    cancel: Cancel | None = None,
) -> None:
    """Fill ``view`` completely from ``sock``.

    :param deadline: absolute :func:`time.monotonic` time, ``None`` = none.
    :raises PeerClosedError: "connection closed by peer after k of n bytes".
    :raises TransportTimeout: when the deadline passes first.
    :raises TransportCancelled: when ``cancel`` fires.
    """
    out = _as_bytes_view(view)
    if out.readonly:
        raise UsageError("recv_into_exact needs a writable buffer")
    n = out.nbytes
    got = 0
    # A socket with a Python timeout would wait inside recv() before trying
    # it, out of our slicing: call recv() on such a socket only after poll().
    timed = bool(sock.gettimeout())
    ready = not timed
    while got < n:
        if cancel is not None:
            cancel.check()
        if ready:
            try:
                k = sock.recv_into(out[got:], n - got, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                k = -1
            except OSError as exc:
                raise _os_error(
                    f"receive failed after {got} of {n} bytes", "", exc
                ) from exc
            if k == 0:
                raise PeerClosedError(
                    f"connection closed by peer after {got} of {n} bytes"
                )
            if k > 0:
                got += k
                continue
        left = _remaining(deadline)
        if left is not None and left <= 0:
            raise TransportTimeout(
                f"receive timed out after {got} of {n} bytes", err=errno.ETIMEDOUT
            )
        ready = _poll(sock, select.POLLIN, _slice(deadline), "") or not timed


def recv_exact(
    sock: socket.socket,
    n: int,
    deadline: float | None,
    cancel: Cancel | None = None,
) -> bytes:
    """Receive exactly ``n`` bytes; see :func:`recv_into_exact`."""
    if n < 0:
        raise UsageError(f"cannot receive {n} bytes")
    buf = bytearray(n)
    recv_into_exact(sock, buf, deadline, cancel)
    return bytes(buf)


def sendall_deadline(
    sock: socket.socket,
    data: bytes | bytearray | memoryview,
    deadline: float | None,
    cancel: Cancel | None = None,
) -> None:
    """Send all of ``data`` before ``deadline`` (absolute monotonic time).

    :raises TransportTimeout: with the count sent so far.
    :raises TransportError: on a socket error (EPIPE, ECONNRESET, ...).
    :raises TransportCancelled: when ``cancel`` fires.
    """
    view = _as_bytes_view(data)
    n = view.nbytes
    sent = 0
    flags = socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL
    timed = bool(sock.gettimeout())  # see recv_into_exact
    ready = not timed
    while sent < n:
        if cancel is not None:
            cancel.check()
        if ready:
            try:
                sent += sock.send(view[sent:], flags)
                continue
            except (BlockingIOError, InterruptedError):
                pass
            except OSError as exc:
                raise _os_error(
                    f"send failed after {sent} of {n} bytes", "", exc
                ) from exc
        left = _remaining(deadline)
        if left is not None and left <= 0:
            raise TransportTimeout(
                f"send timed out after {sent} of {n} bytes", err=errno.ETIMEDOUT
            )
        ready = _poll(sock, select.POLLOUT, _slice(deadline), "") or not timed


# ---------------------------------------------------------------- channels


def new_session() -> bytes:
    """A fresh random session id (:data:`SESSION_SIZE` bytes)."""
    return os.urandom(SESSION_SIZE)


def session_bytes(session: bytes | str) -> bytes:
    """A session id as bytes; a str must be its 32 lowercase hex digits."""
    if isinstance(session, str):
        try:
            raw = bytes.fromhex(session)
        except ValueError:
            raw = b""
        if len(raw) != SESSION_SIZE or raw.hex() != session:
            raise UsageError(
                f"session id {session!r} is not {2 * SESSION_SIZE} lowercase hex digits"
            )
        return raw
    if not isinstance(session, bytes) or len(session) != SESSION_SIZE:
        size = len(session) if isinstance(session, bytes) else type(session).__name__
        raise UsageError(f"session id must be {SESSION_SIZE} bytes, got {size}")
    return session


def pack_preamble(index: int, session: bytes | str) -> bytes:
    """The 32-byte preamble of channel ``index`` (0 = main) of ``session``."""
    session = session_bytes(session)
    if not 0 <= index <= 0xFFFFFFFF:
        raise UsageError(f"channel index {index} out of range")
    return _PREAMBLE.pack(CHANNEL_MAGIC, index, session, bytes(4))


def unpack_preamble(data: bytes) -> tuple[int, bytes]:
    """``(index, session)`` of a preamble.

    :raises TransportError: for a wrong size, magic or non-zero reserved field.
    """
    if len(data) != PREAMBLE_SIZE:
        raise TransportError(
            f"channel preamble is {len(data)} bytes, expected {PREAMBLE_SIZE}"
        )
    magic, index, session, reserved = _PREAMBLE.unpack(data)
    if magic != CHANNEL_MAGIC:
        raise TransportError(f"bad channel preamble magic {magic!r}")
    if reserved != bytes(4):
        raise TransportError(f"non-zero reserved preamble field {reserved.hex()}")
    return index, session


class Channels:
    """The main channel and the extra channels of one migration session.

    :param main: channel 0.
    :param extra: channels 1..N, in index order.
    :param session: the session id.
    """

    def __init__(
        self, main: socket.socket, extra: list[socket.socket], session: bytes
    ) -> None:
        self.main = main
        self.extra = extra
        self.session = session
        self._lock = threading.Lock()
        self._closed = False

    @property
    def all(self) -> list[socket.socket]:
        """Every socket, main first, then the extra ones in index order."""
        return [self.main, *self.extra]

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def __len__(self) -> int:
        return 1 + len(self.extra)

    def __iter__(self) -> Iterator[socket.socket]:
        return iter(self.all)

    def close(self) -> None:
        """Shut down and close every channel (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        for sock in self.all:
            _close_quietly(sock)

    def __enter__(self) -> Channels:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = " closed" if self._closed else ""
        return f"<Channels session={self.session.hex()} main+{len(self.extra)}{state}>"


def _check_n_extra(n_extra: int) -> None:
    if n_extra < 0:
        raise UsageError(f"n_extra must be >= 0, got {n_extra}")


def open_channels(
    uri: str | Uri,
    n_extra: int,
    session: bytes | str,
    timeout: float,
    retry_until: float | None = None,
    cancel: Cancel | None = None,
) -> Channels:
    """Connect the main channel and ``n_extra`` extra channels (source side).

    Each connection sends its preamble first.  The whole call must finish
    within ``timeout`` seconds (plus the ``retry_until`` window, during which
    a not-yet-listening target is retried, see :func:`connect`).

    :param session: 16 bytes, or their 32 lowercase hex digits (the form
        :func:`mpvfio.wire.stream.new_session` returns).

    :raises TransportError: after closing every channel already opened.
    """
    _check_n_extra(n_extra)
    session = session_bytes(session)  # validate it before connecting
    text = str(parse_uri(uri))
    deadline = time.monotonic() + timeout + (retry_until or 0.0)
    socks: list[socket.socket] = []
    try:
        for index in range(n_extra + 1):
            left = deadline - time.monotonic()
            if left <= 0:
                raise TransportTimeout(
                    f"opened {index} of {n_extra + 1} channels within {timeout:g} s",
                    text,
                    errno.ETIMEDOUT,
                )
            retry = None if index or not retry_until else retry_until
            sock = connect(uri, left, retry_until=retry, cancel=cancel)
            socks.append(sock)
            sendall_deadline(sock, pack_preamble(index, session), deadline, cancel)
    except BaseException:
        for sock in socks:
            _close_quietly(sock)
        raise
    return Channels(socks[0], socks[1:], session)


class _Pending:
    """An accepted connection whose preamble is still arriving."""

    __slots__ = ("buf", "got", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray(PREAMBLE_SIZE)
        self.got = 0


def accept_channels(
    listener: Listener,
    n_extra: int,
    timeout: float,
    cancel: Cancel | None = None,
) -> Channels:
    """Accept the main and ``n_extra`` extra channels of one session (target).

    Connections are accepted and their preambles read concurrently, so a
    slow or silent connection does not hold the others up.  A connection
    with a bad preamble (wrong magic, index > ``n_extra``, an index its
    session already has, EOF) is closed and otherwise ignored.  The first
    session to complete wins; connections of other sessions are closed.

    :raises TransportTimeout: naming the listener's URI and how far the
        most complete session got.
    :raises TransportCancelled: when ``cancel`` fires.
    """
    _check_n_extra(n_extra)
    text = str(listener.uri)
    deadline = time.monotonic() + timeout
    want = n_extra + 1
    pending: list[_Pending] = []
    sessions: dict[bytes, dict[int, socket.socket]] = {}
    rejected = 0
    done: Channels | None = None
    try:
        while done is None:
            if cancel is not None:
                cancel.check(text)
            for _ in range(_MAX_PENDING):  # drain the accept queue (bounded)
                conn = listener._try_accept()
                if conn is None:
                    break
                conn.setblocking(False)
                pending.append(_Pending(conn))
                if len(pending) > _MAX_PENDING:
                    _close_quietly(pending.pop(0).sock)  # oldest silent one
                    rejected += 1
            still: list[_Pending] = []
            for p in pending:
                outcome = _read_preamble(p)
                if outcome is None:
                    still.append(p)
                    continue
                if isinstance(outcome, str):
                    _close_quietly(p.sock)
                    rejected += 1
                    continue
                index, session = outcome
                group = sessions.setdefault(session, {})
                if index > n_extra or index in group:
                    _close_quietly(p.sock)
                    rejected += 1
                    continue
                group[index] = p.sock
                if len(group) == want and done is None:
                    done = _finish(group, session)
                    del sessions[session]
            pending = still
            if done is not None:
                break
            left = deadline - time.monotonic()
            if left <= 0:
                best = max((len(g) for g in sessions.values()), default=0)
                raise TransportTimeout(
                    f"only {best} of {want} channels of one session arrived "
                    f"within {timeout:g} s ({len(sessions)} session(s) seen, "
                    f"{rejected} connection(s) rejected)",
                    text,
                    errno.ETIMEDOUT,
                )
            _wait_any(listener, pending, deadline, text)
    except BaseException:
        if done is not None:
            done.close()
        raise
    finally:
        for p in pending:
            _close_quietly(p.sock)
        for group in sessions.values():
            for sock in group.values():
                _close_quietly(sock)
    assert done is not None
    return done


def _finish(group: dict[int, socket.socket], session: bytes) -> Channels:
    socks = [group[i] for i in range(len(group))]
    for sock in socks:
        sock.setblocking(True)
    return Channels(socks[0], socks[1:], session)


def _read_preamble(p: _Pending) -> tuple[int, bytes] | str | None:
    """Read what has arrived: the parsed preamble, a rejection reason, or None."""
    view = memoryview(p.buf)
    try:
        k = p.sock.recv_into(view[p.got :], PREAMBLE_SIZE - p.got)
    except (BlockingIOError, InterruptedError):
        return None
    except OSError as exc:
        return f"receive failed: {errno_name(exc.errno or 0)}"
    if k == 0:
        return f"closed after {p.got} of {PREAMBLE_SIZE} preamble bytes"
    p.got += k
    if p.got < PREAMBLE_SIZE:
        # Reject a wrong magic as soon as it shows, not at the deadline.
        if p.buf[: min(p.got, len(CHANNEL_MAGIC))] != CHANNEL_MAGIC[: p.got]:
            return "bad magic"
        return None
    try:
        return unpack_preamble(bytes(p.buf))
    except TransportError as exc:
        return str(exc)


def _wait_any(
    listener: Listener,
    pending: list[_Pending],
    deadline: float,
    uri: str,
) -> None:
    """Sleep until a connection or preamble bytes arrive (one slice at most)."""
    poller = select.poll()
    poller.register(_fd_of_listener(listener, uri), select.POLLIN)
    for p in pending:
        poller.register(p.sock.fileno(), select.POLLIN)
    poller.poll(_slice(deadline) * 1000.0)


def _fd_of_listener(listener: Listener, uri: str) -> int:
    fd = listener.fileno()
    if fd < 0 or listener.closed:
        raise TransportError("listener is closed", uri, errno.EBADF)
    return fd
