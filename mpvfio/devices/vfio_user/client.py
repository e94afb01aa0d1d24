"""The vfio-user client backend: a device behind a UNIX socket (layer 1).

:class:`VFIOUserDevice` implements the :class:`~mpvfio.devices.base.DeviceBackend`
contract over the vfio-user protocol (../shared/spec/VFIO_USER.md), with
nothing but :mod:`socket` and :mod:`struct`:

* VERSION 0.2 with ``max_msg_fds``, ``max_data_xfer_size`` and
  ``migration.pgsize`` 4096; the server's answer must be major 0, minor <= 2.
  Transfers use the smaller of both sides' ``max_data_xfer_size``.
* DEVICE_FEATURE GET MIGRATION (the flags are reported as the server gives
  them: libvfio-user says STOP_COPY|PRE_COPY, never P2P), GET/SET
  MIG_DEVICE_STATE, GET MIG_DATA_SIZE when the server offers it (an mpvfio
  extension; libvfio-user does not, and :meth:`VFIOUserDevice.data_size`
  then raises EOPNOTSUPP).
* MIG_DATA_READ / MIG_DATA_WRITE in chunks of at most the transfer size;
  the data length of a READ reply comes from its ``size`` field only
  (libvfio-user pads the message).  A READ of 0 bytes is the end of the
  data: temporary in PRE_COPY/PRE_COPY_P2P (``None``, the kernel's
  ENOMSG), permanent in STOP_COPY (``b""``).
* DEVICE_RESET; error replies are read whole (libvfio-user echoes the
  request payload in some of them).
* **A GET of the device state follows every failed SET**: the SET reply
  never says where a failed walk stopped.

Errors become mpvfio errors here, at the boundary: a failed SET raises
:class:`~mpvfio.errors.TransitionError` (the server's errno, the state
reached in the message); everything else, including a dead or silent
server, raises :class:`~mpvfio.errors.DeviceError`.  **Every wait has a
deadline** (``timeout`` seconds per request): a server that dies
mid-transition gives ECONNRESET at once, one that hangs gives ETIMEDOUT.
After either, the connection is unusable (a late reply would desynchronise
it): every later call raises ENOTCONN; open a new backend.

**The data fd.**  vfio-user has no data_fd: data moves in-band on the
control socket.  The contract's "data fd" is mapped to a *session token*:
the read end of a pipe (``O_CLOEXEC``) that the backend creates when a
session opens (the same arcs that return a data_fd in the kernel) and
hands to the caller, who owns it and closes it, exactly as with a kernel
data_fd.  The backend keeps the write end and closes it when the session
ends (leaving the saving group or RESUMING, reset, close, a broken
connection), so the token reads end-of-stream (``POLLHUP``) once its
session is over.  The token carries no data: pass it to
:meth:`VFIOUserDevice.read_data` / :meth:`VFIOUserDevice.write_data`.  The
backend recognises its token by the pipe's inode, so a stale or recycled fd
number is refused (ENODEV), never mistaken for the live session.

**PRECOPY_INFO.**  vfio-user has no equivalent.
:meth:`VFIOUserDevice.precopy_info` reads one transfer ahead into a
client-side buffer (served first by the next ``read_data``) and reports
``(buffered bytes, 0)``: ``(0, 0)`` exactly when the server has nothing
more for now; ``initial_bytes`` is a lower bound, ``dirty_bytes`` is always
0 (the protocol cannot tell them apart; mtty also reports 0).

**Arc records.**  The client cannot see the hops inside a SET: it records
one :class:`~mpvfio.devices.base.ArcRecord` per SET request (``src`` = the
state before, ``dst`` = the requested state).

**Reset.**  libvfio-user since #844 (2026-05) no longer puts the migration
state back to RUNNING on DEVICE_RESET, and refuses RESET in STOP and
STOP_COPY.  :meth:`VFIOUserDevice.reset` keeps the contract (RUNNING
afterwards): it GETs the state after the reset and walks to RUNNING if the
server left it elsewhere, and falls back to SET RUNNING when RESET is
refused in STOP/STOP_COPY.

mpvfio's own server (:mod:`mpvfio.devices.vfio_user.server`) also answers a
private checksum feature: :meth:`VFIOUserDevice.checksum` is the test hook
that reads the server-side device's state digest.
"""

