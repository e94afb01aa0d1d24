"""VFIO migration uAPI numbers and byte layouts (no I/O).

This module owns the constants of ``include/uapi/linux/vfio.h`` that the
live-migration protocol v2 uses: the ``vfio_device_mig_state`` enum, the
``VFIO_MIGRATION_*`` capability bits, the ``VFIO_DEVICE_FEATURE`` flag bits and
feature indexes, the ioctl numbers, and the payload structs as
:class:`struct.Struct` objects with pack/unpack helpers.

Layouts are written little-endian (``"<"``): the kernel uses native byte order,
which is little-endian on x86-64 and arm64, the only hosts mpvfio targets.
Every struct is naturally aligned, so ``"<"`` (no padding) gives the same bytes
as the C layout.
"""

from __future__ import annotations

import enum
import struct

__all__ = [
    "BIND_IOMMUFD",
    "DMA_LOGGING_CONTROL",
    "DMA_LOGGING_RANGE",
    "DMA_LOGGING_REPORT",
    "FEATURE_HDR",
    "FEATURE_MIGRATION",
    "FEATURE_MIG_DATA_SIZE",
    "FEATURE_MIG_STATE",
    "IOMMU_DEV",
    "LEGAL_FLAG_SETS",
    "PRECOPY_INFO",
    "PRECOPY_STATES",
    "SAVING_GROUP",
    "SESSION_CLOSING_ARCS",
    "SESSION_OPENING_ARCS",
    "STATE_NEEDS",
    "VFIO_BASE",
    "VFIO_DEVICE_BIND_IOMMUFD",
    "VFIO_DEVICE_FEATURE",
    "VFIO_DEVICE_FEATURE_GET",
    "VFIO_DEVICE_FEATURE_MASK",
    "VFIO_DEVICE_FEATURE_PROBE",
    "VFIO_DEVICE_FEATURE_SET",
    "VFIO_DEVICE_RESET",
    "VFIO_MIG_GET_PRECOPY_INFO",
    "VFIO_TYPE",
    "_IO",
    "_IOC",
    "Feature",
    "MigFlag",
    "MigState",
    "pack_feature",
    "pack_mig_state",
    "pack_precopy_info",
    "qapi_name",
    "unpack_mig_state",
    "unpack_precopy_info",
]


class MigState(enum.IntEnum):
    """``enum vfio_device_mig_state`` (a u32 on the wire).

    Names are the uAPI names without the ``VFIO_DEVICE_STATE_`` prefix.
    """

    ERROR = 0
    STOP = 1
    RUNNING = 2
    STOP_COPY = 3
    RESUMING = 4
    RUNNING_P2P = 5
    PRE_COPY = 6
    PRE_COPY_P2P = 7


_QAPI_NAMES: dict[MigState, str] = {
    MigState.STOP: "stop",
    MigState.RUNNING: "running",
    MigState.STOP_COPY: "stop-copy",
    MigState.RESUMING: "resuming",
    MigState.RUNNING_P2P: "running-p2p",
    MigState.PRE_COPY: "pre-copy",
    MigState.PRE_COPY_P2P: "pre-copy-p2p",
}


def qapi_name(state: MigState) -> str | None:
    """Return QEMU's QAPI name of ``state`` (``"stop-copy"``); ERROR has none."""
    return _QAPI_NAMES.get(state)


class MigFlag(enum.IntFlag):
    """``VFIO_MIGRATION_*``: the capability bits of FEATURE_MIGRATION (a u64)."""

    STOP_COPY = 1 << 0
    P2P = 1 << 1
    PRE_COPY = 1 << 2


#: The four flag combinations the uAPI defines (STOP_COPY is mandatory).
LEGAL_FLAG_SETS: tuple[MigFlag, ...] = (
    MigFlag.STOP_COPY,
    MigFlag.STOP_COPY | MigFlag.P2P,
    MigFlag.STOP_COPY | MigFlag.PRE_COPY,
    MigFlag.STOP_COPY | MigFlag.P2P | MigFlag.PRE_COPY,
)

