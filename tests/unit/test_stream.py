"""Tests for mpvfio.wire.stream: round trips, strict parsing, limits."""

from __future__ import annotations

import io
import json
import pickle
import socket
import struct
import threading
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mpvfio.errors import MpvfioError, UsageError
from mpvfio.wire import stream as S
from mpvfio.wire.stream import (
    Config,
    ConfigLoadReady,
    DataChunk,
    Eof,
    FullEnd,
    Header,
    Hello,
    InitDataSent,
    PartEnd,
    Record,
    SectionEnd,
    SectionStart,
    StreamError,
    StreamReader,
    StreamWriter,
    SwitchoverStart,
    VfioTag,
)

SESSION = "00112233445566778899aabbccddeeff"
EOS = VfioTag.END_OF_STATE
Op = tuple[Any, ...]

# --------------------------------------------------------------------------
# helpers


def hello(
    devices: Sequence[str] = ("a", "b"),
    channels: int = 0,
    cai: bool = False,
) -> Hello:
    return Hello(
        tuple(devices),
        multifd_channels=channels,
        config_after_iter=cai,
        arch="x86_64",
        session=SESSION,
    )


def write(h: Hello, ops: Sequence[Op]) -> tuple[bytes, list[Record]]:
    """Run ``ops`` through a writer; return the bytes and the expected records."""
    buf = io.BytesIO()
    w = StreamWriter(buf)
    w.header(h)
    want: list[Record] = [Header(h)]
    for op in ops:
        kind, args = op[0], op[1:]
        if kind == "start":
            sid = w.section_start(args[0])
            want.append(SectionStart(args[0], sid))
        elif kind == "part":
            dev, data, init = args
            w.section_part(dev, data, init_data_sent=init)
            if data is not None:
                want.append(DataChunk(dev, data, False))
            want.append(InitDataSent(dev) if init else PartEnd(dev))
        elif kind == "switch":
            w.cmd_switchover_start()
            want.append(SwitchoverStart())
        elif kind == "end":
            dev, chunks = args
            w.section_end(dev, chunks)
            want.extend(DataChunk(dev, c, True) for c in chunks or ())
            want.append(SectionEnd(dev))
        elif kind == "full_config":
            w.section_full_config(args[0], args[1])
            want.append(Config(args[0], args[1]))
        elif kind == "full_multifd":
            w.section_full_multifd(args[0], args[1])
            want.append(ConfigLoadReady(args[0]) if args[1] else FullEnd(args[0]))
        elif kind == "eof":
            w.eof()
            want.append(Eof())
        else:  # pragma: no cover
            raise AssertionError(kind)
    assert w.offset == len(buf.getvalue())
    return buf.getvalue(), want


def read_all(data: bytes, **kw: Any) -> list[Record]:
    return list(StreamReader(io.BytesIO(data), **kw))


def full_ops(h: Hello, part_data: bytes | None = b"pre") -> list[Op]:
    """A complete valid op list for ``h``."""
    ops: list[Op] = [("start", d) for d in h.devices]
    ops += [("part", d, part_data, False) for d in h.devices]
    ops.append(("switch",))
    if h.multifd:
        ops += [("end", d, None) for d in h.devices]
        ops += [("full_multifd", d, h.config_after_iter) for d in h.devices]
    else:
        ops += [("end", d, [b"s1", b"s22"]) for d in h.devices]
        ops += [("full_config", d, b"cfg-" + d.encode()) for d in h.devices]
    ops.append(("eof",))
    return ops


def stream_of(h: Hello) -> bytes:
    return write(h, full_ops(h))[0]


def header_bytes(h: Hello) -> bytes:
    buf = io.BytesIO()
    StreamWriter(buf).header(h)
    return buf.getvalue()


def sec(kind: int, sid: int, idstr: bytes | None = None) -> bytes:
    out = struct.pack(">BI", kind, sid)
    if idstr is not None:
        out += struct.pack(">B", len(idstr)) + idstr + struct.pack(">II", 0, 1)
    return out


def q(*tags: int) -> bytes:
    return b"".join(struct.pack(">Q", t) for t in tags)


FOOT = b"\x7e"
START_A = sec(1, 0, b"a/vfio") + q(VfioTag.DEV_SETUP_STATE, EOS) + FOOT


def expect_error(data: bytes, match: str, **kw: Any) -> StreamError:
    with pytest.raises(StreamError, match=match) as ei:
        read_all(data, **kw)
    return ei.value


class Chunky(io.RawIOBase):
    """A raw file returning at most ``step`` bytes per read (socket-like)."""

    def __init__(self, data: bytes, step: int) -> None:
        self._b = io.BytesIO(data)
        self._step = step
        self.max_request = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        mv = memoryview(b).cast("B")
        self.max_request = max(self.max_request, mv.nbytes)
        chunk = self._b.read(min(self._step, mv.nbytes))
        mv[: len(chunk)] = chunk
        return len(chunk)


