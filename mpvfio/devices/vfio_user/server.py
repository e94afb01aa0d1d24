"""A vfio-user device server for emulated VFs (layer 1).

Serves :class:`~mpvfio.devices.emulated.EmulatedDevice` instances over the
vfio-user protocol (../shared/spec/VFIO_USER.md), migration subset:
VERSION, DEVICE_FEATURE (MIGRATION, MIG_DEVICE_STATE, and the mpvfio
extensions MIG_DATA_SIZE and a checksum test hook, see
:mod:`mpvfio.uapi.vfio_user`), MIG_DATA_READ, MIG_DATA_WRITE and
DEVICE_RESET.  Device-model commands (regions, IRQs, DMA) are answered
with EOPNOTSUPP: there is no device model behind the migration state.

:class:`DeviceServer` serves N VFs of one emulated PF, one UNIX socket each
(``<prefix><i>.sock``), one thread per socket:

* the profile gives every VF its latencies, state size, flags (P2P and
  PRE_COPY as the profile says: unlike libvfio-user, P2P states are served
  when advertised) and injected faults;
* the PF concurrency limit is one :class:`threading.BoundedSemaphore` shared
  by the VFs of the server process;
* each socket serves one client at a time (the protocol does not
  multiplex); a second client is accepted and closed at once, so it fails
  fast instead of waiting;
* a client disconnect releases the device's session: a device left in a
  saving state or RESUMING is reset (RUNNING, sessions torn down, as mlx5
  does when its fd is closed); a device in STOP, RUNNING, ... keeps its
  state for the next client, as a VM's stopped source device does;
* bad input never crashes the server: a malformed or unknown command gets an
  EINVAL error reply, an oversized one an E2BIG reply and a closed
  connection, a stalled one (a message started and not finished within
  :data:`MESSAGE_TIMEOUT_S`) a closed connection;
* :meth:`DeviceServer.stop` closes the sockets and unlinks their paths.  A
  thread stuck in a long arc (a ``hang`` fault) is not waited for beyond
  the stop timeout: its connection is shut down, so its client sees EOF.

Like the kernel (and libvfio-user's error replies), a failed SET echoes the
request payload with the Error flag; DEVICE_RESET puts the migration state
back to RUNNING (kernel semantics, the backend contract).

:class:`ServerProcess` runs a server as a separate process (as a real PF's
device server is), waits for its ``ready`` line and stops it on exit: what
the benchmarks, the tests and the launch scripts use.

Command line (``mpvfio device-server``, or
``python -m mpvfio.devices.vfio_user.server``)::

    --pf PATH_PREFIX --vfs N --profile P [--seed S]

prints one ``listening <path>`` line per socket and then ``ready``, and
runs until SIGINT or SIGTERM (a clean stop, exit status 0).
"""

from __future__ import annotations

import argparse
import contextlib
import errno as _errno
import logging
import os
import select
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType

from mpvfio.argtypes import run_main
from mpvfio.devices.base import ThreadGate
from mpvfio.devices.emulated import EmulatedDevice
from mpvfio.devices.profiles import Profile, get_profile
from mpvfio.devices.vfio_user.client import ConnectionClosed, MessageSocket, close_fds
from mpvfio.errors import DeviceError, MpvfioError, TransitionError, UsageError
from mpvfio.uapi import vfio_user as vu
from mpvfio.uapi.vfio import (
    FEATURE_HDR,
    FEATURE_MIG_DATA_SIZE,
    FEATURE_MIG_STATE,
    FEATURE_MIGRATION,
    SAVING_GROUP,
    VFIO_DEVICE_FEATURE_GET,
    VFIO_DEVICE_FEATURE_MASK,
    VFIO_DEVICE_FEATURE_PROBE,
    VFIO_DEVICE_FEATURE_SET,
    Feature,
    MigState,
)

__all__ = [
    "MESSAGE_TIMEOUT_S",
    "DeviceServer",
    "ServerProcess",
    "add_arguments",
    "main",
    "run",
    "serve_device",
]

