"""Tests for mpvfio.wire.multifd: packets, channel preamble, reassembly."""

from __future__ import annotations

import io
import pickle
import struct
import threading
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mpvfio.errors import MpvfioError, UsageError
from mpvfio.wire import multifd as M
from mpvfio.wire.multifd import (
    ChannelPreamble,
    MultifdCancelled,
    MultifdError,
    MultifdTimeout,
    Packet,
    Reassembler,
    ReassemblyTable,
    encode_packet,
    pack_packet_header,
    pack_wrapper,
    parse_packet,
    read_frame,
    unpack_wrapper,
    write_frame,
)
from mpvfio.wire.stream import decode_config_state, encode_config_state

SESSION = "00112233445566778899aabbccddeeff"


def drain(r: Reassembler, timeout: float = 5.0) -> bytes:
    """Consume every data chunk of ``r`` in order (then the config is next)."""
    out = bytearray()
    while (chunk := r.next_chunk(timeout)) is not None:
        out += chunk
    return bytes(out)


# --------------------------------------------------------------------------
# wrapper and packet codec


def test_struct_layouts() -> None:
    assert M.WRAPPER.format == ">III256sII" and M.WRAPPER.size == 276
    assert M.PACKET_HEADER.format == ">III" and M.PACKET_HEADER.size == 12
    assert M.PREAMBLE.size == 36
    assert M.MULTIFD_FLAG_DEVICE_STATE == 32 << 1


@given(
    st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=60),
    st.integers(12, 2**30),
)
def test_wrapper_roundtrip(idstr: str, size: int) -> None:
    raw = pack_wrapper(idstr, size)
    assert len(raw) == 276
    magic, version, flags = struct.unpack_from(">III", raw)
    assert (magic, version, flags) == (0x11223344, 1, 64)
    w = unpack_wrapper(raw)
    assert (w.idstr, w.instance_id, w.size) == (idstr, 0, size)


def test_wrapper_idstr_truncated_to_255_and_nul_terminated() -> None:
    raw = pack_wrapper("x" * 300, 12)
    assert raw[12 : 12 + 255] == b"x" * 255 and raw[12 + 255] == 0
    assert unpack_wrapper(raw).idstr == "x" * 255


def test_wrapper_errors() -> None:
    good = bytearray(pack_wrapper("a/vfio", 100))
    bad = bytearray(good)
    bad[0] = 0
    with pytest.raises(MultifdError, match="bad multifd packet magic 0x00223344"):
        unpack_wrapper(bytes(bad))
    bad = bytearray(good)
    bad[7] = 2
    with pytest.raises(MultifdError, match="unsupported multifd packet version 2"):
        unpack_wrapper(bytes(bad))
    bad = bytearray(good)
    bad[11] = 0x41
    with pytest.raises(MultifdError, match="flags 0x41"):
        unpack_wrapper(bytes(bad))
    bad = bytearray(good)
    bad[12:268] = b"y" * 256
    with pytest.raises(MultifdError, match="not NUL-terminated"):
        unpack_wrapper(bytes(bad))
    bad = bytearray(good)
    bad[30] = ord("z")
    with pytest.raises(MultifdError, match="after its NUL"):
        unpack_wrapper(bytes(bad))
    bad = bytearray(good)
    bad[12] = 0xFF
    with pytest.raises(MultifdError, match="not UTF-8"):
        unpack_wrapper(bytes(bad))
    with pytest.raises(
        MultifdError, match="claims 100 bytes, more than the limit of 99"
    ):
        unpack_wrapper(bytes(good), max_size=99)
    with pytest.raises(MultifdError, match="275 bytes"):
        unpack_wrapper(bytes(good[:-1]))
    with pytest.raises(UsageError):
        pack_wrapper("a", -1)


