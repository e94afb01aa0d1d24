"""vfio-user: byte layouts, the client against a libvfio-user-like fake, and
the mpvfio server's handling of bad input (../shared/spec/VFIO_USER.md)."""

from __future__ import annotations

import array
import errno
import json
import os
import shutil
import socket
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

from mpvfio.devices.emulated import EmulatedDevice
from mpvfio.devices.profiles import get_profile
from mpvfio.devices.vfio_user.client import VFIOUserDevice
from mpvfio.devices.vfio_user.server import DeviceServer, serve_device
from mpvfio.errors import DeviceError, TransitionError
from mpvfio.uapi import vfio_user as vu
from mpvfio.uapi.vfio import FEATURE_HDR, Feature, MigFlag, MigState

S = MigState
GET = 0x10000
SET = 0x20000
PROBE = 0x40000


# --------------------------------------------------------------- layouts


def test_header_is_16_packed_bytes() -> None:
    assert vu.HEADER.size == 16
    assert vu.HEADER.format == "<HHIII"


def test_set_stop_copy_matches_the_spec_example() -> None:
    # VFIO_USER.md §6, id=4: SET MIG_DEVICE_STATE STOP_COPY.
    want = bytes.fromhex(
        "04001000200000000000000000000000100000000200020003000000ffffffff"
    )
    payload = vu.pack_mig_state_set(S.STOP_COPY)
    assert vu.pack_header(4, vu.Command.DEVICE_FEATURE, len(payload)) + payload == want


def test_error_reply_with_payload_parses() -> None:
    # libvfio-user's failed SET: reply|error, errno 22, msg_size 32.
    raw = bytes.fromhex("0400100020000000210000001600000000")[:16]
    hdr = vu.unpack_header(raw)
    assert hdr.is_reply and hdr.is_error and not hdr.no_reply
    assert (hdr.error, hdr.payload_size) == (errno.EINVAL, 16)


def test_header_smaller_than_16_is_a_protocol_error() -> None:
    with pytest.raises(DeviceError) as ei:
        vu.unpack_header(vu.HEADER.pack(1, 1, 3, 0, 0))
    assert ei.value.errno == errno.EPROTO


def test_command_numbers() -> None:
    assert (vu.Command.VERSION, vu.Command.DEVICE_RESET) == (1, 13)
    assert (vu.Command.DEVICE_FEATURE, vu.Command.MIG_DATA_READ) == (16, 17)
    assert int(vu.Command.MIG_DATA_WRITE) == 18
    assert (vu.FLAG_NO_REPLY, vu.FLAG_ERROR, vu.TYPE_REPLY) == (0x10, 0x20, 0x1)


def test_version_payload_is_nul_terminated_json() -> None:
    caps = vu.Capabilities(8, 1 << 20, 4096)
    body = vu.pack_version(0, 2, caps)
    assert body[:4] == struct.pack("<HH", 0, 2)
    assert body.endswith(b"\0")
    doc = json.loads(body[4:-1])
    assert doc == {
        "capabilities": {
            "max_msg_fds": 8,
            "max_data_xfer_size": 1048576,
            "migration": {"pgsize": 4096},
        }
    }
    assert vu.unpack_version(body) == (0, 2, caps)


def test_version_reply_of_libvfio_user_parses() -> None:
    text = (
        b'{"capabilities":{"max_msg_fds":8,"max_data_xfer_size":1048576,'
        b'"migration":{"pgsize":4096}}}\0'
    )
    major, minor, caps = vu.unpack_version(struct.pack("<HH", 0, 2) + text)
    assert (major, minor) == (0, 2)
    assert (caps.max_msg_fds, caps.max_data_xfer_size) == (8, 1 << 20)
    assert caps.migration_pgsize == 4096


