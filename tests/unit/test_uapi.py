"""Tests of mpvfio.uapi.vfio: numbers and layouts against VFIO_UAPI.md."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mpvfio.uapi import vfio
from mpvfio.uapi.vfio import Feature, MigFlag, MigState

U32 = st.integers(0, 2**32 - 1)
S32 = st.integers(-(2**31), 2**31 - 1)
U64 = st.integers(0, 2**64 - 1)


@pytest.mark.parametrize(
    ("value", "hex_literal", "dec_literal"),
    [
        (vfio.VFIO_DEVICE_RESET, 0x3B6F, 15215),
        (vfio.VFIO_DEVICE_FEATURE, 0x3B75, 15221),
        (vfio.VFIO_MIG_GET_PRECOPY_INFO, 0x3B79, 15225),
    ],
)
def test_ioctl_numbers(value: int, hex_literal: int, dec_literal: int) -> None:
    assert value == hex_literal == dec_literal


def test_ioctl_builder() -> None:
    assert vfio.VFIO_TYPE == 0x3B == ord(";")
    assert vfio.VFIO_BASE == 100
    assert vfio._IO(0x3B, 100) == 0x3B64  # VFIO_GET_API_VERSION
    # The doc comments' _IOWR encodings are wrong for VFIO; the builder
    # still produces them, which pins the dir and size fields.
    assert vfio._IOC(3, 0x3B, 117, 8) == 0xC0083B75
    assert vfio._IOC(3, 0x3B, 121, 24) == 0xC0183B79


def test_struct_sizes() -> None:
    assert vfio.FEATURE_HDR.size == 8
    assert vfio.FEATURE_MIGRATION.size == 8
    assert vfio.FEATURE_MIG_STATE.size == 8
    assert vfio.FEATURE_MIG_DATA_SIZE.size == 8
    assert vfio.PRECOPY_INFO.size == 24
    assert vfio.DMA_LOGGING_CONTROL.size == 24
    assert vfio.DMA_LOGGING_RANGE.size == 16
    assert vfio.DMA_LOGGING_REPORT.size == 32
    for s in (
        vfio.FEATURE_HDR,
        vfio.FEATURE_MIGRATION,
        vfio.FEATURE_MIG_STATE,
        vfio.FEATURE_MIG_DATA_SIZE,
        vfio.PRECOPY_INFO,
        vfio.DMA_LOGGING_CONTROL,
        vfio.DMA_LOGGING_RANGE,
        vfio.DMA_LOGGING_REPORT,
    ):
        assert s.format.startswith("<")


def test_dma_logging_offsets() -> None:
    raw = vfio.DMA_LOGGING_CONTROL.pack(0x1000, 3, 0, 0xDEAD0000)
    assert raw[0:8] == (0x1000).to_bytes(8, "little")
    assert raw[8:12] == (3).to_bytes(4, "little")
    assert raw[16:24] == (0xDEAD0000).to_bytes(8, "little")
    report = vfio.DMA_LOGGING_REPORT.pack(1, 2, 3, 4)
    assert [int.from_bytes(report[i : i + 8], "little") for i in (0, 8, 16, 24)] == [
        1,
        2,
        3,
        4,
    ]


def test_mig_state_numbers() -> None:
    assert {s.name: int(s) for s in MigState} == {
        "ERROR": 0,
        "STOP": 1,
        "RUNNING": 2,
        "STOP_COPY": 3,
        "RESUMING": 4,
        "RUNNING_P2P": 5,
        "PRE_COPY": 6,
        "PRE_COPY_P2P": 7,
    }


def test_qapi_names() -> None:
    assert vfio.qapi_name(MigState.ERROR) is None
    assert vfio.qapi_name(MigState.STOP) == "stop"
    assert vfio.qapi_name(MigState.RUNNING) == "running"
    assert vfio.qapi_name(MigState.STOP_COPY) == "stop-copy"
    assert vfio.qapi_name(MigState.RESUMING) == "resuming"
    assert vfio.qapi_name(MigState.RUNNING_P2P) == "running-p2p"
    assert vfio.qapi_name(MigState.PRE_COPY) == "pre-copy"
    assert vfio.qapi_name(MigState.PRE_COPY_P2P) == "pre-copy-p2p"


def test_flag_numbers() -> None:
    assert (MigFlag.STOP_COPY, MigFlag.P2P, MigFlag.PRE_COPY) == (1, 2, 4)
    assert [int(f) for f in vfio.LEGAL_FLAG_SETS] == [0x1, 0x3, 0x5, 0x7]


def test_state_needs() -> None:
    assert {s.name: m for s, m in vfio.STATE_NEEDS.items()} == {
        "ERROR": 0xFFFFFFFF,
        "STOP": 0x1,
        "RUNNING": 0x1,
        "STOP_COPY": 0x1,
        "RESUMING": 0x1,
        "RUNNING_P2P": 0x3,
        "PRE_COPY": 0x5,
        "PRE_COPY_P2P": 0x7,
    }


def test_session_sets() -> None:
    s = MigState
    assert {s.PRE_COPY, s.PRE_COPY_P2P, s.STOP_COPY} == vfio.SAVING_GROUP
    assert {
        (s.STOP, s.STOP_COPY),
        (s.STOP, s.RESUMING),
        (s.RUNNING, s.PRE_COPY),
        (s.RUNNING_P2P, s.PRE_COPY_P2P),
    } == vfio.SESSION_OPENING_ARCS
    assert {
        (s.STOP_COPY, s.STOP),
        (s.PRE_COPY, s.RUNNING),
        (s.PRE_COPY_P2P, s.RUNNING_P2P),
        (s.RESUMING, s.STOP),
    } == vfio.SESSION_CLOSING_ARCS


def test_feature_numbers() -> None:
    assert vfio.VFIO_DEVICE_FEATURE_MASK == 0x0000FFFF
    assert vfio.VFIO_DEVICE_FEATURE_GET == 0x00010000
    assert vfio.VFIO_DEVICE_FEATURE_SET == 0x00020000
    assert vfio.VFIO_DEVICE_FEATURE_PROBE == 0x00040000
    assert [f.name for f in sorted(Feature)] == [
        "PCI_VF_TOKEN",
        "MIGRATION",
        "MIG_DEVICE_STATE",
        "LOW_POWER_ENTRY",
        "LOW_POWER_ENTRY_WITH_WAKEUP",
        "LOW_POWER_EXIT",
        "DMA_LOGGING_START",
        "DMA_LOGGING_STOP",
        "DMA_LOGGING_REPORT",
        "MIG_DATA_SIZE",
        "BUS_MASTER",
        "DMA_BUF",
    ]
    assert [int(f) for f in sorted(Feature)] == list(range(12))


GET, SET, PROBE = (
    vfio.VFIO_DEVICE_FEATURE_GET,
    vfio.VFIO_DEVICE_FEATURE_SET,
    vfio.VFIO_DEVICE_FEATURE_PROBE,
)


@pytest.mark.parametrize(
    ("flags", "word"),
    [
        (GET | Feature.MIGRATION, 0x00010001),
        (PROBE | Feature.MIGRATION, 0x00040001),
        (PROBE | GET | Feature.MIGRATION, 0x00050001),
        (GET | Feature.MIG_DEVICE_STATE, 0x00010002),
        (SET | Feature.MIG_DEVICE_STATE, 0x00020002),
        (GET | Feature.MIG_DATA_SIZE, 0x00010009),
    ],
)
def test_feature_flags_words(flags: int, word: int) -> None:
    assert flags == word
    buf = vfio.pack_feature(flags, bytes(8))
    assert len(buf) == 16
    assert buf[:4] == (16).to_bytes(4, "little")  # argsz
    assert buf[4:8] == word.to_bytes(4, "little")


def test_set_mig_device_state_buffer() -> None:
    buf = vfio.pack_feature(
        SET | Feature.MIG_DEVICE_STATE, vfio.pack_mig_state(MigState.STOP_COPY)
    )
    assert buf == bytes.fromhex("10000000 02000200 03000000 ffffffff")
    assert vfio.unpack_mig_state(buf[8:]) == (3, -1)


def test_probe_without_payload() -> None:
    assert vfio.pack_feature(PROBE | Feature.MIGRATION, b"") == bytes.fromhex(
        "08000000 01000400"
    )


def test_precopy_info_request() -> None:
    buf = vfio.pack_precopy_info()
    assert buf == (24).to_bytes(4, "little") + bytes(20)
    assert vfio.unpack_precopy_info(buf) == (0, 0)


@given(flags=U32, payload=st.binary(max_size=64))
def test_pack_feature_round_trip(flags: int, payload: bytes) -> None:
    buf = vfio.pack_feature(flags, payload)
    argsz, got_flags = vfio.FEATURE_HDR.unpack_from(buf)
    assert argsz == len(buf) == 8 + len(payload)
    assert got_flags == flags
    assert buf[8:] == payload


@given(state=U32, data_fd=S32)
def test_mig_state_round_trip(state: int, data_fd: int) -> None:
    buf = vfio.FEATURE_MIG_STATE.pack(state, data_fd)
    assert vfio.unpack_mig_state(buf) == (state, data_fd)
    assert vfio.unpack_mig_state(vfio.pack_mig_state(state)) == (state, -1)


@given(initial=U64, dirty=U64)
def test_precopy_info_round_trip(initial: int, dirty: int) -> None:
    buf = vfio.PRECOPY_INFO.pack(24, 0, initial, dirty)
    assert buf[8:16] == initial.to_bytes(8, "little")
    assert buf[16:24] == dirty.to_bytes(8, "little")
    assert vfio.unpack_precopy_info(buf) == (initial, dirty)


@given(value=U64)
def test_u64_payloads_round_trip(value: int) -> None:
    for s in (vfio.FEATURE_MIGRATION, vfio.FEATURE_MIG_DATA_SIZE):
        raw = s.pack(value)
        assert raw == value.to_bytes(8, "little")
        assert s.unpack(raw) == (value,)