@given(st.integers(0, 0xFFFFFFFE), st.booleans(), st.binary(max_size=100))
def test_packet_roundtrip(idx: int, config: bool, data: bytes) -> None:
    raw = encode_packet(idx, data, config=config)
    assert raw[:12] == struct.pack(">III", 0, idx, 1 if config else 0)
    p = parse_packet(raw)
    assert (p.version, p.idx, p.config, bytes(p.data)) == (0, idx, config, data)
    p2 = parse_packet(bytearray(raw))
    assert bytes(p2.data) == data


def test_parse_packet_too_short_and_zero_copy() -> None:
    for n in range(12):
        with pytest.raises(MultifdError, match=r"dev: device state packet too short"):
            parse_packet(b"\0" * n, "dev")
    buf = bytearray(pack_packet_header(3) + b"payload")
    p = parse_packet(buf)
    assert isinstance(p.data, memoryview) and p.data.obj is buf
    assert len(parse_packet(pack_packet_header(0)).data) == 0


def test_frames_roundtrip_over_a_file() -> None:
    f = io.BytesIO()
    big = bytes(range(256)) * 100
    n1 = write_frame(f, "a/vfio", 0, big)
    n2 = write_frame(f, "b/vfio", 7, memoryview(b"cfg"), config=True)
    assert n1 == 276 + 12 + len(big) and n2 == 276 + 12 + 3
    f.seek(0)
    fr = read_frame(f)
    assert fr is not None
    w, p = fr
    assert (w.idstr, w.size, p.idx, p.config, bytes(p.data)) == (
        "a/vfio",
        12 + len(big),
        0,
        False,
        big,
    )
    fr = read_frame(f)
    assert fr is not None and fr[1].config and bytes(fr[1].data) == b"cfg"
    assert read_frame(f) is None


def test_frame_errors() -> None:
    f = io.BytesIO()
    write_frame(f, "a/vfio", 0, b"abcdef")
    data = f.getvalue()
    for cut in range(1, len(data)):
        with pytest.raises(MultifdError, match="truncated multifd channel"):
            read_frame(io.BytesIO(data[:cut]))
    short = pack_wrapper("a/vfio", 11) + b"\0" * 11
    with pytest.raises(MultifdError, match="too short"):
        read_frame(io.BytesIO(short))
    huge = pack_wrapper("a/vfio", 2**32 - 1)

    class Rec:
        def __init__(self, data: bytes) -> None:
            self.b = io.BytesIO(data)
            self.max = 0

        def read(self, n: int) -> bytes:
            self.max = max(self.max, n)
            return self.b.read(n)

    rec = Rec(huge)
    with pytest.raises(MultifdError, match="more than the limit"):
        read_frame(rec)
    assert rec.max == 276


def test_frame_short_reads_and_partial_writes() -> None:
    class Trickle:
        def __init__(self) -> None:
            self.buf = bytearray()

        def write(self, b: Any) -> int:
            part = bytes(memoryview(b)[:5])
            self.buf += part
            return len(part)

    t = Trickle()
    write_frame(t, "dev/vfio", 1, b"x" * 50)

    class Slow:
        def __init__(self, data: bytes) -> None:
            self.b = io.BytesIO(data)

        def read(self, n: int) -> bytes:
            return self.b.read(min(n, 3))

    fr = read_frame(Slow(bytes(t.buf)))
    assert fr is not None and bytes(fr[1].data) == b"x" * 50 and fr[1].idx == 1


# --------------------------------------------------------------------------
# channel preamble


@given(st.integers(1, 255), st.data())
def test_preamble_roundtrip(count: int, data: st.DataObject) -> None:
    idx = data.draw(st.integers(0, count - 1))
    session = data.draw(st.binary(min_size=16, max_size=16)).hex()
    p = ChannelPreamble(idx, count, session)
    raw = p.pack()
    assert raw[:8] == b"MPVFIOC\x00" and len(raw) == 36
    assert ChannelPreamble.unpack(raw) == p
    assert ChannelPreamble.read(io.BytesIO(raw)) == p