def test_version_defaults_and_bad_json() -> None:
    assert vu.unpack_version(struct.pack("<HH", 0, 0))[2] == vu.Capabilities()
    for bad in (b"{}", b"{nope}\0", b'{"capabilities":{"max_msg_fds":"x"}}\0'):
        with pytest.raises(DeviceError):
            vu.unpack_version(struct.pack("<HH", 0, 0) + bad)


def test_feature_flag_words() -> None:
    assert vu.FEATURE_FLAGS == {
        "GET MIGRATION": 0x00010001,
        "PROBE MIGRATION": 0x00040001,
        "GET MIG_DEVICE_STATE": 0x00010002,
        "SET MIG_DEVICE_STATE": 0x00020002,
        "GET MIG_DATA_SIZE": 0x00010009,
    }
    # GET: argsz is the largest reply payload accepted; no data is sent.
    get = vu.pack_feature_request(GET | Feature.MIGRATION, reply_data=8)
    assert get == struct.pack("<II", 16, 0x00010001)
    assert vu.pack_feature_request(PROBE | GET | Feature.MIGRATION) == struct.pack(
        "<II", 8, 0x00050001
    )


def test_mig_data_layouts() -> None:
    assert vu.pack_mig_data_read(4096) == struct.pack("<II", 4104, 4096)
    assert vu.pack_mig_data_write(b"abc") == struct.pack("<II", 11, 3) + b"abc"
    # libvfio-user pads the READ reply to the requested size: use 'size'.
    padded = struct.pack("<II", 8 + 3, 3) + b"xyz" + bytes(4093)
    assert vu.unpack_mig_data(padded) == (11, 3, b"xyz")
    with pytest.raises(DeviceError):
        vu.unpack_mig_data(struct.pack("<II", 100, 92) + b"short")


# --------------------------------------------- a libvfio-user-like fake


