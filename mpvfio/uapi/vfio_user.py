"""vfio-user protocol numbers and byte layouts for migration (no I/O).

What ../shared/spec/VFIO_USER.md describes, as constants and
:class:`struct.Struct` objects with pack/unpack helpers:

* the 16-byte message header (``msg_id``, ``command``, ``msg_size``,
  ``flags``, ``error``) that starts every command and every reply;
* the command numbers (VERSION 1 ... MIG_DATA_WRITE 18);
* the VERSION payload (``major``, ``minor``, NUL-terminated JSON
  capabilities) and the :class:`Capabilities` it carries;
* DEVICE_FEATURE requests (the kernel's ``struct vfio_device_feature``
  reused: ``argsz`` is the largest reply payload accepted);
* the MIG_DATA_READ / MIG_DATA_WRITE payloads (``argsz``, ``size``, data).

Byte order is the host's (the protocol has no wire endianness); like
:mod:`mpvfio.uapi.vfio` the layouts are written ``"<"`` for the
little-endian hosts mpvfio targets.  Every struct is packed.

Parsing peer input never trusts it: a malformed payload raises
:class:`~mpvfio.errors.DeviceError` with ``EPROTO`` (the server turns that
into an EINVAL error reply, the client into a broken connection).

mpvfio extensions (not in the vfio-user spec; a libvfio-user server answers
them with EINVAL, and the client then reports EOPNOTSUPP):

* DEVICE_FEATURE index 9, ``MIG_DATA_SIZE`` (GET, PROBE): the kernel's
  ``stop_copy_length``, same 8-byte payload as the kernel's.
* DEVICE_FEATURE index :data:`FEATURE_MPVFIO_CHECKSUM` (GET, PROBE): the
  32-byte SHA-256 of the emulated device's state, a test hook.
* P2P states: the spec says RUNNING_P2P/PRE_COPY_P2P are "not used in
  vfio-user"; mpvfio's server accepts them when its device advertises
  ``VFIO_MIGRATION_P2P`` (kernel semantics), and never advertises P2P
  otherwise, so a standard client never sees them.
"""

from __future__ import annotations

import enum
import errno as _errno
import json
import struct
from dataclasses import dataclass
from typing import Any, NamedTuple

from mpvfio.errors import DeviceError
from mpvfio.uapi.vfio import (
    FEATURE_HDR,
    VFIO_DEVICE_FEATURE_GET,
    VFIO_DEVICE_FEATURE_PROBE,
    VFIO_DEVICE_FEATURE_SET,
    Feature,
    pack_mig_state,
)

__all__ = [
    "DEFAULT_MAX_DATA_XFER_SIZE",
    "DEFAULT_MAX_MSG_FDS",
    "FEATURE_FLAGS",
    "FEATURE_MPVFIO_CHECKSUM",
    "FLAG_ERROR",
    "FLAG_NO_REPLY",
    "FLAG_TYPE_MASK",
    "HEADER",
    "MAX_MSG_FDS_LIMIT",
    "MIG_DATA",
    "MIG_DATA_FD_UNUSED",
    "MIG_PGSIZE",
    "TYPE_COMMAND",
    "TYPE_REPLY",
    "VERSION",
    "VERSION_MAJOR",
    "VERSION_MINOR",
    "Capabilities",
    "Command",
    "Header",
    "max_message_size",
    "pack_feature_request",
    "pack_header",
    "pack_mig_data_read",
    "pack_mig_data_read_reply",
    "pack_mig_data_write",
    "pack_mig_state_set",
    "pack_version",
    "protocol_error",
    "unpack_feature",
    "unpack_header",
    "unpack_mig_data",
    "unpack_version",
]


