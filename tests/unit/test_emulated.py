"""Tests of the emulated VFIO device against the uAPI spec.

Expected paths come from a reference walk rebuilt here from VFIO_FSM.md §1
(the next-hop table typed in from the spec, fixed per §5), not from
mpvfio.uapi.fsm.  Session rules are VFIO_UAPI.md §5-§7 and VFIO_FSM.md §4.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import itertools
import os
import threading
from collections.abc import Callable, Iterator
from itertools import pairwise
from typing import Any

import pytest

from mpvfio.devices.base import ArcRecord, DeviceBackend
from mpvfio.devices.emulated import EmulatedDevice, make_state, new_backing
from mpvfio.devices.profiles import Fault, Profile, get_profile
from mpvfio.errors import DeviceError, TransitionError
from mpvfio.uapi.vfio import MigFlag, MigState

S = MigState
F = MigFlag
SC, P2P, PRE = F.STOP_COPY, F.P2P, F.PRE_COPY
FLAG_SETS = [SC, SC | P2P, SC | PRE, SC | P2P | PRE]
FLAG_IDS = ["sc", "sc+p2p", "sc+pre", "sc+p2p+pre"]
SAVING = {S.PRE_COPY, S.PRE_COPY_P2P, S.STOP_COPY}
OPENING = {
    (S.RUNNING, S.PRE_COPY),
    (S.RUNNING_P2P, S.PRE_COPY_P2P),
    (S.STOP, S.STOP_COPY),
    (S.STOP, S.RESUMING),
}

# ------------------------------------------------------- reference walk (spec)
_NAMES = "ERROR STOP RUNNING STOP_COPY RESUMING RUNNING_P2P PRE_COPY PRE_COPY_P2P"
# VFIO_FSM.md §1, rows = current state, columns = target (both in _NAMES order).
_HOP_TEXT = """
ERROR ERROR ERROR ERROR ERROR ERROR ERROR ERROR
ERROR STOP RUNNING_P2P STOP_COPY RESUMING RUNNING_P2P RUNNING_P2P RUNNING_P2P
ERROR RUNNING_P2P RUNNING RUNNING_P2P RUNNING_P2P RUNNING_P2P PRE_COPY RUNNING_P2P
ERROR STOP STOP STOP_COPY STOP STOP ERROR ERROR
ERROR STOP STOP STOP RESUMING STOP STOP STOP
ERROR STOP RUNNING STOP STOP RUNNING_P2P RUNNING PRE_COPY_P2P
ERROR RUNNING RUNNING PRE_COPY_P2P RUNNING RUNNING PRE_COPY PRE_COPY_P2P
ERROR RUNNING_P2P RUNNING_P2P STOP_COPY RUNNING_P2P RUNNING_P2P PRE_COPY PRE_COPY_P2P
"""
_ORDER = [S[n] for n in _NAMES.split()]
HOP = {
    (_ORDER[r], _ORDER[c]): S[name]
    for r, line in enumerate(_HOP_TEXT.strip().splitlines())
    for c, name in enumerate(line.split())
}
NEEDS = {
    S.STOP: SC,
    S.RUNNING: SC,
    S.STOP_COPY: SC,
    S.RESUMING: SC,
    S.RUNNING_P2P: SC | P2P,
    S.PRE_COPY: SC | PRE,
    S.PRE_COPY_P2P: SC | P2P | PRE,
}


def ref_supported(flags: F, state: S) -> bool:
    return state != S.ERROR and flags & NEEDS[state] == NEEDS[state]


def ref_path(flags: F, cur: S, new: S) -> list[S] | None:
    """VFIO_FSM.md §1 driver loop (fixed kernel): the path, or None (EINVAL)."""
    if cur == new:
        return [cur]
    if not ref_supported(flags, cur) or not ref_supported(flags, new):
        return None
    path = [cur]
    while path[-1] != new:
        nxt = HOP[path[-1], new]
        while nxt != S.ERROR and not ref_supported(flags, nxt):
            nxt = HOP[nxt, new]
        if nxt == S.ERROR:
            return None
        path.append(nxt)
    return path


def test_reference_walk_matches_spec_counts() -> None:
    """Self-check of the transcription: VFIO_FSM.md §3 summary counts."""
    expect = {  # flags: (supported pairs valid, fd-returning cases)
        SC: (16, 6),
        SC | P2P: (25, 8),
        SC | PRE: (24, 10),
        SC | P2P | PRE: (47, 18),
    }
    for flags, (valid, with_fd) in expect.items():
        sup = [s for s in S if ref_supported(flags, s)]
        paths = [ref_path(flags, a, b) for a in sup for b in sup]
        ok = [p for p in paths if p is not None]
        assert len(ok) == valid
        assert sum(1 for p in ok if len(p) > 1 and (p[-2], p[-1]) in OPENING) == with_fd
    # §4.1: every arc the driver implements for the flag set is used
    for flags, count in {SC: 6, SC | P2P: 8, SC | PRE: 9, SC | P2P | PRE: 15}.items():
        sup = [s for s in S if ref_supported(flags, s)]
        used: set[tuple[S, S]] = set()
        for a, b in itertools.product(sup, sup):
            path = ref_path(flags, a, b)
            if path is not None:
                used |= set(pairwise(path))
        assert len(used) == count


# -------------------------------------------------------------------- helpers
SMALL = get_profile("instant").replace(
    name="small", state_size=16 * 1024, precopy_initial=4096, precopy_dirty=4096
)


def prof(flags: F = SC | P2P | PRE, **kw: object) -> Profile:
    return SMALL.replace(flags=flags, **kw)


def _fd_set() -> dict[int, str]:
    out = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            out[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            pass
    return out


@pytest.fixture(autouse=True)
def _no_fd_leaks() -> Iterator[None]:
    """Every fd a test receives (data fds, memfds) must be closed again."""
    before = _fd_set()
    yield
    leaked = {
        fd: link
        for fd, link in _fd_set().items()
        if before.get(fd) != link and "memfd:mpvfio" in link
    }
    assert not leaked, f"leaked fds: {leaked}"


class Owner:
    """Closes every device and fd a test registers."""

    def __init__(self) -> None:
        self.devs: list[EmulatedDevice] = []
        self.fds: list[int] = []

    def dev(self, name: str = "vf0", profile: Profile = SMALL, **kw: Any) -> Any:
        d = EmulatedDevice(name, profile, **kw)
        self.devs.append(d)
        return d

    def fd(self, fd: int | None) -> int:
        assert fd is not None, "expected a data fd"
        self.fds.append(fd)
        return fd

    def close(self) -> None:
        for d in self.devs:
            d.close()
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.devs.clear()
        self.fds.clear()


@pytest.fixture
def own() -> Iterator[Owner]:
    o = Owner()
    yield o
    o.close()


def arcs_of(dev: EmulatedDevice) -> list[tuple[S, S]]:
    recs = dev.take_arcs()
    assert all(isinstance(r, ArcRecord) for r in recs)
    return [(r.src, r.dst) for r in recs]


def drain(dev: EmulatedDevice, fd: int, n: int = 4096) -> bytes:
    """Read a STOP_COPY fd to its end (b"")."""
    out = bytearray()
    while True:
        chunk = dev.read_data(fd, n)
        assert chunk is not None, "ENOMSG is never returned in STOP_COPY"
        if not chunk:
            return bytes(out)
        out += chunk


def drain_precopy(dev: EmulatedDevice, fd: int, n: int = 4096) -> bytes:
    """Read a PRE_COPY fd to its temporary end (None = ENOMSG)."""
    out = bytearray()
    while True:
        chunk = dev.read_data(fd, n)
        if chunk is None:
            return bytes(out)
        assert chunk, "PRE_COPY must not report a permanent end"
        out += chunk


@functools.cache
def stream_for(state_size: int, key: str = "src") -> tuple[bytes, str]:
    """A complete saving stream (STOP -> STOP_COPY) and the state's checksum."""
    dev = EmulatedDevice(key, SMALL.replace(state_size=state_size), key=key)
    try:
        dev.set_state(S.STOP)
        fd = dev.set_state(S.STOP_COPY)
        assert fd is not None
        try:
            data = drain(dev, fd)
        finally:
            os.close(fd)
        return data, dev.checksum()
    finally:
        dev.close()


