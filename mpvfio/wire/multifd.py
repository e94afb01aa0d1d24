"""Multifd device-state packets and their target-side reassembly (QEMU.md R10).

Pure codec plus a thread-safe reassembly buffer; no sockets, no processes.

Wire layout of one multifd channel (every integer big-endian; a migration
opens its channels with :func:`mpvfio.net.transport.open_channels`,
whose own preamble replaces the one below, so :class:`ChannelPreamble` is
only a standalone codec)::

    channel  := preamble frame*                     (the end of file ends it)
    preamble := magic[8] = b"MPVFIOC\\x00", be32 version = 1,
                be32 channel index (< count), be32 channel count (1..255),
                session[16]  (the bytes of the main stream hello's session)
    frame    := wrapper, packet
    wrapper  := be32 magic 0x11223344, be32 version 1,            (R10.3)
                be32 flags = NOCOMP (0) | DEVICE_STATE (64),
                char idstr[256] (NUL-padded, at most 255 bytes),
                be32 instance_id (0), be32 next_packet_size (= len(packet))
    packet   := be32 version (0), be32 idx, be32 flags (bit 0 CONFIG_STATE),
                data[next_packet_size - 12]                       (R10.2)

The config packet (flags bit 0) is the last packet of its device; its data is
:func:`mpvfio.wire.stream.encode_config_state` of the config (R10.4).

Target side: one :class:`Reassembler` per device (``load_state_buffer`` of
R10.5 is :meth:`Reassembler.add`, the load thread of R10.6 consumes with
:meth:`Reassembler.next_chunk` and :meth:`Reassembler.config`), grouped in a
:class:`ReassemblyTable` keyed by idstr.
"""

from __future__ import annotations

import struct
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass

from mpvfio.errors import (
    MultifdCancelled,
    MultifdError,
    MultifdTimeout,
    UsageError,
)
from mpvfio.wire.stream import (
    SESSION_BYTES,
    BytesLike,
    Readable,
    Writable,
    _bytes_view,
    device_label,
    new_session,
    vfio_idstr,
)

__all__ = [
    "CHANNEL_MAGIC",
    "CHANNEL_VERSION",
    "DEFAULT_MAX_PACKET",
    "INVALID_IDX",
    "MULTIFD_FLAG_DEVICE_STATE",
    "MULTIFD_FLAG_NOCOMP",
    "MULTIFD_MAGIC",
    "MULTIFD_VERSION",
    "PACKET_FLAG_CONFIG_STATE",
    "PACKET_HEADER",
    "PACKET_VERSION",
    "PREAMBLE",
    "UINT64_MAX",
    "WRAPPER",
    "ChannelPreamble",
    "MultifdCancelled",
    "MultifdError",
    "MultifdTimeout",
    "Packet",
    "Reassembler",
    "ReassemblyTable",
    "Wrapper",
    "encode_packet",
    "pack_packet_header",
    "pack_wrapper",
    "parse_packet",
    "read_frame",
    "unpack_wrapper",
    "write_frame",
]

MULTIFD_MAGIC = 0x11223344
MULTIFD_VERSION = 1
MULTIFD_FLAG_NOCOMP = 0
MULTIFD_FLAG_DEVICE_STATE = 64  # 32 << 1
WRAPPER = struct.Struct(">III256sII")
"""``MultiFDPacketDeviceState_t``: magic, version, flags, idstr, instance, size."""

PACKET_VERSION = 0
"""``VFIO_DEVICE_STATE_PACKET_VER_CURRENT``."""
PACKET_FLAG_CONFIG_STATE = 1
"""``VFIO_DEVICE_STATE_CONFIG_STATE``: the config packet, the last one."""
INVALID_IDX = 0xFFFFFFFF
PACKET_HEADER = struct.Struct(">III")
"""``VFIODeviceStatePacket`` header: version, idx, flags (12 bytes)."""

CHANNEL_MAGIC = b"MPVFIOC\x00"
CHANNEL_VERSION = 1
PREAMBLE = struct.Struct(">8sIII16s")
"""The channel preamble: magic, version, index, count, session (36 bytes)."""

