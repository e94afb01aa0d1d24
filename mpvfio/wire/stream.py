"""The main migration channel: mpvfio's stream header plus QEMU's savevm framing.

This module is a pure codec: it reads and writes binary file-like objects
(anything with ``read(n)`` / ``write(b)``, e.g. ``socket.makefile("rb")`` or
:class:`io.BytesIO`) and never opens sockets or starts processes.

Wire layout (every integer is big-endian)::

    stream   := header section* EOF [nothing more]

    header   := magic[8]       b"MPVFIOS\\x00"
                be32 version   1 (STREAM_VERSION); any other value is rejected
                be32 flags     bit 0 = multifd (FLAG_MULTIFD); other bits must be 0
                be16 reserved  0; a non-zero value is rejected (room for v1.x)
                be32 hello_len 0 < hello_len <= 64 KiB (MAX_HELLO)
                hello[hello_len]   UTF-8 JSON object, keys (all required):
                    "devices":           [idstr, ...]  unique, "<device>/vfio"
                    "multifd_channels":  int 0..255 (0 <=> flags bit 0 clear)
                    "config_after_iter": bool  (x-migration-load-config-after-iter)
                    "arch":              str   source architecture (<= 64 chars)
                    "session":           str   32 lowercase hex digits (16 bytes);
                                               every channel preamble
                                               repeats it (transport.py)
                unknown keys are ignored (forward compatible additions).

    section  := START | PART | END | FULL | CMD               (QEMU.md R11.2)
    START    := u8 0x01, be32 section_id, u8 idlen, idstr, be32 instance_id (0),
                be32 version_id (1), content, u8 0x7E
    FULL     := u8 0x04, the same header as START, content, u8 0x7E
    PART     := u8 0x02, be32 section_id, content, u8 0x7E
    END      := u8 0x03, be32 section_id, content, u8 0x7E
    CMD      := u8 0x08, be16 cmd (11 = MIG_CMD_SWITCHOVER_START), be16 len (0)
    EOF      := u8 0x00

Section content (R11.3; tags are be64, see :class:`VfioTag`):

=========  ===============================  ===================================
section    non-multifd                      multifd
=========  ===============================  ===================================
START      SETUP_STATE, EOS                 same
PART       [DATA_STATE, be64 n, n bytes]*,  same
           then EOS or INIT_DATA_SENT
END        {DATA_STATE, be64 n, n bytes}*,  EOS only
           EOS
FULL       CONFIG_STATE, be32 n, n bytes    EOS (config-after-iter off) or
           of config, EOS                   CONFIG_LOAD_READY (on)
=========  ===============================  ===================================

Protocol order (enforced by both :class:`StreamWriter` and
:class:`StreamReader`, mirroring ``qemu_savevm_state_*``): every START, then
PARTs, then at most one SWITCHOVER_START (mandatory before the first END in
multifd mode, R10.1), then one END per device, then one FULL per device, then
EOF.  A device must be named in the hello; its section id is given by its
START and reused by its FULL.  At EOF every device must have sent its FULL.

Device names and idstrs: the API speaks in device names (qdev ids); the wire
carries ``idstr = vfio_idstr(name)`` = ``"<name>/vfio"`` (or ``"vfio"`` for
the empty name, R4.3) with instance id 0.
"""

from __future__ import annotations

import enum
import json
import platform
import re
import secrets
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from mpvfio.errors import (
    StreamError,
    UsageError,
)

__all__ = [
    "DEFAULT_MAX_CHUNK",
    "FLAG_MULTIFD",
    "HEADER_SIZE",
    "MAX_HELLO",
    "MIG_CMD_SWITCHOVER_START",
    "SECTION_FOOTER",
    "SESSION_BYTES",
    "STREAM_MAGIC",
    "STREAM_VERSION",
    "BytesLike",
    "Config",
    "ConfigLoadReady",
    "DataChunk",
    "Eof",
    "FullEnd",
    "Header",
    "Hello",
    "InitDataSent",
    "PartEnd",
    "Readable",
    "Record",
    "SectionEnd",
    "SectionStart",
    "SectionType",
    "StreamError",
    "StreamReader",
    "StreamWriter",
    "SwitchoverStart",
    "VfioTag",
    "Writable",
    "decode_config_state",
    "device_label",
    "device_of_idstr",
    "encode_config_state",
    "new_session",
    "vfio_idstr",
]

STREAM_MAGIC = b"MPVFIOS\x00"
"""The first 8 bytes of every mpvfio main-channel stream."""
STREAM_VERSION = 1
"""The stream version this side speaks."""
FLAG_MULTIFD = 1
"""Header flag bit 0: stop-copy data and config travel on multifd channels."""
MAX_HELLO = 64 * 1024
"""Largest accepted hello blob (bytes)."""
DEFAULT_MAX_CHUNK = 1 << 30
"""Default limit of one DEV_DATA_STATE chunk or device config (1 GiB)."""
SECTION_FOOTER = 0x7E
"""QEMU's section footer byte (section footers are always on)."""
MIG_CMD_SWITCHOVER_START = 11
"""QEMU's ``MIG_CMD_SWITCHOVER_START`` command number."""
SESSION_BYTES = 16
"""Length of a session id (hex-encoded in the hello: 32 digits)."""
SECTION_VERSION = 1
"""``version_id`` of a VFIO section."""
INSTANCE_ID = 0
"""``instance_id`` of every mpvfio section."""

_HEADER = struct.Struct(">8sIIHI")  # magic, version, flags, reserved, hello_len
HEADER_SIZE = _HEADER.size
"""Size of the fixed part of the stream header (22 bytes)."""
_U8 = struct.Struct(">B")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_SEC = struct.Struct(">BI")  # type, section id
_START_TAIL = struct.Struct(">IIQQB")  # instance, version, SETUP, EOS, footer
_INST_VER = struct.Struct(">II")
_TAG_SIZE = struct.Struct(">QQ")  # DATA_STATE, n
_TAG_LEN32 = struct.Struct(">QI")  # CONFIG_STATE, n
_TAG_FOOT = struct.Struct(">QB")  # tag, footer
_CMD = struct.Struct(">BHH")
_SMALL_WRITE = 4096  # payloads up to this size are joined into one write()
_PIECE = 1 << 20  # reads larger than this go in pieces
_MAX_CONFIG = 0xFFFFFFFF  # be32 length
_SESSION_RE = re.compile(f"[0-9a-f]{{{2 * SESSION_BYTES}}}")
_MAX_ARCH = 64
_MAX_CHANNELS = 255