@dataclass
class Fake:
    """A scripted server behaving as libvfio-user does (spec §2-§4)."""

    path: str
    flags: int = 0x5  # STOP_COPY|PRE_COPY: libvfio-user never reports P2P
    xfer: int = 4096
    state: int = S.RUNNING
    stream: bytes = bytes(range(256)) * 40  # 10240 bytes of "device state"
    fail_set: dict[int, tuple[int, int]] = field(default_factory=dict)
    silent: set[int] = field(default_factory=set)  # commands never answered
    dma_read_first: bool = False
    log: list[tuple[int, bytes]] = field(default_factory=list)
    written: list[int] = field(default_factory=list)
    version_error: int = 0
    version_major: int = 0
    _pos: int = 0

    def __post_init__(self) -> None:
        self.done = threading.Event()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.bind(self.path)
        self.sock.listen(1)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _recv(self, conn: socket.socket, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            part = conn.recv(n - len(buf))
            if not part:
                raise EOFError
            buf += part
        return buf

    def _reply(
        self, conn: socket.socket, hdr: vu.Header, payload: bytes, err: int = 0
    ) -> None:
        flags = 0x1 | (0x20 if err else 0)
        conn.sendall(
            vu.pack_header(hdr.msg_id, hdr.command, len(payload), flags, err) + payload
        )

    def _run(self) -> None:
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return
        conn.settimeout(None)
        with conn:
            try:
                while True:
                    hdr = vu.unpack_header(self._recv(conn, 16))
                    payload = self._recv(conn, hdr.payload_size)
                    self.log.append((hdr.command, payload))
                    if hdr.command in self.silent:
                        self.done.wait(30)
                        return
                    if not self._handle(conn, hdr, payload):
                        return
            except (EOFError, OSError):
                return

    def _handle(self, conn: socket.socket, hdr: vu.Header, payload: bytes) -> bool:
        cmd = hdr.command
        if cmd == vu.Command.VERSION:
            if self.version_error:
                self._reply(conn, hdr, b"", self.version_error)
                return False
            _major, minor, _caps = vu.unpack_version(payload)
            text = json.dumps(
                {
                    "capabilities": {
                        "max_msg_fds": 8,
                        "max_data_xfer_size": self.xfer,
                        "migration": {"pgsize": 4096},
                    }
                }
            ).encode()
            reply = struct.pack("<HH", self.version_major, min(minor, 2))
            self._reply(conn, hdr, reply + text + b"\0")
        elif cmd == vu.Command.DEVICE_FEATURE:
            _argsz, flags, data = vu.unpack_feature(payload)
            index = flags & 0xFFFF
            if flags & PROBE:
                ok = index in (1, 2) and not (index == 1 and flags & SET)
                self._reply(conn, hdr, payload if ok else b"", 0 if ok else 22)
            elif index == Feature.MIGRATION and flags & GET:
                self._reply(conn, hdr, struct.pack("<IIQ", 16, flags, self.flags))
            elif index == Feature.MIG_DEVICE_STATE and flags & GET:
                self._reply(conn, hdr, struct.pack("<IIII", 16, flags, self.state, 0))
            elif index == Feature.MIG_DEVICE_STATE and flags & SET:
                new = struct.unpack_from("<I", data)[0]
                if new in self.fail_set:
                    err, self.state = self.fail_set[new]
                    self._reply(conn, hdr, payload, err)  # echoes the request
                elif new in (0, 5, 7) or new > 7:
                    self._reply(conn, hdr, payload, errno.EINVAL)
                else:
                    if new in (3, 6):
                        self._pos = 0
                    self.state = new
                    self._reply(conn, hdr, payload)
            else:  # MIG_DATA_SIZE, DMA logging, ...: EINVAL, header only
                self._reply(conn, hdr, b"", errno.EINVAL)
        elif cmd == vu.Command.MIG_DATA_READ:
            if self.dma_read_first:
                self.dma_read_first = False
                conn.sendall(vu.pack_header(77, vu.Command.DMA_READ, 0))
                ans = vu.unpack_header(self._recv(conn, 16))
                self.log.append((-ans.command, struct.pack("<I", ans.error)))
            _argsz, size = struct.unpack("<II", payload)
            if self.state == S.PRE_COPY:
                data = b""
            else:
                data = self.stream[self._pos : self._pos + min(size, 3000)]
            self._pos += len(data)
            padded = data.ljust(size, b"\0")  # libvfio-user's quirk
            self._reply(
                conn, hdr, struct.pack("<II", 8 + len(data), len(data)) + padded
            )
        elif cmd == vu.Command.MIG_DATA_WRITE:
            _argsz, size = struct.unpack_from("<II", payload)
            self.written.append(size)
            self._reply(conn, hdr, b"")
        elif cmd == vu.Command.DEVICE_RESET:
            if self.state in (S.STOP, S.STOP_COPY):
                self._reply(conn, hdr, b"", errno.EINVAL)
            else:
                self._reply(conn, hdr, b"")  # since #844: state untouched
        else:
            self._reply(conn, hdr, b"", errno.EINVAL)
        return True

    def close(self) -> None:
        self.done.set()
        self.sock.close()
        self.thread.join(15)


@pytest.fixture
def sockdir() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="mpvu")  # short: AF_UNIX paths max 108 bytes
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def fake(sockdir: str) -> Iterator[Callable[..., Fake]]:
    made: list[Fake] = []

    def make(**kw: object) -> Fake:
        f = Fake(os.path.join(sockdir, "fake.sock"), **kw)  # type: ignore[arg-type]
        made.append(f)
        return f

    yield make
    for f in made:
        f.close()


def _features(f: Fake) -> list[int]:
    return [
        struct.unpack_from("<I", p, 4)[0] for c, p in f.log if c == 16 and len(p) >= 8
    ]