_log = logging.getLogger(__name__)
_S = MigState
_SESSION_STATES = SAVING_GROUP | {_S.RESUMING}
#: How often idle loops look at the stop flag.
POLL_S = 0.1
#: A message whose first byte arrived must be complete within this.
MESSAGE_TIMEOUT_S = 30.0
#: Room for the VERSION JSON on top of the largest data message.
_SLACK = 64 * 1024
_GET = VFIO_DEVICE_FEATURE_GET
_SET = VFIO_DEVICE_FEATURE_SET
_PROBE = VFIO_DEVICE_FEATURE_PROBE
#: feature index -> (allowed ops, GET data size)
_FEATURES: dict[int, tuple[int, int]] = {
    Feature.MIGRATION: (_GET, FEATURE_MIGRATION.size),
    Feature.MIG_DEVICE_STATE: (_GET | _SET, FEATURE_MIG_STATE.size),
    Feature.MIG_DATA_SIZE: (_GET, FEATURE_MIG_DATA_SIZE.size),
    vu.FEATURE_MPVFIO_CHECKSUM: (_GET, 32),
}
_UNIMPLEMENTED = frozenset(
    {
        vu.Command.DMA_MAP,
        vu.Command.DMA_UNMAP,
        vu.Command.DEVICE_GET_INFO,
        vu.Command.DEVICE_GET_REGION_INFO,
        vu.Command.DEVICE_GET_REGION_IO_FDS,
        vu.Command.DEVICE_GET_IRQ_INFO,
        vu.Command.DEVICE_SET_IRQS,
        vu.Command.REGION_READ,
        vu.Command.REGION_WRITE,
        vu.Command.REGION_WRITE_MULTI,
    }
)


@dataclass
class _Reply:
    payload: bytes = b""
    err: int = 0
    close: bool = False


def _error(err: int, payload: bytes = b"", close: bool = False) -> _Reply:
    return _Reply(payload, err, close)


class _Client:
    """Per-connection protocol state."""

    def __init__(self) -> None:
        self.negotiated = False
        self.xfer = vu.DEFAULT_MAX_DATA_XFER_SIZE