def load(dev: EmulatedDevice, fd: int, data: bytes, seg: int = 997) -> None:
    for i in range(0, len(data), seg):
        assert dev.write_data(fd, data[i : i + seg]) == len(data[i : i + seg])


def drive_to(own: Owner, dev: EmulatedDevice, state: S) -> int | None:
    """Bring a RUNNING device to ``state``; returns the session fd if any."""
    fd = dev.set_state(state)
    if fd is not None:
        own.fd(fd)
    if state == S.RESUMING:
        assert fd is not None
        load(dev, fd, stream_for(dev.profile.state_size)[0])
    dev.take_arcs()
    return fd


def assert_session_ended(dev: EmulatedDevice, fd: int) -> None:
    with pytest.raises(DeviceError) as info:
        dev.read_data(fd, 100)
    assert info.value.errno == errno.ENODEV
    assert os.read(fd, 100) == b""  # the raw fd reads end of stream


# ------------------------------------------------------------------ contract
def test_is_a_device_backend(own: Owner) -> None:
    dev = own.dev()
    assert isinstance(dev, DeviceBackend)
    assert dev.get_state() == S.RUNNING  # initial state
    assert dev.migration_flags() == SC | P2P | PRE
    assert dev.take_arcs() == []


# --------------------------------------------------------------- FSM walks
WALK_CASES = [
    pytest.param(flags, cur, id=f"{fid}-{cur.name}")
    for flags, fid in zip(FLAG_SETS, FLAG_IDS, strict=True)
    for cur in S
    if ref_supported(flags, cur)
]


@pytest.mark.parametrize(("flags", "cur"), WALK_CASES)
def test_walk_every_target(own: Owner, flags: F, cur: S) -> None:
    for new in S:
        dev = own.dev(f"{cur.name}-{new.name}", prof(flags))
        old_fd = drive_to(own, dev, cur)
        assert dev.get_state() == cur
        expect = ref_path(flags, cur, new)
        if expect is None:
            with pytest.raises(TransitionError) as info:
                dev.set_state(new)
            assert info.value.errno == errno.EINVAL
            assert dev.get_state() == cur  # nothing changed
            assert dev.take_arcs() == []
            if old_fd is not None and cur in SAVING:
                assert dev.read_data(old_fd, 16)  # the session is untouched
            continue
        fd = dev.set_state(new)
        if fd is not None:
            own.fd(fd)
        assert dev.get_state() == new
        arcs = list(pairwise(expect))
        assert arcs_of(dev) == arcs, f"{cur.name} -> {new.name}"
        opens = bool(arcs) and arcs[-1] in OPENING
        assert (fd is not None) == opens, f"{cur.name} -> {new.name}"
        if fd is not None:
            assert fd != old_fd
            os.fstat(fd)  # a real, open fd
        if old_fd is not None and cur in SAVING:
            left = any(a in SAVING and b not in SAVING for a, b in arcs)
            if left:
                assert_session_ended(dev, old_fd)
            else:  # moved inside the saving group: same session goes on
                assert dev.read_data(old_fd, 16)
        if old_fd is not None and cur == S.RESUMING and new != S.RESUMING:
            with pytest.raises(DeviceError) as info:  # RESUMING -> STOP ended it
                dev.write_data(old_fd, b"x")
            assert info.value.errno == errno.ENODEV