def test_client_reports_flags_without_p2p(fake: Callable[..., Fake]) -> None:
    f = fake()
    with VFIOUserDevice(f.path, timeout=5) as dev:
        assert dev.migration_flags() == MigFlag.STOP_COPY | MigFlag.PRE_COPY
        assert not dev.migration_flags() & MigFlag.P2P
        assert dev.get_state() == S.RUNNING
        assert (dev.minor, dev.xfer) == (2, 4096)
    ver = f.log[0]
    assert ver[0] == vu.Command.VERSION
    _major, minor, caps = vu.unpack_version(ver[1])
    assert minor == 2 and caps.migration_pgsize == 4096 and caps.max_msg_fds == 8


def test_reads_use_size_not_msg_size_and_stay_in_xfer(
    fake: Callable[..., Fake],
) -> None:
    f = fake()
    with VFIOUserDevice(f.path, timeout=5) as dev:
        fd = dev.set_state(S.STOP_COPY)
        assert fd is not None
        out = bytearray()
        while chunk := dev.read_data(fd, 10000):
            out += chunk
        assert chunk == b""  # STOP_COPY: 0 bytes is the permanent end
        assert bytes(out) == f.stream
        sizes = [struct.unpack("<II", p)[1] for c, p in f.log if c == 17]
        assert sizes and max(sizes) <= 4096
        os.close(fd)


def test_zero_in_precopy_is_enomsg(fake: Callable[..., Fake]) -> None:
    f = fake()
    with VFIOUserDevice(f.path, timeout=5) as dev:
        fd = dev.set_state(S.PRE_COPY)
        assert fd is not None
        assert dev.read_data(fd, 4096) is None
        assert dev.precopy_info(fd) == (0, 0)
        os.close(fd)


def test_writes_are_chunked_to_the_servers_limit(fake: Callable[..., Fake]) -> None:
    f = fake(xfer=4096)
    with VFIOUserDevice(f.path, timeout=5) as dev:
        dev.set_state(S.STOP)
        fd = dev.set_state(S.RESUMING)
        assert fd is not None
        assert dev.write_data(fd, bytes(10000)) == 10000
        assert f.written == [4096, 4096, 1808]
        os.close(fd)


def test_failed_set_is_followed_by_a_get(fake: Callable[..., Fake]) -> None:
    # Spec §3.2: RESUMING -> RUNNING failed in RUNNING's callback, left at STOP.
    f = fake(fail_set={S.RUNNING: (errno.EINVAL, S.STOP)})
    with VFIOUserDevice(f.path, timeout=5) as dev:
        dev.set_state(S.STOP)
        fd = dev.set_state(S.RESUMING)
        with pytest.raises(TransitionError) as ei:
            dev.set_state(S.RUNNING)
        exc = ei.value
        assert (exc.errno, exc.cur, exc.new) == (errno.EINVAL, "RESUMING", "RUNNING")
        assert "now in STOP" in str(exc)
        # The failed SET (payload echoed, msg_size 32) then a GET.
        assert _features(f)[-2:] == [0x00020002, 0x00010002]
        assert dev.get_state() == S.STOP
        arcs = dev.take_arcs()
        assert arcs[-1].ok is False and arcs[-1].err == errno.EINVAL
        assert fd is not None
        assert os.read(fd, 1) == b""  # the resuming session ended: token at EOF
        os.close(fd)


def test_p2p_request_gets_einval_from_a_server_without_p2p(
    fake: Callable[..., Fake],
) -> None:
    f = fake()
    with VFIOUserDevice(f.path, timeout=5) as dev:
        with pytest.raises(TransitionError) as ei:
            dev.set_state(S.RUNNING_P2P)
        assert ei.value.errno == errno.EINVAL
        assert dev.get_state() == S.RUNNING


def test_no_mig_data_size_nor_checksum_from_libvfio_user(
    fake: Callable[..., Fake],
) -> None:
    f = fake()
    with VFIOUserDevice(f.path, timeout=5) as dev:
        for call in (dev.data_size, dev.checksum):
            with pytest.raises(DeviceError) as ei:
                call()
            assert ei.value.errno == errno.EOPNOTSUPP
        assert dev.get_state() == S.RUNNING  # the connection is still fine