class _Endpoint:
    """One socket serving one device, in its own thread."""

    def __init__(
        self, path: str, device: EmulatedDevice, stop: threading.Event, xfer: int
    ) -> None:
        self.path = path
        self.device = device
        self.stop = stop
        self.xfer = xfer
        self.lock = threading.Lock()  # the device: this thread and test hooks
        self.data_fd: int | None = None
        self.conn: socket.socket | None = None
        self.listener: socket.socket | None = None
        self.thread: threading.Thread | None = None
        self.clients_served = 0

    # ------------------------------------------------------------ sockets
    def bind(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            _clear_stale(self.path)
            sock.bind(self.path)
            sock.listen(4)
        except OSError as exc:
            sock.close()
            raise DeviceError(
                f"cannot listen on {self.path}: {exc.strerror or exc}",
                self.device.name,
                exc.errno or _errno.EIO,
            ) from None
        self.listener = sock

    def start(self) -> None:
        self.thread = threading.Thread(
            target=self._run, name=f"vfio-user {self.device.name}", daemon=True
        )
        self.thread.start()

    def _run(self) -> None:
        listener = self.listener
        assert listener is not None
        try:
            while not self.stop.is_set():
                ready, _, _ = select.select([listener], [], [], POLL_S)
                if not ready:
                    continue
                try:
                    conn, _addr = listener.accept()
                except OSError:
                    continue
                self.conn = conn
                self.clients_served += 1
                try:
                    self._serve(conn)
                finally:
                    self.conn = None
                    conn.close()
                    self._release()
        except Exception:  # noqa: BLE001  # a bug: log it, other VFs keep serving
            _log.exception("vfio-user endpoint %s failed", self.path)
        finally:
            listener.close()

    def _serve(self, conn: socket.socket) -> None:
        io = MessageSocket(conn)
        client = _Client()
        listener = self.listener
        assert listener is not None
        while not self.stop.is_set():
            ready, _, _ = select.select([conn, listener], [], [], POLL_S)
            if conn not in ready:
                if listener in ready:  # our client is still here: busy
                    self._turn_away(listener)
                continue
            fds: list[int] = []
            try:
                deadline = time.monotonic() + MESSAGE_TIMEOUT_S
                try:
                    hdr, _raw = io.recv_header(deadline, fds)
                except DeviceError:  # msg_size < 16: the stream cannot resync
                    _log.warning("%s: malformed header, closing", self.path)
                    return
                limit = vu.max_message_size(self.xfer) + _SLACK
                if hdr.size > limit:
                    _log.warning(
                        "%s: %d-byte message exceeds %d, closing",
                        self.path,
                        hdr.size,
                        limit,
                    )
                    self._send(io, hdr, _error(_errno.E2BIG))
                    return
                payload = io.recv_payload(hdr, deadline, fds)
                reply = self._dispatch(client, hdr, payload, fds)
                if not hdr.no_reply:
                    self._send(io, hdr, reply)
                if reply.close:
                    return
            except (ConnectionClosed, TimeoutError, OSError) as exc:
                _log.info("%s: client gone (%s)", self.path, exc)
                return
            finally:
                close_fds(fds)

    def _send(self, io: MessageSocket, hdr: vu.Header, reply: _Reply) -> None:
        flags = vu.TYPE_REPLY | (vu.FLAG_ERROR if reply.err else 0)
        io.send(
            vu.pack_header(
                hdr.msg_id, hdr.command, len(reply.payload), flags, reply.err
            )
            + reply.payload,
            time.monotonic() + MESSAGE_TIMEOUT_S,
        )

    def _turn_away(self, listener: socket.socket) -> None:
        try:
            extra, _addr = listener.accept()
        except OSError:
            return
        _log.info("%s: busy, turning away a second client", self.path)
        extra.close()

    def _release(self) -> None:
        """The client left: end the device's session (module docstring)."""
        with self.lock:
            self._close_data_fd()
            try:
                if self.device.get_state() in _SESSION_STATES:
                    self.device.reset()
            except MpvfioError as exc:
                _log.warning("%s: releasing the session failed: %s", self.path, exc)

    def _close_data_fd(self) -> None:
        fd, self.data_fd = self.data_fd, None
        if fd is not None:
            os.close(fd)

    def _sync_session(self, fd: int | None) -> None:
        """Keep the device's newest data fd; drop it once the session ended."""
        if fd is not None:
            self._close_data_fd()
            self.data_fd = fd
        if self.device.get_state() not in _SESSION_STATES:
            self._close_data_fd()

    # ----------------------------------------------------------- dispatch
    def _dispatch(
        self, client: _Client, hdr: vu.Header, payload: bytes, fds: list[int]
    ) -> _Reply:
        if hdr.msg_type != vu.TYPE_COMMAND:
            return _error(_errno.EINVAL)
        cmd = hdr.command
        if cmd == vu.Command.VERSION:
            return self._version(client, payload, fds)
        if not client.negotiated:
            return _error(_errno.EINVAL)
        if fds:
            return _error(_errno.EINVAL)
        try:
            with self.lock:
                if cmd == vu.Command.DEVICE_FEATURE:
                    return self._feature(payload)
                if cmd == vu.Command.MIG_DATA_READ:
                    return self._mig_read(client, payload)
                if cmd == vu.Command.MIG_DATA_WRITE:
                    return self._mig_write(client, payload)
                if cmd == vu.Command.DEVICE_RESET:
                    if payload:
                        return _error(_errno.EINVAL)
                    self.device.reset()
                    self._close_data_fd()
                    return _Reply()
        except DeviceError as exc:
            return _error(exc.errno or _errno.EIO)
        except OSError as exc:
            return _error(exc.errno or _errno.EIO)
        if cmd in _UNIMPLEMENTED:
            return _error(_errno.EOPNOTSUPP)
        return _error(_errno.EINVAL)

    def _version(self, client: _Client, payload: bytes, fds: list[int]) -> _Reply:
        if client.negotiated or fds:
            return _error(_errno.EINVAL)
        try:
            major, minor, caps = vu.unpack_version(payload)
        except DeviceError:
            return _error(_errno.EINVAL, close=True)
        if major != vu.VERSION_MAJOR:
            return _error(_errno.EINVAL, close=True)
        if caps.migration_pgsize not in (None, vu.MIG_PGSIZE):
            return _error(_errno.EINVAL, close=True)
        client.negotiated = True
        client.xfer = caps.max_data_xfer_size
        mine = vu.Capabilities(
            max_msg_fds=8, max_data_xfer_size=self.xfer, migration_pgsize=vu.MIG_PGSIZE
        )
        return _Reply(
            vu.pack_version(vu.VERSION_MAJOR, min(minor, vu.VERSION_MINOR), mine)
        )

    def _feature(self, payload: bytes) -> _Reply:
        try:
            argsz, flags, data = vu.unpack_feature(payload)
        except DeviceError:
            return _error(_errno.EINVAL)
        index = flags & VFIO_DEVICE_FEATURE_MASK
        ops = flags & ~VFIO_DEVICE_FEATURE_MASK
        if ops & ~(_GET | _SET | _PROBE):
            return _error(_errno.EINVAL)
        if ops & _GET and ops & _SET and not ops & _PROBE:
            return _error(_errno.EINVAL)
        if not ops:
            return _error(_errno.EINVAL)
        allowed, size = _FEATURES.get(index, (0, 0))
        if not allowed or ops & (_GET | _SET) & ~allowed:
            return _error(_errno.EINVAL)
        if ops & _PROBE:
            return _Reply(payload)
        if ops & _GET:
            if argsz < FEATURE_HDR.size + size:
                return _error(_errno.EINVAL)
            body = self._get(index)
            return _Reply(FEATURE_HDR.pack(FEATURE_HDR.size + size, flags) + body)
        # SET MIG_DEVICE_STATE
        if len(data) < FEATURE_MIG_STATE.size:
            return _error(_errno.EINVAL, payload)
        state = int.from_bytes(data[:4], "little")
        if not 0 <= state < len(_S):
            return _error(_errno.EINVAL, payload)
        fd: int | None = None
        try:
            fd = self.device.set_state(_S(state))
        except TransitionError as exc:
            return _error(exc.errno or _errno.EIO, payload)
        finally:
            try:
                self._sync_session(fd)
            except DeviceError:  # the device was closed under us (stopping)
                self._close_data_fd()
        return _Reply(payload)

    def _get(self, index: int) -> bytes:
        dev = self.device
        if index == Feature.MIGRATION:
            return FEATURE_MIGRATION.pack(int(dev.migration_flags()))
        if index == Feature.MIG_DEVICE_STATE:
            return FEATURE_MIG_STATE.pack(int(dev.get_state()), 0)
        if index == Feature.MIG_DATA_SIZE:
            return FEATURE_MIG_DATA_SIZE.pack(dev.data_size())
        return bytes.fromhex(dev.checksum())

    def _mig_read(self, client: _Client, payload: bytes) -> _Reply:
        if len(payload) != vu.MIG_DATA.size:
            return _error(_errno.EINVAL)
        argsz, size = vu.MIG_DATA.unpack(payload)
        if argsz < vu.MIG_DATA.size + size or size > min(client.xfer, self.xfer):
            return _error(_errno.EINVAL)
        fd = self.data_fd
        if fd is None or self.device.get_state() not in SAVING_GROUP:
            return _error(_errno.EINVAL)
        out = bytearray()
        while len(out) < size:
            chunk = self.device.read_data(fd, size - len(out))
            if not chunk:  # None (nothing for now) or b"" (the end): size 0
                break
            out += chunk
        return _Reply(vu.pack_mig_data_read_reply(bytes(out)))

    def _mig_write(self, client: _Client, payload: bytes) -> _Reply:
        try:
            argsz, size, data = vu.unpack_mig_data(payload)
        except DeviceError:
            return _error(_errno.EINVAL)
        if (
            len(data) != len(payload) - vu.MIG_DATA.size
            or argsz < vu.MIG_DATA.size + size
            or size > self.xfer
        ):
            return _error(_errno.EINVAL)
        fd = self.data_fd
        if fd is None or self.device.get_state() != _S.RESUMING:
            return _error(_errno.EINVAL)
        if self.device.write_data(fd, data) != size:
            return _error(_errno.EINVAL)
        return _Reply()

    # ------------------------------------------------------------ stopping
    def shutdown(self, timeout: float) -> bool:
        """Wait for the thread; on timeout shut its sockets down.  Joined?"""
        thread = self.thread
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                for sock in (self.conn, self.listener):
                    if sock is not None:
                        try:
                            sock.shutdown(socket.SHUT_RDWR)
                        except OSError:
                            pass
                return False
        elif self.listener is not None:
            self.listener.close()
        return True


def _unlink(path: str) -> None:
    """Remove a socket path; one already gone is fine."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _clear_stale(path: str) -> None:
    """Remove a dead server's socket at ``path``; refuse a live one."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise OSError(_errno.EEXIST, f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)  # nobody listens: stale
    else:
        raise OSError(_errno.EADDRINUSE, f"a server is listening on {path}")
    finally:
        probe.close()


class DeviceServer:
    """Serve the VFs of one emulated PF over vfio-user (module docstring).

    :param prefix: socket path prefix; VF ``i`` listens on ``<prefix><i>.sock``.
    :param vfs: how many VFs.
    :param profile: the VFs' profile (or a profile name / JSON path).
    :param seed: seeds the latency jitter.
    :param keys: per-VF state keys (default: the VF names, all different).
    :param max_data_xfer_size: the server's transfer limit.
    """

    def __init__(
        self,
        prefix: str,
        vfs: int,
        profile: Profile | str,
        *,
        seed: int = 0,
        keys: Sequence[str] | None = None,
        max_data_xfer_size: int = vu.DEFAULT_MAX_DATA_XFER_SIZE,
    ) -> None:
        if vfs < 1:
            raise UsageError(f"a PF needs at least one VF, got {vfs}")
        if keys is not None and len(keys) != vfs:
            raise UsageError(f"{len(keys)} keys for {vfs} VFs")
        if max_data_xfer_size < 1:
            raise UsageError(f"max_data_xfer_size must be >= 1: {max_data_xfer_size}")
        self.profile = get_profile(profile) if isinstance(profile, str) else profile
        self.prefix = prefix
        self.paths = [f"{prefix}{i}.sock" for i in range(vfs)]
        base = Path(prefix).name or "vf"
        gate = (
            ThreadGate(self.profile.pf_concurrency)
            if self.profile.pf_concurrency
            else None
        )
        self.devices = [
            EmulatedDevice(
                f"{base}{i}",
                self.profile,
                key=keys[i] if keys is not None else None,
                gate=gate,
                seed=seed,
            )
            for i in range(vfs)
        ]
        self._stop = threading.Event()
        self._endpoints = [
            _Endpoint(path, dev, self._stop, max_data_xfer_size)
            for path, dev in zip(self.paths, self.devices, strict=True)
        ]
        self._started = False
        self._stopped = False

    def start(self) -> DeviceServer:
        """Listen on every socket and start serving (returns ``self``)."""
        if self._started:
            return self
        self._started = True
        try:
            for ep in self._endpoints:
                ep.bind()
        except BaseException:
            self.stop()
            raise
        for ep in self._endpoints:
            ep.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving: close the sockets, unlink the paths (idempotent)."""
        if self._stopped:
            return
        self._stopped = True
        self._stop.set()
        for ep in self._endpoints:
            if ep.listener is not None:
                _unlink(ep.path)
        deadline = time.monotonic() + timeout
        for ep in self._endpoints:
            joined = ep.shutdown(max(0.0, deadline - time.monotonic()))
            if joined:
                with ep.lock:
                    ep._close_data_fd()
                    ep.device.close()
            else:
                _log.warning("%s: still busy in an arc at shutdown", ep.path)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until :meth:`stop` is called (or ``timeout``); stopped?"""
        return self._stop.wait(timeout)

    def device(self, index: int) -> EmulatedDevice:
        """VF ``index``'s device (a test hook; do not drive it directly)."""
        return self.devices[index]

    def checksum(self, index: int) -> str:
        """SHA-256 of VF ``index``'s state (test hook)."""
        ep = self._endpoints[index]
        with ep.lock:
            return ep.device.checksum()

    def clients_served(self, index: int) -> int:
        """How many clients VF ``index`` has accepted so far."""
        return self._endpoints[index].clients_served

    def __enter__(self) -> DeviceServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class ServerProcess:
    """``mpvfio device-server`` in a child process (module docstring).

    :param prefix: socket path prefix (VF ``i`` at ``<prefix><i>.sock``).
    :param vfs: how many VFs.
    :param profile: a built-in profile name or a JSON file path.
    :param seed: latency jitter seed.
    :param timeout: seconds to wait for ``ready``.
    :raise DeviceError: the server exited or did not get ready in time
        (its stderr is in the message).
    """

    def __init__(
        self,
        prefix: str,
        vfs: int,
        profile: str,
        *,
        seed: int = 0,
        timeout: float = 20.0,
    ) -> None:
        get_profile(profile)  # a bad profile: the caller's error, here
        self.prefix = prefix
        self.paths = [f"{prefix}{i}.sock" for i in range(vfs)]
        cmd = [
            sys.executable,
            "-m",
            "mpvfio.devices.vfio_user.server",
            "--pf",
            prefix,
            "--vfs",
            str(vfs),
            "--profile",
            profile,
            "--seed",
            str(seed),
        ]
        # stderr to a file: a pipe nobody reads would block a chatty server
        self._log = tempfile.TemporaryFile("w+")  # noqa: SIM115 - closed in stop()
        try:
            self.proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=self._log,
            )
        except BaseException:
            self._log.close()
            raise
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise

    @property
    def pid(self) -> int:
        """The server process's pid."""
        return self.proc.pid

    def specs(self) -> list[str]:
        """``vfio-user:PATH`` device specs of its VFs, in order."""
        return [f"vfio-user:{p}" for p in self.paths]

    def _wait_ready(self, timeout: float) -> None:
        out = self.proc.stdout
        assert out is not None
        fd = out.fileno()
        buf = b""
        deadline = time.monotonic() + timeout
        while b"ready\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise DeviceError(
                    f"the device server for {self.prefix} was not ready in "
                    f"{timeout:.0f} s",
                    self.prefix,
                    _errno.ETIMEDOUT,
                )
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                continue
            chunk = os.read(fd, 65536)  # unbuffered: select sees what is left
            if not chunk:  # exited
                self.proc.wait(5.0)
                raise DeviceError(
                    f"the device server for {self.prefix} exited with status "
                    f"{self.proc.returncode}: {self.stderr()[-500:]}",
                    self.prefix,
                    _errno.EIO,
                )
            buf += chunk

    def stderr(self) -> str:
        """What the server wrote on stderr so far."""
        self._log.seek(0)
        return self._log.read().strip()

    def kill(self) -> None:
        """SIGKILL the server (a crashed PF, for tests)."""
        if self.proc.poll() is None:
            self.proc.kill()

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, wait (then SIGKILL); the exit status (idempotent)."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5.0)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._log.close()
        for path in self.paths:  # a killed server leaves its sockets
            _unlink(path)
        return self.proc.returncode

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def serve_device(
    sock_path: str,
    device: EmulatedDevice,
    *,
    stop: threading.Event | None = None,
    max_data_xfer_size: int = vu.DEFAULT_MAX_DATA_XFER_SIZE,
) -> None:
    """Serve one device on ``sock_path`` until ``stop`` is set or Ctrl-C.

    Blocks.  The socket is closed and unlinked on return; the device is not
    closed (the caller owns it).
    """
    stop = stop or threading.Event()
    ep = _Endpoint(sock_path, device, stop, max_data_xfer_size)
    ep.bind()
    ep.start()
    try:
        while not stop.wait(POLL_S):
            pass
    finally:
        stop.set()
        _unlink(sock_path)
        ep.shutdown(5.0)
        with ep.lock:
            ep._close_data_fd()