@pytest.mark.parametrize("flags", FLAG_SETS, ids=FLAG_IDS)
def test_error_state_refuses_everything_but_reset(own: Owner, flags: F) -> None:
    dev = own.dev(profile=prof(flags, faults={"STOP>STOP_COPY": Fault("error-state")}))
    dev.set_state(S.STOP)
    with pytest.raises(TransitionError):
        dev.set_state(S.STOP_COPY)
    assert dev.get_state() == S.ERROR
    dev.take_arcs()
    for new in S:
        if new == S.ERROR:
            assert dev.set_state(S.ERROR) is None  # already there: success
        else:
            with pytest.raises(TransitionError) as info:
                dev.set_state(new)
            assert info.value.errno == errno.EINVAL
        assert dev.get_state() == S.ERROR
    assert dev.take_arcs() == []
    dev.reset()
    assert dev.get_state() == S.RUNNING


@pytest.mark.parametrize("flags", FLAG_SETS, ids=FLAG_IDS)
def test_error_cannot_be_requested(own: Owner, flags: F) -> None:
    dev = own.dev(profile=prof(flags))
    with pytest.raises(TransitionError) as info:
        dev.set_state(S.ERROR)
    assert info.value.errno == errno.EINVAL
    assert info.value.device == dev.name
    assert dev.get_state() == S.RUNNING


def test_request_current_state_is_a_noop(own: Owner) -> None:
    dev = own.dev()
    assert dev.set_state(S.RUNNING) is None
    assert dev.take_arcs() == []
    fd = own.fd(dev.set_state(S.PRE_COPY))
    dev.take_arcs()
    assert dev.set_state(S.PRE_COPY) is None
    assert dev.take_arcs() == []
    assert dev.read_data(fd, 8)


@pytest.mark.parametrize(
    ("flags", "new"),
    [
        (SC | PRE, S.PRE_COPY),
        (SC | P2P | PRE, S.PRE_COPY),
        (SC | P2P | PRE, S.PRE_COPY_P2P),
    ],
)
def test_blocked_stop_copy_to_precopy_changes_nothing(
    own: Owner, flags: F, new: S
) -> None:
    """VFIO_FSM.md §5.1: EINVAL (not a hang); session and fd stay."""
    dev = own.dev(profile=prof(flags))
    fd = own.fd(dev.set_state(S.PRE_COPY))
    assert dev.set_state(S.STOP_COPY) is None
    dev.take_arcs()
    with pytest.raises(TransitionError) as info:
        dev.set_state(new)
    assert info.value.errno == errno.EINVAL
    assert dev.get_state() == S.STOP_COPY
    assert dev.take_arcs() == []
    data = drain(dev, fd)
    assert data  # the stream still flows


@pytest.mark.parametrize(("flags", "new"), [(SC, S.RUNNING_P2P), (SC, S.PRE_COPY)])
def test_unsupported_target_is_einval(own: Owner, flags: F, new: S) -> None:
    dev = own.dev(profile=prof(flags))
    with pytest.raises(TransitionError) as info:
        dev.set_state(new)
    assert info.value.errno == errno.EINVAL
    assert dev.get_state() == S.RUNNING


# ------------------------------------------------------------------ sessions
def test_precopy_to_stop_copy_keeps_the_session(own: Owner) -> None:
    dev = own.dev()
    fd = own.fd(dev.set_state(S.PRE_COPY))
    head = dev.read_data(fd, 10)
    assert head
    assert dev.set_state(S.STOP_COPY) is None  # no new fd
    assert arcs_of(dev) == [
        (S.RUNNING, S.PRE_COPY),
        (S.PRE_COPY, S.PRE_COPY_P2P),
        (S.PRE_COPY_P2P, S.STOP_COPY),
    ]
    rest = drain(dev, fd)
    # the same fd carries one complete stream
    target = own.dev("dst", key="dst")
    target.set_state(S.STOP)
    rfd = own.fd(target.set_state(S.RESUMING))
    load(target, rfd, head + rest)
    target.set_state(S.STOP)
    assert target.checksum() == dev.checksum()


def test_precopy_without_p2p_goes_straight_to_stop_copy(own: Owner) -> None:
    dev = own.dev(profile=prof(SC | PRE))
    fd = own.fd(dev.set_state(S.PRE_COPY))
    assert dev.set_state(S.STOP_COPY) is None
    assert arcs_of(dev) == [(S.RUNNING, S.PRE_COPY), (S.PRE_COPY, S.STOP_COPY)]
    assert drain(dev, fd)


def test_precopy_p2p_moves_keep_the_session(own: Owner) -> None:
    dev = own.dev()
    fd = own.fd(dev.set_state(S.PRE_COPY))
    assert dev.set_state(S.PRE_COPY_P2P) is None
    assert dev.set_state(S.PRE_COPY) is None
    assert dev.set_state(S.PRE_COPY_P2P) is None
    assert dev.read_data(fd, 10)


@pytest.mark.parametrize(
    ("start", "leave"),
    [
        (S.PRE_COPY, S.RUNNING),
        (S.PRE_COPY_P2P, S.RUNNING_P2P),
        (S.STOP_COPY, S.STOP),
        (S.PRE_COPY, S.STOP),
        (S.PRE_COPY, S.RUNNING_P2P),
        (S.STOP_COPY, S.RUNNING),
        (S.STOP_COPY, S.RESUMING),
    ],
)
def test_leaving_the_saving_group_ends_the_session(
    own: Owner, start: S, leave: S
) -> None:
    dev = own.dev()
    fd = own.fd(dev.set_state(start))
    assert dev.read_data(fd, 10)  # partly read
    new = dev.set_state(leave)
    if new is not None:
        own.fd(new)
    assert dev.get_state() == leave
    assert_session_ended(dev, fd)