def test_probe(fake: Callable[..., Fake]) -> None:
    f = fake()
    with VFIOUserDevice(f.path, timeout=5) as dev:
        assert dev.probe(Feature.MIGRATION) is True
        assert dev.probe(Feature.MIG_DEVICE_STATE, SET) is True
        assert dev.probe(Feature.MIGRATION, SET) is False
        assert dev.probe(Feature.MIG_DATA_SIZE) is False
    assert _features(f)[-4:] == [0x00050001, 0x00060002, 0x00060001, 0x00050009]


def test_reset_keeps_the_contract_with_new_libvfio_user(
    fake: Callable[..., Fake],
) -> None:
    f = fake()
    with VFIOUserDevice(f.path, timeout=5) as dev:
        dev.set_state(S.STOP)
        dev.reset()  # refused in STOP (EINVAL): walks to RUNNING instead
        assert dev.get_state() == S.RUNNING == f.state
        fd = dev.set_state(S.PRE_COPY)
        dev.reset()  # accepted, but the state stays PRE_COPY (#844): walk
        assert dev.get_state() == S.RUNNING == f.state
        assert fd is not None
        with pytest.raises(DeviceError) as ei:
            dev.read_data(fd, 10)
        assert ei.value.errno == errno.ENODEV
        os.close(fd)


def test_server_command_between_request_and_reply(fake: Callable[..., Fake]) -> None:
    f = fake(dma_read_first=True)
    with VFIOUserDevice(f.path, timeout=5) as dev:
        fd = dev.set_state(S.STOP_COPY)
        assert fd is not None
        assert dev.read_data(fd, 100) == f.stream[:100]
        assert (-vu.Command.DMA_READ, struct.pack("<I", errno.EINVAL)) in f.log
        os.close(fd)


def test_silent_server_times_out_then_connection_is_dead(
    fake: Callable[..., Fake],
) -> None:
    f = fake(silent={vu.Command.DEVICE_RESET})
    dev = VFIOUserDevice(f.path, timeout=0.3)
    t0 = time.monotonic()
    with pytest.raises(DeviceError) as ei:
        dev.reset()
    assert time.monotonic() - t0 < 3
    assert ei.value.errno == errno.ETIMEDOUT
    assert "no reply within" in str(ei.value)
    with pytest.raises(DeviceError) as ei:
        dev.get_state()
    assert ei.value.errno == errno.ENOTCONN
    dev.close()


@pytest.mark.parametrize(("err", "major"), [(errno.EINVAL, 0), (0, 1)])
def test_version_refused_or_wrong(
    fake: Callable[..., Fake], err: int, major: int
) -> None:
    f = fake(version_error=err, version_major=major)
    with pytest.raises(DeviceError) as ei:
        VFIOUserDevice(f.path, timeout=5)
    assert ei.value.errno == (err or errno.EPROTO)
    assert "version" in str(ei.value)


def test_connect_to_nothing(sockdir: str) -> None:
    with pytest.raises(DeviceError) as ei:
        VFIOUserDevice(os.path.join(sockdir, "none.sock"), timeout=1)
    assert ei.value.errno == errno.ENOENT
    assert "none.sock" in str(ei.value)


def test_session_token_is_a_pipe_checked_by_inode(fake: Callable[..., Fake]) -> None:
    f = fake()
    with VFIOUserDevice(f.path, timeout=5) as dev:
        fd = dev.set_state(S.STOP_COPY)
        assert fd is not None
        r, w = os.pipe()  # any other fd is refused
        with pytest.raises(DeviceError) as ei:
            dev.read_data(r, 10)
        assert ei.value.errno == errno.ENODEV
        os.close(r)
        os.close(w)
        os.close(fd)  # the caller closed its token: the number is dead
        with pytest.raises(DeviceError):
            dev.read_data(fd, 10)