UINT64_MAX = (1 << 64) - 1
DEFAULT_MAX_PACKET = (1 << 30) + PACKET_HEADER.size
"""Default limit of ``next_packet_size`` accepted by :func:`read_frame`."""


# --------------------------------------------------------------------------
# wrapper and packet codec


@dataclass(frozen=True, slots=True)
class Wrapper:
    """A decoded multifd device-state wrapper (R10.3)."""

    idstr: str
    instance_id: int
    size: int
    flags: int = MULTIFD_FLAG_NOCOMP | MULTIFD_FLAG_DEVICE_STATE


@dataclass(frozen=True, slots=True)
class Packet:
    """A VFIO device-state packet (R10.2); ``data`` may be a view."""

    version: int
    idx: int
    flags: int
    data: bytes | bytearray | memoryview

    @property
    def config(self) -> bool:
        """True for the config packet (the last one of its device)."""
        return bool(self.flags & PACKET_FLAG_CONFIG_STATE)


def _check_u32(value: int, what: str) -> None:
    if not 0 <= value <= 0xFFFFFFFF:
        raise UsageError(f"{what} {value} does not fit a u32")


def pack_wrapper(idstr: str, size: int, *, instance_id: int = 0) -> bytes:
    """The 276-byte wrapper; ``idstr`` is NUL-padded and cut to 255 bytes."""
    _check_u32(size, "next_packet_size")
    _check_u32(instance_id, "instance_id")
    raw = idstr.encode("utf-8")[:255]
    return WRAPPER.pack(
        MULTIFD_MAGIC,
        MULTIFD_VERSION,
        MULTIFD_FLAG_NOCOMP | MULTIFD_FLAG_DEVICE_STATE,
        raw,
        instance_id,
        size,
    )


def unpack_wrapper(buf: BytesLike, *, max_size: int = DEFAULT_MAX_PACKET) -> Wrapper:
    """Decode and check a wrapper: magic, version, flags, idstr, size limit."""
    if len(buf) != WRAPPER.size:
        raise MultifdError(f"multifd wrapper has {len(buf)} bytes, not {WRAPPER.size}")
    magic, version, flags, raw, instance, size = WRAPPER.unpack(buf)
    if magic != MULTIFD_MAGIC:
        raise MultifdError(
            f"bad multifd packet magic 0x{magic:08x}, expected 0x{MULTIFD_MAGIC:08x}"
        )
    if version != MULTIFD_VERSION:
        raise MultifdError(
            f"unsupported multifd packet version {version}, expected {MULTIFD_VERSION}"
        )
    if flags != MULTIFD_FLAG_NOCOMP | MULTIFD_FLAG_DEVICE_STATE:
        raise MultifdError(
            f"multifd packet flags 0x{flags:x}: only NOCOMP|DEVICE_STATE (0x40) "
            "is supported"
        )
    nul = raw.find(b"\x00")
    if nul < 0:
        raise MultifdError("multifd idstr is not NUL-terminated")
    if raw[nul:].strip(b"\x00"):
        raise MultifdError("multifd idstr has bytes after its NUL terminator")
    try:
        idstr = raw[:nul].decode("utf-8")
    except UnicodeDecodeError as e:
        raise MultifdError(f"multifd idstr is not UTF-8: {e}") from e
    if size > max_size:
        raise MultifdError(
            f"multifd packet of {idstr!r} claims {size} bytes, more than the "
            f"limit of {max_size}"
        )
    return Wrapper(idstr, instance, size, flags)


def pack_packet_header(idx: int, *, config: bool = False, version: int = 0) -> bytes:
    """The 12-byte VFIO device-state packet header."""
    _check_u32(idx, "idx")
    _check_u32(version, "version")
    flags = PACKET_FLAG_CONFIG_STATE if config else 0
    return PACKET_HEADER.pack(version, idx, flags)


def encode_packet(idx: int, data: BytesLike, *, config: bool = False) -> bytes:
    """Header plus data in one buffer (convenient; copies ``data``)."""
    return pack_packet_header(idx, config=config) + bytes(data)