def test_new_precopy_session_gets_a_new_fd(own: Owner) -> None:
    dev = own.dev()
    fd1 = own.fd(dev.set_state(S.PRE_COPY))
    dev.set_state(S.RUNNING)
    fd2 = own.fd(dev.set_state(S.PRE_COPY))
    assert fd1 != fd2
    assert_session_ended(dev, fd1)
    assert dev.read_data(fd2, 10)


@pytest.mark.parametrize("start", [S.PRE_COPY, S.PRE_COPY_P2P, S.STOP_COPY])
def test_reset_ends_a_saving_session(own: Owner, start: S) -> None:
    dev = own.dev()
    fd = own.fd(dev.set_state(start))
    dev.reset()
    assert dev.get_state() == S.RUNNING
    assert_session_ended(dev, fd)


def test_reset_abandons_resuming(own: Owner) -> None:
    """VFIO_UAPI.md §7: reset is the only way to abandon RESUMING (ENODEV)."""
    dev = own.dev()
    dev.set_state(S.STOP)
    fd = own.fd(dev.set_state(S.RESUMING))
    dev.write_data(fd, b"partial")
    dev.reset()
    assert dev.get_state() == S.RUNNING
    with pytest.raises(DeviceError) as info:
        dev.write_data(fd, b"more")
    assert info.value.errno == errno.ENODEV


def test_reset_from_every_state(own: Owner) -> None:
    for state in S:
        if state == S.ERROR:
            continue
        dev = own.dev(f"r-{state.name}")
        drive_to(own, dev, state)
        dev.reset()
        assert dev.get_state() == S.RUNNING
        assert dev.take_arcs() == []  # reset is not an arc


# -------------------------------------------------------------------- PRE_COPY
def test_precopy_info_and_enomsg(own: Owner) -> None:
    dev = own.dev()
    fd = own.fd(dev.set_state(S.PRE_COPY))
    initial, dirty = dev.precopy_info(fd)
    assert initial > 0  # starts non-zero
    assert dirty == 0  # starts at 0
    prev = initial
    while initial:
        assert dev.read_data(fd, 1000)
        initial, dirty = dev.precopy_info(fd)
        assert initial < prev  # shrinks as data is read
        prev = initial
    assert dirty > 0  # the device dirtied state once the initial data was read
    prev = dirty
    while dirty:
        assert dev.read_data(fd, 1000)
        initial, dirty = dev.precopy_info(fd)
        assert initial == 0
        assert dirty < prev
        prev = dirty
    assert dev.read_data(fd, 1000) is None  # ENOMSG: temporary end
    assert dev.read_data(fd, 1000) is None
    assert dev.precopy_info(fd) == (0, 0)
    # pre-copy continues in PRE_COPY_P2P, the info still works there
    dev.set_state(S.PRE_COPY_P2P)
    assert dev.precopy_info(fd) == (0, 0)
    assert dev.read_data(fd, 1000) is None


def test_precopy_without_dirtying(own: Owner) -> None:
    dev = own.dev(profile=prof(precopy_dirty=0))
    fd = own.fd(dev.set_state(S.PRE_COPY))
    data = drain_precopy(dev, fd)
    assert data
    assert dev.precopy_info(fd) == (0, 0)


def test_precopy_dirtying_really_changes_the_state(own: Owner) -> None:
    dev = own.dev()
    before = dev.checksum()
    fd = own.fd(dev.set_state(S.PRE_COPY))
    drain_precopy(dev, fd)
    assert dev.checksum() != before


@pytest.mark.parametrize("state", [S.RUNNING, S.STOP, S.STOP_COPY, S.RUNNING_P2P])
def test_precopy_info_outside_precopy_is_einval(own: Owner, state: S) -> None:
    dev = own.dev()
    fd = own.fd(dev.set_state(S.PRE_COPY))
    new = dev.set_state(state)
    if new is not None:
        fd = own.fd(new)
    with pytest.raises(DeviceError) as info:
        dev.precopy_info(fd)
    assert info.value.errno == errno.EINVAL


def test_stop_copy_reads_end_with_empty_bytes(own: Owner) -> None:
    dev = own.dev()
    dev.set_state(S.STOP)
    fd = own.fd(dev.set_state(S.STOP_COPY))
    seen = 0
    while True:
        chunk = dev.read_data(fd, 333)
        assert chunk is not None  # never ENOMSG in STOP_COPY
        if chunk == b"":
            break
        assert len(chunk) <= 333
        seen += len(chunk)
    assert seen >= dev.profile.state_size  # the whole state went out
    for _ in range(3):
        assert dev.read_data(fd, 333) == b""  # a permanent end


def test_stop_copy_after_enomsg_streams_the_rest(own: Owner) -> None:
    dev = own.dev()
    fd = own.fd(dev.set_state(S.PRE_COPY))
    pre = drain_precopy(dev, fd)
    dev.set_state(S.STOP_COPY)
    rest = drain(dev, fd)
    assert rest
    assert len(pre) + len(rest) >= dev.profile.state_size


# ---------------------------------------------------------------- round trip
def _save(own: Owner, dev: EmulatedDevice, precopy: bool) -> tuple[bytes, str]:
    if precopy:
        fd = own.fd(dev.set_state(S.PRE_COPY))
        data = drain_precopy(dev, fd, 1500)
        dev.set_state(S.STOP_COPY)
    else:
        dev.set_state(S.STOP)
        fd = own.fd(dev.set_state(S.STOP_COPY))
        data = b""
    checksum = dev.checksum()  # at stop time, after any dirtying
    data += drain(dev, fd, 2048)
    dev.set_state(S.STOP)
    assert_session_ended(dev, fd)
    return data, checksum