class Command(enum.IntEnum):
    """vfio-user command numbers (the header's ``command`` field)."""

    VERSION = 1
    DMA_MAP = 2
    DMA_UNMAP = 3
    DEVICE_GET_INFO = 4
    DEVICE_GET_REGION_INFO = 5
    DEVICE_GET_REGION_IO_FDS = 6
    DEVICE_GET_IRQ_INFO = 7
    DEVICE_SET_IRQS = 8
    REGION_READ = 9
    REGION_WRITE = 10
    DMA_READ = 11
    DMA_WRITE = 12
    DEVICE_RESET = 13
    REGION_WRITE_MULTI = 15
    DEVICE_FEATURE = 16
    MIG_DATA_READ = 17
    MIG_DATA_WRITE = 18


# --- header ---

#: u16 msg_id, u16 command, u32 msg_size (whole message), u32 flags, u32 error.
HEADER = struct.Struct("<HHIII")
#: Bits 0-3 of ``flags``: the message type.
FLAG_TYPE_MASK = 0xF
TYPE_COMMAND = 0x0
TYPE_REPLY = 0x1
#: The sender wants no reply (a command flag).
FLAG_NO_REPLY = 0x10
#: The reply reports a failure; ``error`` holds the errno (may be 0).
FLAG_ERROR = 0x20

# --- VERSION ---

#: u16 major, u16 minor; NUL-terminated JSON follows.
VERSION = struct.Struct("<HH")
VERSION_MAJOR = 0
#: The minor mpvfio proposes (libvfio-user's LIB_VFIO_USER_MINOR).
VERSION_MINOR = 2
DEFAULT_MAX_MSG_FDS = 1
DEFAULT_MAX_DATA_XFER_SIZE = 1024 * 1024
#: libvfio-user refuses more.
MAX_MSG_FDS_LIMIT = 1024
#: ``migration.pgsize``: libvfio-user insists on the host page size.
MIG_PGSIZE = 4096

# --- DEVICE_FEATURE ---

#: mpvfio's private feature index: GET returns SHA-256 of the device state.
FEATURE_MPVFIO_CHECKSUM = 0xFF01
#: What a client puts in the unused ``data_fd`` field of a SET (-1).
MIG_DATA_FD_UNUSED = 0xFFFFFFFF

# --- MIG_DATA_READ / MIG_DATA_WRITE ---

#: u32 argsz (8 + data size), u32 size; data follows (replies, writes).
MIG_DATA = struct.Struct("<II")


def protocol_error(message: str, err: int = _errno.EPROTO) -> DeviceError:
    """The error raised for a malformed message (no device name yet)."""
    return DeviceError(f"vfio-user protocol error: {message}", "", err)


def max_message_size(max_data_xfer_size: int) -> int:
    """The largest message a peer with this transfer limit must accept."""
    return HEADER.size + MIG_DATA.size + max_data_xfer_size


class Header(NamedTuple):
    """One message header (see :data:`HEADER`)."""

    msg_id: int
    command: int
    size: int
    flags: int
    error: int = 0

    @property
    def msg_type(self) -> int:
        """``TYPE_COMMAND`` or ``TYPE_REPLY`` (bits 0-3 of ``flags``)."""
        return self.flags & FLAG_TYPE_MASK

    @property
    def is_reply(self) -> bool:
        """True for a reply."""
        return self.msg_type == TYPE_REPLY

    @property
    def is_error(self) -> bool:
        """True when the Error flag is set."""
        return bool(self.flags & FLAG_ERROR)

    @property
    def no_reply(self) -> bool:
        """True when the sender asked for no reply."""
        return bool(self.flags & FLAG_NO_REPLY)

    @property
    def payload_size(self) -> int:
        """Bytes after the header (always read them, even for errors)."""
        return self.size - HEADER.size


def pack_header(
    msg_id: int, command: int, payload_size: int, flags: int = 0, error: int = 0
) -> bytes:
    """Pack a header for a message carrying ``payload_size`` payload bytes."""
    return HEADER.pack(
        msg_id & 0xFFFF, command, HEADER.size + payload_size, flags, error
    )