#: Flags a device must advertise for a state to be usable (vfio_main.c's
#: ``state_flags_table``).  ERROR needs all 32 bits: never satisfiable.
STATE_NEEDS: dict[MigState, int] = {
    MigState.ERROR: 0xFFFFFFFF,
    MigState.STOP: MigFlag.STOP_COPY,
    MigState.RUNNING: MigFlag.STOP_COPY,
    MigState.STOP_COPY: MigFlag.STOP_COPY,
    MigState.RESUMING: MigFlag.STOP_COPY,
    MigState.RUNNING_P2P: MigFlag.STOP_COPY | MigFlag.P2P,
    MigState.PRE_COPY: MigFlag.STOP_COPY | MigFlag.PRE_COPY,
    MigState.PRE_COPY_P2P: MigFlag.STOP_COPY | MigFlag.P2P | MigFlag.PRE_COPY,
}

#: States that share one saving session (and one data_fd).
SAVING_GROUP: frozenset[MigState] = frozenset(
    {MigState.PRE_COPY, MigState.PRE_COPY_P2P, MigState.STOP_COPY}
)

#: The pre-copy states: the saving group while the device still runs.
PRECOPY_STATES: frozenset[MigState] = frozenset(
    {MigState.PRE_COPY, MigState.PRE_COPY_P2P}
)

#: Arcs that open a session and hand back a new data_fd.
SESSION_OPENING_ARCS: frozenset[tuple[MigState, MigState]] = frozenset(
    {
        (MigState.STOP, MigState.STOP_COPY),
        (MigState.STOP, MigState.RESUMING),
        (MigState.RUNNING, MigState.PRE_COPY),
        (MigState.RUNNING_P2P, MigState.PRE_COPY_P2P),
    }
)

#: Arcs that end the session (the driver disables the data_fd).
SESSION_CLOSING_ARCS: frozenset[tuple[MigState, MigState]] = frozenset(
    {
        (MigState.STOP_COPY, MigState.STOP),
        (MigState.PRE_COPY, MigState.RUNNING),
        (MigState.PRE_COPY_P2P, MigState.RUNNING_P2P),
        (MigState.RESUMING, MigState.STOP),
    }
)

# --- ioctl numbers (asm-generic/ioctl.h layout: x86-64, arm64, riscv, s390) ---

_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = 8
_IOC_SIZESHIFT = 16
_IOC_DIRSHIFT = 30
_IOC_NONE = 0


def _IOC(direction: int, type_: int, nr: int, size: int) -> int:
    """Encode an ioctl number: dir(2) | size(14) | type(8) | nr(8)."""
    return (
        (direction << _IOC_DIRSHIFT)
        | (size << _IOC_SIZESHIFT)
        | (type_ << _IOC_TYPESHIFT)
        | (nr << _IOC_NRSHIFT)
    )


def _IO(type_: int, nr: int) -> int:
    """Encode an ioctl with no direction and no size, as every VFIO ioctl is."""
    return _IOC(_IOC_NONE, type_, nr, 0)


VFIO_TYPE = ord(";")  # 0x3B
VFIO_BASE = 100

#: Device fd; no argument.  Puts the migration state back to RUNNING.
VFIO_DEVICE_RESET = _IO(VFIO_TYPE, VFIO_BASE + 11)  # 0x3B6F
#: Device fd; argument: struct vfio_device_feature (header + payload).
VFIO_DEVICE_FEATURE = _IO(VFIO_TYPE, VFIO_BASE + 17)  # 0x3B75
#: The saving data_fd (not the device fd); argument: struct vfio_precopy_info.
VFIO_MIG_GET_PRECOPY_INFO = _IO(VFIO_TYPE, VFIO_BASE + 21)  # 0x3B79
#: VFIO_DEVICE_BIND_IOMMUFD: cdev device fd; struct vfio_device_bind_iommufd.
VFIO_DEVICE_BIND_IOMMUFD = _IO(VFIO_TYPE, VFIO_BASE + 18)  # 0x3B76
#: struct vfio_device_bind_iommufd without the (flagged) token pointer:
#: u32 argsz, u32 flags, s32 iommufd, u32 out_devid.
BIND_IOMMUFD = struct.Struct("<IIiI")
IOMMU_DEV = "/dev/iommu"