def test_preamble_errors() -> None:
    raw = bytearray(ChannelPreamble(0, 2, SESSION).pack())
    bad = bytearray(raw)
    bad[0] = ord("X")
    with pytest.raises(MultifdError, match="not an mpvfio multifd channel"):
        ChannelPreamble.unpack(bytes(bad))
    bad = bytearray(raw)
    bad[11] = 9
    with pytest.raises(MultifdError, match="unsupported multifd channel version 9"):
        ChannelPreamble.unpack(bytes(bad))
    bad = bytearray(raw)
    bad[15] = 2  # index 2 of 2
    with pytest.raises(MultifdError, match="bad channel preamble: channel index 2"):
        ChannelPreamble.unpack(bytes(bad))
    with pytest.raises(MultifdError, match="truncated"):
        ChannelPreamble.read(io.BytesIO(bytes(raw[:20])))
    with pytest.raises(MultifdError, match="truncated"):
        ChannelPreamble.read(io.BytesIO(b""))
    with pytest.raises(UsageError, match="count 0"):
        ChannelPreamble(0, 0, SESSION)
    with pytest.raises(UsageError, match="hex"):
        ChannelPreamble(0, 1, "zz")
    with pytest.raises(UsageError, match="lowercase"):
        ChannelPreamble(0, 1, SESSION.upper())
    assert len(ChannelPreamble.new(0, 1).session) == 32


# --------------------------------------------------------------------------
# reassembler: R10.5 checks


def test_in_order_then_config() -> None:
    r = Reassembler("dev")
    r.add(0, 0, b"ab")
    r.add(1, 0, b"cd")
    r.add(2, M.PACKET_FLAG_CONFIG_STATE, b"CFG")
    assert r.complete and r.config_received and r.idx_last == 2
    assert r.queued_bytes == 7
    assert r.next_chunk() == b"ab"
    assert r.queued_bytes == 5
    assert r.next_chunk() == b"cd"
    assert r.next_chunk() is None
    assert r.next_chunk() is None  # config still next
    assert r.config() == b"CFG"
    assert r.queued_bytes == 0 and r.done
    assert r.next_chunk() is None
    with pytest.raises(MultifdError, match="config already consumed"):
        r.config()


def test_duplicate_rejected() -> None:
    r = Reassembler("dev")
    r.add(3, 0, b"x")
    with pytest.raises(
        MultifdError, match=r"dev: packet slot already filled \(packet idx 3\)"
    ):
        r.add(3, 0, b"y")
    assert r.queued_bytes == 1


def test_replay_after_consumption_rejected() -> None:
    r = Reassembler("dev")
    r.add(0, 0, b"x")
    assert r.next_chunk(1) == b"x"
    with pytest.raises(MultifdError, match="already filled") as ei:
        r.add(0, 0, b"x")
    assert ei.value.device == "dev" and ei.value.idx == 0
    r.add(1, 1, b"c")
    assert r.next_chunk(1) is None and r.config() == b"c"
    with pytest.raises(MultifdError, match="already filled"):
        r.add(1, 1, b"c")


def test_invalid_idx_and_version_and_flags() -> None:
    r = Reassembler("dev")
    with pytest.raises(MultifdError, match="invalid packet index 0xFFFFFFFF"):
        r.add(0xFFFFFFFF, 0, b"")
    with pytest.raises(MultifdError, match="unsupported device state packet version 1"):
        r.add(0, 0, b"", version=1)
    # version is checked before idx (R10.5 order)
    with pytest.raises(MultifdError, match="version 1"):
        r.add(0xFFFFFFFF, 0, b"", version=1)
    with pytest.raises(MultifdError, match="unknown packet flags 0x2"):
        r.add(0, 2, b"")
    with pytest.raises(MultifdError, match="too short"):
        r.add_raw(b"\0" * 11)
    assert r.queued_bytes == 0 and r.next_idx == 0