def _resume(own: Owner, dev: EmulatedDevice, data: bytes, seg: int = 997) -> None:
    dev.set_state(S.STOP)
    fd = own.fd(dev.set_state(S.RESUMING))
    dev.take_arcs()
    load(dev, fd, data, seg)
    assert dev.set_state(S.RUNNING) is None
    assert dev.get_state() == S.RUNNING


@pytest.mark.parametrize("flags", FLAG_SETS, ids=FLAG_IDS)
def test_round_trip(own: Owner, flags: F) -> None:
    src = own.dev("src", prof(flags))
    start = src.checksum()
    data, checksum = _save(own, src, precopy=bool(flags & PRE))
    if flags & PRE:
        assert checksum != start  # pre-copy dirtied the state
    dst = own.dev("dst", prof(flags))  # another key: other content
    assert dst.checksum() != checksum
    _resume(own, dst, data)
    assert dst.checksum() == checksum
    expect = ref_path(flags, S.RESUMING, S.RUNNING)
    assert expect is not None
    assert arcs_of(dst) == list(pairwise(expect))


@pytest.mark.parametrize("seg", [1, 4096, 1 << 20])
def test_round_trip_any_write_segmentation(own: Owner, seg: int) -> None:
    src = own.dev("src", prof(state_size=5000))
    data, checksum = _save(own, src, precopy=True)
    dst = own.dev("dst", prof(state_size=5000))
    _resume(own, dst, data, seg)
    assert dst.checksum() == checksum


@pytest.mark.parametrize(
    ("size", "dirty"), [(4100, 8192), (8, 8), (15, 64), (4096 * 3 + 1, 4096 * 4)]
)
def test_dirtying_a_short_last_chunk_keeps_the_state_size(
    own: Owner, size: int, dirty: int
) -> None:
    """The state keeps its size whatever precopy_dirty covers (it is capped)."""
    p = prof(state_size=size, precopy_initial=size, precopy_dirty=dirty)
    src = own.dev("src", p)
    data, checksum = _save(own, src, precopy=True)
    assert checksum != hashlib.sha256(make_state(size, "src")).hexdigest()
    dst = own.dev("dst", p)
    _resume(own, dst, data)
    assert dst.checksum() == checksum


def test_dirtying_with_shared_backing_and_short_chunk(own: Owner) -> None:
    p = prof(state_size=4100, precopy_initial=4100, precopy_dirty=8192)
    backing = new_backing(p.state_size, "src")
    try:
        src = own.dev("src", p, backing=backing)
        data, checksum = _save(own, src, precopy=True)
        assert len(backing) == 4100
        assert hashlib.sha256(backing).hexdigest() == checksum
        dst = own.dev("dst", p)
        _resume(own, dst, data)
        assert dst.checksum() == checksum
    finally:
        own.close()
        backing.close()


# ------------------------------------------------------------------ bad data
def _bad_streams() -> dict[str, bytes]:
    good, _ = stream_for(SMALL.state_size)
    mid = len(good) // 2
    flipped = good[:mid] + bytes([good[mid] ^ 0xFF]) + good[mid + 1 :]
    foreign, _ = stream_for(SMALL.state_size * 2)
    return {
        "empty": b"",
        "header-only": good[:32],
        "short": good[:-1],
        "no-end-record": good[: len(good) - 40],
        "half": good[:mid],
        "corrupted": flipped,
        "foreign-size": foreign,
        "garbage": bytes(range(256)) * 64,
        "trailing-junk": good + b"junk",
        "twice": good + good,
    }


@pytest.mark.parametrize("kind", list(_bad_streams()))
def test_bad_resume_data_fails_into_error(own: Owner, kind: str) -> None:
    data = _bad_streams()[kind]
    dev = own.dev("dst")
    dev.set_state(S.STOP)
    fd = own.fd(dev.set_state(S.RESUMING))
    load(dev, fd, data, 4096)
    dev.take_arcs()
    with pytest.raises(TransitionError) as info:
        dev.set_state(S.RUNNING)
    assert info.value.errno == errno.EINVAL
    assert dev.get_state() == S.ERROR
    recs = dev.take_arcs()
    assert [(r.src, r.dst, r.ok, r.err) for r in recs] == [
        (S.RESUMING, S.STOP, False, errno.EINVAL)
    ]
    # only reset leaves ERROR
    for new in (S.STOP, S.RUNNING, S.RESUMING):
        with pytest.raises(TransitionError) as info:
            dev.set_state(new)
        assert info.value.errno == errno.EINVAL
        assert dev.get_state() == S.ERROR
    dev.reset()
    assert dev.get_state() == S.RUNNING
    # the device works again afterwards
    good, checksum = stream_for(SMALL.state_size)
    _resume(own, dev, good)
    assert dev.checksum() == checksum


def test_good_stream_control(own: Owner) -> None:
    """The control case of the bad-data tests: the unmodified stream loads."""
    good, checksum = stream_for(SMALL.state_size)
    dev = own.dev("dst")
    _resume(own, dev, good, 4096)
    assert dev.checksum() == checksum


# -------------------------------------------------------------------- faults
def test_errno_fault_leaves_the_arc_source(own: Owner) -> None:
    p = prof(faults={"RUNNING_P2P>STOP": Fault("errno", err=errno.EBUSY)})
    dev = own.dev(profile=p)
    with pytest.raises(TransitionError) as info:
        dev.set_state(S.STOP)
    assert info.value.errno == errno.EBUSY
    assert info.value.device == dev.name
    assert dev.get_state() == S.RUNNING_P2P  # where the walk stopped
    recs = dev.take_arcs()
    assert [(r.src, r.dst, r.ok, r.err) for r in recs] == [
        (S.RUNNING, S.RUNNING_P2P, True, 0),
        (S.RUNNING_P2P, S.STOP, False, errno.EBUSY),
    ]
    with pytest.raises(TransitionError):  # fires every time (times=None)
        dev.set_state(S.STOP)
    assert dev.get_state() == S.RUNNING_P2P