# --- VFIO_DEVICE_FEATURE flags word ---

VFIO_DEVICE_FEATURE_MASK = 0x0000FFFF
VFIO_DEVICE_FEATURE_GET = 1 << 16
VFIO_DEVICE_FEATURE_SET = 1 << 17
VFIO_DEVICE_FEATURE_PROBE = 1 << 18


class Feature(enum.IntEnum):
    """``VFIO_DEVICE_FEATURE_*`` feature indexes (bits 0-15 of the flags word)."""

    PCI_VF_TOKEN = 0
    MIGRATION = 1
    MIG_DEVICE_STATE = 2
    LOW_POWER_ENTRY = 3
    LOW_POWER_ENTRY_WITH_WAKEUP = 4
    LOW_POWER_EXIT = 5
    DMA_LOGGING_START = 6
    DMA_LOGGING_STOP = 7
    DMA_LOGGING_REPORT = 8
    MIG_DATA_SIZE = 9
    BUS_MASTER = 10
    DMA_BUF = 11


# --- struct layouts ---

#: struct vfio_device_feature: u32 argsz, u32 flags; data[] follows at 8.
FEATURE_HDR = struct.Struct("<II")
#: struct vfio_device_feature_migration: u64 flags (VFIO_MIGRATION_*).
FEATURE_MIGRATION = struct.Struct("<Q")
#: struct vfio_device_feature_mig_state: u32 device_state, s32 data_fd.
FEATURE_MIG_STATE = struct.Struct("<Ii")
#: struct vfio_device_feature_mig_data_size: u64 stop_copy_length.
FEATURE_MIG_DATA_SIZE = struct.Struct("<Q")
#: struct vfio_precopy_info: u32 argsz, u32 flags, u64 initial, u64 dirty.
PRECOPY_INFO = struct.Struct("<IIQQ")
#: struct vfio_device_feature_dma_logging_control:
#: u64 page_size, u32 num_ranges, u32 reserved, u64 ranges (user pointer).
DMA_LOGGING_CONTROL = struct.Struct("<QIIQ")
#: struct vfio_device_feature_dma_logging_range: u64 iova, u64 length.
DMA_LOGGING_RANGE = struct.Struct("<QQ")
#: struct vfio_device_feature_dma_logging_report:
#: u64 iova, u64 length, u64 page_size, u64 bitmap (user pointer).
DMA_LOGGING_REPORT = struct.Struct("<QQQQ")


def pack_feature(flags: int, payload: bytes) -> bytes:
    """Build a VFIO_DEVICE_FEATURE buffer: header (argsz computed) + payload."""
    return FEATURE_HDR.pack(FEATURE_HDR.size + len(payload), flags) + payload


def pack_mig_state(state: int) -> bytes:
    """Pack a mig_state payload requesting ``state`` (data_fd field is -1)."""
    return FEATURE_MIG_STATE.pack(state, -1)


def unpack_mig_state(buf: bytes) -> tuple[int, int]:
    """Unpack a mig_state payload into ``(device_state, data_fd)``.

    ``device_state`` stays a plain int: SET echoes whatever was requested,
    which need not be a valid :class:`MigState`.
    """
    state, data_fd = FEATURE_MIG_STATE.unpack(buf)
    return int(state), int(data_fd)


def pack_precopy_info() -> bytes:
    """Build a VFIO_MIG_GET_PRECOPY_INFO argument (argsz 24, the rest zero)."""
    return PRECOPY_INFO.pack(PRECOPY_INFO.size, 0, 0, 0)


def unpack_precopy_info(buf: bytes) -> tuple[int, int]:
    """Return ``(initial_bytes, dirty_bytes)`` from a filled precopy_info."""
    _argsz, _flags, initial, dirty = PRECOPY_INFO.unpack(buf)
    return int(initial), int(dirty)