def test_queued_bytes_limit_exact_boundary() -> None:
    r = Reassembler("dev", max_queued=10)
    r.add(0, 0, b"x" * 6)
    r.add(1, 0, b"y" * 4)  # == limit: accepted
    assert r.queued_bytes == 10
    with pytest.raises(
        MultifdError, match=r"would reach 11 bytes, over the limit of 10"
    ):
        r.add(2, 0, b"z")
    with pytest.raises(MultifdError, match="over the limit"):
        r.add(2, M.PACKET_FLAG_CONFIG_STATE, b"c")  # config bytes count too
    r.add(2, 0, b"")  # zero bytes still fit
    assert r.next_chunk(1) == b"x" * 6  # consumption frees queue space
    r.add(3, M.PACKET_FLAG_CONFIG_STATE, b"c" * 6)
    assert r.queued_bytes == 10
    assert r.next_chunk(1) == b"y" * 4
    assert r.next_chunk(1) is None  # the empty packet 2 is skipped
    assert r.config() == b"c" * 6


def test_zero_limit_and_default_limit() -> None:
    r = Reassembler("dev", max_queued=0)
    r.add(0, 0, b"")
    with pytest.raises(MultifdError, match="over the limit of 0"):
        r.add(1, 0, b"a")
    assert Reassembler("d").max_queued == 2**64 - 1
    with pytest.raises(UsageError):
        Reassembler("d", max_queued=2**64)


def test_out_of_order_arrival_reassembled_in_order() -> None:
    r = Reassembler("dev")
    r.add(4, M.PACKET_FLAG_CONFIG_STATE, b"C")
    for idx in (2, 0, 3, 1):
        r.add(idx, 0, bytes([65 + idx]))
    assert drain(r) == b"ABCD"
    assert r.config() == b"C"


def test_config_is_last() -> None:
    r = Reassembler("dev")
    r.add(2, M.PACKET_FLAG_CONFIG_STATE, b"C")
    with pytest.raises(
        MultifdError, match=r"data packet after the config packet \(idx 2\)"
    ):
        r.add(3, 0, b"late")
    with pytest.raises(MultifdError, match="second config packet"):
        r.add(1, M.PACKET_FLAG_CONFIG_STATE, b"C2")
    r2 = Reassembler("dev")
    r2.add(5, 0, b"d")
    with pytest.raises(
        MultifdError, match="config packet arrived after data packet idx 5"
    ):
        r2.add(3, M.PACKET_FLAG_CONFIG_STATE, b"C")


def test_config_before_data_consumed() -> None:
    r = Reassembler("dev")
    r.add(1, M.PACKET_FLAG_CONFIG_STATE, b"C")
    with pytest.raises(MultifdError, match="config is not next"):
        r.config()
    r2 = Reassembler("dev")
    with pytest.raises(MultifdError, match="config packet not received yet"):
        r2.config()


def test_nothing_changes_on_error() -> None:
    r = Reassembler("dev", max_queued=3)
    r.add(0, 0, b"abc")
    for args in ((0, 0, b""), (1, 0, b"x"), (0xFFFFFFFF, 0, b"")):
        with pytest.raises(MultifdError):
            r.add(*args)
    assert r.queued_bytes == 3 and r.idx_last is None and not r.complete
    with pytest.raises(MultifdError):
        r.add(1, M.PACKET_FLAG_CONFIG_STATE, b"toolong")
    assert r.idx_last is None


def test_completion_tracking_with_gaps() -> None:
    r = Reassembler("dev")
    r.add(3, M.PACKET_FLAG_CONFIG_STATE, b"C")
    r.add(0, 0, b"a")
    r.add(2, 0, b"c")
    assert r.config_received and not r.complete
    r.add(1, 0, b"b")
    assert r.complete
    assert drain(r) == b"abc"
    assert r.complete


def test_huge_config_idx_does_not_cost_memory_or_time() -> None:
    r = Reassembler("dev")
    r.add(0xFFFFFFFE, M.PACKET_FLAG_CONFIG_STATE, b"C")
    assert not r.complete  # no loop over 4 billion slots
    assert r.queued_bytes == 1


# --------------------------------------------------------------------------
# consumer waits, cancel, threads


