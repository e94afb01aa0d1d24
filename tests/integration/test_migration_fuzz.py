"""Malformed migration streams against a real target over a real socket.

A valid stream is recorded once from a real migration (the main channel as
the source's writer produced it, and the multifd frames as the device
senders produced them).  A raw client then plays the source: it opens the
channels with the recorded session (``transport.open_channels``), writes a
damaged copy of the bytes, shuts its side down and reads the target's
answers.  Whatever the damage (truncation, bad tags, oversized sizes,
reordered or duplicated sections, bad multifd packets, random flips), the
target must end in a clear :class:`MigrationError` quickly, reset its
devices, never start its VM, keep its memory bounded, and never accept
device state other than the source's.
"""

from __future__ import annotations

import io
import json
import shutil
import socket
import struct
import tempfile
import threading
import time
from dataclasses import dataclass, field
from itertools import zip_longest
from typing import Any

import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mpvfio.devices.profiles import MiB, Profile
from mpvfio.machine import Machine
from mpvfio.migration import engine
from mpvfio.migration.engine import IncomingInfo, MigrationError, MigrationParams
from mpvfio.migration.local import migrate_pair
from mpvfio.net.transport import TransportError, open_channels, sendall_deadline
from mpvfio.uapi.vfio import MigState
from mpvfio.vmstate import RunState
from mpvfio.wire.multifd import (
    INVALID_IDX,
    PACKET_HEADER,
    WRAPPER,
    pack_packet_header,
    pack_wrapper,
    read_frame,
)
from mpvfio.wire.stream import (
    Config,
    ConfigLoadReady,
    Eof,
    FullEnd,
    Header,
    InitDataSent,
    PartEnd,
    SectionEnd,
    SectionStart,
    StreamReader,
    SwitchoverStart,
    VfioTag,
)

#: Small, latency free, nothing dirtied: a recorded stream is ~40 KiB.
FUZZ = Profile(name="fuzz", state_size=16 * 1024, precopy_initial=4096, precopy_dirty=0)
DEVICES = ("vf0", "vf1")
TIME_BOUND = 5.0  # seconds one malformed stream may take to be rejected
TARGET = MigrationParams(timeout=TIME_BOUND, connect_retry_s=0.5)
GO = struct.pack(">I", 16) + b'{"status": "go"}'
#: Records that end a section (or the header, or the stream).
_ENDS = (
    Header,
    SectionStart,
    PartEnd,
    InitDataSent,
    SectionEnd,
    Config,
    FullEnd,
    ConfigLoadReady,
    SwitchoverStart,
    Eof,
)

pytestmark = pytest.mark.timeout(120)


@dataclass
class Section:
    kind: str
    device: str
    start: int
    end: int


@dataclass(repr=False)
class Recording:
    """One valid migration as the wire carried it."""

    main: bytes
    frames: list[bytes]
    channels: int
    session: str
    checksums: dict[str, str]
    sections: list[Section] = field(default_factory=list)

    def __repr__(self) -> str:
        return (
            f"<Recording {len(self.main)} bytes main, {len(self.frames)} frames on "
            f"{self.channels} channel(s)>"
        )

    def section(self, kind: str, device: str = "", nth: int = 0) -> Section:
        found = [
            s for s in self.sections if s.kind == kind and device in ("", s.device)
        ]
        return found[nth]

    def cut(self, s: Section) -> bytes:
        return self.main[s.start : s.end]


def _sections(main: bytes) -> tuple[str, list[Section]]:
    reader = StreamReader(io.BytesIO(main))
    out: list[Section] = []
    start = 0
    for rec in reader:
        if isinstance(rec, _ENDS):
            dev = getattr(rec, "device", "")
            out.append(Section(type(rec).__name__, dev, start, reader.offset))
            start = reader.offset
    assert reader.hello is not None and start == len(main)
    return reader.hello.session, out