class RecordingReader:
    """``read(n)`` only (no readinto), remembering the largest request."""

    def __init__(self, data: bytes) -> None:
        self._b = io.BytesIO(data)
        self.max_request = 0

    def read(self, n: int) -> bytes:
        self.max_request = max(self.max_request, n)
        return self._b.read(n)


# --------------------------------------------------------------------------
# strategies

names = st.text(
    st.characters(codec="utf-8", exclude_characters="\x00"), min_size=0, max_size=10
)
payloads = st.binary(max_size=48) | st.builds(
    lambda n, b: bytes([b]) * n, st.integers(4097, 9000), st.integers(0, 255)
)


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[Hello, list[Op]]:
    devices = draw(st.lists(names, unique=True, max_size=4))
    channels = draw(st.sampled_from([0, 0, 1, 8]))
    cai = draw(st.booleans())
    h = Hello(
        tuple(devices),
        multifd_channels=channels,
        config_after_iter=cai,
        arch=draw(st.text(max_size=8)),
        session=draw(st.binary(min_size=16, max_size=16)).hex(),
    )
    ops: list[Op] = [("start", d) for d in devices]
    init_left = set(devices)
    if devices:
        for _ in range(draw(st.integers(0, 6))):
            d = draw(st.sampled_from(devices))
            data = draw(st.none() | payloads)
            init = d in init_left and draw(st.booleans())
            init_left.discard(d) if init else None
            ops.append(("part", d, data, init))
    if channels or draw(st.booleans()):
        ops.append(("switch",))
    for d in draw(st.permutations(devices)):
        chunks = None if channels else draw(st.none() | st.lists(payloads, max_size=3))
        ops.append(("end", d, chunks))
    for d in draw(st.permutations(devices)):
        if channels:
            ops.append(("full_multifd", d, cai))
        else:
            ops.append(("full_config", d, draw(payloads)))
    ops.append(("eof",))
    return h, ops


# --------------------------------------------------------------------------
# round trips


@pytest.mark.timeout(120)
@settings(deadline=None, max_examples=150)
@given(scenarios())
def test_roundtrip_every_record_type(sc: tuple[Hello, list[Op]]) -> None:
    h, ops = sc
    data, want = write(h, ops)
    assert read_all(data) == want


@pytest.mark.timeout(120)
@settings(deadline=None, max_examples=60)
@given(scenarios(), st.integers(1, 7))
def test_roundtrip_with_short_reads(sc: tuple[Hello, list[Op]], step: int) -> None:
    h, ops = sc
    data, want = write(h, ops)
    assert list(StreamReader(Chunky(data, step))) == want
    assert list(StreamReader(io.BufferedReader(Chunky(data, step)))) == want


def test_roundtrip_covers_all_record_kinds() -> None:
    h1 = hello()
    ops = [
        ("start", "a"),
        ("start", "b"),
        ("part", "a", b"x" * 5000, False),
        ("part", "b", None, True),
        ("part", "a", b"", False),
        ("switch",),
        ("end", "a", [b"1", memoryview(b"22")]),
        ("end", "b", None),
        ("full_config", "a", bytearray(b"cfg")),
        ("full_config", "b", b""),
        ("eof",),
    ]
    data, _ = write(h1, ops)
    recs = read_all(data)
    kinds = {type(r).__name__ for r in recs}
    assert kinds == {
        "Header",
        "SectionStart",
        "DataChunk",
        "PartEnd",
        "InitDataSent",
        "SwitchoverStart",
        "SectionEnd",
        "Config",
        "Eof",
    }
    assert DataChunk("a", b"22", True) in recs
    assert DataChunk("a", b"", False) in recs
    for cai in (False, True):
        h2 = hello(channels=2, cai=cai)
        recs = read_all(stream_of(h2))
        assert (ConfigLoadReady("a") in recs) is cai
        assert (FullEnd("a") in recs) is not cai


def test_exact_bytes_of_a_small_stream() -> None:
    h = hello(["d"])
    data, _ = write(
        h,
        [
            ("start", "d"),
            ("switch",),
            ("end", "d", [b"AB"]),
            ("full_config", "d", b"C"),
            ("eof",),
        ],
    )
    blob = h.to_json()
    assert data[:22] == b"MPVFIOS\x00" + struct.pack(">IIHI", 1, 0, 0, len(blob))
    assert json.loads(data[22 : 22 + len(blob)]) == {
        "arch": "x86_64",
        "config_after_iter": False,
        "devices": ["d/vfio"],
        "multifd_channels": 0,
        "session": SESSION,
    }
    body = data[22 + len(blob) :]
    idstr = b"d/vfio"
    assert body == (
        b"\x01\x00\x00\x00\x00\x06" + idstr + struct.pack(">II", 0, 1)
        + q(0xFFFFFFFFEF100003, 0xFFFFFFFFEF100001) + FOOT
        + b"\x08\x00\x0b\x00\x00"
        + b"\x03\x00\x00\x00\x00" + q(0xFFFFFFFFEF100004, 2) + b"AB"
        + q(0xFFFFFFFFEF100001) + FOOT
        + b"\x04\x00\x00\x00\x00\x06" + idstr + struct.pack(">II", 0, 1)
        + q(0xFFFFFFFFEF100002) + struct.pack(">I", 1) + b"C"
        + q(0xFFFFFFFFEF100001) + FOOT
        + b"\x00"
    )  # fmt: skip