from __future__ import annotations

import array
import errno as _errno
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from types import TracebackType

from mpvfio.devices.base import ArcRecord
from mpvfio.errors import DeviceError, TransitionError, errno_name
from mpvfio.uapi import vfio_user as vu
from mpvfio.uapi.vfio import (
    FEATURE_MIG_DATA_SIZE,
    FEATURE_MIG_STATE,
    FEATURE_MIGRATION,
    PRECOPY_STATES,
    SAVING_GROUP,
    VFIO_DEVICE_FEATURE_GET,
    VFIO_DEVICE_FEATURE_PROBE,
    Feature,
    MigFlag,
    MigState,
)

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "ConnectionClosed",
    "MessageSocket",
    "RemoteError",
    "VFIOUserDevice",
]

#: Default deadline of one request (a SET includes the device's arcs).
DEFAULT_TIMEOUT_S = 60.0
_S = MigState
_MAX_FDS = 8
_FD_SIZE = array.array("i").itemsize


class ConnectionClosed(Exception):
    """The peer closed the connection (EOF), possibly mid-message."""


class RemoteError(Exception):
    """An error reply: ``err`` (positive errno) and the reply's payload."""

    def __init__(self, err: int, payload: bytes = b"") -> None:
        super().__init__(err, payload)
        self.err = err or _errno.EIO
        self.payload = payload


class MessageSocket:
    """Framed vfio-user messages on a stream socket, with deadlines.

    Received file descriptors (SCM_RIGHTS) are collected per message and
    returned to the caller, who must close them: no migration message
    carries one, but a peer may attach some and they must not leak.

    :param sock: a connected ``AF_UNIX`` ``SOCK_STREAM`` socket (owned).
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._anc = socket.CMSG_SPACE(_MAX_FDS * _FD_SIZE)

    def close(self) -> None:
        """Close the socket (idempotent)."""
        try:
            self.sock.close()
        except OSError:
            pass

    def _arm(self, deadline: float | None) -> None:
        if deadline is None:
            self.sock.settimeout(None)
            return
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("deadline passed")
        self.sock.settimeout(left)

    def send(self, data: bytes, deadline: float | None) -> None:
        """Send one whole message before ``deadline`` (monotonic seconds)."""
        view = memoryview(data)
        while view:
            self._arm(deadline)
            sent = self.sock.send(view)
            view = view[sent:]

    def _recv_into(
        self, buf: bytearray, deadline: float | None, fds: list[int]
    ) -> None:
        view = memoryview(buf)
        got = 0
        while got < len(buf):
            self._arm(deadline)
            n, anc, _flags, _addr = self.sock.recvmsg_into([view[got:]], self._anc)
            for level, kind, data in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    usable = len(data) - len(data) % _FD_SIZE
                    fds.extend(array.array("i", data[:usable]))
            if n == 0:
                raise ConnectionClosed(f"EOF after {got} of {len(buf)} bytes")
            got += n

    def recv_header(
        self, deadline: float | None, fds: list[int]
    ) -> tuple[vu.Header, bytes]:
        """Receive 16 header bytes; returns the parsed header and the raw bytes."""
        raw = bytearray(vu.HEADER.size)
        self._recv_into(raw, deadline, fds)
        return vu.unpack_header(raw), bytes(raw)

    def recv_payload(
        self, hdr: vu.Header, deadline: float | None, fds: list[int]
    ) -> bytes:
        """Receive the payload announced by ``hdr``."""
        buf = bytearray(hdr.payload_size)
        if buf:
            self._recv_into(buf, deadline, fds)
        return bytes(buf)


def close_fds(fds: list[int]) -> None:
    """Close received descriptors nobody asked for."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
    fds.clear()