def unpack_header(buf: bytes | bytearray | memoryview) -> Header:
    """Unpack 16 header bytes; ``msg_size`` < 16 is a protocol error."""
    if len(buf) < HEADER.size:
        raise protocol_error(f"short header ({len(buf)} bytes)")
    hdr = Header(*HEADER.unpack_from(buf))
    if hdr.size < HEADER.size:
        raise protocol_error(f"msg_size {hdr.size} is smaller than the header")
    return hdr


# --- VERSION ---


@dataclass(frozen=True)
class Capabilities:
    """The VERSION capabilities mpvfio understands (others are ignored).

    :param max_msg_fds: most fds the sender can receive in one message.
    :param max_data_xfer_size: most data bytes per REGION/DMA/MIG_DATA
        transfer the sender accepts.
    :param migration_pgsize: ``migration.pgsize`` (``None``: key absent).
    :param extra: every other key, unparsed.
    """

    max_msg_fds: int = DEFAULT_MAX_MSG_FDS
    max_data_xfer_size: int = DEFAULT_MAX_DATA_XFER_SIZE
    migration_pgsize: int | None = None
    extra: tuple[tuple[str, Any], ...] = ()

    def to_json(self) -> dict[str, Any]:
        """The ``{"capabilities": {...}}`` object."""
        caps: dict[str, Any] = {
            "max_msg_fds": self.max_msg_fds,
            "max_data_xfer_size": self.max_data_xfer_size,
        }
        if self.migration_pgsize is not None:
            caps["migration"] = {"pgsize": self.migration_pgsize}
        caps.update(self.extra)
        return {"capabilities": caps}

    @classmethod
    def from_json(cls, doc: Any) -> Capabilities:
        """Parse a decoded VERSION JSON document (absent keys: defaults)."""
        if doc is None:
            return cls()
        if not isinstance(doc, dict):
            raise protocol_error("VERSION JSON is not an object")
        caps = doc.get("capabilities", {})
        if not isinstance(caps, dict):
            raise protocol_error("VERSION 'capabilities' is not an object")
        fds = _number(caps, "max_msg_fds", DEFAULT_MAX_MSG_FDS)
        xfer = _number(caps, "max_data_xfer_size", DEFAULT_MAX_DATA_XFER_SIZE)
        if not 0 <= fds <= MAX_MSG_FDS_LIMIT:
            raise protocol_error(f"max_msg_fds {fds} is outside 0..1024")
        if xfer < 1:
            raise protocol_error(f"max_data_xfer_size {xfer} is < 1")
        pgsize: int | None = None
        mig = caps.get("migration")
        if mig is not None:
            if not isinstance(mig, dict):
                raise protocol_error("VERSION 'migration' is not an object")
            if "pgsize" in mig:
                pgsize = _number(mig, "pgsize", MIG_PGSIZE)
        known = {"max_msg_fds", "max_data_xfer_size", "migration"}
        extra = tuple((k, v) for k, v in caps.items() if k not in known)
        return cls(fds, xfer, pgsize, extra)


def _number(obj: dict[str, Any], key: str, default: int) -> int:
    value = obj.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool):
        raise protocol_error(f"capability {key!r} is not an integer: {value!r}")
    return value


def pack_version(major: int, minor: int, caps: Capabilities | None) -> bytes:
    """VERSION payload: major, minor, then the JSON with its NUL (if any)."""
    body = VERSION.pack(major, minor)
    if caps is not None:
        text = json.dumps(caps.to_json(), separators=(",", ":"))
        body += text.encode() + b"\0"
    return body


def unpack_version(payload: bytes) -> tuple[int, int, Capabilities]:
    """Parse a VERSION payload into ``(major, minor, capabilities)``."""
    if len(payload) < VERSION.size:
        raise protocol_error(f"VERSION payload of {len(payload)} bytes")
    major, minor = VERSION.unpack_from(payload)
    rest = payload[VERSION.size :]
    if not rest:
        return int(major), int(minor), Capabilities()
    if rest[-1:] != b"\0":
        raise protocol_error("VERSION JSON is not NUL-terminated")
    text = rest[:-1].rstrip(b"\0")
    try:
        doc = json.loads(text.decode()) if text else None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise protocol_error(f"VERSION JSON does not parse: {exc}") from None
    return int(major), int(minor), Capabilities.from_json(doc)