def test_multifd_flag_and_section_ids() -> None:
    h = hello(["x", "y", "z"], channels=3)
    data, want = write(h, full_ops(h))
    assert struct.unpack(">I", data[12:16]) == (1,)
    starts = [r for r in want if isinstance(r, SectionStart)]
    assert [(r.device, r.section_id) for r in starts] == [("x", 0), ("y", 1), ("z", 2)]


def test_empty_device_name_uses_plain_vfio_idstr() -> None:
    h = hello([""])
    data, want = write(h, full_ops(h))
    assert b"\x04vfio" in data
    assert read_all(data) == want


def test_large_chunk_roundtrip_pieces() -> None:
    big = bytes(range(256)) * 9000  # 2.3 MB: read in 1 MiB pieces
    h = hello(["a"])
    ops: list[Op] = [
        ("start", "a"),
        ("end", "a", [big]),
        ("full_config", "a", b"c"),
        ("eof",),
    ]
    data, want = write(h, ops)
    assert read_all(data) == want
    rec = RecordingReader(data)
    assert list(StreamReader(rec)) == want
    assert rec.max_request == 1 << 20
    assert list(StreamReader(Chunky(data, 100_000))) == want


# --------------------------------------------------------------------------
# truncation and corruption


def test_every_truncation_of_a_stream_is_a_stream_error() -> None:
    h = hello(["a", "b"])
    data = stream_of(h)
    for cut in range(len(data)):
        with pytest.raises(StreamError, match=r"truncated .* at offset \d+"):
            read_all(data[:cut])
    assert read_all(data)[-1] == Eof()


@pytest.mark.timeout(120)
@settings(deadline=None, max_examples=100)
@given(scenarios(), st.data())
def test_truncation_property(sc: tuple[Hello, list[Op]], data: st.DataObject) -> None:
    stream, _ = write(*sc)
    cut = data.draw(st.integers(0, len(stream) - 1))
    step = data.draw(st.integers(1, 64))
    with pytest.raises(StreamError, match=r"truncated .* at offset \d+"):
        list(StreamReader(Chunky(stream[:cut], step)))


@pytest.mark.timeout(120)
@settings(deadline=None, max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios(), st.data())
def test_byte_flips_give_stream_error_or_valid_parse(
    sc: tuple[Hello, list[Op]], data: st.DataObject
) -> None:
    stream = bytearray(write(*sc)[0])
    flips = data.draw(
        st.lists(
            st.tuples(st.integers(0, len(stream) - 1), st.integers(1, 255)),
            min_size=1,
            max_size=4,
        )
    )
    for pos, x in flips:
        stream[pos] ^= x
    err: StreamError | None = None
    try:
        recs = read_all(bytes(stream))
    except StreamError as e:
        err = e
    if err is None:
        assert isinstance(recs[0], Header) and recs[-1] == Eof()
    else:
        assert " offset " in str(err)


@pytest.mark.timeout(120)
@settings(deadline=None, max_examples=200)
@given(st.binary(max_size=200))
def test_random_garbage_after_the_header(garbage: bytes) -> None:
    h = hello(["a"], channels=1, cai=True)
    try:
        read_all(header_bytes(h) + garbage)
    except StreamError:
        pass


@pytest.mark.timeout(60)
@settings(deadline=None, max_examples=200)
@given(st.binary(max_size=100))
def test_random_bytes_are_never_a_crash(garbage: bytes) -> None:
    with pytest.raises(StreamError):
        read_all(garbage)


# --------------------------------------------------------------------------
# size limits (no allocation from a claimed size)


def test_oversized_chunk_rejected_before_allocation() -> None:
    h = hello(["a"])
    data = (
        header_bytes(h)
        + START_A
        + sec(2, 0)
        + q(VfioTag.DEV_DATA_STATE, 1 << 62)
        + b"x" * 100
    )
    rec = RecordingReader(data)
    with pytest.raises(StreamError, match="size 4611686018427387904 exceeds the limit"):
        list(StreamReader(rec))
    assert rec.max_request < 1024


def test_chunk_limit_is_configurable_and_exact() -> None:
    h = hello(["a"])
    ops: list[Op] = [
        ("start", "a"),
        ("part", "a", b"x" * 100, False),
        ("switch",),
        ("end", "a", None),
        ("full_config", "a", b"c"),
        ("eof",),
    ]
    data, want = write(h, ops)
    assert read_all(data, max_chunk=100) == want
    expect_error(data, "DEV_DATA_STATE size 100 exceeds the limit of 99", max_chunk=99)


def test_oversized_config_rejected_before_allocation() -> None:
    h = hello(["a"])
    data, _ = write(
        h,
        [("start", "a"), ("end", "a", None), ("full_config", "a", b"c" * 50), ("eof",)],
    )
    expect_error(data, "config size 50 exceeds the limit of 10", max_chunk=10)