def parse_packet(buf: BytesLike, device: str = "") -> Packet:
    """Split a packet into header fields and a zero-copy view of its data.

    Only the length is checked here ("too short", the first R10.5 check);
    :meth:`Reassembler.add` does the rest.
    """
    mv = _bytes_view(buf)
    if mv.nbytes < PACKET_HEADER.size:
        who = f"{device_label(device)}: " if device else ""
        raise MultifdError(
            f"{who}device state packet too short ({mv.nbytes} bytes, the header "
            f"alone is {PACKET_HEADER.size})",
            device,
        )
    version, idx, flags = PACKET_HEADER.unpack_from(mv)
    return Packet(version, idx, flags, mv[PACKET_HEADER.size :])


# --------------------------------------------------------------------------
# channel preamble and frames on a file


@dataclass(frozen=True, slots=True)
class ChannelPreamble:
    """The first bytes of every multifd channel: ties it to the main stream.

    :param index: this channel's index, ``0 <= index < count``.
    :param count: the number of channels (the hello's multifd_channels).
    :param session: the hello's session (32 lowercase hex digits).
    """

    index: int
    count: int
    session: str

    def __post_init__(self) -> None:
        if not 1 <= self.count <= 255:
            raise UsageError(f"channel count {self.count} is out of range 1..255")
        if not 0 <= self.index < self.count:
            raise UsageError(
                f"channel index {self.index} is not in 0..{self.count - 1}"
            )
        try:
            raw = bytes.fromhex(self.session)
        except (ValueError, TypeError) as e:
            raise UsageError(f"session {self.session!r} is not hex: {e}") from e
        if len(raw) != SESSION_BYTES or raw.hex() != self.session:
            raise UsageError(
                f"session must be {2 * SESSION_BYTES} lowercase hex digits: "
                f"{self.session!r}"
            )

    @classmethod
    def new(cls, index: int, count: int, session: str | None = None) -> ChannelPreamble:
        """A preamble with a fresh session unless one is given."""
        return cls(index, count, session if session is not None else new_session())

    def pack(self) -> bytes:
        """The 36-byte preamble."""
        return PREAMBLE.pack(
            CHANNEL_MAGIC,
            CHANNEL_VERSION,
            self.index,
            self.count,
            bytes.fromhex(self.session),
        )

    @classmethod
    def unpack(cls, buf: BytesLike) -> ChannelPreamble:
        """Decode and check a preamble; raise :class:`MultifdError`."""
        if len(buf) != PREAMBLE.size:
            raise MultifdError(
                f"channel preamble has {len(buf)} bytes, not {PREAMBLE.size}"
            )
        magic, version, index, count, session = PREAMBLE.unpack(buf)
        if magic != CHANNEL_MAGIC:
            raise MultifdError(
                f"not an mpvfio multifd channel (magic {magic!r}, expected "
                f"{CHANNEL_MAGIC!r})"
            )
        if version != CHANNEL_VERSION:
            raise MultifdError(
                f"unsupported multifd channel version {version}, this side speaks "
                f"{CHANNEL_VERSION}"
            )
        try:
            return cls(index, count, session.hex())
        except UsageError as e:
            raise MultifdError(f"bad channel preamble: {e}") from e

    @classmethod
    def read(cls, f: Readable) -> ChannelPreamble:
        """Read and check a preamble from a file."""
        return cls.unpack(_read_exact(f, PREAMBLE.size, "channel preamble", True))


def _read_exact(f: Readable, n: int, what: str, required: bool) -> bytes | bytearray:
    """``n`` bytes; ``b""`` at a clean end when not ``required``."""
    buf: bytes | bytearray = b""
    got = 0
    while got < n:
        try:
            part = f.read(n - got)
        except OSError as e:
            raise MultifdError(f"read of {what} failed: {e}") from e
        if part is None:
            raise MultifdError(f"read of {what} would block (non-blocking file)")
        if not part:
            if got == 0 and not required:
                return b""
            raise MultifdError(
                f"truncated multifd channel: {what} needs {n} bytes, got {got}"
            )
        if got == 0 and len(part) == n:
            return part
        if got == 0:
            buf = bytearray(n)
        assert isinstance(buf, bytearray)
        buf[got : got + len(part)] = part
        got += len(part)
    return buf