def test_errno_fault_on_first_arc_changes_nothing(own: Owner) -> None:
    p = prof(faults={"RUNNING>PRE_COPY": Fault("errno", err=errno.ENOSPC)})
    dev = own.dev(profile=p)
    with pytest.raises(TransitionError) as info:
        dev.set_state(S.PRE_COPY)
    assert info.value.errno == errno.ENOSPC
    assert dev.get_state() == S.RUNNING


def test_default_fault_errno_is_eio(own: Owner) -> None:
    dev = own.dev(profile=prof(faults={"RUNNING>RUNNING_P2P": Fault("errno")}))
    with pytest.raises(TransitionError) as info:
        dev.set_state(S.RUNNING_P2P)
    assert info.value.errno == errno.EIO


def test_error_state_fault(own: Owner) -> None:
    p = prof(faults={"PRE_COPY_P2P>STOP_COPY": Fault("error-state", err=errno.EPROTO)})
    dev = own.dev(profile=p)
    fd = own.fd(dev.set_state(S.PRE_COPY))
    with pytest.raises(TransitionError) as info:
        dev.set_state(S.STOP_COPY)
    assert info.value.errno == errno.EPROTO
    assert dev.get_state() == S.ERROR
    assert_session_ended(dev, fd)
    with pytest.raises(TransitionError) as info:
        dev.set_state(S.RUNNING)
    assert info.value.errno == errno.EINVAL
    dev.reset()
    assert dev.get_state() == S.RUNNING


def test_fault_times_once(own: Owner) -> None:
    p = prof(faults={"RUNNING>RUNNING_P2P": Fault("errno", err=errno.EAGAIN, times=1)})
    dev = own.dev(profile=p)
    with pytest.raises(TransitionError) as info:
        dev.set_state(S.RUNNING_P2P)
    assert info.value.errno == errno.EAGAIN
    assert dev.get_state() == S.RUNNING
    dev.set_state(S.RUNNING_P2P)  # second time: the fault is spent
    assert dev.get_state() == S.RUNNING_P2P
    dev.set_state(S.RUNNING)
    dev.set_state(S.RUNNING_P2P)
    assert all(r.ok for r in dev.take_arcs()[1:])


def test_fault_times_zero_never_fires(own: Owner) -> None:
    dev = own.dev(profile=prof(faults={"RUNNING>RUNNING_P2P": Fault("errno", times=0)}))
    dev.set_state(S.RUNNING_P2P)
    assert dev.get_state() == S.RUNNING_P2P


def test_fault_once_on_resuming_to_stop_keeps_resuming(own: Owner) -> None:
    p = prof(faults={"RESUMING>STOP": Fault("errno", err=errno.EIO, times=1)})
    dev = own.dev(profile=p)
    good, checksum = stream_for(SMALL.state_size)
    dev.set_state(S.STOP)
    fd = own.fd(dev.set_state(S.RESUMING))
    load(dev, fd, good[:100])
    with pytest.raises(TransitionError) as info:
        dev.set_state(S.STOP)
    assert info.value.errno == errno.EIO
    assert dev.get_state() == S.RESUMING
    load(dev, fd, good[100:])  # the resume fd still works
    dev.set_state(S.STOP)
    assert dev.checksum() == checksum


def test_slow_fault_still_succeeds(own: Owner) -> None:
    p = prof(faults={"STOP>STOP_COPY": Fault("slow", ms=1.0)})
    dev = own.dev(profile=p)
    dev.set_state(S.STOP)
    fd = own.fd(dev.set_state(S.STOP_COPY))
    assert dev.get_state() == S.STOP_COPY
    recs = dev.take_arcs()
    assert recs[-1].ok
    assert (recs[-1].src, recs[-1].dst) == (S.STOP, S.STOP_COPY)
    assert recs[-1].end_ns >= recs[-1].start_ns
    assert drain(dev, fd)


def test_fault_off_the_path_does_not_fire(own: Owner) -> None:
    dev = own.dev(profile=prof(faults={"STOP>RESUMING": Fault("error-state")}))
    dev.set_state(S.STOP)
    fd = own.fd(dev.set_state(S.STOP_COPY))
    drain(dev, fd)
    dev.set_state(S.RUNNING)
    assert dev.get_state() == S.RUNNING


@pytest.mark.timeout(60)
def test_latency_profile_walks(own: Owner) -> None:
    """A profile with (tiny) latencies and jitter behaves the same."""
    p = prof(default_arc_ms=0.5, jitter_ms=0.5, arc_ms={"STOP>STOP_COPY": 1.0})
    dev = own.dev(profile=p, seed=7)
    dev.set_state(S.STOP)
    fd = own.fd(dev.set_state(S.STOP_COPY))
    assert arcs_of(dev) == [
        (S.RUNNING, S.RUNNING_P2P),
        (S.RUNNING_P2P, S.STOP),
        (S.STOP, S.STOP_COPY),
    ]
    assert drain(dev, fd)


# ----------------------------------------------------------------- data size
def test_data_size_plausibility(own: Owner) -> None:
    dev = own.dev()
    size = dev.profile.state_size
    assert dev.data_size() >= size  # RUNNING: the whole state is to come
    fd = own.fd(dev.set_state(S.PRE_COPY))
    before = dev.data_size()
    assert before >= size
    while dev.precopy_info(fd)[0]:
        assert dev.read_data(fd, 1000)
    after = dev.data_size()
    assert after < before  # pre-copy data moved early is not needed again
    assert after > 0
    dev.set_state(S.STOP_COPY)
    assert dev.data_size() <= before
    drain(dev, fd)
    assert dev.data_size() < size