def test_truncated_huge_claim_allocates_one_piece_only() -> None:
    h = hello(["a"])
    data = header_bytes(h) + START_A + sec(2, 0) + q(VfioTag.DEV_DATA_STATE, 1 << 29)
    rec = RecordingReader(data + b"z" * 10)
    with pytest.raises(StreamError, match="truncated"):
        list(StreamReader(rec))
    assert rec.max_request == 1 << 20


def test_hello_length_limit() -> None:
    bad = b"MPVFIOS\x00" + struct.pack(">IIHI", 1, 0, 0, 64 * 1024 + 1)
    rec = RecordingReader(bad + b"{}" * 10)
    with pytest.raises(StreamError, match=r"hello length 65537 is not in 1\.\.65536"):
        list(StreamReader(rec))
    assert rec.max_request < 64
    expect_error(b"MPVFIOS\x00" + struct.pack(">IIHI", 1, 0, 0, 0), "hello length 0")


# --------------------------------------------------------------------------
# header and peer


def test_wrong_magic_rejected_at_once() -> None:
    e = expect_error(
        b"GET / HTTP/1.1\r\n" + b"x" * 100, "not an mpvfio migration stream"
    )
    assert "magic b'GET / HT'" in str(e) and e.offset == 0


def test_wrong_version_rejected_at_once() -> None:
    data = bytearray(stream_of(hello()))
    data[8:12] = struct.pack(">I", 2)
    expect_error(bytes(data), "unsupported stream version 2, this side speaks 1")
    # the rest of the header is not even needed
    expect_error(b"MPVFIOS\x00\x00\x00\x00\x07", "unsupported stream version 7")


def test_unknown_flags_reserved_and_flag_mismatch() -> None:
    good = stream_of(hello())
    data = bytearray(good)
    data[15] = 0x02
    expect_error(bytes(data), "unknown stream flags 0x00000002 at offset 12")
    data = bytearray(good)
    data[17] = 1
    expect_error(bytes(data), "reserved header field is 0x0001")
    data = bytearray(good)
    data[15] = 0x01  # multifd flag without channels in the hello
    expect_error(bytes(data), "disagree with the hello")


@pytest.mark.parametrize(
    ("blob", "match"),
    [
        (b"\xff\xfe", "not UTF-8 JSON"),
        (b"[1]", "not a JSON object"),
        (b'{"devices": []}', "lacks the key"),
        (
            b'{"devices":["a"],"multifd_channels":0,"config_after_iter":false,'
            b'"arch":"x","session":"' + SESSION.encode() + b'"}',
            "not of the form",
        ),
        (
            b'{"devices":["a/vfio","a/vfio"],"multifd_channels":0,'
            b'"config_after_iter":false,"arch":"x","session":"'
            + SESSION.encode()
            + b'"}',
            "listed twice",
        ),
        (
            b'{"devices":[],"multifd_channels":true,"config_after_iter":false,'
            b'"arch":"x","session":"' + SESSION.encode() + b'"}',
            "multifd_channels must be an int",
        ),
        (
            b'{"devices":[],"multifd_channels":0,"config_after_iter":1,'
            b'"arch":"x","session":"' + SESSION.encode() + b'"}',
            "config_after_iter must be a bool",
        ),
        (
            b'{"devices":[],"multifd_channels":0,"config_after_iter":false,'
            b'"arch":"x","session":"XYZ"}',
            "session must be",
        ),
        (b"[" * 10_000 + b"]" * 10_000, "not UTF-8 JSON|not a JSON object"),
    ],
)
def test_bad_hello(blob: bytes, match: str) -> None:
    data = b"MPVFIOS\x00" + struct.pack(">IIHI", 1, 0, 0, len(blob)) + blob
    e = expect_error(data, match)
    assert "at offset 22" in str(e)


def test_hello_ignores_unknown_keys() -> None:
    h = hello(["a"])
    obj = json.loads(h.to_json())
    obj["future"] = {"x": 1}
    assert Hello.from_json(json.dumps(obj).encode()) == h


def test_wrong_peer_session_and_devices() -> None:
    data = stream_of(hello(["a", "b"]))
    assert (
        read_all(data, expect_session=SESSION, expect_devices=["b", "a"])[-1] == Eof()
    )
    expect_error(data, "peer mismatch: stream session", expect_session="ab" * 16)
    expect_error(data, r"peer mismatch: the source migrates devices \['a', 'b'\]",
                 expect_devices=["a"])  # fmt: skip


def test_hello_validation() -> None:
    with pytest.raises(UsageError, match="listed twice"):
        hello(["a", "a"])
    with pytest.raises(UsageError, match="NUL"):
        hello(["a\x00"])
    with pytest.raises(UsageError, match="too long"):
        hello(["x" * 251])
    hello(["x" * 250])  # idstr of exactly 255 bytes
    with pytest.raises(UsageError, match="out of range"):
        hello(channels=256)
    with pytest.raises(UsageError, match="session"):
        Hello(("a",), session="ABCD" * 8)
    with pytest.raises(UsageError, match="sequence"):
        Hello("ab")  # type: ignore[arg-type]
    h = Hello(["a"])  # type: ignore[arg-type]
    assert h.devices == ("a",) and len(h.session) == 32 and not h.multifd