def write_frame(
    f: Writable,
    idstr: str,
    idx: int,
    data: BytesLike,
    *,
    config: bool = False,
    instance_id: int = 0,
) -> int:
    """Write wrapper + packet header, then ``data`` uncopied; return the size."""
    mv = _bytes_view(data)
    size = PACKET_HEADER.size + mv.nbytes
    head = pack_wrapper(idstr, size, instance_id=instance_id) + pack_packet_header(
        idx, config=config
    )
    for part in (memoryview(head), mv):
        done = 0
        while done < part.nbytes:
            try:
                n = f.write(part[done:])
            except OSError as e:
                raise MultifdError(f"write of a multifd frame failed: {e}") from e
            if n is None or n <= 0:
                raise MultifdError(f"write of a multifd frame returned {n}")
            done += n
    return WRAPPER.size + size


def read_frame(
    f: Readable, *, max_size: int = DEFAULT_MAX_PACKET
) -> tuple[Wrapper, Packet] | None:
    """Read one frame; ``None`` at a clean end of the channel.

    ``next_packet_size`` is checked against ``max_size`` and against the
    12-byte minimum ("too short") before the data is read.
    """
    raw = _read_exact(f, WRAPPER.size, "multifd wrapper", False)
    if not raw:
        return None
    w = unpack_wrapper(raw, max_size=max_size)
    if w.size < PACKET_HEADER.size:
        raise MultifdError(
            f"device state packet of {w.idstr!r} too short ({w.size} bytes)"
        )
    version, idx, flags = PACKET_HEADER.unpack(
        _read_exact(f, PACKET_HEADER.size, "packet header", True)
    )
    n = w.size - PACKET_HEADER.size
    data = _read_exact(f, n, f"packet {idx} of {w.idstr!r}", True) if n else b""
    return w, Packet(version, idx, flags, data)


# --------------------------------------------------------------------------
# reassembly