def _record(channels: int) -> Recording:
    """Migrate once (serial, in process) and keep every byte sent."""
    main = bytearray()
    frames: list[bytes] = []
    real_write = engine._Writer.write

    def tee(self: Any, data: Any) -> int:
        main.extend(bytes(data))
        return int(real_write(self, data))

    from mpvfio.workers import migration as wm

    real_frame = wm._send_frame

    def tee_frame(sock: Any, lock: Any, head: bytes, data: bytes, *a: Any) -> None:
        frames.append(bytes(head) + bytes(data))
        real_frame(sock, lock, head, data, *a)

    with (
        pytest.MonkeyPatch.context() as mp,
        Machine("serial", name="rec-src") as src,
        Machine("serial", name="rec-dst") as dst,
    ):
        mp.setattr(engine._Writer, "write", tee)
        mp.setattr(wm, "_send_frame", tee_frame)
        for m in (src, dst):
            for name in DEVICES:
                m.add_vfio_device(name, FUZZ)
        src.start()
        dst.start(run=False, runstate=RunState.INMIGRATE)
        res = migrate_pair(src, dst, MigrationParams(multifd_channels=channels))
        assert res.ok, (res.error, res.target_error)
        assert res.info is not None
        checksums = dict(res.info.checksums)
    session, sections = _sections(bytes(main))
    assert bool(frames) == bool(channels)
    return Recording(bytes(main), frames, channels, session, checksums, sections)


@pytest.fixture(scope="module")
def rec() -> Recording:
    return _record(0)


@pytest.fixture(scope="module")
def rec_mfd() -> Recording:
    return _record(1)


# -- the replay harness ----------------------------------------------------------------


@dataclass
class Outcome:
    error: BaseException | None
    info: IncomingInfo | None
    seconds: float
    states: list[MigState]
    ran: bool
    checksums: dict[str, str]
    answers: list[dict[str, Any]]


def _read_msgs(sock: socket.socket) -> list[dict[str, Any]]:
    """The target's answers until it closes."""
    sock.settimeout(TIME_BOUND + 5)
    buf = b""
    out: list[dict[str, Any]] = []
    while True:
        try:
            part = sock.recv(1 << 16)
        except OSError:
            return out
        if not part:
            return out
        buf += part
        while len(buf) >= 4:
            (n,) = struct.unpack(">I", buf[:4])
            if len(buf) < 4 + n:
                break
            msg = json.loads(buf[4 : 4 + n])
            buf = buf[4 + n :]
            out.append(msg)
            if msg.get("status") in ("completed", "failed"):
                return out