def test_device_label_in_messages() -> None:
    assert S.device_label("0000:00:02.0") == "0000:00:02.0"
    assert S.device_label("") == "''"
    assert S.device_label("a b\n") == "'a b\\n'"
    h = hello(["", "x\ny"])
    data = (
        header_bytes(h)
        + sec(1, 0, b"vfio")
        + q(VfioTag.DEV_SETUP_STATE, VfioTag.DEV_DATA_STATE)
    )
    expect_error(data, "^'': DEV_SETUP_STATE not followed by END_OF_STATE")
    data = header_bytes(h) + sec(1, 0, b"x\ny/vfio") + q(1)
    expect_error(data, r"^'x\\ny': Unknown tag 0x1 in START section at offset \d+$")


def test_idstr_helpers() -> None:
    assert S.vfio_idstr("0000:00:02.0") == "0000:00:02.0/vfio"
    assert S.vfio_idstr("") == "vfio"
    for name in ("", "a", "a/b", "0000:00:02.0"):
        assert S.device_of_idstr(S.vfio_idstr(name)) == name
    for bad in ("/vfio", "x", "a/vfio2", ""):
        with pytest.raises(UsageError):
            S.device_of_idstr(bad)


# --------------------------------------------------------------------------
# framing errors


def test_unknown_section_type() -> None:
    h = hello(["a"])
    base = header_bytes(h)
    e = expect_error(base + b"\x05", "unknown section type 0x05")
    assert e.offset == len(base)
    assert f"at offset {len(base)}" in str(e)


def test_unknown_tag_like_qemu() -> None:
    h = hello(["a"])
    data = header_bytes(h) + START_A + sec(2, 0) + q(0xFFFFFFFFEF100007)
    e = expect_error(data, "a: Unknown tag 0xffffffffef100007 in PART section")
    assert e.offset == len(header_bytes(h) + START_A + sec(2, 0))


def test_section_id_not_announced() -> None:
    h = hello(["a"])
    data = header_bytes(h) + START_A + sec(2, 5) + q(EOS) + FOOT
    expect_error(data, "PART section id 5 was not announced by a START section")
    data = header_bytes(h) + sec(3, 0) + q(EOS) + FOOT
    expect_error(data, "END section id 0 was not announced")


def test_unknown_idstr() -> None:
    h = hello(["a"])
    data = header_bytes(h) + sec(1, 0, b"zz/vfio") + q(VfioTag.DEV_SETUP_STATE, EOS)
    expect_error(data, "unknown START section idstr 'zz/vfio' .not in the hello")
    data = header_bytes(h) + sec(1, 0, b"\xff\xfe") + q(VfioTag.DEV_SETUP_STATE, EOS)
    expect_error(data, "idstr is not UTF-8")


def test_bad_instance_and_version_id() -> None:
    h = hello(["a"])
    head = header_bytes(h) + struct.pack(">BIB", 1, 0, 6) + b"a/vfio"
    expect_error(head + struct.pack(">II", 1, 1), "unknown instance id 1")
    expect_error(head + struct.pack(">II", 0, 2), "version id 2, expected 1")


def test_bad_footer() -> None:
    h = hello(["a"])
    data = header_bytes(h) + START_A[:-1] + b"\x7f"
    e = expect_error(data, r"bad section footer 0x7f for section id 0 \(a\)")
    assert e.offset == len(data) - 1


def test_setup_state_not_followed_by_eos() -> None:
    h = hello(["a"])
    data = (
        header_bytes(h)
        + sec(1, 0, b"a/vfio")
        + q(VfioTag.DEV_SETUP_STATE, VfioTag.DEV_DATA_STATE)
    )
    expect_error(data, "DEV_SETUP_STATE not followed by END_OF_STATE")
    data = header_bytes(h) + sec(1, 0, b"a/vfio") + q(EOS)
    expect_error(data, "unexpected END_OF_STATE in START section, expected DEV_SETUP")


def test_duplicate_start_and_reused_section_id() -> None:
    h = hello(["a", "b"])
    expect_error(header_bytes(h) + START_A + START_A, "already used by a")
    b2 = sec(1, 1, b"a/vfio") + q(VfioTag.DEV_SETUP_STATE, EOS) + FOOT
    expect_error(header_bytes(h) + START_A + b2, "duplicate START section for a")


def test_order_violations() -> None:
    h = hello(["a", "b"])
    part_a = sec(2, 0) + q(EOS) + FOOT
    start_b = sec(1, 1, b"b/vfio") + q(VfioTag.DEV_SETUP_STATE, EOS) + FOOT
    expect_error(
        header_bytes(h) + START_A + part_a + start_b,
        "START section of b is out of order: the stream is already in its iteration",
    )
    end_a = sec(3, 0) + q(EOS) + FOOT
    switch = b"\x08\x00\x0b\x00\x00"
    expect_error(
        header_bytes(h) + START_A + end_a + switch,
        "MIG_CMD_SWITCHOVER_START is out of order",
    )
    expect_error(header_bytes(h) + START_A + switch + switch, "duplicate MIG_CMD")
    expect_error(header_bytes(h) + START_A + end_a + end_a, "duplicate END section")
    full_a = sec(4, 0, b"a/vfio") + q(VfioTag.DEV_CONFIG_STATE) + b"\0\0\0\0"
    expect_error(
        header_bytes(h) + START_A + full_a, "FULL section of a before its END section"
    )