BytesLike = bytes | bytearray | memoryview
"""A payload the writer accepts (written without an extra copy)."""


class Readable(Protocol):
    """What :class:`StreamReader` needs: ``read(n)`` (short reads allowed)."""

    def read(self, size: int, /) -> bytes | None: ...


class Writable(Protocol):
    """What :class:`StreamWriter` needs: ``write(b)`` (partial writes allowed)."""

    def write(self, data: bytes | memoryview, /) -> int | None: ...


class SectionType(enum.IntEnum):
    """savevm section types (R11.2)."""

    EOF = 0x00
    START = 0x01
    PART = 0x02
    END = 0x03
    FULL = 0x04
    CMD = 0x08


class VfioTag(enum.IntEnum):
    """VFIO section payload flag words (R11.1)."""

    END_OF_STATE = 0xFFFFFFFFEF100001
    DEV_CONFIG_STATE = 0xFFFFFFFFEF100002
    DEV_SETUP_STATE = 0xFFFFFFFFEF100003
    DEV_DATA_STATE = 0xFFFFFFFFEF100004
    DEV_INIT_DATA_SENT = 0xFFFFFFFFEF100005
    DEV_CONFIG_LOAD_READY = 0xFFFFFFFFEF100006


_TAG_VALUES = frozenset(int(t) for t in VfioTag)


# --------------------------------------------------------------------------
# names


def vfio_idstr(device: str) -> str:
    """The savevm idstr of a device (R4.3): ``"<device>/vfio"``, or ``"vfio"``."""
    return f"{device}/vfio" if device else "vfio"


def device_of_idstr(idstr: str) -> str:
    """Invert :func:`vfio_idstr`; raise :class:`UsageError` for another form."""
    if idstr == "vfio":
        return ""
    if len(idstr) > 5 and idstr.endswith("/vfio"):
        return idstr[:-5]
    raise UsageError(f"idstr {idstr!r} is not of the form '<device>/vfio'")


def device_label(device: str) -> str:
    """A device name as messages show it: bare when plain, else ``repr()``."""
    if device and device.isprintable() and not any(c.isspace() for c in device):
        return device
    return repr(device)


_dl = device_label


def new_session() -> str:
    """A fresh random session id (32 lowercase hex digits)."""
    return secrets.token_hex(SESSION_BYTES)


def _check_device(name: object) -> str:
    if not isinstance(name, str):
        raise UsageError(f"device name {name!r} is not a string")
    if "\x00" in name:
        raise UsageError(f"device name {name!r} contains a NUL character")
    try:
        n = len(vfio_idstr(name).encode("utf-8"))
    except UnicodeEncodeError as e:
        raise UsageError(f"device name {name!r} is not encodable: {e}") from e
    if n > 255:
        raise UsageError(
            f"device name {name[:40]!r}... is too long: its idstr has {n} bytes, "
            "at most 255 fit a section header"
        )
    return name


# --------------------------------------------------------------------------
# hello