@pytest.mark.timeout(20)
def test_cancel_wakes_a_waiting_consumer() -> None:
    r = Reassembler("dev")
    r.add(1, 0, b"gap before me")
    errors: list[BaseException] = []
    started = threading.Event()

    def consumer() -> None:
        started.set()
        try:
            r.next_chunk()
        except MultifdError as e:
            errors.append(e)

    t = threading.Thread(target=consumer)
    t.start()
    assert started.wait(5)
    time.sleep(0.05)
    assert t.is_alive()
    r.cancel()
    t.join(5)
    assert not t.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], MultifdCancelled)
    assert "operation cancelled" in str(errors[0])
    assert r.cancelled and r.queued_bytes == 0
    with pytest.raises(MultifdCancelled, match="operation cancelled"):
        r.add(0, 0, b"x")
    with pytest.raises(MultifdCancelled):
        r.config()
    with pytest.raises(MultifdCancelled):
        r.next_chunk(0)


@pytest.mark.timeout(20)
def test_next_chunk_timeout() -> None:
    r = Reassembler("dev")
    t0 = time.monotonic()
    with pytest.raises(
        MultifdTimeout, match=r"timed out after 0\.05 s waiting for packet idx 0"
    ):
        r.next_chunk(0.05)
    assert time.monotonic() - t0 >= 0.05
    with pytest.raises(MultifdTimeout):
        r.next_chunk(0)


@pytest.mark.timeout(30)
def test_consumer_wakes_when_the_packet_arrives() -> None:
    r = Reassembler("dev")
    got: list[bytes | None] = []

    def consumer() -> None:
        got.append(r.next_chunk(10))
        got.append(r.next_chunk(10))

    t = threading.Thread(target=consumer)
    t.start()
    time.sleep(0.05)
    r.add(1, M.PACKET_FLAG_CONFIG_STATE, b"C")
    time.sleep(0.05)
    assert t.is_alive()  # idx 0 still missing
    r.add(0, 0, b"data")
    t.join(10)
    assert got == [b"data", None]


@pytest.mark.timeout(60)
def test_concurrent_producers_one_consumer() -> None:
    n = 400
    r = Reassembler("dev", max_queued=2**20)
    chunks = [i.to_bytes(4, "big") * (1 + i % 7) for i in range(n)]
    out: list[bytes] = []
    errors: list[BaseException] = []

    def producer(k: int) -> None:
        try:
            for i in range(k, n, 4):
                r.add(i, 0, chunks[i])
            if k == 0:
                r.add(n, M.PACKET_FLAG_CONFIG_STATE, b"CFG")
        except MultifdError as e:  # pragma: no cover
            errors.append(e)

    def consumer() -> None:
        try:
            while (c := r.next_chunk(20)) is not None:
                out.append(c)
            out.append(r.config())
        except MultifdError as e:  # pragma: no cover
            errors.append(e)

    threads = [threading.Thread(target=producer, args=(k,)) for k in range(4)]
    threads.append(threading.Thread(target=consumer))
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    assert out == [*chunks, b"CFG"]
    assert r.queued_bytes == 0


@pytest.mark.timeout(120)
@settings(deadline=None, max_examples=150)
@given(st.lists(st.binary(max_size=40), max_size=30), st.binary(max_size=40), st.data())
def test_random_permutations_reassemble(
    chunks: list[bytes], config: bytes, data: st.DataObject
) -> None:
    packets = [encode_packet(i, c) for i, c in enumerate(chunks)]
    packets.append(encode_packet(len(chunks), config, config=True))
    order = data.draw(st.permutations(packets))
    r = Reassembler("dev")
    for p in order:
        r.add_raw(p)
    assert r.complete
    assert r.queued_bytes == sum(map(len, chunks)) + len(config)
    assert drain(r, 1) == b"".join(chunks)
    assert r.config() == config
    assert r.queued_bytes == 0