def test_eof_before_completion() -> None:
    h = hello(["a"])
    expect_error(header_bytes(h) + b"\x00", "EOF before device a completed .its START")
    end_a = sec(3, 0) + q(EOS) + FOOT
    expect_error(
        header_bytes(h) + START_A + end_a + b"\x00", "its FULL section is missing"
    )


def test_data_after_eof() -> None:
    data = stream_of(hello())
    e = expect_error(data + b"\x00", "data after EOF")
    assert e.offset == len(data)
    assert read_all(data + b"junk", check_trailing=False)[-1] == Eof()


def test_no_read_after_eof_when_trailing_check_is_off() -> None:
    data = stream_of(hello())

    class Strict(RecordingReader):
        def read(self, n: int) -> bytes:
            out = super().read(n)
            assert out, "read past the end"
            return out

    assert list(StreamReader(Strict(data), check_trailing=False))[-1] == Eof()


def test_unknown_command_and_bad_length() -> None:
    h = hello(["a"])
    expect_error(header_bytes(h) + b"\x08\x00\x0c\x00\x00", "unknown command 12")
    expect_error(header_bytes(h) + b"\x08\x00\x0b\x00\x01", "with length 1")


def test_multifd_end_section_with_data_and_without_switchover() -> None:
    h = hello(["a"], channels=1)
    base = header_bytes(h) + START_A
    switch = b"\x08\x00\x0b\x00\x00"
    expect_error(
        base + sec(3, 0) + q(EOS) + FOOT, "END section of a before MIG_CMD_SWITCHOVER"
    )
    expect_error(
        base + switch + sec(3, 0) + q(VfioTag.DEV_DATA_STATE, 1) + b"x",
        "DEV_DATA_STATE in END section in multifd mode",
    )


def test_config_state_in_multifd_mode() -> None:
    h = hello(["a"], channels=1)
    base = header_bytes(h) + START_A + b"\x08\x00\x0b\x00\x00" + sec(3, 0) + q(EOS)
    data = base + FOOT + sec(4, 0, b"a/vfio") + q(VfioTag.DEV_CONFIG_STATE)
    expect_error(data + b"\0\0\0\1x" + q(EOS) + FOOT, r"DEV_CONFIG_STATE in multifd")


def _upto_full(h: Hello) -> bytes:
    data, _ = write(h, [("start", "a"), ("switch",), ("end", "a", None)])
    return data


def test_config_load_ready_errors() -> None:
    full_lr = sec(4, 0, b"a/vfio") + q(VfioTag.DEV_CONFIG_LOAD_READY) + FOOT
    # not multifd
    expect_error(
        _upto_full(hello(["a"])) + full_lr,
        "a: got DEV_CONFIG_LOAD_READY outside multifd transfer",
    )
    # multifd, config-after-iter off
    expect_error(
        _upto_full(hello(["a"], channels=1)) + full_lr,
        "a: got DEV_CONFIG_LOAD_READY but was disabled",
    )
    # duplicated
    h = hello(["a"], channels=1, cai=True)
    ok = _upto_full(h) + full_lr
    assert read_all(ok + b"\x00")[-2:] == [ConfigLoadReady("a"), Eof()]
    expect_error(ok + full_lr, "a: duplicate DEV_CONFIG_LOAD_READY")
    # EOS where LOAD_READY is due, and a duplicate FULL
    full_eos = sec(4, 0, b"a/vfio") + q(EOS) + FOOT
    expect_error(_upto_full(h) + full_eos, "expected DEV_CONFIG_LOAD_READY")
    h2 = hello(["a"], channels=1)
    expect_error(_upto_full(h2) + full_eos + full_eos, "duplicate FULL section for a")
    expect_error(_upto_full(hello(["a"])) + full_eos, "without DEV_CONFIG_STATE")


def test_full_section_id_must_match_start() -> None:
    h = hello(["a"], channels=1)
    data = _upto_full(h) + sec(4, 9, b"a/vfio") + q(EOS) + FOOT
    expect_error(data, "FULL section of a has id 9, its START used 0")


def test_duplicate_init_data_sent() -> None:
    h = hello(["a"])
    part = sec(2, 0) + q(VfioTag.DEV_INIT_DATA_SENT) + FOOT
    data = header_bytes(h) + START_A + part
    expect_error(data + part, "a: duplicate DEV_INIT_DATA_SENT")