def test_data_size_in_stop(own: Owner) -> None:
    dev = own.dev()
    dev.set_state(S.STOP)
    assert dev.data_size() >= dev.profile.state_size


# ------------------------------------------------------------------- backing
def test_new_backing_holds_make_state() -> None:
    buf = new_backing(10000, "k")
    try:
        assert len(buf) == 10000
        assert bytes(buf) == bytes(make_state(10000, "k"))
    finally:
        buf.close()


def test_shared_backing_keeps_state_across_instances(own: Owner) -> None:
    p = prof()
    backing = new_backing(p.state_size, "vf")
    try:
        first = own.dev("vf", p, backing=backing)
        fresh = first.checksum()
        assert fresh == hashlib.sha256(make_state(p.state_size, "vf")).hexdigest()
        fd = own.fd(first.set_state(S.PRE_COPY))
        drain_precopy(first, fd)  # dirties the state
        changed = first.checksum()
        assert changed != fresh
        first.close()
        second = own.dev("vf", p, backing=backing)
        assert second.checksum() == changed  # the "hardware" kept it
        # a load into one instance is seen by the next one too
        good, checksum = stream_for(p.state_size)
        _resume(own, second, good)
        second.close()
        third = own.dev("vf", p, backing=backing)
        assert third.checksum() == checksum
    finally:
        own.close()
        backing.close()


def test_backing_size_mismatch(own: Owner) -> None:
    backing = new_backing(100, "x")
    try:
        with pytest.raises(DeviceError) as info:
            EmulatedDevice("x", prof(), backing=backing)
        assert info.value.errno == errno.EINVAL
    finally:
        backing.close()


# -------------------------------------------------------------------- closed
def test_closed_device_is_enodev(own: Owner) -> None:
    dev = own.dev()
    fd = own.fd(dev.set_state(S.PRE_COPY))
    dev.close()
    dev.close()  # idempotent
    assert os.read(fd, 10) == b""  # open sessions ended
    calls: list[Callable[[], object]] = [
        dev.get_state,
        dev.migration_flags,
        dev.data_size,
        dev.reset,
        lambda: dev.set_state(S.STOP),
        lambda: dev.read_data(fd, 10),
        lambda: dev.write_data(fd, b"x"),
        lambda: dev.precopy_info(fd),
    ]
    for call in calls:
        with pytest.raises(DeviceError) as info:
            call()
        assert info.value.errno == errno.ENODEV


def test_close_ends_resuming_session(own: Owner) -> None:
    dev = own.dev()
    dev.set_state(S.STOP)
    own.fd(dev.set_state(S.RESUMING))
    dev.close()
    with pytest.raises(DeviceError):
        dev.get_state()


def test_read_and_write_need_their_own_session(own: Owner) -> None:
    dev = own.dev()
    dev.set_state(S.STOP)
    rfd = own.fd(dev.set_state(S.RESUMING))
    with pytest.raises(DeviceError):
        dev.read_data(rfd, 10)  # not a saving fd
    other = own.dev("other")
    other.set_state(S.STOP)
    sfd = own.fd(other.set_state(S.STOP_COPY))
    with pytest.raises(DeviceError):
        dev.write_data(sfd, b"x")  # not this device's resuming fd


# ---------------------------------------------------------------- make_state
@pytest.mark.parametrize("size", [1, 15, 4095, 4096, 4097, 70000, 200_003])
def test_make_state_size_and_determinism(size: int) -> None:
    a = make_state(size, "key-a")
    assert len(a) == size
    assert make_state(size, "key-a") == a
    if size >= 16:
        assert make_state(size, "key-b") != a


def test_make_state_pages_differ() -> None:
    st = make_state(64 * 4096, "k")
    pages = {bytes(st[i : i + 4096]) for i in range(0, len(st), 4096)}
    assert len(pages) == 64


def test_checksum_depends_on_key(own: Owner) -> None:
    a1 = own.dev("a", key="same")
    a2 = own.dev("b", key="same")
    b = own.dev("c", key="other")
    assert a1.checksum() == a2.checksum()
    assert a1.checksum() != b.checksum()
    # default key is the name
    assert own.dev("same").checksum() == a1.checksum()


# ------------------------------------------------------------------- PF gate
class CountingGate:
    """A fake PF gate: a semaphore that counts its concurrent holders."""

    def __init__(self, limit: int, grant: bool = True) -> None:
        self._sem = threading.BoundedSemaphore(limit)
        self._lock = threading.Lock()
        self.grant = grant
        self.holders = 0
        self.max_holders = 0
        self.acquires = 0
        self.releases = 0

    def acquire(self, timeout: float | None = None) -> bool:
        if not self.grant:
            return False
        if not self._sem.acquire(timeout=timeout):
            return False
        with self._lock:
            self.acquires += 1
            self.holders += 1
            self.max_holders = max(self.max_holders, self.holders)
        return True

    def release(self) -> None:
        with self._lock:
            self.releases += 1
            self.holders -= 1
            assert self.holders >= 0, "released more than acquired"
        self._sem.release()


def test_gate_wraps_every_arc(own: Owner) -> None:
    gate = CountingGate(1)
    dev = own.dev(profile=prof(pf_concurrency=1), gate=gate)
    dev.set_state(S.STOP)
    fd = own.fd(dev.set_state(S.STOP_COPY))
    drain(dev, fd)
    dev.set_state(S.RUNNING)
    n = len(dev.take_arcs())
    assert n == 6
    assert gate.acquires == gate.releases == n
    assert gate.holders == 0


def test_gate_unused_without_pf_limit(own: Owner) -> None:
    gate = CountingGate(1)
    dev = own.dev(profile=prof(pf_concurrency=0), gate=gate)
    dev.set_state(S.STOP)
    assert gate.acquires == 0