@dataclass(frozen=True)
class Hello:
    """The JSON blob after the fixed stream header (see the module docstring).

    :param devices: the migrated device names (qdev ids), unique; the wire
        carries their idstrs.
    :param multifd_channels: number of multifd channels, 0 = no multifd.
    :param config_after_iter: the source's x-migration-load-config-after-iter
        (resolved from AUTO): FULL sections carry DEV_CONFIG_LOAD_READY.
    :param arch: the source architecture (``platform.machine()`` by default).
    :param session: 32 lowercase hex digits tying multifd channels to this
        stream; random by default.
    """

    devices: tuple[str, ...]
    multifd_channels: int = 0
    config_after_iter: bool = False
    arch: str = field(default_factory=platform.machine)
    session: str = field(default_factory=new_session)

    def __post_init__(self) -> None:
        devices = self.devices
        if isinstance(devices, str) or not isinstance(devices, Iterable):
            raise UsageError(f"devices must be a sequence of names, not {devices!r}")
        devs = tuple(_check_device(d) for d in devices)
        seen: set[str] = set()
        for d in devs:
            if d in seen:
                raise UsageError(f"device {d!r} is listed twice")
            seen.add(d)
        object.__setattr__(self, "devices", devs)
        ch = self.multifd_channels
        if isinstance(ch, bool) or not isinstance(ch, int):
            raise UsageError(f"multifd_channels must be an int, not {ch!r}")
        if not 0 <= ch <= _MAX_CHANNELS:
            raise UsageError(f"multifd_channels {ch} is out of range 0..255")
        if not isinstance(self.config_after_iter, bool):
            raise UsageError(
                f"config_after_iter must be a bool, not {self.config_after_iter!r}"
            )
        if not isinstance(self.arch, str) or len(self.arch) > _MAX_ARCH:
            raise UsageError(f"arch must be a string of <= 64 chars: {self.arch!r}")
        if not isinstance(self.session, str) or not _SESSION_RE.fullmatch(self.session):
            raise UsageError(
                f"session must be {2 * SESSION_BYTES} lowercase hex digits: "
                f"{self.session!r}"
            )

    @property
    def multifd(self) -> bool:
        """True when stop-copy data and config travel on multifd channels."""
        return self.multifd_channels > 0

    @property
    def flags(self) -> int:
        """The header flags word."""
        return FLAG_MULTIFD if self.multifd else 0

    def idstrs(self) -> tuple[str, ...]:
        """The wire idstrs of :attr:`devices`, in order."""
        return tuple(vfio_idstr(d) for d in self.devices)

    def to_json(self) -> bytes:
        """The hello blob (compact JSON, sorted keys)."""
        obj = {
            "arch": self.arch,
            "config_after_iter": self.config_after_iter,
            "devices": list(self.idstrs()),
            "multifd_channels": self.multifd_channels,
            "session": self.session,
        }
        return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, blob: bytes | bytearray) -> Hello:
        """Parse and validate a hello blob; raise :class:`StreamError`."""
        try:
            obj: Any = json.loads(bytes(blob).decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise StreamError(f"hello is not UTF-8 JSON: {e}") from e
        if not isinstance(obj, dict):
            raise StreamError(f"hello is not a JSON object but {type(obj).__name__}")
        missing = sorted(
            {"arch", "config_after_iter", "devices", "multifd_channels", "session"}
            - set(obj)
        )
        if missing:
            raise StreamError(f"hello lacks the key(s) {', '.join(missing)}")
        idstrs = obj["devices"]
        if not isinstance(idstrs, list) or not all(isinstance(s, str) for s in idstrs):
            raise StreamError(f"hello 'devices' is not a list of strings: {idstrs!r}")
        try:
            names = tuple(device_of_idstr(s) for s in idstrs)
            return cls(
                devices=names,
                multifd_channels=obj["multifd_channels"],
                config_after_iter=obj["config_after_iter"],
                arch=obj["arch"],
                session=obj["session"],
            )
        except UsageError as e:
            raise StreamError(f"bad hello: {e}") from e


# --------------------------------------------------------------------------
# records


@dataclass(frozen=True, slots=True)
class Header:
    """The stream header was read and validated."""

    hello: Hello


@dataclass(frozen=True, slots=True)
class SectionStart:
    """A START section (DEV_SETUP_STATE, END_OF_STATE): ``load_setup`` time."""

    device: str
    section_id: int


@dataclass(frozen=True, slots=True)
class DataChunk:
    """One DEV_DATA_STATE chunk: precopy (PART) or stop-copy (END) data."""

    device: str
    data: bytes | bytearray
    stop_copy: bool = False


@dataclass(frozen=True, slots=True)
class PartEnd:
    """A PART section ended with END_OF_STATE."""

    device: str


@dataclass(frozen=True, slots=True)
class InitDataSent:
    """A PART section ended with DEV_INIT_DATA_SENT (switchover-ack)."""

    device: str


@dataclass(frozen=True, slots=True)
class SectionEnd:
    """An END section (save_complete) ended."""

    device: str


@dataclass(frozen=True, slots=True)
class Config:
    """A FULL section with the device config (non-multifd)."""

    device: str
    config: bytes | bytearray


@dataclass(frozen=True, slots=True)
class FullEnd:
    """A FULL section with END_OF_STATE only (multifd, no config-after-iter)."""

    device: str


@dataclass(frozen=True, slots=True)
class ConfigLoadReady:
    """A FULL section with DEV_CONFIG_LOAD_READY (multifd, config-after-iter)."""

    device: str


@dataclass(frozen=True, slots=True)
class SwitchoverStart:
    """The MIG_CMD_SWITCHOVER_START command."""


@dataclass(frozen=True, slots=True)
class Eof:
    """The savevm EOF byte: the stream is complete."""


Record = (
    Header
    | SectionStart
    | DataChunk
    | PartEnd
    | InitDataSent
    | SectionEnd
    | Config
    | FullEnd
    | ConfigLoadReady
    | SwitchoverStart
    | Eof
)
"""Everything :class:`StreamReader` yields."""


# --------------------------------------------------------------------------
# config blob (shared with the multifd config packet, R10.4 step 4)


def encode_config_state(config: BytesLike) -> bytes:
    """``DEV_CONFIG_STATE, be32 n, config, END_OF_STATE``: the FULL content and
    the payload of the multifd config packet."""
    mv = _bytes_view(config)
    if mv.nbytes > _MAX_CONFIG:
        raise UsageError(f"config of {mv.nbytes} bytes exceeds the be32 length")
    return b"".join(
        (
            _TAG_LEN32.pack(VfioTag.DEV_CONFIG_STATE, mv.nbytes),
            mv,
            _U64.pack(VfioTag.END_OF_STATE),
        )
    )


def decode_config_state(blob: BytesLike, device: str = "") -> bytes:
    """The config inside an :func:`encode_config_state` blob (R10.6 step 3).

    Raise :class:`StreamError` when the blob does not start with
    DEV_CONFIG_STATE, has a wrong length or does not end with END_OF_STATE.
    """
    mv = _bytes_view(blob)
    who = f"{_dl(device)}: " if device else ""
    if mv.nbytes < _TAG_LEN32.size + _U64.size:
        raise StreamError(f"{who}config payload of {mv.nbytes} bytes is too short", 0)
    tag, n = _TAG_LEN32.unpack_from(mv)
    if tag != VfioTag.DEV_CONFIG_STATE:
        raise StreamError(
            f"{who}config payload starts with 0x{tag:x}, expected DEV_CONFIG_STATE "
            f"(0x{VfioTag.DEV_CONFIG_STATE:x})",
            0,
        )
    end = _TAG_LEN32.size + n
    if end + _U64.size != mv.nbytes:
        raise StreamError(
            f"{who}config payload length {n} does not match its "
            f"{mv.nbytes}-byte packet",
            8,
        )
    (eos,) = _U64.unpack_from(mv, end)
    if eos != VfioTag.END_OF_STATE:
        raise StreamError(
            f"{who}config payload ends with 0x{eos:x}, expected END_OF_STATE", end
        )
    return bytes(mv[_TAG_LEN32.size : end])


def _bytes_view(data: BytesLike) -> memoryview:
    mv = memoryview(data)
    if mv.ndim != 1 or mv.format != "B":
        mv = mv.cast("B")
    return mv


# --------------------------------------------------------------------------
# protocol order (shared by writer and reader)


class _Phase(enum.IntEnum):
    HEADER = 0
    SETUP = 1
    ITERATE = 2
    SWITCHOVER = 3
    COMPLETE = 4
    NON_ITERABLE = 5
    EOF = 6


_PHASE_TEXT = {
    _Phase.HEADER: "header",
    _Phase.SETUP: "setup (START sections)",
    _Phase.ITERATE: "iteration (PART sections)",
    _Phase.SWITCHOVER: "switchover (after SWITCHOVER_START)",
    _Phase.COMPLETE: "completion (END sections)",
    _Phase.NON_ITERABLE: "non-iterable (FULL sections)",
    _Phase.EOF: "EOF",
}


class _Dev(enum.IntEnum):
    NEW = 0
    STARTED = 1
    ENDED = 2
    DONE = 3


class _Tracker:
    """The savevm order of QEMU.md R8.10 / R11.3, one state per device."""

    def __init__(self, hello: Hello, fail: Callable[[str], Exception]) -> None:
        self.hello = hello
        self.fail = fail
        self.phase = _Phase.SETUP
        self.switchover = False
        self.state = dict.fromkeys(hello.devices, _Dev.NEW)
        self.init_sent: set[str] = set()
        self.load_ready: set[str] = set()

    def _check(self, phase: _Phase, what: str) -> None:
        if phase < self.phase:
            raise self.fail(
                f"{what} is out of order: the stream is already in its "
                f"{_PHASE_TEXT[self.phase]} phase"
            )

    def _known(self, device: str) -> _Dev:
        st = self.state.get(device)
        if st is None:
            raise self.fail(f"device {device!r} is not in the hello device list")
        return st

    # Each method checks everything first and changes state only at the end,
    # so a refused call (writer misuse) leaves the tracker as it was.

    def start(self, device: str) -> None:
        st = self._known(device)
        self._check(_Phase.SETUP, f"START section of {_dl(device)}")
        if st is not _Dev.NEW:
            raise self.fail(f"duplicate START section for {_dl(device)}")
        self.state[device] = _Dev.STARTED

    def part(self, device: str, init_data_sent: bool = False) -> None:
        st = self._known(device)
        self._check(_Phase.ITERATE, f"PART section of {_dl(device)}")
        if st is not _Dev.STARTED:
            raise self.fail(f"PART section of {_dl(device)} before its START section")
        if init_data_sent:
            self.init_data_sent(device)
        self.phase = _Phase.ITERATE

    def init_data_sent(self, device: str) -> None:
        if device in self.init_sent:
            raise self.fail(f"{_dl(device)}: duplicate DEV_INIT_DATA_SENT")
        self.init_sent.add(device)

    def switchover_start(self) -> None:
        if self.switchover:
            raise self.fail("duplicate MIG_CMD_SWITCHOVER_START")
        self._check(_Phase.SWITCHOVER, "MIG_CMD_SWITCHOVER_START")
        self.switchover = True
        self.phase = _Phase.SWITCHOVER

    def end(self, device: str) -> None:
        st = self._known(device)
        self._check(_Phase.COMPLETE, f"END section of {_dl(device)}")
        if self.hello.multifd and not self.switchover:
            raise self.fail(
                f"END section of {_dl(device)} before MIG_CMD_SWITCHOVER_START "
                "(mandatory in multifd mode)"
            )
        if st is _Dev.NEW:
            raise self.fail(f"END section of {_dl(device)} before its START section")
        if st is not _Dev.STARTED:
            raise self.fail(f"duplicate END section for {_dl(device)}")
        self.state[device] = _Dev.ENDED
        self.phase = _Phase.COMPLETE

    def full(self, device: str, tag: VfioTag) -> None:
        st = self._known(device)
        h = self.hello
        if tag is VfioTag.DEV_CONFIG_LOAD_READY:
            # R10.7, in QEMU's order
            if not h.multifd:
                raise self.fail(
                    f"{_dl(device)}: got DEV_CONFIG_LOAD_READY outside multifd transfer"
                )
            if not h.config_after_iter:
                raise self.fail(
                    f"{_dl(device)}: got DEV_CONFIG_LOAD_READY but was disabled"
                )
            if device in self.load_ready:
                raise self.fail(f"{_dl(device)}: duplicate DEV_CONFIG_LOAD_READY")
        elif tag is VfioTag.DEV_CONFIG_STATE:
            if h.multifd:
                raise self.fail(
                    f"{_dl(device)}: DEV_CONFIG_STATE in multifd mode (R9.2: the "
                    "config travels on the multifd channels)"
                )
        elif tag is VfioTag.END_OF_STATE:
            if not h.multifd:
                raise self.fail(
                    f"{_dl(device)}: FULL section without DEV_CONFIG_STATE "
                    "(non-multifd mode)"
                )
            if h.config_after_iter:
                raise self.fail(
                    f"{_dl(device)}: FULL section with END_OF_STATE, expected "
                    "DEV_CONFIG_LOAD_READY (config_after_iter is on)"
                )
        else:  # pragma: no cover - the callers filter the tag
            raise self.fail(f"{_dl(device)}: unexpected {tag.name} in FULL section")
        self._check(_Phase.NON_ITERABLE, f"FULL section of {_dl(device)}")
        if st is _Dev.DONE:
            raise self.fail(f"duplicate FULL section for {_dl(device)}")
        if st is not _Dev.ENDED:
            raise self.fail(f"FULL section of {_dl(device)} before its END section")
        self.state[device] = _Dev.DONE
        self.phase = _Phase.NON_ITERABLE
        if tag is VfioTag.DEV_CONFIG_LOAD_READY:
            self.load_ready.add(device)

    def eof(self) -> None:
        self._check(_Phase.EOF, "EOF")
        for device, st in self.state.items():
            if st is not _Dev.DONE:
                raise self.fail(
                    f"EOF before device {_dl(device)} completed (its "
                    f"{['START', 'END', 'FULL', ''][st]} section is missing)"
                )
        self.phase = _Phase.EOF


# --------------------------------------------------------------------------
# writer


class StreamWriter:
    """Write the source side of the main channel (R11.3).

    Every method checks the protocol order first (a misuse raises
    :class:`~mpvfio.errors.UsageError` and writes nothing), then writes the
    whole section.  Payloads are written as memoryviews after their header:
    never copied, except that payloads up to 4 KiB are joined with their
    framing into one ``write()``.  An exception while writing (from the file
    or from a chunk iterator) breaks the writer: later calls raise
    :class:`StreamError`.  Call :meth:`flush` (or flush the file) yourself.
    """

    def __init__(self, f: Writable) -> None:
        self._f = f
        self._track: _Tracker | None = None
        self._sid: dict[str, int] = {}
        self._offset = 0
        self._broken: BaseException | None = None

    @property
    def hello(self) -> Hello | None:
        """The hello written by :meth:`header`, or ``None``."""
        return None if self._track is None else self._track.hello

    @property
    def offset(self) -> int:
        """Bytes written so far."""
        return self._offset

    def section_id(self, device: str) -> int:
        """The section id assigned to ``device`` by its START."""
        try:
            return self._sid[device]
        except KeyError:
            raise UsageError(f"device {device!r} has no section yet") from None

    # -- plumbing --

    def _write(self, *parts: BytesLike) -> None:
        if self._broken is not None:
            raise StreamError(
                f"stream writer is broken by an earlier failure: {self._broken!r}",
                self._offset,
            )
        try:
            for part in parts:
                self._write_all(part)
        except BaseException as e:
            self._broken = e
            if isinstance(e, OSError):
                raise StreamError(
                    f"write failed at offset {self._offset}: {e}", self._offset
                ) from e
            raise

    def _write_all(self, data: BytesLike) -> None:
        mv = _bytes_view(data)
        total = mv.nbytes
        done = 0
        while done < total:
            n = self._f.write(mv[done:] if done else mv)
            if n is None:
                raise StreamError(
                    f"write would block at offset {self._offset} (non-blocking file)",
                    self._offset,
                )
            if n <= 0 or n > total - done:
                raise StreamError(
                    f"write() returned {n} at offset {self._offset}", self._offset
                )
            done += n
            self._offset += n

    def _tracker(self) -> _Tracker:
        if self._broken is not None:
            raise StreamError(
                f"stream writer is broken by an earlier failure: {self._broken!r}",
                self._offset,
            )
        if self._track is None:
            raise UsageError("write the stream header first")
        return self._track

    def _payload(self, head: bytes, payload: BytesLike, tail: bytes) -> None:
        mv = _bytes_view(payload)
        if mv.nbytes <= _SMALL_WRITE:
            self._write(b"".join((head, mv, tail)))
        else:
            self._write(head, mv, tail)

    def _full_head(self, device: str) -> bytes:
        sid = self._sid[device]  # the tracker made sure START came first
        idstr = vfio_idstr(device).encode()
        return (
            _SEC.pack(SectionType.FULL, sid)
            + _U8.pack(len(idstr))
            + idstr
            + _INST_VER.pack(INSTANCE_ID, SECTION_VERSION)
        )

    # -- records --

    def header(self, hello: Hello) -> None:
        """Write the stream header and hello."""
        if self._track is not None:
            raise UsageError("the stream header was already written")
        blob = hello.to_json()
        if len(blob) > MAX_HELLO:
            raise UsageError(f"hello of {len(blob)} bytes exceeds {MAX_HELLO}")
        self._write(
            _HEADER.pack(STREAM_MAGIC, STREAM_VERSION, hello.flags, 0, len(blob)),
            blob,
        )
        self._track = _Tracker(hello, UsageError)

    def section_start(self, device: str) -> int:
        """START: DEV_SETUP_STATE, END_OF_STATE.  Return the new section id."""
        self._tracker().start(device)
        sid = self._sid[device] = len(self._sid)
        idstr = vfio_idstr(device).encode()
        self._write(
            _SEC.pack(SectionType.START, sid)
            + _U8.pack(len(idstr))
            + idstr
            + _START_TAIL.pack(
                INSTANCE_ID,
                SECTION_VERSION,
                VfioTag.DEV_SETUP_STATE,
                VfioTag.END_OF_STATE,
                SECTION_FOOTER,
            )
        )
        return sid

    def section_part(
        self, device: str, data: BytesLike | None = None, init_data_sent: bool = False
    ) -> None:
        """PART: [DEV_DATA_STATE, n, data], then END_OF_STATE or INIT_DATA_SENT.

        ``data=None`` writes no chunk (nothing read, ENOMSG); ``b""`` writes
        an empty chunk.
        """
        self._tracker().part(device, init_data_sent)
        end = VfioTag.DEV_INIT_DATA_SENT if init_data_sent else VfioTag.END_OF_STATE
        sec = _SEC.pack(SectionType.PART, self._sid[device])
        tail = _TAG_FOOT.pack(end, SECTION_FOOTER)
        if data is None:
            self._write(sec + tail)
            return
        mv = _bytes_view(data)
        self._payload(sec + _TAG_SIZE.pack(VfioTag.DEV_DATA_STATE, mv.nbytes), mv, tail)

    def section_end(
        self, device: str, chunks: Iterable[BytesLike] | None = None
    ) -> None:
        """END: each chunk as DEV_DATA_STATE (non-multifd), then END_OF_STATE.

        In multifd mode ``chunks`` must be ``None`` or empty (the data goes
        on the multifd channels).  ``chunks`` may be a lazy iterator; an
        exception it raises breaks the writer (the section is half written).
        """
        track = self._tracker()
        it = iter(()) if chunks is None else iter(chunks)
        first = self._next_chunk(it)
        if first is not None and track.hello.multifd:
            raise UsageError(
                f"{_dl(device)}: END section data in multifd mode (it belongs on the "
                "multifd channels)"
            )
        track.end(device)
        self._write(_SEC.pack(SectionType.END, self._sid[device]))
        chunk = first
        while chunk is not None:
            mv = _bytes_view(chunk)
            self._payload(_TAG_SIZE.pack(VfioTag.DEV_DATA_STATE, mv.nbytes), mv, b"")
            chunk = self._next_chunk(it)
        self._write(_TAG_FOOT.pack(VfioTag.END_OF_STATE, SECTION_FOOTER))

    def _next_chunk(self, it: Iterator[BytesLike]) -> BytesLike | None:
        try:
            return next(it, None)
        except BaseException as e:
            self._broken = e
            raise

    def section_full_config(self, device: str, config: BytesLike) -> None:
        """FULL (non-multifd): DEV_CONFIG_STATE, be32 n, config, END_OF_STATE."""
        track = self._tracker()
        mv = _bytes_view(config)
        if mv.nbytes > _MAX_CONFIG:
            raise UsageError(f"config of {mv.nbytes} bytes exceeds the be32 length")
        track.full(device, VfioTag.DEV_CONFIG_STATE)
        self._payload(
            self._full_head(device)
            + _TAG_LEN32.pack(VfioTag.DEV_CONFIG_STATE, mv.nbytes),
            mv,
            _TAG_FOOT.pack(VfioTag.END_OF_STATE, SECTION_FOOTER),
        )

    def section_full_multifd(self, device: str, load_ready: bool) -> None:
        """FULL (multifd): END_OF_STATE, or DEV_CONFIG_LOAD_READY.

        ``load_ready`` must equal the hello's ``config_after_iter`` (R8.8).
        """
        track = self._tracker()
        hello = track.hello
        if hello.multifd and load_ready != hello.config_after_iter:
            raise UsageError(
                f"{_dl(device)}: load_ready={load_ready} but the hello says "
                f"config_after_iter={hello.config_after_iter}"
            )
        tag = VfioTag.DEV_CONFIG_LOAD_READY if load_ready else VfioTag.END_OF_STATE
        track.full(device, tag)
        self._write(self._full_head(device) + _TAG_FOOT.pack(tag, SECTION_FOOTER))

    def cmd_switchover_start(self) -> None:
        """MIG_CMD_SWITCHOVER_START (0x08, be16 11, be16 0)."""
        self._tracker().switchover_start()
        self._write(_CMD.pack(SectionType.CMD, MIG_CMD_SWITCHOVER_START, 0))

    def eof(self) -> None:
        """The savevm EOF byte; every device must have completed."""
        self._tracker().eof()
        self._write(_U8.pack(SectionType.EOF))

    def flush(self) -> None:
        """Flush the file if it has a ``flush()``."""
        flush = getattr(self._f, "flush", None)
        if flush is not None:
            try:
                flush()
            except OSError as e:
                self._broken = e
                raise StreamError(f"flush failed: {e}", self._offset) from e


# --------------------------------------------------------------------------
# reader


class StreamReader:
    """Parse the main channel incrementally and validate it strictly.

    Iterate it (or call :meth:`read_record`) to get :data:`Record` objects;
    the first is :class:`Header`, the last :class:`Eof`.  Data chunks are
    yielded as soon as they are read, before the rest of their section.

    :param f: a binary file; short reads are retried, ``b""`` is the end.
    :param max_chunk: largest DEV_DATA_STATE chunk or config accepted; a
        larger size is rejected before anything is allocated.
    :param expect_devices: if given, the hello must list exactly these devices
        (any order), else "peer mismatch".
    :param expect_session: if given, the hello's session must equal it.
    :param check_trailing: after EOF, read once more and reject any byte
        ("data after EOF").  Pass ``False`` when the peer keeps the
        connection open (the extra read would block).

    Any problem raises :class:`StreamError` naming the byte offset; the
    reader is then unusable (later calls raise again).  ``OSError`` from the
    file is wrapped in :class:`StreamError`.
    """

    def __init__(
        self,
        f: Readable,
        *,
        max_chunk: int = DEFAULT_MAX_CHUNK,
        expect_devices: Iterable[str] | None = None,
        expect_session: str | None = None,
        check_trailing: bool = True,
    ) -> None:
        if max_chunk < 0:
            raise UsageError(f"max_chunk must be >= 0, not {max_chunk}")
        self._f = f
        self._max_chunk = max_chunk
        self._expect_devices = None if expect_devices is None else set(expect_devices)
        self._expect_session = expect_session
        self._check_trailing = check_trailing
        self._offset = 0
        self._at = 0
        self._track: _Tracker | None = None
        self._sid_dev: dict[int, str] = {}
        self._dev_sid: dict[str, int] = {}
        self._idstr_dev: dict[str, str] = {}
        self._error: StreamError | None = None
        self._gen = self._records()

    @property
    def hello(self) -> Hello | None:
        """The parsed hello, once the header was read."""
        return None if self._track is None else self._track.hello

    @property
    def offset(self) -> int:
        """Bytes consumed so far."""
        return self._offset

    def read_header(self) -> Hello:
        """Read the header if not yet done; return the hello."""
        if self._track is None:
            rec = self.read_record()
            assert isinstance(rec, Header)
        return self._tracker().hello

    def read_record(self) -> Record | None:
        """The next record, or ``None`` after :class:`Eof`."""
        if self._error is not None:
            raise StreamError(
                f"stream reader already failed: {self._error}", self._error.offset
            )
        try:
            return next(self._gen)
        except StopIteration:
            return None
        except StreamError as e:
            self._error = e
            raise

    def __iter__(self) -> Iterator[Record]:
        return self

    def __next__(self) -> Record:
        rec = self.read_record()
        if rec is None:
            raise StopIteration
        return rec

    # -- low level --

    def _err(self, msg: str, offset: int | None = None) -> StreamError:
        off = self._at if offset is None else offset
        return StreamError(f"{msg} at offset {off}", off)

    def _read(self, n: int) -> bytes:
        try:
            data = self._f.read(n)
        except OSError as e:
            raise StreamError(
                f"read failed at offset {self._offset}: {e}", self._offset
            ) from e
        if data is None:
            raise StreamError(
                f"read would block at offset {self._offset} (non-blocking file)",
                self._offset,
            )
        if len(data) > n:
            raise StreamError(
                f"read({n}) returned {len(data)} bytes at offset {self._offset}",
                self._offset,
            )
        return data

    def _exact(self, n: int, what: str) -> bytes | bytearray:
        """Exactly ``n`` bytes (``n`` is already bounded by the caller).

        Sizes up to 1 MiB are one ``read(n)`` (no extra copy when the file
        returns everything).  Larger ones are read in 1 MiB pieces and the
        ``n``-byte buffer is allocated only once real data arrived, so a
        truncated stream claiming a huge size costs at most one piece.
        """
        start = self._offset
        if n == 0:
            return b""
        first = self._read(min(n, _PIECE))
        got = len(first)
        if got == n:
            self._offset += n
            return first
        if got == 0:
            raise self._truncated(what, start, n, 0)
        buf = bytearray(n)
        buf[:got] = first
        del first
        readinto = getattr(self._f, "readinto", None)
        with memoryview(buf) as mv:
            while got < n:
                want = min(n - got, _PIECE)
                if readinto is not None:
                    try:
                        k = readinto(mv[got : got + want])
                    except OSError as e:
                        raise StreamError(
                            f"read failed at offset {start + got}: {e}", start + got
                        ) from e
                    if k is None:
                        raise StreamError(
                            f"read would block at offset {start + got} "
                            "(non-blocking file)",
                            start + got,
                        )
                else:
                    part = self._read(want)
                    k = len(part)
                    mv[got : got + k] = part
                if not k:
                    self._offset += got
                    raise self._truncated(what, start, n, got)
                got += k
        self._offset += n
        return buf

    @staticmethod
    def _truncated(what: str, start: int, n: int, got: int) -> StreamError:
        return StreamError(
            f"truncated stream: {what} at offset {start} needs {n} bytes, got {got}",
            start,
        )

    def _u8(self, what: str) -> int:
        return self._exact(1, what)[0]

    def _u16(self, what: str) -> int:
        return int(_U16.unpack(self._exact(2, what))[0])

    def _u32(self, what: str) -> int:
        return int(_U32.unpack(self._exact(4, what))[0])

    def _u64(self, what: str) -> int:
        return int(_U64.unpack(self._exact(8, what))[0])

    def _tag(self, device: str, where: str) -> VfioTag:
        off = self._offset
        tag = self._u64(f"{_dl(device)}: VFIO tag in {where}")
        self._at = off
        if tag not in _TAG_VALUES:
            raise self._err(f"{_dl(device)}: Unknown tag 0x{tag:x} in {where}")
        return VfioTag(tag)

    def _footer(self, sid: int, device: str) -> None:
        off = self._offset
        b = self._u8("section footer")
        if b != SECTION_FOOTER:
            raise self._err(
                f"bad section footer 0x{b:02x} for section id {sid} ({_dl(device)}), "
                f"expected 0x{SECTION_FOOTER:02x}",
                off,
            )

    def _limit(self, n: int, what: str, off: int) -> int:
        if n > self._max_chunk:
            raise self._err(
                f"{what} size {n} exceeds the limit of {self._max_chunk} bytes "
                "(max_chunk)",
                off,
            )
        return n

    def _tracker(self) -> _Tracker:
        assert self._track is not None
        return self._track

    # -- header --

    def _read_hello(self) -> Hello:
        magic = self._exact(8, "stream magic")
        if magic != STREAM_MAGIC:
            raise StreamError(
                f"not an mpvfio migration stream (magic {bytes(magic)!r} at offset "
                f"0, expected {STREAM_MAGIC!r})",
                0,
            )
        version = self._u32("stream version")
        if version != STREAM_VERSION:
            raise StreamError(
                f"unsupported stream version {version}, this side speaks "
                f"{STREAM_VERSION} (at offset 8)",
                8,
            )
        flags = self._u32("stream flags")
        if flags & ~FLAG_MULTIFD:
            raise self._err(f"unknown stream flags 0x{flags:08x}", 12)
        reserved = self._u16("stream header reserved field")
        if reserved:
            raise self._err(f"reserved header field is 0x{reserved:04x}, not 0", 16)
        n = self._u32("hello length")
        if n == 0 or n > MAX_HELLO:
            raise self._err(f"hello length {n} is not in 1..{MAX_HELLO}", 18)
        blob = self._exact(n, "hello")
        try:
            hello = Hello.from_json(blob)
        except StreamError as e:
            raise self._err(str(e), HEADER_SIZE) from e
        if hello.flags != flags:
            raise self._err(
                f"header flags 0x{flags:x} disagree with the hello "
                f"(multifd_channels={hello.multifd_channels})",
                12,
            )
        if self._expect_session is not None and hello.session != self._expect_session:
            raise self._err(
                f"peer mismatch: stream session {hello.session}, expected "
                f"{self._expect_session}",
                HEADER_SIZE,
            )
        if self._expect_devices is not None and set(hello.devices) != (
            self._expect_devices
        ):
            raise self._err(
                f"peer mismatch: the source migrates devices "
                f"{sorted(hello.devices)}, this side has "
                f"{sorted(self._expect_devices)}",
                HEADER_SIZE,
            )
        return hello

    # -- sections --

    def _section_device(self, kind: str, sec_off: int) -> tuple[int, str]:
        sid = self._u32("section id")
        dev = self._sid_dev.get(sid)
        if dev is None:
            raise self._err(
                f"{kind} section id {sid} was not announced by a START section",
                sec_off,
            )
        return sid, dev

    def _section_header(self, kind: str, sec_off: int) -> tuple[int, str]:
        sid = self._u32("section id")
        idoff = self._offset
        idlen = self._u8("idstr length")
        raw = self._exact(idlen, "idstr")
        try:
            idstr = bytes(raw).decode("utf-8")
        except UnicodeDecodeError as e:
            raise self._err(f"{kind} section idstr is not UTF-8 ({e})", idoff) from e
        dev = self._idstr_dev.get(idstr)
        if dev is None:
            raise self._err(
                f"unknown {kind} section idstr {idstr!r} (not in the hello device "
                "list)",
                idoff,
            )
        ioff = self._offset
        instance = self._u32("instance id")
        version = self._u32("version id")
        if instance != INSTANCE_ID:
            raise self._err(
                f"{kind} section of {_dl(dev)}: unknown instance id {instance}",
                ioff,
            )
        if version != SECTION_VERSION:
            raise self._err(
                f"{kind} section of {_dl(dev)}: version id {version}, expected "
                f"{SECTION_VERSION}",
                ioff + 4,
            )
        owner = self._sid_dev.get(sid)
        if kind == "START":
            if owner is not None:
                raise self._err(
                    f"START section id {sid} is already used by {_dl(owner)}",
                    sec_off,
                )
        else:
            mine = self._dev_sid.get(dev)
            if mine is not None and mine != sid:
                raise self._err(
                    f"FULL section of {_dl(dev)} has id {sid}, its START used {mine}",
                    sec_off,
                )
            if mine is None and owner is not None:
                raise self._err(
                    f"FULL section id {sid} is already used by {_dl(owner)}",
                    sec_off,
                )
        return sid, dev

    def _data_chunk(self, device: str, stop_copy: bool) -> DataChunk:
        off = self._offset
        n = self._limit(self._u64("chunk size"), f"{_dl(device)}: DEV_DATA_STATE", off)
        data = self._exact(n, f"{_dl(device)}: DEV_DATA_STATE payload")
        return DataChunk(device, data, stop_copy)

    def _unexpected(
        self, device: str, tag: VfioTag, where: str, want: str
    ) -> StreamError:
        return self._err(
            f"{_dl(device)}: unexpected {tag.name} in {where}, expected {want}"
        )

    def _start(self, off: int) -> Iterator[Record]:
        sid, dev = self._section_header("START", off)
        self._at = off
        self._tracker().start(dev)
        tag = self._tag(dev, "START section")
        if tag is not VfioTag.DEV_SETUP_STATE:
            raise self._unexpected(dev, tag, "START section", "DEV_SETUP_STATE")
        tag = self._tag(dev, "START section")
        if tag is not VfioTag.END_OF_STATE:
            raise self._err(
                f"{_dl(dev)}: DEV_SETUP_STATE not followed by END_OF_STATE "
                f"(got {tag.name})"
            )
        self._footer(sid, dev)
        self._sid_dev[sid] = dev
        self._dev_sid[dev] = sid
        yield SectionStart(dev, sid)

    def _part(self, off: int) -> Iterator[Record]:
        sid, dev = self._section_device("PART", off)
        self._at = off
        track = self._tracker()
        track.part(dev)
        while True:
            tag = self._tag(dev, "PART section")
            if tag is VfioTag.DEV_DATA_STATE:
                yield self._data_chunk(dev, False)
            elif tag is VfioTag.END_OF_STATE:
                self._footer(sid, dev)
                yield PartEnd(dev)
                return
            elif tag is VfioTag.DEV_INIT_DATA_SENT:
                track.init_data_sent(dev)
                self._footer(sid, dev)
                yield InitDataSent(dev)
                return
            else:
                raise self._unexpected(
                    dev,
                    tag,
                    "PART section",
                    "DEV_DATA_STATE, END_OF_STATE or DEV_INIT_DATA_SENT",
                )

    def _end(self, off: int) -> Iterator[Record]:
        sid, dev = self._section_device("END", off)
        self._at = off
        track = self._tracker()
        track.end(dev)
        while True:
            tag = self._tag(dev, "END section")
            if tag is VfioTag.END_OF_STATE:
                self._footer(sid, dev)
                yield SectionEnd(dev)
                return
            if tag is not VfioTag.DEV_DATA_STATE:
                raise self._unexpected(
                    dev, tag, "END section", "DEV_DATA_STATE or END_OF_STATE"
                )
            if track.hello.multifd:
                raise self._err(
                    f"{_dl(dev)}: DEV_DATA_STATE in END section in multifd mode "
                    "(stop-copy data belongs on the multifd channels)"
                )
            yield self._data_chunk(dev, True)

    def _full(self, off: int) -> Iterator[Record]:
        sid, dev = self._section_header("FULL", off)
        tag = self._tag(dev, "FULL section")
        track = self._tracker()
        if tag not in (
            VfioTag.DEV_CONFIG_STATE,
            VfioTag.END_OF_STATE,
            VfioTag.DEV_CONFIG_LOAD_READY,
        ):
            raise self._unexpected(
                dev,
                tag,
                "FULL section",
                "DEV_CONFIG_STATE, END_OF_STATE or DEV_CONFIG_LOAD_READY",
            )
        track.full(dev, tag)  # END came first, so START mapped sid <-> dev
        if tag is VfioTag.DEV_CONFIG_STATE:
            loff = self._offset
            n = self._limit(self._u32("config length"), f"{_dl(dev)}: config", loff)
            config = self._exact(n, f"{_dl(dev)}: config")
            tag = self._tag(dev, "FULL section")
            if tag is not VfioTag.END_OF_STATE:
                raise self._unexpected(
                    dev, tag, "FULL section after the config", "END_OF_STATE"
                )
            self._footer(sid, dev)
            yield Config(dev, config)
        elif tag is VfioTag.END_OF_STATE:
            self._footer(sid, dev)
            yield FullEnd(dev)
        else:
            self._footer(sid, dev)
            yield ConfigLoadReady(dev)

    def _cmd(self, off: int) -> Iterator[Record]:
        cmd = self._u16("command number")
        n = self._u16("command length")
        if cmd != MIG_CMD_SWITCHOVER_START:
            raise self._err(
                f"unknown command {cmd} (only MIG_CMD_SWITCHOVER_START = "
                f"{MIG_CMD_SWITCHOVER_START} is known)",
                off,
            )
        if n != 0:
            raise self._err(
                f"MIG_CMD_SWITCHOVER_START with length {n}, expected 0", off
            )
        self._at = off
        self._tracker().switchover_start()
        yield SwitchoverStart()

    def _records(self) -> Iterator[Record]:
        hello = self._read_hello()
        self._idstr_dev = {vfio_idstr(d): d for d in hello.devices}
        self._track = _Tracker(hello, self._err)
        yield Header(hello)
        handlers: dict[int, Callable[[int], Iterator[Record]]] = {
            SectionType.START: self._start,
            SectionType.PART: self._part,
            SectionType.END: self._end,
            SectionType.FULL: self._full,
            SectionType.CMD: self._cmd,
        }
        while True:
            off = self._offset
            stype = self._u8("section type")
            self._at = off
            if stype == SectionType.EOF:
                self._tracker().eof()
                yield Eof()
                if self._check_trailing:
                    extra = self._read(1)
                    if extra:
                        raise self._err("data after EOF", self._offset)
                return
            handler = handlers.get(stype)
            if handler is None:
                known = ", ".join(f"{t.name}=0x{t.value:02x}" for t in SectionType)
                raise self._err(
                    f"unknown section type 0x{stype:02x} (expected one of {known})"
                )
            yield from handler(off)