# ----------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``device-server`` options."""
    parser.add_argument(
        "--pf",
        required=True,
        metavar="PATH_PREFIX",
        help="socket path prefix: VF i listens on PATH_PREFIX<i>.sock",
    )
    parser.add_argument(
        "--vfs", type=int, default=1, metavar="N", help="number of VFs (default 1)"
    )
    parser.add_argument(
        "--profile",
        default="instant",
        metavar="P",
        help="device profile: a built-in name or a .json file (default instant)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="latency jitter seed (default 0)"
    )
    parser.add_argument(
        "--max-data-xfer-size",
        type=int,
        default=vu.DEFAULT_MAX_DATA_XFER_SIZE,
        metavar="BYTES",
        help="largest data transfer per message (default 1 MiB)",
    )


def run(args: argparse.Namespace) -> int:
    """Serve until SIGINT/SIGTERM; 0 after a clean stop."""
    server = DeviceServer(
        args.pf,
        args.vfs,
        args.profile,
        seed=args.seed,
        max_data_xfer_size=args.max_data_xfer_size,
    )

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        server._stop.set()

    # SIGINT is handled like SIGTERM (a flag, no KeyboardInterrupt), so the
    # signal cannot land in the middle of the clean-up.
    main_thread = threading.current_thread() is threading.main_thread()
    old = (
        {s: signal.signal(s, _on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        if main_thread
        else {}
    )
    try:
        server.start()
        for path in server.paths:
            print(f"listening {path}", flush=True)
        print("ready", flush=True)
        while not server.wait(0.5):
            pass
    finally:
        server.stop()
        for signum, handler in old.items():
            signal.signal(signum, handler)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``mpvfio device-server`` as a function (errors: message, status 2)."""
    parser = argparse.ArgumentParser(
        prog="mpvfio device-server",
        description="Serve emulated VFs of one PF over vfio-user sockets.",
    )
    add_arguments(parser)
    return run_main(
        parser, argv, run, prog="mpvfio device-server", all_errors_usage=True
    )


if __name__ == "__main__":
    sys.exit(main())