class Reassembler:
    """Target-side reassembly of one device's packets (R10.5, R10.6).

    Producers (multifd receive threads) call :meth:`add` in any order; one
    consumer calls :meth:`next_chunk` until it returns ``None`` (the config
    packet is next) and then :meth:`config`.  Everything runs under one
    :class:`threading.Condition`.

    Memory: :attr:`queued_bytes` counts the data bytes stored and not yet
    handed out (config included); :meth:`next_chunk` and :meth:`config`
    drop their reference.  Consumed indexes stay "filled" (replays fail).

    :param device: the device name (for messages).
    :param max_queued: x-migration-max-queued-buffers-size; a packet that
        would make :attr:`queued_bytes` strictly greater fails.
    """

    def __init__(self, device: str, *, max_queued: int = UINT64_MAX) -> None:
        if not 0 <= max_queued <= UINT64_MAX:
            raise UsageError(f"max_queued {max_queued} is not in 0..2**64-1")
        self.device = device
        self.max_queued = max_queued
        self._label = device_label(device)
        self._cond = threading.Condition()
        self._slots: dict[int, bytes] = {}
        self._next = 0
        self._idx_last: int | None = None
        self._max_data_idx = -1
        self._received = 0  # distinct indexes ever stored
        self._queued = 0
        self._config_taken = False
        self._cancelled: str | None = None

    # -- introspection --

    @property
    def queued_bytes(self) -> int:
        """Bytes stored and not yet handed to the consumer."""
        with self._cond:
            return self._queued

    @property
    def next_idx(self) -> int:
        """The index the consumer waits for."""
        with self._cond:
            return self._next

    @property
    def idx_last(self) -> int | None:
        """The config packet's index, once it arrived."""
        with self._cond:
            return self._idx_last

    @property
    def config_received(self) -> bool:
        """True once the config packet arrived."""
        with self._cond:
            return self._idx_last is not None

    @property
    def complete(self) -> bool:
        """True when every packet ``0..idx_last`` arrived (or was consumed)."""
        with self._cond:
            return self._complete()

    @property
    def done(self) -> bool:
        """True once :meth:`config` handed out the config."""
        with self._cond:
            return self._config_taken

    @property
    def cancelled(self) -> bool:
        """True after :meth:`cancel`."""
        with self._cond:
            return self._cancelled is not None

    def _complete(self) -> bool:
        # every stored idx is <= idx_last (add() rejects data past the config)
        last = self._idx_last
        return last is not None and self._received == last + 1

    # -- producer --

    def _fail(self, msg: str, idx: int) -> MultifdError:
        return MultifdError(
            f"{self._label}: {msg} (packet idx {idx})", self.device, idx
        )

    def add(self, idx: int, flags: int, data: BytesLike, *, version: int = 0) -> None:
        """Store one packet's data (R10.5 checks, in order).

        Raise :class:`MultifdError` for: a cancelled reassembly, version != 0,
        idx 0xFFFFFFFF, unknown flag bits, a second config packet or a data
        packet past the config, a slot already filled (consumed ones too),
        or :attr:`queued_bytes` + n > :attr:`max_queued`.  Nothing changes
        on error.
        """
        n = memoryview(data).nbytes
        with self._cond:
            if self._cancelled is not None:
                raise MultifdCancelled(
                    f"{self._label}: {self._cancelled} (packet idx {idx} dropped)",
                    self.device,
                    idx,
                )
            if version != PACKET_VERSION:
                raise self._fail(
                    f"unsupported device state packet version {version}, expected "
                    f"{PACKET_VERSION}",
                    idx,
                )
            if idx == INVALID_IDX:
                raise self._fail("invalid packet index 0xFFFFFFFF", idx)
            if flags & ~PACKET_FLAG_CONFIG_STATE:
                raise self._fail(f"unknown packet flags 0x{flags:x}", idx)
            config = bool(flags & PACKET_FLAG_CONFIG_STATE)
            last = self._idx_last
            filled = idx < self._next or idx in self._slots
            if config and last is not None and last != idx:
                raise self._fail(
                    f"second config packet (the first had idx {last})", idx
                )
            if config and not filled and idx < self._max_data_idx:
                raise self._fail(
                    f"config packet arrived after data packet idx "
                    f"{self._max_data_idx} (the config is the last packet)",
                    idx,
                )
            if not config and last is not None and idx > last:
                raise self._fail(
                    f"data packet after the config packet (idx {last})", idx
                )
            if filled:
                raise self._fail("packet slot already filled", idx)
            if self._queued + n > self.max_queued:
                raise self._fail(
                    f"queued buffers would reach {self._queued + n} bytes, over the "
                    f"limit of {self.max_queued} (x-migration-max-queued-buffers-size)",
                    idx,
                )
            self._slots[idx] = data if isinstance(data, bytes) else bytes(data)
            self._queued += n
            self._received += 1
            if config:
                self._idx_last = idx
            else:
                self._max_data_idx = max(self._max_data_idx, idx)
            self._cond.notify_all()

    def add_packet(self, packet: Packet) -> None:
        """:meth:`add` a parsed :class:`Packet`."""
        self.add(packet.idx, packet.flags, packet.data, version=packet.version)

    def add_raw(self, buf: BytesLike) -> None:
        """:func:`parse_packet` then :meth:`add`."""
        self.add_packet(parse_packet(buf, self.device))

    # -- consumer --

    def next_chunk(self, timeout: float | None = None) -> bytes | None:
        """The data of the next index in order, waiting for it.

        Zero-length packets are skipped.  Return ``None`` when the config
        packet is next (it is present: call :meth:`config`) or was taken.
        Raise :class:`MultifdCancelled` after :meth:`cancel` and
        :class:`MultifdTimeout` when ``timeout`` seconds pass.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                if self._cancelled is not None:
                    raise MultifdCancelled(
                        f"{self._label}: {self._cancelled}", self.device, self._next
                    )
                if self._config_taken:
                    return None
                idx = self._next
                if idx in self._slots:
                    if idx == self._idx_last:
                        return None
                    data = self._slots.pop(idx)
                    self._queued -= len(data)
                    self._next = idx + 1
                    if data:
                        return data
                    continue
                if deadline is None:
                    self._cond.wait()
                else:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise MultifdTimeout(
                            f"{self._label}: timed out after {timeout} s waiting for "
                            f"packet idx {idx}",
                            self.device,
                            idx,
                        )
                    self._cond.wait(left)

    def config(self) -> bytes:
        """The config packet's data, once :meth:`next_chunk` returned ``None``."""
        with self._cond:
            if self._cancelled is not None:
                raise MultifdCancelled(
                    f"{self._label}: {self._cancelled}", self.device, self._next
                )
            if self._config_taken:
                raise self._fail("config already consumed", self._next)
            last = self._idx_last
            if last is None or self._next != last or last not in self._slots:
                raise self._fail(
                    "config is not next: consume the data packets first"
                    if last is not None
                    else "config packet not received yet",
                    self._next,
                )
            data = self._slots.pop(last)
            self._queued -= len(data)
            self._next = last + 1
            self._config_taken = True
            self._cond.notify_all()
            return data

    def cancel(self, reason: str = "operation cancelled") -> None:
        """Wake every waiter with :class:`MultifdCancelled`; drop queued data."""
        with self._cond:
            if self._cancelled is None:
                self._cancelled = reason
            self._slots.clear()
            self._queued = 0
            self._cond.notify_all()


