"""The built-in emulated VFIO device: a user-space model with uAPI semantics.

This is the default backend (layer 1).  It behaves as a kernel VFIO variant
driver does towards its user (../shared/spec/VFIO_UAPI.md §5-§8):

* ``set_state`` walks the kernel's combination path (:mod:`mpvfio.uapi.fsm`)
  one arc at a time, doing each arc's work and sleeping the profile's
  latency, holding the PF's gate (PF concurrency limit) while it works.
  A refused request (EINVAL) changes nothing; a failing arc leaves the device
  in the arc's source state (or ERROR for an ``error-state`` fault).
* Data sessions hand back a **real file descriptor**: a memfd (an anonymous
  in-memory file) on the session-opening arcs RUNNING->PRE_COPY,
  RUNNING_P2P->PRE_COPY_P2P, STOP->STOP_COPY and STOP->RESUMING.  The saving
  group (PRE_COPY, PRE_COPY_P2P, STOP_COPY) keeps one session and one fd.
  Leaving a session truncates the file, so the user's fd reads end-of-stream.
  A memfd needs no feeder thread (workers fork safely), holds any amount of
  state, and is a valid sendfile()/splice() source for the data path.
* The device state is real bytes (``state_size``), deterministic per device
  key, with a SHA-256 checksum.  The stream carries it in chunks; the
  resuming side rebuilds it and checks the checksum when it leaves RESUMING:
  bad or short data makes that arc fail with EINVAL and the device ends in
  ERROR (only reset leaves it).
* PRE_COPY offers the first ``precopy_initial`` bytes; once they are read the
  device dirties ``precopy_dirty`` bytes (they really change) and offers them
  again; then reads give ENOMSG (``None``) until STOP_COPY, which streams
  every chunk not already sent clean, then the end record.
* Data moves at the profile's rates, paced by the device itself (a read or
  write returns once its bytes' time has passed): the data fd's
  ``bandwidth`` for pre-copy reads and resume writes, and ``stopcopy_rate``,
  the firmware's save rate, for STOP_COPY reads (``bandwidth`` when 0).
  Each device keeps its own budget, so devices read in parallel are paced
  in parallel (a rate per device, not per PF).

Stream format (device-private, little-endian, like mtty's blob)::

    header  <8s I I Q Q   magic b"MPVFEMU1", version 1, flags 0,
                          state_size, chunk_size
    record  <B 3x I Q     kind (1 data, 2 end), length, offset; then data
    end     kind 2, length 32, offset 0; data = SHA-256 of the whole state
"""

from __future__ import annotations

import errno as _errno
import hashlib
import mmap
import os
import random
import struct
import time
from collections import deque
from itertools import pairwise

from mpvfio.devices.base import ArcGate, ArcRecord
from mpvfio.devices.profiles import Fault, Profile, arc_key
from mpvfio.errors import DeviceError, TransitionError
from mpvfio.uapi import fsm
from mpvfio.uapi.vfio import PRECOPY_STATES, MigFlag, MigState

__all__ = [
    "STREAM_HEADER",
    "STREAM_RECORD",
    "EmulatedDevice",
    "make_state",
    "new_backing",
]

STREAM_MAGIC = b"MPVFEMU1"
STREAM_VERSION = 1
STREAM_HEADER = struct.Struct("<8sIIQQ")
STREAM_RECORD = struct.Struct("<B3xIQ")
REC_DATA = 1
REC_END = 2
_DIGEST = 32
#: How long an arc waits for its PF gate before giving up (a wedged PF).
GATE_TIMEOUT_S = 600.0

S = MigState