def test_unexpected_known_tags() -> None:
    h = hello(["a"])
    base = header_bytes(h) + START_A
    expect_error(
        base + sec(2, 0) + q(VfioTag.DEV_SETUP_STATE),
        "unexpected DEV_SETUP_STATE in PART section",
    )
    expect_error(
        base + sec(3, 0) + q(VfioTag.DEV_CONFIG_STATE),
        "unexpected DEV_CONFIG_STATE in END section",
    )
    end = sec(3, 0) + q(EOS) + FOOT
    expect_error(
        base + end + sec(4, 0, b"a/vfio") + q(VfioTag.DEV_DATA_STATE),
        "unexpected DEV_DATA_STATE in FULL section",
    )
    expect_error(
        base + end + sec(4, 0, b"a/vfio") + q(VfioTag.DEV_CONFIG_STATE)
        + b"\0\0\0\0" + q(VfioTag.DEV_DATA_STATE),
        "unexpected DEV_DATA_STATE in FULL section after the config",
    )  # fmt: skip


# --------------------------------------------------------------------------
# reader behaviour


def test_reader_error_is_sticky() -> None:
    r = StreamReader(io.BytesIO(b"nope nope nope nope nope"))
    with pytest.raises(StreamError, match="not an mpvfio"):
        r.read_record()
    with pytest.raises(StreamError, match="already failed: not an mpvfio"):
        r.read_record()


def test_read_header_then_records_then_none() -> None:
    h = hello(["a"])
    r = StreamReader(io.BytesIO(stream_of(h)))
    assert r.hello is None
    assert r.read_header() == h and r.hello == h
    assert r.read_header() == h
    recs = list(r)
    assert recs[0] == SectionStart("a", 0) and recs[-1] == Eof()
    assert r.read_record() is None
    assert r.offset == len(stream_of(h))


def test_records_are_yielded_incrementally() -> None:
    h = hello(["a"])
    data = header_bytes(h) + START_A + sec(2, 0) + q(VfioTag.DEV_DATA_STATE, 3) + b"abc"
    r = StreamReader(io.BytesIO(data))
    assert isinstance(r.read_record(), Header)
    assert r.read_record() == SectionStart("a", 0)
    assert r.read_record() == DataChunk("a", b"abc", False)
    with pytest.raises(StreamError, match="truncated"):
        r.read_record()


def test_oserror_is_wrapped() -> None:
    class Broken:
        def read(self, n: int) -> bytes:
            raise ConnectionResetError(104, "Connection reset by peer")

    with pytest.raises(StreamError, match="read failed at offset 0") as ei:
        list(StreamReader(Broken()))
    assert isinstance(ei.value.__cause__, ConnectionResetError)


def test_nonblocking_none_read() -> None:
    class WouldBlock:
        def read(self, n: int) -> None:
            return None

    with pytest.raises(StreamError, match="would block"):
        list(StreamReader(WouldBlock()))


@pytest.mark.timeout(30)
@pytest.mark.parametrize("buffering", [0, 65536])
def test_over_a_socketpair(buffering: int) -> None:
    h = hello(["a", "b"], channels=2, cai=True)
    big = bytes(range(256)) * 8192  # 2 MiB: many short socket reads
    ops = full_ops(h, part_data=big)
    data, want = write(h, ops)
    a, b = socket.socketpair()
    with a, b:

        def send() -> None:
            with a.makefile("wb") as wf:
                w = StreamWriter(wf)
                w.header(h)
                for op in ops:
                    _apply(w, op)
                w.flush()
            a.shutdown(socket.SHUT_WR)

        t = threading.Thread(target=send)
        t.start()
        with b.makefile("rb", buffering=buffering) as rf:
            got = list(StreamReader(rf))
        t.join(10)
    assert got == want and len(data) > len(big)


def _apply(w: StreamWriter, op: Op) -> None:
    method = {
        "start": "section_start",
        "part": "section_part",
        "switch": "cmd_switchover_start",
        "end": "section_end",
        "full_config": "section_full_config",
        "full_multifd": "section_full_multifd",
        "eof": "eof",
    }[op[0]]
    getattr(w, method)(*op[1:])


def test_reader_rejects_negative_limit() -> None:
    with pytest.raises(UsageError):
        StreamReader(io.BytesIO(), max_chunk=-1)


# --------------------------------------------------------------------------
# writer


class RecordingWriter:
    def __init__(self, limit: int | None = None) -> None:
        self.parts: list[Any] = []
        self.buf = bytearray()
        self.limit = limit

    def write(self, b: Any) -> int:
        mv = memoryview(b)
        if self.limit is not None:
            mv = mv[: self.limit]
        self.parts.append(b)
        self.buf += mv
        return mv.nbytes


def test_writer_does_not_copy_large_payloads() -> None:
    payload = bytes(1 << 20)
    w = StreamWriter(rec := RecordingWriter())
    h = hello(["a"])
    w.header(h)
    w.section_start("a")
    w.section_part("a", payload)
    views = [p for p in rec.parts if isinstance(p, memoryview) and p.obj is payload]
    assert len(views) == 1 and views[0].nbytes == 1 << 20
    w.cmd_switchover_start()
    chunk = bytearray(10_000)
    w.section_end("a", iter([chunk]))
    assert any(isinstance(p, memoryview) and p.obj is chunk for p in rec.parts)
    cfg = bytes(5000)
    w.section_full_config("a", cfg)
    assert any(isinstance(p, memoryview) and p.obj is cfg for p in rec.parts)
    w.eof()
    assert max(len(memoryview(p)) for p in rec.parts if not _is_payload(p)) < 300
    assert read_all(bytes(rec.buf))[-1] == Eof()