@dataclass
class _Session:
    """One migration data session and its token (module docstring)."""

    kind: str  # "save" or "resume"
    token: int  # the read end, handed to the caller
    keep: int  # the write end, ours
    ident: tuple[int, int]
    buf: bytearray = field(default_factory=bytearray)


class VFIOUserDevice:
    """A migratable device behind a vfio-user socket (module docstring).

    :param path: the server's UNIX socket.
    :param name: the device's name in errors and records (default: the path).
    :param timeout: deadline in seconds of each request, connecting included.
    :param max_data_xfer_size: the transfer limit offered to the server.
    """

    def __init__(
        self,
        path: str,
        *,
        name: str | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        max_data_xfer_size: int = vu.DEFAULT_MAX_DATA_XFER_SIZE,
    ) -> None:
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0 s, got {timeout!r}")
        if max_data_xfer_size < 1:
            raise ValueError(f"max_data_xfer_size must be >= 1: {max_data_xfer_size}")
        self.path = path
        self.name = name or path
        self.timeout = float(timeout)
        self.offered_xfer = max_data_xfer_size
        self.xfer = max_data_xfer_size
        self.server_caps = vu.Capabilities()
        self.minor = 0
        self._lock = threading.RLock()
        self._msg_id = 0
        self._arcs: list[ArcRecord] = []
        self._session: _Session | None = None
        self._broken: str | None = None
        self._closed = False
        self._has_data_size: bool | None = None
        self._state = _S.RUNNING
        self._io = self._connect()
        try:
            self._handshake()
            self._flags = self._get_flags()
            self._state = self._get_state_raw()
        except BaseException:
            self._io.close()
            self._closed = True
            raise

    # ---------------------------------------------------------- transport
    def _connect(self) -> MessageSocket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.path)
        except OSError as exc:
            sock.close()
            err = exc.errno or _errno.ETIMEDOUT
            raise DeviceError(
                f"cannot connect to the vfio-user socket {self.path}: "
                f"{exc.strerror or exc}",
                self.name,
                err,
            ) from None
        return MessageSocket(sock)

    def _fail(self, what: str, why: str, err: int) -> DeviceError:
        """Mark the connection unusable and build the error to raise."""
        self._broken = f"{what}: {why}"
        self._end_session()
        self._io.close()
        return DeviceError(f"vfio-user {what}: {why}", self.name, err)

    def _check_usable(self) -> None:
        if self._closed:
            raise DeviceError("device is closed", self.name, _errno.ENODEV)
        if self._broken is not None:
            raise DeviceError(
                f"the vfio-user connection is unusable since: {self._broken}",
                self.name,
                _errno.ENOTCONN,
            )

    def _call(self, cmd: vu.Command, payload: bytes, what: str) -> bytes:
        """One request and its reply; an error reply raises :class:`RemoteError`.

        Transport failures raise :class:`DeviceError` and break the connection.
        """
        with self._lock:
            self._check_usable()
            self._msg_id = (self._msg_id + 1) & 0xFFFF
            msg_id = self._msg_id
            deadline = time.monotonic() + self.timeout
            limit = max(vu.max_message_size(self.xfer), 64 * 1024)
            fds: list[int] = []
            try:
                self._io.send(
                    vu.pack_header(msg_id, cmd, len(payload)) + payload, deadline
                )
                while True:
                    hdr, _raw = self._io.recv_header(deadline, fds)
                    if hdr.size > limit:
                        raise self._fail(
                            what,
                            f"reply of {hdr.size} bytes exceeds {limit}",
                            _errno.EPROTO,
                        )
                    body = self._io.recv_payload(hdr, deadline, fds)
                    close_fds(fds)
                    if hdr.is_reply:
                        break
                    self._refuse_server_command(hdr, deadline)
            except TimeoutError:
                raise self._fail(
                    what, f"no reply within {self.timeout:g} s", _errno.ETIMEDOUT
                ) from None
            except (ConnectionClosed, BrokenPipeError, ConnectionResetError) as exc:
                raise self._fail(
                    what,
                    f"the server closed the connection ({exc})",
                    _errno.ECONNRESET,
                ) from None
            except DeviceError as exc:  # a malformed header
                if self._broken is None:
                    raise self._fail(what, str(exc.args[0]), _errno.EPROTO) from None
                raise
            except OSError as exc:
                raise self._fail(
                    what, f"socket error: {exc}", exc.errno or _errno.EIO
                ) from None
            finally:
                close_fds(fds)  # those of a message cut short
            if hdr.msg_id != msg_id or hdr.command != cmd:
                raise self._fail(
                    what,
                    f"reply (id {hdr.msg_id}, command {hdr.command}) does not "
                    f"answer request (id {msg_id}, command {int(cmd)})",
                    _errno.EPROTO,
                )
            if hdr.is_error:
                raise RemoteError(hdr.error, body)
            return body

    def _refuse_server_command(self, hdr: vu.Header, deadline: float) -> None:
        """A server->client command (DMA_READ/WRITE): we map no DMA memory."""
        if not hdr.no_reply:
            self._io.send(
                vu.pack_header(
                    hdr.msg_id,
                    hdr.command,
                    0,
                    vu.TYPE_REPLY | vu.FLAG_ERROR,
                    _errno.EINVAL,
                ),
                deadline,
            )

    def _protocol(self, what: str, why: str) -> DeviceError:
        with self._lock:
            return self._fail(what, why, _errno.EPROTO)

    # ---------------------------------------------------------- handshake
    def _handshake(self) -> None:
        caps = vu.Capabilities(
            max_msg_fds=_MAX_FDS,
            max_data_xfer_size=self.offered_xfer,
            migration_pgsize=vu.MIG_PGSIZE,
        )
        what = "VERSION"
        try:
            body = self._call(
                vu.Command.VERSION,
                vu.pack_version(vu.VERSION_MAJOR, vu.VERSION_MINOR, caps),
                what,
            )
        except RemoteError as exc:
            raise self._fail(
                what,
                f"the server refused version {vu.VERSION_MAJOR}.{vu.VERSION_MINOR} "
                f"({errno_name(exc.err)})",
                exc.err,
            ) from None
        except DeviceError as exc:
            if exc.errno == _errno.ECONNRESET:
                raise DeviceError(
                    f"vfio-user server at {self.path} closed the connection during "
                    "VERSION (busy with another client, or it refused us)",
                    self.name,
                    _errno.ECONNRESET,
                ) from None
            raise
        try:
            major, minor, server = vu.unpack_version(body)
        except DeviceError as exc:
            raise self._protocol(what, str(exc.args[0])) from None
        if major != vu.VERSION_MAJOR or minor > vu.VERSION_MINOR:
            raise self._protocol(
                what,
                f"server answered version {major}.{minor} to our "
                f"{vu.VERSION_MAJOR}.{vu.VERSION_MINOR}",
            )
        self.minor = minor
        self.server_caps = server
        self.xfer = max(1, min(self.offered_xfer, server.max_data_xfer_size))

    # ------------------------------------------------------------ features
    def _feature(
        self, flags: int, data: bytes, reply_data: int, what: str
    ) -> tuple[int, bytes]:
        """DEVICE_FEATURE; returns the reply's ``(flags, data)``."""
        body = self._call(
            vu.Command.DEVICE_FEATURE,
            vu.pack_feature_request(flags, data, reply_data),
            what,
        )
        try:
            _argsz, rflags, rdata = vu.unpack_feature(body)
        except DeviceError as exc:
            raise self._protocol(what, str(exc.args[0])) from None
        if len(rdata) < reply_data:
            raise self._protocol(
                what, f"reply carries {len(rdata)} data bytes, expected {reply_data}"
            )
        return rflags, rdata

    def _get(self, feature: int, size: int, what: str, why: str = "") -> bytes:
        """DEVICE_FEATURE GET of ``feature``: its ``size``-byte reply data.

        An error reply raises :class:`DeviceError` with the reply's errno.
        """
        try:
            _f, data = self._feature(VFIO_DEVICE_FEATURE_GET | feature, b"", size, what)
        except RemoteError as exc:
            msg = f"vfio-user {what} failed" + (f": {why}" if why else "")
            raise DeviceError(msg, self.name, exc.err) from None
        return data

    def _get_flags(self) -> MigFlag:
        data = self._get(
            Feature.MIGRATION,
            FEATURE_MIGRATION.size,
            "GET MIGRATION",
            "the device does not support migration",
        )
        (value,) = FEATURE_MIGRATION.unpack_from(data)
        return MigFlag(int(value))

    def _get_state_raw(self) -> MigState:
        what = "GET MIG_DEVICE_STATE"
        data = self._get(Feature.MIG_DEVICE_STATE, FEATURE_MIG_STATE.size, what)
        state, _fd = FEATURE_MIG_STATE.unpack_from(data)
        if not 0 <= state < len(_S):
            raise self._protocol(what, f"server reports unknown state {state}")
        return _S(state)

    # ----------------------------------------------------------- sessions
    def _new_session(self, kind: str) -> int:
        token, keep = os.pipe2(os.O_CLOEXEC)
        st = os.fstat(token)
        self._session = _Session(kind, token, keep, (st.st_dev, st.st_ino))
        return token

    def _end_session(self) -> None:
        sess, self._session = self._session, None
        if sess is not None:
            try:
                os.close(sess.keep)
            except OSError:
                pass

    def _arrive(self, state: MigState, open_session: bool) -> int | None:
        """Record the state reached; end or open sessions; maybe a new token."""
        prev, self._state = self._state, state
        sess = self._session
        if sess is not None:
            keep = (sess.kind == "save" and state in SAVING_GROUP) or (
                sess.kind == "resume" and state == _S.RESUMING
            )
            if not keep:
                self._end_session()
        if not open_session:
            return None
        # Entering the saving group or RESUMING from outside: the last arc
        # is one of the four session-opening arcs (no saving state is ever
        # in the interior of a walk), so the kernel would return a data_fd.
        if state in SAVING_GROUP and prev not in SAVING_GROUP:
            self._end_session()
            return self._new_session("save")
        if state == _S.RESUMING and prev != _S.RESUMING:
            self._end_session()
            return self._new_session("resume")
        return None

    def _session_for(self, fd: int, kind: str) -> _Session:
        sess = self._session
        what = "saving" if kind == "save" else "resuming"
        if sess is not None and sess.kind == kind:
            try:
                st = os.fstat(fd)
            except OSError:
                pass
            else:
                if (st.st_dev, st.st_ino) == sess.ident:
                    return sess
        raise DeviceError(
            f"fd {fd} is not the token of an open {what} session",
            self.name,
            _errno.ENODEV,
        )

    # ------------------------------------------------------ the contract
    def migration_flags(self) -> MigFlag:
        """GET feature MIGRATION (read at connect; the flags are static)."""
        self._check_usable()
        return self._flags

    def get_state(self) -> MigState:
        """GET feature MIG_DEVICE_STATE."""
        with self._lock:
            state = self._get_state_raw()
            self._arrive(state, open_session=False)
            return state

    def set_state(self, new: MigState) -> int | None:
        """SET feature MIG_DEVICE_STATE; a new session token or ``None``.

        A failed SET is followed by a GET: the device's state afterwards is
        in the error message and in :meth:`get_state` (cached).
        """
        with self._lock:
            self._check_usable()
            cur = self._state
            if not 0 <= int(new) < len(_S):
                raise TransitionError(
                    f"state {int(new)} is out of range",
                    self.name,
                    _errno.EINVAL,
                    cur.name,
                    str(int(new)),
                )
            new = _S(new)
            what = f"SET MIG_DEVICE_STATE {cur.name} -> {new.name}"
            start = time.monotonic_ns()
            try:
                self._call(vu.Command.DEVICE_FEATURE, vu.pack_mig_state_set(new), what)
            except RemoteError as exc:
                end = time.monotonic_ns()
                self._arcs.append(
                    ArcRecord(self.name, cur, new, start, end, False, exc.err)
                )
                try:
                    actual = self._get_state_raw()
                except DeviceError as gexc:
                    raise TransitionError(
                        f"vfio-user {what} failed, and the GET after it failed "
                        f"too: {gexc}",
                        self.name,
                        exc.err,
                        cur.name,
                        new.name,
                    ) from None
                self._arrive(actual, open_session=False)
                raise TransitionError(
                    f"vfio-user {what} failed; the device is now in {actual.name}",
                    self.name,
                    exc.err,
                    cur.name,
                    new.name,
                ) from None
            self._arcs.append(
                ArcRecord(self.name, cur, new, start, time.monotonic_ns())
            )
            return self._arrive(new, open_session=True)

    def _mig_read(self, size: int, what: str) -> bytes:
        try:
            body = self._call(
                vu.Command.MIG_DATA_READ, vu.pack_mig_data_read(size), what
            )
        except RemoteError as exc:
            raise DeviceError(
                f"vfio-user {what} failed in {self._state.name}", self.name, exc.err
            ) from None
        try:
            _argsz, got, data = vu.unpack_mig_data(body)
        except DeviceError as exc:
            raise self._protocol(what, str(exc.args[0])) from None
        if got > size:
            raise self._protocol(what, f"server sent {got} bytes for {size} asked")
        return data

    def read_data(self, fd: int, n: int) -> bytes | None:
        """MIG_DATA_READ up to ``n`` bytes: data, ``b""`` (end), ``None`` (ENOMSG)."""
        with self._lock:
            self._check_usable()
            sess = self._session_for(fd, "save")
            if n <= 0:
                return b""
            if sess.buf:
                data = bytes(sess.buf[:n])
                del sess.buf[:n]
                return data
            out = bytearray()
            while len(out) < n:
                want = min(n - len(out), self.xfer)
                chunk = self._mig_read(want, "MIG_DATA_READ")
                out += chunk
                if len(chunk) < want:
                    break
            if out:
                return bytes(out)
            return None if self._state in PRECOPY_STATES else b""

    def write_data(self, fd: int, data: bytes | memoryview) -> int:
        """MIG_DATA_WRITE all of ``data``, in transfer-sized chunks."""
        with self._lock:
            self._check_usable()
            self._session_for(fd, "resume")
            view = memoryview(data).cast("B")
            done = 0
            while done < len(view):
                chunk = view[done : done + self.xfer]
                try:
                    self._call(
                        vu.Command.MIG_DATA_WRITE,
                        vu.pack_mig_data_write(chunk),
                        "MIG_DATA_WRITE",
                    )
                except RemoteError as exc:
                    raise DeviceError(
                        f"vfio-user MIG_DATA_WRITE of {len(chunk)} bytes at stream "
                        f"offset +{done} failed",
                        self.name,
                        exc.err,
                    ) from None
                done += len(chunk)
            return done

    def precopy_info(self, fd: int) -> tuple[int, int]:
        """``(initial, dirty)`` estimated by reading ahead (module docstring)."""
        with self._lock:
            self._check_usable()
            if self._state not in PRECOPY_STATES:
                raise DeviceError(
                    f"PRECOPY_INFO needs PRE_COPY or PRE_COPY_P2P, device is "
                    f"{self._state.name}",
                    self.name,
                    _errno.EINVAL,
                )
            sess = self._session_for(fd, "save")
            if not sess.buf:
                sess.buf += self._mig_read(self.xfer, "MIG_DATA_READ (precopy_info)")
            return len(sess.buf), 0

    def data_size(self) -> int:
        """GET MIG_DATA_SIZE (mpvfio extension); EOPNOTSUPP if not offered."""
        with self._lock:
            if self._has_data_size is None:
                self._has_data_size = self.probe(Feature.MIG_DATA_SIZE)
            if not self._has_data_size:
                raise DeviceError(
                    "the vfio-user server does not offer MIG_DATA_SIZE (it is not "
                    "part of vfio-user; only mpvfio's server answers it)",
                    self.name,
                    _errno.EOPNOTSUPP,
                )
            data = self._get(
                Feature.MIG_DATA_SIZE, FEATURE_MIG_DATA_SIZE.size, "GET MIG_DATA_SIZE"
            )
            (length,) = FEATURE_MIG_DATA_SIZE.unpack_from(data)
            return int(length)

    def probe(self, feature: int, ops: int = VFIO_DEVICE_FEATURE_GET) -> bool:
        """DEVICE_FEATURE PROBE: whether ``feature`` supports ``ops`` (GET/SET)."""
        with self._lock:
            try:
                self._feature(
                    VFIO_DEVICE_FEATURE_PROBE | ops | feature, b"", 0, "PROBE"
                )
            except RemoteError:
                return False
            return True

    def checksum(self) -> str:
        """SHA-256 (hex) of the server-side device state: mpvfio's test hook."""
        with self._lock:
            try:
                _f, data = self._feature(
                    VFIO_DEVICE_FEATURE_GET | vu.FEATURE_MPVFIO_CHECKSUM,
                    b"",
                    32,
                    "GET mpvfio checksum",
                )
            except RemoteError:
                raise DeviceError(
                    "the vfio-user server has no checksum hook (not an mpvfio server?)",
                    self.name,
                    _errno.EOPNOTSUPP,
                ) from None
            return data[:32].hex()

    def reset(self) -> None:
        """DEVICE_RESET, then make sure the device is RUNNING (docstring)."""
        with self._lock:
            self._check_usable()
            prev = self._state
            try:
                self._call(vu.Command.DEVICE_RESET, b"", "DEVICE_RESET")
            except RemoteError as exc:
                if exc.err == _errno.EINVAL and prev in (_S.STOP, _S.STOP_COPY):
                    pass  # libvfio-user refuses RESET while stopped: walk instead
                else:
                    raise DeviceError(
                        f"vfio-user DEVICE_RESET failed in {prev.name}",
                        self.name,
                        exc.err,
                    ) from None
            self._end_session()
            state = self._get_state_raw()
            self._arrive(state, open_session=False)
            if state == _S.RUNNING:
                return
            if state == _S.ERROR:
                raise DeviceError(
                    "the device is still in ERROR after DEVICE_RESET",
                    self.name,
                    _errno.EIO,
                )
            try:
                self.set_state(_S.RUNNING)
            except TransitionError as exc:
                raise DeviceError(
                    f"DEVICE_RESET left the device in {state.name} and it cannot "
                    f"reach RUNNING: {exc}",
                    self.name,
                    exc.errno,
                ) from None

    def take_arcs(self) -> list[ArcRecord]:
        """Records since the last call, one per SET request (module docstring)."""
        with self._lock:
            arcs, self._arcs = self._arcs, []
            return arcs

    def close(self) -> None:
        """Disconnect (idempotent); an open session ends on both sides."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._end_session()
            self._io.close()

    def __enter__(self) -> VFIOUserDevice:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else self._state.name
        return f"<VFIOUserDevice {self.name!r} at {self.path} ({state})>"