def make_state(size: int, key: str) -> bytearray:
    """Deterministic device state: ``size`` bytes unique to ``key``.

    Every 4 KiB page starts with a 16-byte tag of (key, page) followed by a
    slice of a per-key random block, so two devices (or two pages) never
    hold the same bytes and building 100 MiB stays cheap.
    """
    base = random.Random(key).randbytes(min(size, 64 * 1024) + 4096)
    page = 4096
    parts = []
    for i in range((size + page - 1) // page):
        tag = hashlib.blake2b(f"{key}:{i}".encode(), digest_size=16).digest()
        off = (i * 4080) % (len(base) - 4080)
        parts.append(tag + base[off : off + 4080])
    return bytearray(b"".join(parts)[:size])


def new_backing(size: int, key: str) -> mmap.mmap:
    """Shared memory holding a device's state: the emulated "hardware".

    An anonymous ``MAP_SHARED`` mapping filled with :func:`make_state`.  Forked
    workers inherit it (no fd, no name, nothing to unlink), so the state
    outlives any one worker, as a real device's state outlives its fd.
    """
    buf = mmap.mmap(-1, size, flags=mmap.MAP_SHARED)
    buf[:] = make_state(size, key)
    return buf


def _chunk_size(state_size: int) -> int:
    return 4096 if state_size <= 4 * 1024 * 1024 else 1024 * 1024


class _SaveSession:
    """One saving session (PRE_COPY / PRE_COPY_P2P / STOP_COPY)."""

    def __init__(self, user_fd: int, dev_fd: int) -> None:
        self.user_fd = user_fd
        self.dev_fd = dev_fd
        self.end = 0  # bytes appended to the file
        self.stopcopy = False
        self.pending_initial: deque[int] = deque()
        self.pending_dirty: deque[int] = deque()
        self.pending_stop: deque[int] = deque()
        self.init_left = 0  # initial bytes not yet read by the user
        self.dirty_left = 0
        self.dirtied = False
        self.ended = False

    def unread(self) -> int:
        return self.end - os.lseek(self.dev_fd, 0, os.SEEK_CUR)


class _ResumeSession:
    def __init__(self, user_fd: int, dev_fd: int) -> None:
        self.user_fd = user_fd
        self.dev_fd = dev_fd


class EmulatedDevice:
    """An emulated VFIO migration device (see the module docstring).

    :param name: the device's name (qdev id), used in errors and records.
    :param profile: latencies, sizes, flags, faults.
    :param key: what makes its state unique (default: ``name``).
    :param gate: the PF's concurrency gate, shared by its VFs (optional).
    :param seed: seeds the latency jitter.
    :param backing: shared memory holding the state (:func:`new_backing`);
        default: private memory filled from ``key``.
    """

    def __init__(
        self,
        name: str,
        profile: Profile,
        *,
        key: str | None = None,
        gate: ArcGate | None = None,
        seed: int = 0,
        backing: mmap.mmap | None = None,
    ) -> None:
        self.name = name
        self.profile = profile
        self.key = key or name
        self._gate = gate if profile.pf_concurrency else None
        self._rng = random.Random(f"{seed}:{self.key}")
        self._flags = MigFlag(profile.flags)
        self._state: bytearray | mmap.mmap
        if backing is not None:
            if len(backing) != profile.state_size:
                raise DeviceError(
                    f"backing holds {len(backing)} bytes, profile says "
                    f"{profile.state_size}",
                    name,
                    _errno.EINVAL,
                )
            self._state = backing
        else:
            self._state = make_state(profile.state_size, self.key)
        self._chunk = _chunk_size(profile.state_size)
        self._nchunks = (profile.state_size + self._chunk - 1) // self._chunk
        self._clean_sent: set[int] = set()
        self._generation = 0
        self._mig = S.RUNNING
        self._save: _SaveSession | None = None
        self._resume: _ResumeSession | None = None
        self._arcs: list[ArcRecord] = []
        self._fault_fired: dict[str, int] = {}
        self._armed: dict[str, Fault] = {}
        self._validated: tuple[int, int, bytearray] | None = None
        self._bw_next = 0.0
        self._closed = False

    # ---------------------------------------------------------------- info
    def migration_flags(self) -> MigFlag:
        """GET feature MIGRATION."""
        self._check_open()
        return self._flags

    def get_state(self) -> MigState:
        """GET feature MIG_DEVICE_STATE."""
        self._check_open()
        return self._mig

    def checksum(self) -> str:
        """SHA-256 of the device state bytes (hex)."""
        return hashlib.sha256(self._state).hexdigest()

    def take_arcs(self) -> list[ArcRecord]:
        """Arc records since the last call (and forget them)."""
        arcs, self._arcs = self._arcs, []
        return arcs

    def data_size(self) -> int:
        """GET feature MIG_DATA_SIZE: estimated bytes to finish STOP_COPY."""
        self._check_open()
        rec = STREAM_RECORD.size
        end = rec + _DIGEST
        if self._save is None:
            return STREAM_HEADER.size + self._nchunks * rec + len(self._state) + end
        unsent = [c for c in range(self._nchunks) if c not in self._clean_sent]
        return (
            self._save.unread()
            + sum(rec + self._chunk_len(c) for c in unsent)
            + (0 if self._save.ended else end)
        )

    # ---------------------------------------------------------- transitions
    def set_state(self, new: MigState) -> int | None:
        """SET feature MIG_DEVICE_STATE (see :mod:`mpvfio.devices.base`)."""
        self._check_open()
        try:
            path = fsm.walk(self._flags, self._mig, new)
        except TransitionError as exc:
            raise TransitionError(
                str(exc.args[0]), self.name, exc.errno, exc.cur, exc.new
            ) from None
        fd: int | None = None
        for src, dst in pairwise(path):
            fd = self._run_arc(src, dst)
            self._mig = dst
        return fd

    def arm_fault(self, arc: str, fault: Fault) -> None:
        """Make the next execution of ``arc`` (``"SRC>DST"``) fail once.

        Runtime fault injection (stress tests); it takes precedence over the
        profile's own fault on that arc and fires exactly once.
        """
        src, sep, dst = arc.partition(">")
        if (
            not sep
            or src not in MigState.__members__
            or dst not in MigState.__members__
        ):
            raise DeviceError(
                f"bad arc {arc!r}; expected 'SRC>DST'", self.name, _errno.EINVAL
            )
        self._armed[arc] = fault

    def reset(self) -> None:
        """VFIO_DEVICE_RESET: tear down sessions, back to RUNNING."""
        self._check_open()
        self._end_sessions()
        self._mig = S.RUNNING

    def close(self) -> None:
        """Close the device (idempotent); open sessions end."""
        if self._closed:
            return
        self._end_sessions()
        self._closed = True

    def _check_open(self) -> None:
        if self._closed:
            raise DeviceError("device is closed", self.name, _errno.ENODEV)

    def _end_sessions(self) -> None:
        self._close_save()
        self._close_resume()

    def _run_arc(self, src: MigState, dst: MigState) -> int | None:
        key = arc_key(src, dst)
        fault = self._armed.pop(key, None)
        if fault is None and (fault := self.profile.fault(src, dst)) is not None:
            fired = self._fault_fired.get(key, 0)
            if fault.times is not None and fired >= fault.times:
                fault = None
            else:
                self._fault_fired[key] = fired + 1
        delay = self.profile.latency_ms(src, dst)
        if self.profile.jitter_ms:
            delay += self._rng.uniform(0.0, self.profile.jitter_ms)
        if fault is not None and fault.kind in ("slow", "hang"):
            delay += fault.ms
        gate = self._gate
        if gate is not None and not gate.acquire(timeout=GATE_TIMEOUT_S):
            raise TransitionError(
                f"PF busy: no arc slot within {GATE_TIMEOUT_S:.0f} s for {key}",
                self.name,
                _errno.ETIMEDOUT,
                src.name,
                dst.name,
            )
        start = time.monotonic_ns()
        try:
            if delay > 0:
                time.sleep(delay / 1000.0)
            if fault is not None and fault.kind in ("errno", "error-state"):
                if fault.kind == "error-state":
                    self._end_sessions()
                    self._mig = S.ERROR
                raise TransitionError(
                    f"injected fault on arc {key}",
                    self.name,
                    fault.err,
                    src.name,
                    dst.name,
                )
            try:
                fd = self._arc_work(src, dst)
            except OSError as exc:  # e.g. EMFILE from memfd_create: the SET fails
                raise TransitionError(
                    f"arc {key} failed: {exc}",
                    self.name,
                    exc.errno or _errno.EIO,
                    src.name,
                    dst.name,
                ) from exc
        except TransitionError as exc:
            self._arcs.append(
                ArcRecord(
                    self.name, src, dst, start, time.monotonic_ns(), False, exc.errno
                )
            )
            raise
        finally:
            if gate is not None:
                gate.release()
        self._arcs.append(ArcRecord(self.name, src, dst, start, time.monotonic_ns()))
        return fd

    def _arc_work(self, src: MigState, dst: MigState) -> int | None:
        arc = (src, dst)
        if arc in ((S.RUNNING, S.PRE_COPY), (S.RUNNING_P2P, S.PRE_COPY_P2P)):
            return self._open_save(stopcopy=False)
        if arc == (S.STOP, S.STOP_COPY):
            return self._open_save(stopcopy=True)
        if dst == S.STOP_COPY:  # PRE_COPY(_P2P) -> STOP_COPY: same session
            self._enter_stopcopy()
            return None
        if arc in (
            (S.PRE_COPY, S.RUNNING),
            (S.PRE_COPY_P2P, S.RUNNING_P2P),
            (S.STOP_COPY, S.STOP),
        ):
            self._close_save()
            return None
        if arc == (S.STOP, S.RESUMING):
            return self._open_resume()
        if arc == (S.RESUMING, S.STOP):
            self._load()
            return None
        return None

    # ---------------------------------------------------------------- saving
    def _new_file(self, what: str) -> tuple[int, int]:
        dev_fd = os.memfd_create(f"mpvfio-{what}-{self.name}", os.MFD_CLOEXEC)
        try:
            return os.dup(dev_fd), dev_fd
        except OSError:
            os.close(dev_fd)
            raise

    def _open_save(self, stopcopy: bool) -> int:
        self._close_save()
        user_fd, dev_fd = self._new_file("save")
        sess = _SaveSession(user_fd, dev_fd)
        self._save = sess
        self._clean_sent.clear()
        try:
            self._append(
                STREAM_HEADER.pack(
                    STREAM_MAGIC, STREAM_VERSION, 0, len(self._state), self._chunk
                )
            )
        except OSError:  # the SET fails: no fd reaches the caller
            self._close_save()
            os.close(user_fd)
            raise
        if stopcopy:
            self._enter_stopcopy()
        else:
            n_init = min(self.profile.precopy_initial, len(self._state))
            chunks = range((n_init + self._chunk - 1) // self._chunk)
            sess.pending_initial.extend(chunks)
            sess.init_left = STREAM_HEADER.size + sum(
                STREAM_RECORD.size + self._chunk_len(c) for c in chunks
            )
        return user_fd

    def _enter_stopcopy(self) -> None:
        sess = self._save
        assert sess is not None
        sess.stopcopy = True
        sess.pending_initial.clear()
        sess.pending_dirty.clear()
        sess.init_left = sess.dirty_left = 0
        sess.pending_stop.extend(
            c for c in range(self._nchunks) if c not in self._clean_sent
        )

    def _close_save(self) -> None:
        sess, self._save = self._save, None
        if sess is not None:
            os.ftruncate(sess.dev_fd, 0)  # the user's fd now reads EOF
            os.close(sess.dev_fd)

    def _chunk_len(self, c: int) -> int:
        return min(self._chunk, len(self._state) - c * self._chunk)

    def _append(self, data: bytes) -> None:
        sess = self._save
        assert sess is not None
        os.pwrite(sess.dev_fd, data, sess.end)
        sess.end += len(data)

    def _append_chunk(self, c: int) -> None:
        off = c * self._chunk
        data = bytes(self._state[off : off + self._chunk_len(c)])
        self._append(STREAM_RECORD.pack(REC_DATA, len(data), off) + data)
        self._clean_sent.add(c)

    def _dirty(self, sess: _SaveSession) -> None:
        """The running device changes ``precopy_dirty`` bytes of its state."""
        sess.dirtied = True
        n = min(self.profile.precopy_dirty, len(self._state))
        self._generation += 1
        for c in range((n + self._chunk - 1) // self._chunk):
            off = c * self._chunk
            # At most the chunk's own length: a short last chunk (or a state
            # under 16 bytes) must not grow the state (bytearray) or raise
            # (mmap backing).
            k = min(16, self._chunk_len(c))
            self._state[off : off + k] = hashlib.blake2b(
                f"{self.key}:dirty:{self._generation}:{c}".encode(), digest_size=16
            ).digest()[:k]
            self._clean_sent.discard(c)
            sess.pending_dirty.append(c)
            sess.dirty_left += STREAM_RECORD.size + self._chunk_len(c)

    def _fill(self, sess: _SaveSession, n: int) -> None:
        """Append records until ``n`` bytes are unread or nothing is pending."""
        while sess.unread() < n:
            if sess.stopcopy:
                if sess.pending_stop:
                    self._append_chunk(sess.pending_stop.popleft())
                elif not sess.ended:
                    self._append(
                        STREAM_RECORD.pack(REC_END, _DIGEST, 0)
                        + hashlib.sha256(self._state).digest()
                    )
                    sess.ended = True
                else:
                    return
            elif sess.pending_initial:
                self._append_chunk(sess.pending_initial.popleft())
            elif sess.pending_dirty:
                self._append_chunk(sess.pending_dirty.popleft())
            else:
                return

    def _session_for(self, fd: int) -> _SaveSession:
        sess = self._save
        if sess is None or sess.user_fd != fd:
            raise DeviceError(
                "the saving session of this fd has ended", self.name, _errno.ENODEV
            )
        return sess

    def _resume_for(self, fd: int) -> _ResumeSession:
        sess = self._resume
        if sess is None or sess.user_fd != fd:
            raise DeviceError(
                "the resuming session of this fd has ended", self.name, _errno.ENODEV
            )
        return sess

    def read_data(self, fd: int, n: int) -> bytes | None:
        """read() on the saving fd (see :mod:`mpvfio.devices.base`)."""
        self._check_open()
        sess = self._session_for(fd)
        self._fill(sess, n)
        if sess.unread() == 0:
            if not sess.stopcopy:
                return None  # ENOMSG: temporary end of pre-copy data
            return b""
        data = os.read(fd, n)
        if not sess.stopcopy:
            took = min(len(data), sess.init_left)
            sess.init_left -= took
            sess.dirty_left = max(0, sess.dirty_left - (len(data) - took))
            if (
                sess.init_left == 0
                and not sess.dirtied
                and self.profile.precopy_dirty
                and not sess.pending_initial
            ):
                self._dirty(sess)
        rate = self.profile.bandwidth
        if sess.stopcopy and self.profile.stopcopy_rate:
            rate = self.profile.stopcopy_rate  # the firmware's save rate
        self._pace(len(data), rate)
        return data

    def precopy_info(self, fd: int) -> tuple[int, int]:
        """VFIO_MIG_GET_PRECOPY_INFO: ``(initial_bytes, dirty_bytes)``."""
        self._check_open()
        if self._mig not in PRECOPY_STATES:
            raise DeviceError(
                f"PRECOPY_INFO needs PRE_COPY or PRE_COPY_P2P, device is "
                f"{self._mig.name}",
                self.name,
                _errno.EINVAL,
            )
        sess = self._session_for(fd)
        return sess.init_left, sess.dirty_left

    def _pace(self, n: int, rate: float) -> None:
        """Hold the caller until ``n`` bytes at ``rate`` bytes/s have passed.

        The device's own clock: one budget per device (not per PF), and idle
        time is not banked (a read after a pause is paced from now).
        """
        if not rate or n <= 0:
            return
        now = time.monotonic()
        self._bw_next = max(self._bw_next, now) + n / rate
        if self._bw_next > now:
            time.sleep(self._bw_next - now)

    # -------------------------------------------------------------- resuming
    def _open_resume(self) -> int:
        self._close_resume()
        user_fd, dev_fd = self._new_file("resume")
        self._resume = _ResumeSession(user_fd, dev_fd)
        return user_fd

    def _close_resume(self) -> None:
        self._validated = None
        sess, self._resume = self._resume, None
        if sess is not None:
            os.ftruncate(sess.dev_fd, 0)
            os.close(sess.dev_fd)

    def write_data(self, fd: int, data: bytes | memoryview) -> int:
        """write() on the resuming fd; returns the bytes written."""
        self._check_open()
        self._resume_for(fd)
        view = memoryview(data)
        done = 0
        while done < len(view):
            done += os.write(fd, view[done:])
        self._pace(done, self.profile.bandwidth)
        return done

    def check_resume(self, fd: int) -> None:
        """Validate the data written so far without leaving RESUMING.

        A target calls this once the whole stream is in, so data the device
        would reject fails the migration *before* the target VM starts
        (the arc RESUMING -> STOP checks the same and would land in ERROR).
        Like mtty's header check on write, it is the driver's early word.

        :raise DeviceError: EINVAL naming what is wrong with the data.
        """
        self._check_open()
        sess = self._resume_for(fd)
        size = os.fstat(sess.dev_fd).st_size
        try:
            state = self._parse(os.pread(sess.dev_fd, size, 0))
        except ValueError as exc:
            raise DeviceError(
                f"resume data rejected: {exc}", self.name, _errno.EINVAL
            ) from None
        # Leaving RESUMING applies this state unless more bytes arrive first.
        self._validated = (sess.dev_fd, size, state)

    def _load(self) -> None:
        """RESUMING -> STOP: apply the written stream or fail into ERROR."""
        sess = self._resume
        assert sess is not None
        size = os.fstat(sess.dev_fd).st_size
        validated, self._validated = self._validated, None
        try:
            if validated is not None and validated[:2] == (sess.dev_fd, size):
                state = validated[2]  # check_resume parsed exactly these bytes
            else:
                state = self._parse(os.pread(sess.dev_fd, size, 0))
        except ValueError as exc:
            self._end_sessions()
            self._mig = S.ERROR
            raise TransitionError(
                f"resume data rejected: {exc}",
                self.name,
                _errno.EINVAL,
                "RESUMING",
                "STOP",
            ) from None
        self._state[:] = state
        self._close_resume()

    def _parse(self, blob: bytes) -> bytearray:
        if len(blob) < STREAM_HEADER.size:
            raise ValueError(f"short stream ({len(blob)} bytes, no header)")
        magic, version, flags, size, _chunk = STREAM_HEADER.unpack_from(blob)
        if magic != STREAM_MAGIC:
            raise ValueError(f"bad magic {magic!r}")
        if version != STREAM_VERSION or flags:
            raise ValueError(f"unsupported version {version} / flags {flags:#x}")
        if size != len(self._state):
            raise ValueError(f"state size {size} != this device's {len(self._state)}")
        state = bytearray(size)
        view = memoryview(blob)  # records are sliced without copying
        pos = STREAM_HEADER.size
        while pos < len(blob):
            if pos + STREAM_RECORD.size > len(blob):
                raise ValueError(f"truncated record header at offset {pos}")
            kind, length, off = STREAM_RECORD.unpack_from(blob, pos)
            pos += STREAM_RECORD.size
            if pos + length > len(blob):
                raise ValueError(f"truncated record at offset {pos}")
            payload = view[pos : pos + length]
            pos += length
            if kind == REC_DATA:
                if off + length > size:
                    raise ValueError(f"record [{off}, +{length}) beyond the state")
                state[off : off + length] = payload
            elif kind == REC_END:
                if pos != len(blob):
                    raise ValueError("data after the end record")
                if hashlib.sha256(state).digest() != bytes(payload):
                    raise ValueError("checksum mismatch (missing or corrupt data)")
                return state
            else:
                raise ValueError(f"unknown record kind {kind}")
        raise ValueError("stream ends without an end record (truncated)")