def test_gate_released_on_failing_arc(own: Owner) -> None:
    gate = CountingGate(1)
    p = prof(pf_concurrency=1, faults={"RUNNING_P2P>STOP": Fault("errno")})
    dev = own.dev(profile=p, gate=gate)
    with pytest.raises(TransitionError):
        dev.set_state(S.STOP)
    assert gate.acquires == gate.releases == 2
    assert gate.holders == 0
    p = prof(pf_concurrency=1, faults={"RUNNING>RUNNING_P2P": Fault("error-state")})
    dev = own.dev("e", profile=p, gate=gate)
    with pytest.raises(TransitionError):
        dev.set_state(S.STOP)
    assert gate.acquires == gate.releases == 3


def test_gate_refused_fails_the_arc(own: Owner) -> None:
    gate = CountingGate(1, grant=False)
    dev = own.dev(profile=prof(pf_concurrency=1), gate=gate)
    with pytest.raises(TransitionError) as info:
        dev.set_state(S.STOP)
    assert info.value.errno == errno.ETIMEDOUT
    assert dev.get_state() == S.RUNNING
    assert gate.releases == 0


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("limit", "nvf"), [(1, 3), (2, 4)])
def test_gate_limits_concurrent_arcs(own: Owner, limit: int, nvf: int) -> None:
    gate = CountingGate(limit)
    p = prof(pf_concurrency=limit, default_arc_ms=1.0)
    devs = [own.dev(f"vf{i}", p, gate=gate) for i in range(nvf)]
    errors: list[BaseException] = []
    start = threading.Barrier(nvf)

    def run(dev: EmulatedDevice) -> None:
        try:
            start.wait(timeout=30)
            for _ in range(3):
                dev.set_state(S.STOP)
                dev.set_state(S.RUNNING)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(d,)) for d in devs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=50)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    total = sum(len(d.take_arcs()) for d in devs)
    assert total == nvf * 3 * 4
    assert gate.acquires == gate.releases == total
    assert 1 <= gate.max_holders <= limit
    assert gate.holders == 0


def test_arc_record_to_dict(own: Owner) -> None:
    dev = own.dev()
    dev.set_state(S.RUNNING_P2P)
    (rec,) = dev.take_arcs()
    d = rec.to_dict()
    assert d["device"] == dev.name
    assert (d["src"], d["dst"], d["ok"], d["err"]) == (
        "RUNNING",
        "RUNNING_P2P",
        True,
        0,
    )
    assert rec.ms >= 0


# ------------------------------------------------------------------- pacing
class FakeClock:
    """Stands in for the emulated module's ``time``: sleeping moves the clock."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.slept = 0.0
        self.frozen = False

    def monotonic(self) -> float:
        return self.now

    def monotonic_ns(self) -> int:
        return int(self.now * 1e9)

    def sleep(self, s: float) -> None:
        assert s >= 0
        self.slept += s
        if not self.frozen:
            self.now += s


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    import mpvfio.devices.emulated as emulated

    fake = FakeClock()
    monkeypatch.setattr(emulated, "time", fake)
    return fake


PACED: dict[str, Any] = {
    "state_size": 64 * 1024,
    "precopy_initial": 16 * 1024,
    "precopy_dirty": 0,
    "bandwidth": 1e6,
}


def test_stopcopy_rate_paces_only_stop_copy_reads(own: Owner, clock: FakeClock) -> None:
    dev = own.dev(profile=prof(**PACED, stopcopy_rate=1e5))
    fd = own.fd(dev.set_state(S.PRE_COPY))
    pre = drain_precopy(dev, fd, 5000)
    assert clock.slept == pytest.approx(len(pre) / 1e6)  # the data fd's rate
    clock.slept = 0.0
    dev.set_state(S.STOP_COPY)
    rest = drain(dev, fd, 7000)
    assert clock.slept == pytest.approx(len(rest) / 1e5)  # the save rate
    data = pre + rest
    clock.slept = 0.0
    other = own.dev("vf1", profile=prof(**PACED, stopcopy_rate=1e5))
    other.set_state(S.STOP)
    wfd = own.fd(other.set_state(S.RESUMING))
    load(other, wfd, data, 9000)
    assert clock.slept == pytest.approx(len(data) / 1e6)  # writes: bandwidth
    other.set_state(S.STOP)
    assert other.checksum() == dev.checksum()


def test_stop_copy_reads_use_the_bandwidth_without_a_save_rate(
    own: Owner, clock: FakeClock
) -> None:
    dev = own.dev(profile=prof(**PACED))
    dev.set_state(S.STOP)
    fd = own.fd(dev.set_state(S.STOP_COPY))
    data = drain(dev, fd, 10_000)
    assert clock.slept == pytest.approx(len(data) / 1e6)


def test_pacing_is_per_device_and_banks_no_idle_time(
    own: Owner, clock: FakeClock
) -> None:
    p = prof(**PACED, stopcopy_rate=1e5)
    a, b = own.dev("vf0", profile=p), own.dev("vf1", profile=p)
    fds = []
    for d in (a, b):
        d.set_state(S.STOP)
        fds.append(own.fd(d.set_state(S.STOP_COPY)))
    clock.frozen = True  # reads "in parallel": sleeping does not move time
    waits = []
    for d, fd in ((a, fds[0]), (b, fds[1]), (a, fds[0])):
        before = clock.slept
        assert d.read_data(fd, 1000) is not None
        waits.append(clock.slept - before)
    # vf1 has its own budget (a PF-wide one would make it wait 20 ms);
    # vf0's second read waits for its first one too
    assert waits == pytest.approx([0.01, 0.01, 0.02])
    clock.frozen = False
    clock.now += 5.0  # a long pause earns no credit
    before = clock.slept
    assert a.read_data(fds[0], 1000) is not None
    assert clock.slept - before == pytest.approx(0.01)