@pytest.mark.timeout(120)
@settings(deadline=None, max_examples=50)
@given(st.lists(st.binary(min_size=1, max_size=40), max_size=20), st.data())
def test_interleaved_add_and_consume(chunks: list[bytes], data: st.DataObject) -> None:
    """Consuming whenever possible during random arrival keeps the order."""
    n = len(chunks)
    order = data.draw(st.permutations(range(n + 1)))
    r = Reassembler("dev")
    out = bytearray()
    for i in order:
        if i == n:
            r.add(i, 1, b"C")
        else:
            r.add(i, 0, chunks[i])
        while True:
            try:
                c = r.next_chunk(0)
            except MultifdTimeout:
                break
            if c is None:
                break
            out += c
    assert bytes(out) == b"".join(chunks)
    assert r.config() == b"C"


# --------------------------------------------------------------------------
# table


def test_table_routes_and_rejects_unknown_device() -> None:
    t = ReassemblyTable(["a", "b"], max_queued=100)
    assert t.devices == ("a", "b") and len(t) == 2
    t.add("a/vfio", encode_packet(0, b"A0"))
    t.add("b/vfio", Packet(0, 0, 1, b"BC"))
    with pytest.raises(MultifdError, match="unknown device: idstr 'c/vfio'"):
        t.add("c/vfio", encode_packet(0, b""))
    with pytest.raises(MultifdError, match="unknown device"):
        t.add("a/vfio", encode_packet(1, b""), instance_id=1)
    with pytest.raises(MultifdError, match="unknown device"):
        t.lookup("a")  # a device name is not an idstr
    assert t["a"].queued_bytes == 2 and t["a"].max_queued == 100
    with pytest.raises(UsageError):
        t["zz"]
    with pytest.raises(UsageError, match="twice"):
        ReassemblyTable(["a", "a"])
    assert t.queued_bytes == 4


def test_table_completion() -> None:
    t = ReassemblyTable(["a", "b"])
    assert not t.complete and t.pending() == ["a", "b"]
    t.add("a/vfio", encode_packet(1, b"cfg", config=True))
    assert t.pending() == ["a", "b"]
    t.add("a/vfio", encode_packet(0, b"d"))
    assert t.pending() == ["b"]
    t.add("b/vfio", encode_packet(0, b"cfg", config=True))
    assert t.complete and t.pending() == []
    assert ReassemblyTable([]).complete


def test_table_frames_end_to_end() -> None:
    """Two channels, packets dealt round robin, reassembled per device."""
    devs = {"0000:00:02.0": [b"a" * 100, b"b" * 50], "": [b"c" * 10]}
    chans = [io.BytesIO(), io.BytesIO()]
    k = 0
    for name, chunks in devs.items():
        idstr = "vfio" if not name else f"{name}/vfio"
        for i, c in enumerate(chunks):
            write_frame(chans[k % 2], idstr, i, c)
            k += 1
        cfg = encode_config_state(b"config of " + name.encode())
        write_frame(chans[k % 2], idstr, len(chunks), cfg, config=True)
        k += 1
    t = ReassemblyTable(devs)
    for ch in reversed(chans):
        ch.seek(0)
        while (fr := read_frame(ch)) is not None:
            t.add_frame(*fr)
    assert t.complete
    for name, chunks in devs.items():
        r = t[name]
        assert drain(r) == b"".join(chunks)
        assert decode_config_state(r.config(), name) == b"config of " + name.encode()


@pytest.mark.timeout(20)
def test_table_cancel_cancels_all() -> None:
    t = ReassemblyTable(["a", "b"])
    t.cancel("source failed")
    for d in ("a", "b"):
        with pytest.raises(MultifdCancelled, match="source failed"):
            t[d].next_chunk()


def test_multifd_errors_pickle() -> None:
    for cls in (MultifdError, MultifdCancelled, MultifdTimeout):
        e = cls("dev: boom (packet idx 3)", "dev", 3)
        e2 = pickle.loads(pickle.dumps(e))
        assert type(e2) is cls and str(e2) == str(e)
        assert (e2.device, e2.idx) == ("dev", 3)
        assert isinstance(e2, MpvfioError)