def _is_payload(p: Any) -> bool:
    return isinstance(p, memoryview) and len(p) >= 5000


def test_writer_retries_partial_writes() -> None:
    h = hello(["a", "b"])
    rec = RecordingWriter(limit=7)
    w = StreamWriter(rec)
    w.header(h)
    for op in full_ops(h):
        _apply(w, op)
    assert bytes(rec.buf) == stream_of(h)


def test_writer_misuse_is_usage_error_and_writes_nothing() -> None:
    buf = io.BytesIO()
    w = StreamWriter(buf)
    with pytest.raises(UsageError, match="header first"):
        w.section_start("a")
    w.header(hello(["a"], channels=1))
    with pytest.raises(UsageError, match="already written"):
        w.header(hello(["a"]))
    size = len(buf.getvalue())
    with pytest.raises(UsageError, match="not in the hello"):
        w.section_start("zz")
    with pytest.raises(UsageError, match="before its START"):
        w.section_part("a", b"x")
    w.section_start("a")
    with pytest.raises(UsageError, match="duplicate START"):
        w.section_start("a")
    size = len(buf.getvalue())
    with pytest.raises(UsageError, match="before MIG_CMD_SWITCHOVER_START"):
        w.section_end("a")
    w.cmd_switchover_start()
    with pytest.raises(UsageError, match="END section data in multifd mode"):
        w.section_end("a", [b"data"])
    assert len(buf.getvalue()) == size + 5
    w.section_end("a", [])
    with pytest.raises(UsageError, match="DEV_CONFIG_STATE in multifd mode"):
        w.section_full_config("a", b"c")
    with pytest.raises(UsageError, match="load_ready=True but the hello says"):
        w.section_full_multifd("a", True)
    with pytest.raises(UsageError, match="EOF before device a completed"):
        w.eof()
    w.section_full_multifd("a", False)
    w.eof()
    assert read_all(buf.getvalue())[-1] == Eof()


def test_writer_init_data_sent_once_and_section_id_lookup() -> None:
    w = StreamWriter(io.BytesIO())
    w.header(hello(["a"]))
    with pytest.raises(UsageError, match="no section yet"):
        w.section_id("a")
    w.section_start("a")
    assert w.section_id("a") == 0
    w.section_part("a", None, init_data_sent=True)
    with pytest.raises(UsageError, match="duplicate DEV_INIT_DATA_SENT"):
        w.section_part("a", None, init_data_sent=True)


def test_writer_broken_by_failing_chunk_iterator() -> None:
    w = StreamWriter(io.BytesIO())
    w.header(hello(["a"]))
    w.section_start("a")

    def chunks() -> Any:
        yield b"one"
        raise OSError(5, "EIO from data_fd")

    with pytest.raises(OSError, match="EIO"):
        w.section_end("a", chunks())
    with pytest.raises(StreamError, match="broken by an earlier failure"):
        w.eof()


def test_writer_oserror_and_flush() -> None:
    class Dead:
        def write(self, b: Any) -> int:
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self) -> None:
            raise BrokenPipeError(32, "Broken pipe")

    w = StreamWriter(Dead())
    with pytest.raises(StreamError, match="write failed at offset 0"):
        w.header(hello())
    w2 = StreamWriter(Dead())
    with pytest.raises(StreamError, match="flush failed"):
        w2.flush()
    w3 = StreamWriter(io.BytesIO())
    w3.flush()


# --------------------------------------------------------------------------
# config blob, errors


@given(st.binary(max_size=300))
def test_config_state_blob_roundtrip(cfg: bytes) -> None:
    blob = S.encode_config_state(cfg)
    assert blob[:8] == q(VfioTag.DEV_CONFIG_STATE) and blob[-8:] == q(EOS)
    assert S.decode_config_state(blob) == cfg


def test_config_state_blob_errors() -> None:
    blob = S.encode_config_state(b"abc")
    with pytest.raises(
        StreamError, match="dev: config payload of 3 bytes is too short"
    ):
        S.decode_config_state(b"abc", "dev")
    with pytest.raises(StreamError, match="expected DEV_CONFIG_STATE"):
        S.decode_config_state(q(EOS) + blob[8:])
    with pytest.raises(StreamError, match="does not match"):
        S.decode_config_state(blob + b"x")
    with pytest.raises(StreamError, match="ends with 0x1"):
        S.decode_config_state(blob[:-8] + q(1))


def test_stream_error_pickles() -> None:
    e = StreamError("truncated stream at offset 5", 5)
    e2 = pickle.loads(pickle.dumps(e))
    assert type(e2) is StreamError and str(e2) == str(e) and e2.offset == 5
    assert isinstance(e2, MpvfioError)