# ---------------------------------------- the mpvfio server, raw socket


@pytest.fixture
def server(sockdir: str) -> Iterator[DeviceServer]:
    with DeviceServer(os.path.join(sockdir, "vf"), 2, "instant") as srv:
        yield srv


class Raw:
    """A bare client speaking bytes."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(5)
        self.sock.connect(path)
        self.id = 0

    def send(self, cmd: int, payload: bytes = b"", flags: int = 0) -> None:
        self.id += 1
        self.sock.sendall(vu.pack_header(self.id, cmd, len(payload), flags) + payload)

    def recv(self) -> tuple[vu.Header, bytes]:
        raw = self._exact(16)
        hdr = vu.unpack_header(raw)
        return hdr, self._exact(hdr.payload_size)

    def _exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            part = self.sock.recv(n - len(buf))
            if not part:
                raise EOFError(f"closed after {len(buf)} of {n} bytes")
            buf += part
        return buf

    def call(self, cmd: int, payload: bytes = b"") -> tuple[vu.Header, bytes]:
        self.send(cmd, payload)
        return self.recv()

    def hello(self) -> None:
        hdr, _ = self.call(
            vu.Command.VERSION,
            vu.pack_version(0, 2, vu.Capabilities(8, 1 << 20, 4096)),
        )
        assert not hdr.is_error

    def closed(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()


def _still_serves(path: str) -> None:
    with VFIOUserDevice(path, timeout=5) as dev:
        assert dev.get_state() == S.RUNNING


def test_server_answers_the_version_handshake(server: DeviceServer) -> None:
    raw = Raw(server.paths[0])
    hdr, body = raw.call(
        vu.Command.VERSION, vu.pack_version(0, 7, vu.Capabilities(8, 4096, 4096))
    )
    assert hdr.is_reply and not hdr.is_error and hdr.msg_id == 1
    major, minor, caps = vu.unpack_version(body)
    assert (major, minor, caps.migration_pgsize) == (0, 2, 4096)
    # the client's limit applies to reads: 4097 is too much now
    hdr, _ = raw.call(vu.Command.DEVICE_FEATURE, vu.pack_mig_state_set(S.STOP_COPY))
    assert not hdr.is_error
    hdr, _ = raw.call(vu.Command.MIG_DATA_READ, vu.pack_mig_data_read(4097))
    assert (hdr.is_error, hdr.error) == (True, errno.EINVAL)
    hdr, body = raw.call(vu.Command.MIG_DATA_READ, vu.pack_mig_data_read(4096))
    assert vu.unpack_mig_data(body)[1] == 4096
    raw.close()


@pytest.mark.parametrize(
    ("major", "pgsize"), [(1, 4096), (0, 65536)], ids=["major1", "pgsize"]
)
def test_server_refuses_a_bad_version_and_closes(
    server: DeviceServer, major: int, pgsize: int
) -> None:
    raw = Raw(server.paths[0])
    hdr, body = raw.call(
        vu.Command.VERSION, vu.pack_version(major, 0, vu.Capabilities(8, 4096, pgsize))
    )
    assert (hdr.is_error, hdr.error, body) == (True, errno.EINVAL, b"")
    assert raw.closed()
    raw.close()
    _still_serves(server.paths[0])


def test_server_needs_version_first_and_only_once(server: DeviceServer) -> None:
    raw = Raw(server.paths[0])
    hdr, _ = raw.call(vu.Command.DEVICE_RESET)
    assert (hdr.is_error, hdr.error) == (True, errno.EINVAL)
    raw.hello()
    hdr, _ = raw.call(vu.Command.VERSION, vu.pack_version(0, 2, None))
    assert hdr.error == errno.EINVAL
    raw.close()


def test_unknown_and_unimplemented_commands(server: DeviceServer) -> None:
    raw = Raw(server.paths[0])
    raw.hello()
    for cmd, err in [(99, errno.EINVAL), (14, errno.EINVAL), (4, errno.EOPNOTSUPP)]:
        hdr, _ = raw.call(cmd, b"junk")
        assert (hdr.command, hdr.is_error, hdr.error) == (cmd, True, err)
    hdr, _ = raw.call(  # still in sync
        vu.Command.DEVICE_FEATURE,
        vu.pack_feature_request(GET | Feature.MIG_DEVICE_STATE, reply_data=8),
    )
    assert not hdr.is_error
    raw.close()


def test_malformed_header_closes_the_connection(server: DeviceServer) -> None:
    raw = Raw(server.paths[0])
    raw.sock.sendall(vu.HEADER.pack(1, 1, 3, 0, 0))  # msg_size < 16
    assert raw.closed()
    raw.close()
    _still_serves(server.paths[0])


def test_oversize_message_gets_e2big_and_closed(server: DeviceServer) -> None:
    raw = Raw(server.paths[0])
    raw.hello()
    raw.sock.sendall(vu.HEADER.pack(9, 18, 64 << 20, 0, 0))
    hdr, _ = raw.recv()
    assert (hdr.msg_id, hdr.is_error, hdr.error) == (9, True, errno.E2BIG)
    assert raw.closed()
    raw.close()
    _still_serves(server.paths[0])


def test_feature_validation(server: DeviceServer) -> None:
    raw = Raw(server.paths[0])
    raw.hello()
    cases = [
        (vu.pack_feature_request(GET | SET | Feature.MIG_DEVICE_STATE), errno.EINVAL),
        (struct.pack("<II", 12, GET | Feature.MIG_DEVICE_STATE), errno.EINVAL),
        (vu.pack_feature_request(SET | Feature.MIGRATION, bytes(8)), errno.EINVAL),
        (vu.pack_feature_request(GET | Feature.DMA_LOGGING_REPORT, reply_data=24), 22),
        (b"\1\2", errno.EINVAL),
    ]
    for payload, err in cases:
        hdr, _ = raw.call(vu.Command.DEVICE_FEATURE, payload)
        assert (hdr.is_error, hdr.error) == (True, err), payload.hex()
    probe = vu.pack_feature_request(PROBE | GET | Feature.MIGRATION)
    hdr, body = raw.call(vu.Command.DEVICE_FEATURE, probe)
    assert (hdr.is_error, body) == (False, probe)
    # a refused SET echoes its request payload, like libvfio-user
    bad = vu.pack_mig_state_set(9)
    hdr, body = raw.call(vu.Command.DEVICE_FEATURE, bad)
    assert (hdr.is_error, hdr.error, hdr.size, body) == (True, 22, 32, bad)
    raw.close()


def test_mig_data_outside_a_session_is_einval(server: DeviceServer) -> None:
    raw = Raw(server.paths[0])
    raw.hello()
    hdr, _ = raw.call(vu.Command.MIG_DATA_READ, vu.pack_mig_data_read(64))
    assert hdr.error == errno.EINVAL
    hdr, _ = raw.call(vu.Command.MIG_DATA_WRITE, vu.pack_mig_data_write(b"x"))
    assert hdr.error == errno.EINVAL
    hdr, _ = raw.call(vu.Command.MIG_DATA_WRITE, struct.pack("<II", 9, 5) + b"x")
    assert hdr.error == errno.EINVAL  # size disagrees with the message
    raw.close()


def test_no_reply_flag(server: DeviceServer) -> None:
    raw = Raw(server.paths[0])
    raw.hello()
    raw.send(vu.Command.DEVICE_FEATURE, vu.pack_mig_state_set(S.STOP), vu.FLAG_NO_REPLY)
    hdr, body = raw.call(
        vu.Command.DEVICE_FEATURE,
        vu.pack_feature_request(GET | Feature.MIG_DEVICE_STATE, reply_data=8),
    )
    assert hdr.msg_id == raw.id  # the SET got no reply
    assert struct.unpack_from("<I", body, FEATURE_HDR.size)[0] == S.STOP
    raw.close()


def test_fds_sent_by_a_client_are_closed(server: DeviceServer) -> None:
    raw = Raw(server.paths[0])
    r, w = os.pipe()
    msg = vu.pack_header(1, vu.Command.VERSION, 4) + vu.pack_version(0, 2, None)
    raw.sock.sendmsg(
        [msg], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [w]))]
    )
    os.close(w)
    hdr, _ = raw.recv()
    assert hdr.error == errno.EINVAL  # libvfio-user also refuses fds here
    os.set_blocking(r, True)
    assert os.read(r, 1) == b""  # every copy of the write end is closed
    os.close(r)
    raw.close()


def test_a_second_client_is_turned_away(server: DeviceServer) -> None:
    with VFIOUserDevice(server.paths[0], timeout=5) as first:
        with pytest.raises(DeviceError) as ei:
            VFIOUserDevice(server.paths[0], timeout=5)
        assert ei.value.errno == errno.ECONNRESET
        assert "busy" in str(ei.value)
        assert first.get_state() == S.RUNNING


def _wait_for(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition never became true"
        time.sleep(0.01)


def test_disconnect_releases_the_session(server: DeviceServer) -> None:
    dev = VFIOUserDevice(server.paths[0], timeout=5)
    fd = dev.set_state(S.STOP_COPY)
    assert fd is not None
    dev.read_data(fd, 100)
    dev.close()
    os.close(fd)
    _wait_for(lambda: server.device(0).get_state() == S.RUNNING)
    # a device left in STOP (no session) keeps it for the next client
    with VFIOUserDevice(server.paths[0], timeout=5) as dev:
        assert dev.get_state() == S.RUNNING
        dev.set_state(S.STOP)
    _wait_for(lambda: server.clients_served(0) == 2)
    with VFIOUserDevice(server.paths[0], timeout=5) as dev:
        assert dev.get_state() == S.STOP


def test_stop_unlinks_and_disconnects(sockdir: str) -> None:
    srv = DeviceServer(os.path.join(sockdir, "vf"), 2, "instant").start()
    dev = VFIOUserDevice(srv.paths[1], timeout=5)
    srv.stop()
    assert not any(os.path.exists(p) for p in srv.paths)
    with pytest.raises(DeviceError) as ei:
        dev.get_state()
    assert ei.value.errno in (errno.ECONNRESET, errno.EPIPE)
    dev.close()
    srv.stop()  # idempotent


def test_stale_socket_is_replaced_live_one_refused(sockdir: str) -> None:
    prefix = os.path.join(sockdir, "vf")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(prefix + "0.sock")
    stale.close()  # the path stays, nobody listens
    with DeviceServer(prefix, 1, "instant"):
        _still_serves(prefix + "0.sock")
        with pytest.raises(DeviceError) as ei:
            DeviceServer(prefix, 1, "instant").start()
        assert ei.value.errno == errno.EADDRINUSE


def test_serve_device_blocks_until_stopped(sockdir: str) -> None:
    path = os.path.join(sockdir, "one.sock")
    device = EmulatedDevice("one", get_profile("instant"))
    stop = threading.Event()
    t = threading.Thread(
        target=serve_device, args=(path, device), kwargs={"stop": stop}
    )
    t.start()
    try:
        _wait_for(lambda: os.path.exists(path))
        with VFIOUserDevice(path, timeout=5) as dev:
            dev.set_state(S.STOP)
            assert dev.checksum() == device.checksum()
        assert device.get_state() == S.STOP
    finally:
        stop.set()
        t.join(10)
    assert not t.is_alive() and not os.path.exists(path)
    device.close()