def replay(
    main: bytes,
    frames: list[bytes] | None = None,
    *,
    session: str,
    channels: int = 0,
    params: MigrationParams = TARGET,
    commit: bool = False,
    mode: str = "serial",
) -> Outcome:
    """Play a source that sends ``main`` (and ``frames`` on channel 1).

    ``commit``: the source's "go" follows the stream at once (the target
    reads it only after its "loaded"); without it a complete stream ends
    without a commit.
    """
    if commit:
        main += GO
    tmp = tempfile.mkdtemp(prefix="mpvfio-fuzz-")
    p = MigrationParams(
        **{**params.__dict__, "multifd_channels": channels, "timeout": params.timeout}
    )
    try:
        with Machine(mode, name="fuzz-dst") as dst:
            for name in DEVICES:
                dst.add_vfio_device(name, FUZZ)
            dst.start(run=False, runstate=RunState.INMIGRATE)
            result: dict[str, Any] = {}
            from mpvfio.net.transport import listen

            lst = listen(f"unix:{tmp}/fuzz.sock")

            def target() -> None:
                try:
                    result["info"] = engine.incoming(dst, lst, p)
                except BaseException as exc:  # noqa: BLE001 - the outcome
                    result["error"] = exc
                finally:
                    lst.close()

            t = threading.Thread(target=target, name="fuzz-target")
            t0 = time.monotonic()
            t.start()
            answers: list[dict[str, Any]] = []
            try:
                with open_channels(lst.uri, channels, session, 5.0) as chans:
                    sender = threading.Thread(
                        target=_send_all, args=(chans, main, frames or [])
                    )
                    sender.start()
                    answers = _read_msgs(chans.main)
                    sender.join(TIME_BOUND + 5)
                    assert not sender.is_alive()
            except (OSError, TransportError):
                pass  # the target may drop the connection first
            t.join(TIME_BOUND + 10)
            assert not t.is_alive(), "the target hangs"
            seconds = time.monotonic() - t0
            return Outcome(
                result.get("error"),
                result.get("info"),
                seconds,
                [MigState(d.call("device_state")) for d in dst.devices],
                any(x.new == RunState.RUNNING for x in dst.vm.runstate_history),
                {d.name: d.checksum() for d in dst.devices},
                answers,
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _send_all(chans: Any, main: bytes, frames: list[bytes]) -> None:
    deadline = time.monotonic() + TIME_BOUND + 2
    try:
        sendall_deadline(chans.main, main, deadline)
        chans.main.shutdown(socket.SHUT_WR)
        for ch in chans.extra:
            for f in frames:
                sendall_deadline(ch, f, deadline)
            ch.shutdown(socket.SHUT_WR)
    except (OSError, TransportError):
        pass  # the target gave up on us: that is its answer


def rejected(out: Outcome, *words: str, stage: str | None = None) -> MigrationError:
    """The target refused: a clear error, devices reset, VM never ran."""
    err = out.error
    assert isinstance(err, MigrationError), err
    assert err.side == "target"
    if stage is not None:
        assert err.stage == stage, err
    for w in words:
        assert w in str(err), err
    assert out.info is None
    assert out.states == [MigState.RUNNING] * len(DEVICES)
    assert not out.ran
    assert out.seconds < TIME_BOUND, out.seconds
    assert out.answers[-1:] == [] or out.answers[-1]["status"] == "failed"
    return err


# -- positive controls -----------------------------------------------------------------


def test_replay_of_the_recording_completes(rec: Recording) -> None:
    out = replay(rec.main, session=rec.session, commit=True)
    assert out.error is None, out.error
    assert out.ran and out.states == [MigState.RUNNING] * 2
    assert out.checksums == rec.checksums
    assert [a["status"] for a in out.answers] == [
        "switchover-ack",
        "loaded",
        "completed",
    ]


def test_replay_of_the_multifd_recording_completes(rec_mfd: Recording) -> None:
    out = replay(
        rec_mfd.main, rec_mfd.frames, session=rec_mfd.session, channels=1, commit=True
    )
    assert out.error is None, out.error
    assert out.checksums == rec_mfd.checksums


def test_no_commit_no_start(rec: Recording) -> None:
    """The whole valid stream but no "go": the target must not start."""
    out = replay(rec.main, session=rec.session)
    rejected(out, "commit", stage="check")


# -- truncation ------------------------------------------------------------------------


def _truncation_points(rec: Recording) -> list[int]:
    points = {0, 1, 7, 8, 12, 17, 21, 22, 40}
    for s in rec.sections:
        points.update({s.start + 1, s.end - 1, (s.start + s.end) // 2})
    points.update(range(0, len(rec.main), max(1, len(rec.main) // 25)))
    return sorted(x for x in points if 0 <= x < len(rec.main))


def test_truncated_streams(rec: Recording) -> None:
    points = _truncation_points(rec)
    assert len(points) > 40
    for cut in points:
        out = replay(rec.main[:cut], session=rec.session)
        err = rejected(out, "truncated")
        header_end = rec.sections[0].end
        assert err.stage == ("accept" if cut < header_end else "load"), (cut, err)


def test_truncated_multifd_channel(rec_mfd: Recording) -> None:
    frames = b"".join(rec_mfd.frames)
    for cut in (1, WRAPPER.size - 1, WRAPPER.size + 5, len(frames) - 1):
        out = replay(
            rec_mfd.main,
            [frames[:cut]],
            session=rec_mfd.session,
            channels=1,
            commit=True,
        )
        rejected(out, "truncated multifd channel", stage="load")


def test_missing_multifd_packet(rec_mfd: Recording) -> None:
    """A channel that ends cleanly with a packet missing fails at once."""
    out = replay(
        rec_mfd.main,
        rec_mfd.frames[1:],
        session=rec_mfd.session,
        channels=1,
        commit=True,
    )
    rejected(out, "ended before every packet arrived", stage="load")


# -- tags and sizes --------------------------------------------------------------------


def _patch_u64(main: bytes, old: int, new: int, nth: int = 0) -> bytes:
    needle = struct.pack(">Q", old)
    at = -1
    for _ in range(nth + 1):
        at = main.index(needle, at + 1)
    return main[:at] + struct.pack(">Q", new) + main[at + 8 :]


@pytest.mark.parametrize("nth", [0, 3, 5])
def test_unknown_tag(rec: Recording, nth: int) -> None:
    bad = _patch_u64(rec.main, VfioTag.END_OF_STATE, 0xFFFFFFFFEF1000FF, nth)
    out = replay(bad, session=rec.session, commit=True)
    rejected(out, "Unknown tag 0xffffffffef1000ff", stage="load")


def test_wrong_tag_in_start_section(rec: Recording) -> None:
    bad = _patch_u64(rec.main, VfioTag.DEV_SETUP_STATE, VfioTag.DEV_DATA_STATE)
    out = replay(bad, session=rec.session, commit=True)
    rejected(out, "unexpected DEV_DATA_STATE", stage="load")


def _data_size_offset(rec: Recording) -> int:
    tag = struct.pack(">Q", VfioTag.DEV_DATA_STATE)
    return rec.main.index(tag) + 8


@pytest.mark.parametrize("size", [2**62, 2**64 - 1, 1 * MiB + 1, 1 << 30])
def test_oversized_chunk_is_refused_before_allocation(
    rec: Recording, size: int
) -> None:
    at = _data_size_offset(rec)
    bad = rec.main[:at] + struct.pack(">Q", size) + rec.main[at + 8 :]
    proc = psutil.Process()
    rss0 = proc.memory_info().rss
    out = replay(bad, session=rec.session, commit=True)
    grown = proc.memory_info().rss - rss0
    rejected(out, f"size {size} exceeds the limit", stage="load")
    assert grown < 64 * MiB, f"RSS grew by {grown >> 20} MiB"


def test_chunk_larger_than_sent_is_truncation(rec: Recording) -> None:
    """A size within the limit but beyond the bytes sent: truncated, bounded."""
    at = _data_size_offset(rec)
    bad = rec.main[:at] + struct.pack(">Q", 1 * MiB) + rec.main[at + 8 :]
    proc = psutil.Process()
    rss0 = proc.memory_info().rss
    out = replay(bad, session=rec.session, commit=True)
    assert proc.memory_info().rss - rss0 < 64 * MiB
    rejected(out, "truncated", stage="load")


def test_oversized_hello(rec: Recording) -> None:
    bad = rec.main[:18] + struct.pack(">I", 0xFFFFFFFF) + rec.main[22:]
    out = replay(bad, session=rec.session, commit=True)
    rejected(out, "hello length", stage="accept")


def test_oversized_config(rec: Recording) -> None:
    tag = struct.pack(">Q", VfioTag.DEV_CONFIG_STATE)
    at = rec.main.index(tag) + 8
    bad = rec.main[:at] + struct.pack(">I", 0xFFFFFFFF) + rec.main[at + 4 :]
    out = replay(bad, session=rec.session, commit=True)
    rejected(out, "exceeds the limit", stage="load")


def test_wrong_session(rec: Recording) -> None:
    out = replay(rec.main, session="ab" * 16, commit=True)
    rejected(out, "peer mismatch", stage="accept")


# -- reordered and duplicated sections -------------------------------------------------


def _rebuild(rec: Recording, order: list[Section]) -> bytes:
    return b"".join(rec.cut(s) for s in order)


@pytest.mark.parametrize(
    ("case", "words"),
    [
        ("dup-start", "is already used"),
        ("dup-end", "duplicate END"),
        ("dup-full", "duplicate FULL"),
        ("dup-switchover", "duplicate MIG_CMD_SWITCHOVER_START"),
        ("full-before-end", "before its END"),
        ("part-after-end", "out of order"),
        ("start-after-part", "out of order"),
        ("eof-first", "EOF before device"),
        ("end-missing", "before its END"),
        ("part-before-start", "not announced"),
    ],
)
def test_reordered_or_duplicated_sections(
    rec: Recording, case: str, words: str
) -> None:
    secs = list(rec.sections)
    hdr, body = secs[0], secs[1:]
    start0 = rec.section("SectionStart", "vf0")
    start1 = rec.section("SectionStart", "vf1")
    end0 = rec.section("SectionEnd", "vf0")
    full0 = rec.section("Config", "vf0")
    part = rec.section("PartEnd", "vf1")
    part0 = rec.section("PartEnd", "vf0")
    sw = rec.section("SwitchoverStart")
    eof = rec.section("Eof")
    if case == "dup-start":
        body.insert(body.index(start1), start0)
    elif case == "dup-end":
        body.insert(body.index(end0) + 1, end0)
    elif case == "dup-full":
        body.insert(body.index(full0) + 1, full0)
    elif case == "dup-switchover":
        body.insert(body.index(sw) + 1, sw)
    elif case == "full-before-end":
        body.remove(full0)
        body.insert(body.index(end0), full0)
    elif case == "part-after-end":
        body.remove(part)
        body.insert(body.index(end0) + 1, part)
    elif case == "start-after-part":
        body.remove(start1)
        body.insert(body.index(part0) + 1, start1)
    elif case == "eof-first":
        body.remove(eof)
        body.insert(body.index(sw), eof)
    elif case == "end-missing":
        body.remove(end0)
    elif case == "part-before-start":
        body.remove(part)
        body.insert(0, part)
    out = replay(_rebuild(rec, [hdr, *body]), session=rec.session, commit=True)
    rejected(out, words, stage="load")


def test_multifd_end_before_switchover(rec_mfd: Recording) -> None:
    secs = list(rec_mfd.sections)
    sw = next(s for s in secs if s.kind == "SwitchoverStart")
    secs.remove(sw)
    secs.insert(secs.index(next(s for s in secs if s.kind == "FullEnd")), sw)
    out = replay(
        _rebuild(rec_mfd, secs),
        rec_mfd.frames,
        session=rec_mfd.session,
        channels=1,
        commit=True,
    )
    rejected(out, "before MIG_CMD_SWITCHOVER_START", stage="load")


# -- malformed multifd packets ---------------------------------------------------------


def _frames_of(rec: Recording) -> list[tuple[str, int, int, bytes]]:
    """(device idstr, idx, flags, data) of every recorded frame, in order."""
    out = []
    for raw in rec.frames:
        frame = read_frame(io.BytesIO(raw))
        assert frame is not None
        w, p = frame
        out.append((w.idstr, p.idx, p.flags, bytes(p.data)))
    return out


def _frame(idstr: str, idx: int, data: bytes, config: bool = False) -> bytes:
    return (
        pack_wrapper(idstr, PACKET_HEADER.size + len(data))
        + pack_packet_header(idx, config=config)
        + data
    )


def _rechunk(rec: Recording, piece: int) -> dict[str, list[bytes]]:
    """Every device's STOP_COPY data cut into ``piece``-byte packets."""
    data: dict[str, bytes] = {}
    config: dict[str, bytes] = {}
    for idstr, _idx, flags, payload in _frames_of(rec):
        if flags & 1:
            config[idstr] = payload
        else:
            data[idstr] = data.get(idstr, b"") + payload
    out: dict[str, list[bytes]] = {}
    for idstr, blob in data.items():
        parts = [blob[i : i + piece] for i in range(0, len(blob), piece)]
        frames = [_frame(idstr, i, p) for i, p in enumerate(parts)]
        frames.append(_frame(idstr, len(parts), config[idstr], config=True))
        out[idstr] = frames
    return out


def test_rechunked_multifd_packets_complete(rec_mfd: Recording) -> None:
    """Positive control: any packet size works, in any order of devices."""
    by_dev = _rechunk(rec_mfd, 1000)
    assert all(len(fs) > 5 for fs in by_dev.values())
    frames = [f for fs in zip_longest(*by_dev.values()) for f in fs if f]
    out = replay(rec_mfd.main, frames, session=rec_mfd.session, channels=1, commit=True)
    assert out.error is None, out.error
    assert out.checksums == rec_mfd.checksums


@pytest.mark.parametrize(
    ("case", "words"),
    [
        ("duplicate", "already filled"),
        ("replay-after-config", "already filled"),
        ("idx-invalid", "invalid packet index 0xFFFFFFFF"),
        ("short", "too short"),
        ("unknown-device", "unknown device"),
        ("bad-version", "unsupported device state packet version"),
        ("second-config", "second config packet"),
        ("data-after-config", "data packet after the config packet"),
        ("bad-magic", "bad multifd packet magic"),
        ("oversized", "more than the limit"),
    ],
)
def test_malformed_multifd_packets(rec_mfd: Recording, case: str, words: str) -> None:
    frames = list(rec_mfd.frames)
    first = frames[0]
    idstr, idx, _flags, data = _frames_of(rec_mfd)[0]
    if case == "duplicate":
        frames.insert(1, first)
    elif case == "replay-after-config":
        frames.append(first)
    elif case == "idx-invalid":
        frames.insert(0, _frame(idstr, INVALID_IDX, data))
    elif case == "short":
        frames.insert(0, pack_wrapper(idstr, 8) + b"\x00" * 8)
    elif case == "unknown-device":
        frames.insert(0, _frame("vf9/vfio", 0, data))
    elif case == "bad-version":
        frames[0] = (
            pack_wrapper(idstr, 12 + len(data)) + struct.pack(">III", 7, idx, 0) + data
        )
    elif case == "second-config":
        frames.append(_frame(idstr, 99, b"x", config=True))
    elif case == "data-after-config":
        frames.append(_frame(idstr, 99, b"x"))
    elif case == "bad-magic":
        frames.insert(0, b"\x00" * WRAPPER.size)
    elif case == "oversized":
        frames.insert(0, pack_wrapper(idstr, 2**31) + b"\x00" * 12)
    proc = psutil.Process()
    rss0 = proc.memory_info().rss
    out = replay(rec_mfd.main, frames, session=rec_mfd.session, channels=1, commit=True)
    assert proc.memory_info().rss - rss0 < 64 * MiB
    rejected(out, words, stage="load")


def test_queued_bytes_over_the_limit(rec_mfd: Recording) -> None:
    """x-migration-max-queued-buffers-size: idx 0 last, the rest must queue."""
    by_dev = _rechunk(rec_mfd, 1000)
    frames = []
    for fs in by_dev.values():
        data, config = fs[:-1], fs[-1]
        frames += [*reversed(data), config]
    limit = 4000
    out = replay(
        rec_mfd.main,
        frames,
        session=rec_mfd.session,
        channels=1,
        params=MigrationParams(timeout=TIME_BOUND, max_queued_buffers_size=limit),
        commit=True,
    )
    rejected(out, f"over the limit of {limit}", stage="load")
    # and the same packets under a limit they fit in complete
    out = replay(
        rec_mfd.main,
        frames,
        session=rec_mfd.session,
        channels=1,
        params=MigrationParams(timeout=TIME_BOUND, max_queued_buffers_size=1 * MiB),
        commit=True,
    )
    assert out.error is None, out.error
    assert out.checksums == rec_mfd.checksums


# -- random damage (Hypothesis) --------------------------------------------------------


FUZZ_SETTINGS = settings(
    max_examples=30,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture(scope="module")
def recs(rec: Recording, rec_mfd: Recording) -> dict[int, Recording]:
    return {0: rec, 1: rec_mfd}


@FUZZ_SETTINGS
@given(data=st.data())
def test_fuzz_random_truncation(recs: dict[int, Recording], data: Any) -> None:
    ch = data.draw(st.sampled_from([0, 1]), label="channels")
    r = recs[ch]
    cut = data.draw(st.integers(0, len(r.main) - 1), label="cut")
    out = replay(r.main[:cut], r.frames, session=r.session, channels=ch)
    rejected(out, "truncated")


@FUZZ_SETTINGS
@given(data=st.data())
def test_fuzz_random_byte_flips(recs: dict[int, Recording], data: Any) -> None:
    """Damage anywhere: a clean refusal, or the source's exact device state."""
    ch = data.draw(st.sampled_from([0, 1]), label="channels")
    r = recs[ch]
    main = bytearray(r.main)
    flips = data.draw(
        st.lists(
            st.tuples(st.integers(0, len(main) - 1), st.integers(1, 255)),
            min_size=1,
            max_size=4,
        ),
        label="flips",
    )
    for at, x in flips:
        main[at] ^= x
    out = replay(bytes(main), r.frames, session=r.session, channels=ch, commit=True)
    if out.error is None:  # the damage hit bytes nobody checks (e.g. the arch)
        assert out.ran
        assert out.checksums == r.checksums
    else:
        rejected(out)


@FUZZ_SETTINGS
@given(data=st.data())
def test_fuzz_random_multifd_damage(rec_mfd: Recording, data: Any) -> None:
    blob = bytearray(b"".join(rec_mfd.frames))
    flips = data.draw(
        st.lists(
            st.tuples(st.integers(0, len(blob) - 1), st.integers(1, 255)),
            min_size=1,
            max_size=3,
        ),
        label="flips",
    )
    for at, x in flips:
        blob[at] ^= x
    cut = data.draw(st.integers(len(blob) // 2, len(blob)), label="cut")
    out = replay(
        rec_mfd.main,
        [bytes(blob[:cut])],
        session=rec_mfd.session,
        channels=1,
        commit=True,
    )
    if out.error is None:
        assert out.checksums == rec_mfd.checksums
    else:
        rejected(out)