# --- DEVICE_FEATURE ---


def pack_feature_request(flags: int, data: bytes = b"", reply_data: int = 0) -> bytes:
    """DEVICE_FEATURE request payload.

    :param flags: feature index | GET/SET/PROBE bits.
    :param data: the feature data sent (SET).
    :param reply_data: the feature data size the reply may carry (GET); the
        request's ``argsz`` is 8 plus the larger of the two.
    """
    argsz = FEATURE_HDR.size + max(len(data), reply_data)
    return FEATURE_HDR.pack(argsz, flags) + data


def unpack_feature(payload: bytes) -> tuple[int, int, bytes]:
    """Split a DEVICE_FEATURE payload into ``(argsz, flags, data)``."""
    if len(payload) < FEATURE_HDR.size:
        raise protocol_error(f"DEVICE_FEATURE payload of {len(payload)} bytes")
    argsz, flags = FEATURE_HDR.unpack_from(payload)
    return int(argsz), int(flags), bytes(payload[FEATURE_HDR.size :])


def pack_mig_state_set(state: int) -> bytes:
    """SET MIG_DEVICE_STATE request: argsz 16, data_fd 0xffffffff."""
    return pack_feature_request(
        VFIO_DEVICE_FEATURE_SET | Feature.MIG_DEVICE_STATE, pack_mig_state(state)
    )


#: The GET and PROBE flag words the client sends, by name (documentation).
FEATURE_FLAGS: dict[str, int] = {
    "GET MIGRATION": VFIO_DEVICE_FEATURE_GET | Feature.MIGRATION,
    "PROBE MIGRATION": VFIO_DEVICE_FEATURE_PROBE | Feature.MIGRATION,
    "GET MIG_DEVICE_STATE": VFIO_DEVICE_FEATURE_GET | Feature.MIG_DEVICE_STATE,
    "SET MIG_DEVICE_STATE": VFIO_DEVICE_FEATURE_SET | Feature.MIG_DEVICE_STATE,
    "GET MIG_DATA_SIZE": VFIO_DEVICE_FEATURE_GET | Feature.MIG_DATA_SIZE,
}


# --- MIG_DATA ---


def pack_mig_data_read(size: int) -> bytes:
    """MIG_DATA_READ request: argsz = 8 + size, size."""
    return MIG_DATA.pack(MIG_DATA.size + size, size)


def pack_mig_data_read_reply(data: bytes) -> bytes:
    """MIG_DATA_READ reply payload: argsz, size, then the data."""
    return MIG_DATA.pack(MIG_DATA.size + len(data), len(data)) + data


def pack_mig_data_write(data: bytes | memoryview) -> bytes:
    """MIG_DATA_WRITE request payload: argsz, size, then the data."""
    return MIG_DATA.pack(MIG_DATA.size + len(data), len(data)) + bytes(data)


def unpack_mig_data(payload: bytes) -> tuple[int, int, bytes]:
    """Split a MIG_DATA payload into ``(argsz, size, data[:size])``.

    The data length comes from ``size`` only: libvfio-user pads READ replies
    to the requested size.  Fewer than ``size`` bytes present is an error.
    """
    if len(payload) < MIG_DATA.size:
        raise protocol_error(f"MIG_DATA payload of {len(payload)} bytes")
    argsz, size = MIG_DATA.unpack_from(payload)
    end = MIG_DATA.size + size
    if end > len(payload):
        raise protocol_error(
            f"MIG_DATA says {size} data bytes, the message holds "
            f"{len(payload) - MIG_DATA.size}"
        )
    return int(argsz), int(size), bytes(payload[MIG_DATA.size : end])