class ReassemblyTable:
    """The :class:`Reassembler` of every migrated device, keyed by idstr.

    :param devices: device names; their idstrs are ``vfio_idstr(name)``.
    :param max_queued: the per-device queued-bytes limit.
    """

    def __init__(self, devices: Iterable[str], *, max_queued: int = UINT64_MAX) -> None:
        self._by_idstr: dict[str, Reassembler] = {}
        self._by_name: dict[str, Reassembler] = {}
        for name in devices:
            idstr = vfio_idstr(name)
            if idstr in self._by_idstr:
                raise UsageError(f"device {name!r} is listed twice")
            r = Reassembler(name, max_queued=max_queued)
            self._by_idstr[idstr] = r
            self._by_name[name] = r

    @property
    def devices(self) -> tuple[str, ...]:
        """The device names, in order."""
        return tuple(self._by_name)

    def __getitem__(self, device: str) -> Reassembler:
        try:
            return self._by_name[device]
        except KeyError:
            raise UsageError(f"unknown device {device!r}") from None

    def __len__(self) -> int:
        return len(self._by_name)

    def lookup(self, idstr: str, instance_id: int = 0) -> Reassembler:
        """The reassembler of a wire idstr; unknown ones raise MultifdError."""
        r = self._by_idstr.get(idstr)
        if r is None or instance_id != 0:
            raise MultifdError(
                f"unknown device: idstr {idstr!r} instance {instance_id} is not "
                "migrated by this stream",
                "",
            )
        return r

    def add(
        self, idstr: str, packet: BytesLike | Packet, *, instance_id: int = 0
    ) -> None:
        """Route a packet (raw bytes or parsed) to its device's reassembler."""
        r = self.lookup(idstr, instance_id)
        if isinstance(packet, Packet):
            r.add_packet(packet)
        else:
            r.add_raw(packet)

    def add_frame(self, wrapper: Wrapper, packet: Packet) -> None:
        """Route a :func:`read_frame` result."""
        self.lookup(wrapper.idstr, wrapper.instance_id).add_packet(packet)

    @property
    def complete(self) -> bool:
        """True when every device's packets, config included, arrived."""
        return all(r.complete for r in self._by_name.values())

    def pending(self) -> list[str]:
        """Devices whose packets have not all arrived yet."""
        return [n for n, r in self._by_name.items() if not r.complete]

    @property
    def queued_bytes(self) -> int:
        """Sum over the devices."""
        return sum(r.queued_bytes for r in self._by_name.values())

    def cancel(self, reason: str = "operation cancelled") -> None:
        """Cancel every device."""
        for r in self._by_name.values():
            r.cancel(reason)
