"""Live migration end to end: source save, target load, rollback (layer 4).

Source (:func:`migrate`), in QEMU's order (../shared/spec/QEMU.md R8, §13)::

    setup     open the main channel (+ N multifd channels), stream header,
              START section per device, save_setup: RUNNING -> PRE_COPY
    precopy   PART sections (one <= 1 MiB chunk per device per pass) while the
              VM runs, until every device reports ENOMSG or the estimated
              stop-copy size / measured bandwidth fits the downtime limit
    stop      vm_stop(finish-migrate): the parallel switchover
              (PRE_COPY -> PRE_COPY_P2P -> STOP_COPY); SWITCHOVER_START
    data      non-multifd: END sections carry each device's STOP_COPY data;
              multifd: every device's worker streams its own data as
              12-byte-header packets over the channels, in parallel (R10.4)
    config    FULL sections: the config state (or, with multifd, EOS or
              DEV_CONFIG_LOAD_READY: the config went last on the channels)
    (ack)     before the stop the source waits for the target's
              switchover-ack (its devices are RESUMING), as QEMU's
              switchover-ack capability does
    complete  EOF; the target answers "loaded" (every device's data is in
              and checked); the source commits with "go" (the last point
              where a cancel or a failure still restarts the source); the
              target starts its VM and answers: downtime = target VM
              running - source vm_stop (one host's CLOCK_MONOTONIC when both
              run on this machine); save_cleanup (STOP_COPY -> STOP) runs
              after, outside the downtime window

Target (:func:`incoming`): load_setup (-> RESUMING), sections loaded as they
arrive (multifd packets reassembled per device in idx order, bounded by
``x-migration-max-queued-buffers-size``), the config loaded last (after
DEV_CONFIG_LOAD_READY with ``x-migration-load-config-after-iter``), the
devices' data checked, "loaded" to the source, then, on the source's "go",
vm_start (RESUMING -> RUNNING_P2P -> RUNNING), the answer to the source, and
load_cleanup after the start (R9.6).  Without autostart (QEMU's ``-S``), or
when the source's VM was paused when it stopped (QEMU's global state, sent
with "go"), the target does not start: run state paused, devices RESUMING
until the caller's ``vm_start``.

Sharing the machine (:class:`MachineLock`): a caller that passes the lock
may stop or start the source VM from another thread during the migration,
as QEMU allows ``stop``/``cont``; the engine lets it in between pre-copy
passes and while it waits on the network.  :class:`LiveStats` lets another
thread read the bytes sent so far (``query-migrate`` while active).

Failure and cancel: on any error before the commit (target gone, connection
dropped, stream error, data rejected by the target, cancel) the source takes
QEMU's failed path (R7.2): ``on_failed`` (MIGRATION ``failed`` comes before
the restart's RESUME, as in QEMU), restart the VM if the switchover stopped
a running VM (STOP_COPY -> RUNNING_P2P -> RUNNING; a VM the user had paused
stays paused), save_cleanup, then the FAILED notifier puts every device in
RUNNING; its device state is unchanged.  The target resets its
devices and never starts its VM.  :class:`MigrationError` names the stage.

The commit ("go") keeps the VM from ever running on both sides: without it
the target would start on EOF while a source that fails or is cancelled
afterwards restarts too.  After "go" the source restarts only if the target
answers that it did not start; if the answer is lost (or the target started
with device errors) the source stays stopped (postmigrate) and raises.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from mpvfio.errors import (
    DeviceError,
    MigrationBlockedError,
    MigrationError,
    MpvfioError,
    StateError,
    UsageError,
)
from mpvfio.ipc import posixobj
from mpvfio.machine import Machine, Mode, NotifyReport, VFIODevice
from mpvfio.net.transport import (
    Cancel,
    Channels,
    Listener,
    TransportCancelled,
    TransportError,
    accept_channels,
    listen,
    open_channels,
    recv_exact,
    sendall_deadline,
)
from mpvfio.uapi.vfio import MigState
from mpvfio.vfiomig import DATA_BUFFER_SIZE
from mpvfio.vmstate import RunState, runstate_is_live
from mpvfio.wire.multifd import (
    PACKET_HEADER,
    MultifdError,
    ReassemblyTable,
    read_frame,
)
from mpvfio.wire.stream import (
    Config,
    ConfigLoadReady,
    DataChunk,
    Eof,
    Hello,
    StreamError,
    StreamReader,
    StreamWriter,
    SwitchoverStart,
    decode_config_state,
    encode_config_state,
    vfio_idstr,
)
from mpvfio.workers.migration import send_device_state

__all__ = [
    "IncomingInfo",
    "LiveStats",
    "MachineLock",
    "MigrationError",
    "MigrationInfo",
    "MigrationParams",
    "incoming",
    "migrate",
    "resolve_config_after_iter",
]

_log = logging.getLogger(__name__)
_LEN = struct.Struct(">I")
_MAX_ANSWER = 1 << 20
#: Largest multifd packet a target accepts: one <= 1 MiB data chunk (R11.4)
#: or the config packet, plus the 12-byte header.
_MAX_PACKET = DATA_BUFFER_SIZE + PACKET_HEADER.size
STAGES = ("setup", "precopy", "stop", "data", "config", "complete")


def resolve_config_after_iter(value: str, arch: str) -> bool:
    """``x-migration-load-config-after-iter``: ON, OFF, or AUTO (on for aarch64)."""
    v = value.lower()
    if v == "on":
        return True
    if v == "off":
        return False
    if v == "auto":
        return arch in ("aarch64", "arm64")
    raise UsageError(
        f"x-migration-load-config-after-iter must be on, off or auto, got {value!r}"
    )


@dataclass
class MigrationParams:
    """Migration parameters (QEMU's capabilities and parameters, simplified).

    :param multifd_channels: extra channels for the device state; 0 = none
        (``x-migration-multifd-transfer`` off), data on the main channel.
    :param downtime_limit_ms: the switchover happens once the estimated
        stop-copy time (size / measured bandwidth) fits under this.
    :param max_precopy_s: switch over anyway after this long in pre-copy.
    :param config_after_iter: ``on`` / ``off`` / ``auto``.
    :param max_queued_buffers_size: target: bytes of out-of-order multifd
        data a device may queue (``x-migration-max-queued-buffers-size``).
    :param timeout: seconds any single network step may block.
    :param connect_retry_s: source: keep retrying while the target is not
        listening yet.
    """

    multifd_channels: int = 0
    downtime_limit_ms: float = 300.0
    max_precopy_s: float = 60.0
    config_after_iter: str = "auto"
    max_queued_buffers_size: int = 2**64 - 1
    timeout: float = 60.0
    connect_retry_s: float = 10.0

    def __post_init__(self) -> None:
        if not 0 <= self.multifd_channels <= 255:
            raise UsageError(
                f"multifd channels must be 0..255, got {self.multifd_channels}"
            )
        if self.downtime_limit_ms <= 0 or self.timeout <= 0:
            raise UsageError("downtime limit and timeout must be > 0")
        if self.max_queued_buffers_size < 0:
            raise UsageError("x-migration-max-queued-buffers-size must be >= 0")
        resolve_config_after_iter(self.config_after_iter, "x86_64")


@dataclass
class Span:
    """One bar of the per-device timeline (monotonic ns)."""

    device: str
    what: str
    start_ns: int
    end_ns: int


@dataclass
class MigrationInfo:
    """What a source saw (``query-migrate`` style)."""

    status: str = "setup"
    stage: str = "setup"
    error: str | None = None
    mode: str = ""
    vfs: int = 0
    multifd_channels: int = 0
    config_after_iter: bool = False
    downtime_ms: float = 0.0
    stop_ms: float = 0.0
    transfer_ms: float = 0.0
    config_ms: float = 0.0
    start_ms: float = 0.0
    total_ms: float = 0.0
    precopy_ms: float = 0.0
    precopy_iterations: int = 0
    precopy_bytes: int = 0
    stopcopy_bytes: int = 0
    transferred_bytes: int = 0
    #: the target started its VM (``False``: it stays paused, QEMU's
    #: ``-S``/``stop`` in inmigrate or a paused source; no checksums then)
    target_started: bool = True
    checksums: dict[str, str] = field(default_factory=dict)
    target_checksums: dict[str, str] = field(default_factory=dict)
    timeline: list[Span] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def checksums_equal(self) -> bool:
        """Every device arrived byte-identical (source at stop == target)."""
        return bool(self.checksums) and self.checksums == self.target_checksums

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        d = asdict(self)
        d["checksums_equal"] = self.checksums_equal
        for k, v in d.items():
            if isinstance(v, float):
                d[k] = round(v, 3)
        return d


@dataclass
class IncomingInfo:
    """What a target saw."""

    status: str = "setup"
    stage: str = "accept"
    error: str | None = None
    started: bool = False
    config_after_iter: bool = False
    load_ms: float = 0.0
    config_ms: float = 0.0
    start_ms: float = 0.0
    resumed_ns: int = 0
    received_bytes: int = 0
    channel_bytes: list[int] = field(default_factory=list)
    checksums: dict[str, str] = field(default_factory=dict)
    timeline: list[Span] = field(default_factory=list)


class MachineLock:
    """The lock every call into one :class:`Machine` holds, handed over FIFO.

    QEMU's BQL for this engine: a :class:`Machine` is not thread-safe, so
    its users (a QMP server's ``stop``/``cont``, a migration) take turns.
    :func:`migrate` holds it for its whole run but lets waiting threads in
    at its safe points (between pre-copy passes) and while it only waits on
    the network (connecting, the switchover-ack): a user's ``stop`` then
    runs during the migration, as QEMU allows.  ``release()`` hands the lock
    to the longest waiter directly, so a holder that releases and asks
    again (:meth:`pause`) queues behind the threads already waiting.

    Not reentrant; every acquire takes a timeout.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._owner: int | None = None
        #: waiting threads, oldest first: [thread ident, handed over]
        self._waiters: deque[list[Any]] = deque()

    def acquire(self, timeout: float) -> bool:
        """Take the lock within ``timeout`` seconds; ``False`` if not."""
        me = threading.get_ident()
        with self._cond:
            if self._owner == me:
                raise RuntimeError("MachineLock is not reentrant")
            if self._owner is None and not self._waiters:
                self._owner = me
                return True
            token: list[Any] = [me, False]
            self._waiters.append(token)
            deadline = time.monotonic() + timeout
            while not token[1]:
                left = deadline - time.monotonic()
                if left <= 0:
                    self._waiters.remove(token)
                    return False
                self._cond.wait(left)
            return True  # release() made this thread the owner

    def release(self) -> None:
        """Give the lock up (to the longest waiter, if any)."""
        with self._cond:
            if self._owner != threading.get_ident():
                raise RuntimeError(
                    "MachineLock released by a thread that does not own it"
                )
            if self._waiters:
                token = self._waiters.popleft()
                self._owner = token[0]
                token[1] = True
                self._cond.notify_all()
            else:
                self._owner = None

    def owned(self) -> bool:
        """Whether the calling thread holds the lock."""
        return self._owner == threading.get_ident()

    def waiting(self) -> int:
        """How many threads wait for the lock now."""
        with self._cond:
            return len(self._waiters)

    def pause(self, timeout: float) -> bool:
        """Holder: let the threads waiting now run first, then hold it again.

        :returns: ``False`` if the lock did not come back within ``timeout``
            seconds (the caller no longer holds it).
        """
        if not self.waiting():
            return True
        self.release()
        return self.acquire(timeout)


class LiveStats:
    """What a running migration has sent so far, read from any thread.

    The migration thread is the only writer and only ever adds to these
    ints (one attribute store each, atomic for readers); :meth:`snapshot`
    costs no lock.  Device bytes are added after the stream bytes that
    carry them and are read first, so ``vfio <= transferred`` in every
    snapshot.  At the end they equal :class:`MigrationInfo`'s totals:
    ``transferred`` = ``transferred_bytes``, ``vfio`` = ``precopy_bytes +
    stopcopy_bytes``.
    """

    __slots__ = (
        "expected_downtime_ms",
        "iterations",
        "main_bytes",
        "multifd_bytes",
        "precopy_bytes",
        "stopcopy_bytes",
    )

    def __init__(self) -> None:
        #: bytes written to the main channel (stream framing included)
        self.main_bytes = 0
        #: device-state payload sent on the multifd channels
        self.multifd_bytes = 0
        #: device data sent during pre-copy / during the downtime
        self.precopy_bytes = 0
        self.stopcopy_bytes = 0
        #: pre-copy passes (QEMU's dirty-sync-count)
        self.iterations = 0
        #: pending bytes / measured bandwidth (0: not estimated yet)
        self.expected_downtime_ms = 0.0

    def snapshot(self) -> dict[str, Any]:
        """``{"vfio", "transferred", "precopy", "stopcopy", "multifd",
        "iterations", "expected_downtime_ms"}`` as of now."""
        stopcopy = self.stopcopy_bytes  # device bytes first (see the class doc)
        precopy = self.precopy_bytes
        multifd = self.multifd_bytes
        main = self.main_bytes
        return {
            "vfio": precopy + stopcopy,
            "transferred": main + multifd,
            "precopy": precopy,
            "stopcopy": stopcopy,
            "multifd": multifd,
            "iterations": self.iterations,
            "expected_downtime_ms": self.expected_downtime_ms,
        }


@contextlib.contextmanager
def _released(lock: MachineLock | None, timeout: float, stage: str) -> Iterator[None]:
    """Let other users of the machine in while the body only waits on I/O."""
    if lock is None:
        yield
        return
    lock.release()
    try:
        yield
    except BaseException:
        # the body's error is the one to report: a lock still busy must not
        # hide it (the caller's rollback waits for the lock again)
        if not lock.acquire(timeout):
            _log.error("the machine lock was not handed back within %g s", timeout)
        raise
    if not lock.acquire(timeout):
        raise MigrationError(
            f"the machine lock was not handed back within {timeout:g} s", stage
        )


def _pause(lock: MachineLock | None, timeout: float, stage: str) -> None:
    """A safe point: a waiting ``stop``/``cont`` runs now."""
    if lock is not None and not lock.pause(timeout):
        raise MigrationError(
            f"the machine lock was not handed back within {timeout:g} s", stage
        )


# ----------------------------------------------------------------- helpers
def _answer(sock: Any, payload: dict[str, Any], timeout: float) -> None:
    blob = json.dumps(payload).encode()
    sendall_deadline(sock, _LEN.pack(len(blob)) + blob, time.monotonic() + timeout)


def _read_answer(sock: Any, timeout: float, cancel: Cancel | None) -> dict[str, Any]:
    """One length-prefixed JSON object from the peer (``MpvfioError`` if not)."""
    deadline = time.monotonic() + timeout
    (n,) = _LEN.unpack(recv_exact(sock, 4, deadline, cancel))
    if n > _MAX_ANSWER:
        raise MpvfioError(f"malformed answer from the peer: {n} bytes is too large")
    try:
        msg = json.loads(recv_exact(sock, n, deadline, cancel))
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise MpvfioError(f"malformed answer from the peer: {exc}") from None
    if not isinstance(msg, dict):
        raise MpvfioError(
            f"malformed answer from the peer: {type(msg).__name__}, not an object"
        )
    return msg


@functools.cache
def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


class _Writer:
    """The main channel's buffered writer with a per-write deadline."""

    def __init__(self, sock: Any, timeout: float, live: LiveStats) -> None:
        sock.settimeout(timeout)
        self.f = sock.makefile("wb", buffering=1 << 20)
        self.bytes = 0
        self.live = live

    def write(self, data: bytes | bytearray | memoryview) -> int:
        n = self.f.write(data)
        self.bytes += len(data)
        self.live.main_bytes = self.bytes
        return int(n or 0)

    def flush(self) -> None:
        self.f.flush()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.f.close()


def _arc_spans(
    report: NotifyReport, devs: Iterable[VFIODevice], what: str
) -> list[Span]:
    """A stop's or start's transitions, per device, as timeline bars."""
    return [
        Span(d.name, f"{what} {a.src.name}>{a.dst.name}", a.start_ns, a.end_ns)
        for d in devs
        for a in report.arcs.get(d.name, [])
    ]


def _device_errors(machine: Machine, since: int) -> list[str]:
    return [str(e) for e in machine.errors[since:]]


# ------------------------------------------------------------------ source
def migrate(
    machine: Machine,
    uri: str,
    params: MigrationParams | None = None,
    *,
    cancel: Cancel | None = None,
    progress: Callable[[str], None] | None = None,
    on_stage: Callable[[str], None] | None = None,
    lock: MachineLock | None = None,
    live: LiveStats | None = None,
    on_failed: Callable[[str], None] | None = None,
) -> MigrationInfo:
    """Migrate a running machine's devices to the target listening on ``uri``.

    :param cancel: cancel the migration from another thread; it is honoured
        until the commit (the "go" to the target, stage ``complete``).
    :param on_stage: called with each stage name as it begins (a test hook:
        cancel or fail at a chosen stage).
    :param lock: the machine's lock, held by the caller: other threads may
        then ``vm_stop``/``vm_start`` the machine during the migration,
        under the lock, as QEMU allows ``stop``/``cont`` (see
        :class:`MachineLock`).  A user's stop during pre-copy takes the
        devices to STOP_COPY (R6.2, paused); the switchover then stops a VM
        that is not live, which runs no handler (O9), the target is told the
        source's run state (QEMU's global state: it stays paused), and a
        failure leaves the VM paused (R7.2).
    :param live: byte counters the caller may read while this runs.
    :param on_failed: called with the error text once the migration has
        failed (not for a cancel), before the source VM is restarted: QEMU
        sets FAILED before ``migration_iteration_finish``'s ``vm_start``
        (R7.2), so MIGRATION ``failed`` comes before RESUME.
    :raise MigrationBlockedError: the device set cannot migrate (R4.6).
    :raise MigrationError: it failed; the source VM runs again if the
        migration stopped it, its devices RUNNING with their state intact
        (unless the target may be running: see the module docstring).
    """
    p = params or MigrationParams()
    cancel = cancel or Cancel()
    say = progress or (lambda _m: None)
    blockers = machine.migration_blockers()
    if blockers:
        raise MigrationBlockedError("; ".join(blockers))
    if machine.vm.runstate != RunState.RUNNING:
        raise StateError(f"migrate needs a running VM, it is {machine.vm.runstate}")
    info = MigrationInfo(
        mode=machine.mode.value,
        vfs=len(machine.devices),
        multifd_channels=p.multifd_channels,
    )
    devs = machine.devices
    t0 = time.monotonic_ns()
    live = live if live is not None else LiveStats()
    stop_ns = 0
    # committed: "go" went out, the target may run the VM from now on
    committed = False
    # the target answered that it did not start after all
    target_idle = False
    # the run state the switchover stopped (QEMU's vm_old_state)
    old_runstate: RunState | None = None
    chans: Channels | None = None
    writer: _Writer | None = None
    n_err = len(machine.errors)

    def stage(name: str) -> None:
        info.stage = name
        cancel.check()
        if on_stage is not None:
            on_stage(name)
        cancel.check()

    try:
        stage("setup")
        # x-migration-load-config-after-iter only matters with multifd (R10.7)
        cai = (
            resolve_config_after_iter(p.config_after_iter, machine.arch)
            and p.multifd_channels > 0
        )
        info.config_after_iter = cai
        hello = Hello(
            tuple(d.name for d in devs), p.multifd_channels, cai, machine.arch
        )
        with _released(lock, p.timeout, "setup"):
            chans = open_channels(
                uri,
                p.multifd_channels,
                hello.session,
                p.timeout,
                retry_until=p.connect_retry_s,
                cancel=cancel,
            )
        writer = _Writer(chans.main, p.timeout, live)
        w = StreamWriter(writer)
        w.header(hello)
        for d in devs:
            w.section_start(d.name)
            if d.call("save_setup") < 0:
                raise DeviceError("save_setup failed", d.name)
        w.flush()
        info.status = "active"
        say(f"setup done: {len(devs)} devices, multifd channels {p.multifd_channels}")

        stage("precopy")
        _precopy(machine, w, writer, p, info, cancel, say, lock, live)

        # Switchover-ack (QEMU's return-path SWITCHOVER_ACK, R9.2): the
        # target says its devices are RESUMING; stopping earlier would put
        # its load_setup into the downtime.
        with _released(lock, p.timeout, "precopy"):
            ack = _read_answer(chans.main, p.timeout, cancel)
        _expect(ack, "switchover-ack", "precopy")

        stage("stop")
        stop_ns = time.monotonic_ns()
        # migration_stop_vm: vm_old_state, then vm_stop_force_state (which
        # runs no handler when a user's stop already paused the VM, O9)
        old_runstate = machine.vm.runstate
        machine.vm_stop(RunState.FINISH_MIGRATE)
        stop = machine.last_report
        info.stop_ms = stop.ms
        info.timeline += _arc_spans(stop, devs, "stop")
        errs = _device_errors(machine, n_err)
        if errs:  # R6.1: the error fails the outgoing migration
            raise MigrationError("; ".join(errs), "stop")
        info.status = "device"
        w.cmd_switchover_start()

        stage("data")
        t_data = time.monotonic_ns()
        if p.multifd_channels:
            _send_multifd(machine, chans, w, p, info, live)
        else:
            for d in devs:
                s = time.monotonic_ns()
                w.section_end(d.name, _stopcopy_chunks(d, info, live))
                info.timeline.append(Span(d.name, "data", s, time.monotonic_ns()))
        w.flush()
        info.transfer_ms = (time.monotonic_ns() - t_data) / 1e6

        stage("config")
        t_cfg = time.monotonic_ns()
        for d in devs:
            if p.multifd_channels:
                w.section_full_multifd(d.name, cai)
            else:
                w.section_full_config(d.name, d.config)
        w.eof()
        w.flush()
        info.config_ms = (time.monotonic_ns() - t_cfg) / 1e6

        stage("complete")
        _expect(_read_answer(chans.main, p.timeout, cancel), "loaded", "complete")
        cancel.check()  # the last point a cancel is honoured
        # The target starts only on the whole "go"; if this send raises, it
        # never got it (a partial message is not a "go").  It carries the
        # run state the switchover stopped, QEMU's global state: a target
        # only starts a VM that was running here.
        go = {"status": "go", "runstate": str(old_runstate)}
        _answer(chans.main, go, p.timeout)
        committed = True
        answer = _read_answer(chans.main, p.timeout, None)
        if answer.get("status") != "completed":
            target_idle = answer.get("started") is False
            _expect(answer, "completed", "complete")
        # The target runs the VM now: nothing below may fail the migration.
        _take_answer(info, answer, stop_ns)
        # The source's state is frozen since the stop (STOP_COPY): its
        # checksum is taken now, outside the downtime it would otherwise add.
        for d in devs:
            info.checksums[d.name] = d.checksum()
        info.transferred_bytes = writer.bytes + live.multifd_bytes
        for d in devs:  # R8.9: outside the downtime window
            try:
                d.call("save_cleanup")
            except MpvfioError as exc:
                info.notes.append(f"save_cleanup: {d.name}: {exc}")
        machine.vm.runstate_set(RunState.POSTMIGRATE)
        info.status = "completed"
        info.total_ms = (time.monotonic_ns() - t0) / 1e6
        say(f"completed: downtime {info.downtime_ms:.1f} ms")
        return info
    except BaseException as exc:
        cancelled = cancel.cancelled and not committed
        info.status = "cancelled" if cancelled else "failed"
        info.error = str(exc)
        reason = exc
        if chans is not None and not cancelled and _peer_trouble(exc):
            reason = _target_reason(chans, exc)
        if chans is not None:  # before the rollback: a loading target fails now
            chans.close()
        # a stop/cont in progress ends within its timeouts
        locked = lock is None or lock.owned() or lock.acquire(3 * p.timeout)
        if not locked:
            # a notification that hangs this long: rolling back beside it
            # would run two notifications at once; report instead
            info.error = (
                f"{exc}; the VM was not restarted: the machine stayed busy for "
                f"{3 * p.timeout:g} s (a stop/cont that hangs?)"
            )
            _log.error("%s", info.error)
            info.total_ms = (time.monotonic_ns() - t0) / 1e6
            raise MigrationError(info.error, info.stage) from exc
        if committed and not target_idle:
            detail = (
                reason.args[0] if isinstance(reason, MigrationError) else str(reason)
            )
            msg = (
                f"{detail}; the target was told to start, so this VM stays "
                "stopped (postmigrate) and never runs twice"
            )
            info.error = msg
            stage_name = getattr(reason, "stage", "") or info.stage
            side = getattr(reason, "side", "source")
            final = MigrationError(msg, stage_name, side)
            _tell_failed(on_failed, final)
            _abandon(machine, info)
            info.total_ms = (time.monotonic_ns() - t0) / 1e6
            raise final from exc
        if isinstance(reason, MigrationError):
            failure: BaseException = reason
        elif isinstance(exc, Exception):
            failure = MigrationError(str(exc), info.stage)
        else:
            failure = exc
        if not cancelled:  # R7.2: FAILED first, then the restart
            _tell_failed(on_failed, failure)
        _rollback(machine, info, old_runstate)
        info.total_ms = (time.monotonic_ns() - t0) / 1e6
        if failure is exc:
            raise
        raise failure from exc
    finally:
        if chans is not None:  # first: a blocked flush then fails at once
            chans.close()
        if writer is not None:
            writer.close()


def _tell_failed(
    on_failed: Callable[[str], None] | None, failure: BaseException
) -> None:
    if on_failed is None:
        return
    try:
        on_failed(str(failure))
    except Exception:  # noqa: BLE001 - a hook's bug must not stop the rollback
        _log.exception("on_failed hook")


def _take_answer(info: MigrationInfo, answer: dict[str, Any], stop_ns: int) -> None:
    """The target's final report: downtime, checksums, its timeline."""
    try:
        resumed = int(answer.get("resumed_ns") or 0)
        same_host = answer.get("boot_id") == _boot_id() and resumed > 0
        end = resumed if same_host else time.monotonic_ns()
        info.downtime_ms = (end - stop_ns) / 1e6
        if not same_host:
            info.notes.append("downtime measured at the source (different hosts)")
        info.target_started = answer.get("started") is not False
        if not info.target_started:
            info.notes.append(
                "the target stays paused: the downtime ends when its load "
                "completed; its devices check their data when it starts"
            )
        info.start_ms = float(answer.get("start_ms") or 0.0)
        info.target_checksums = {
            str(k): str(v) for k, v in dict(answer.get("checksums") or {}).items()
        }
        for span in answer.get("timeline") or []:
            info.timeline.append(
                Span(
                    str(span["device"]),
                    str(span["what"]),
                    int(span["start_ns"]),
                    int(span["end_ns"]),
                )
            )
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        info.notes.append(f"malformed completion report from the target: {exc!r}")


def _expect(msg: dict[str, Any], status: str, stage: str) -> None:
    """The target's answer must say ``status``; else raise what it said."""
    if msg.get("status") == status:
        return
    if msg.get("status") == "failed":
        raise MigrationError(
            str(msg.get("error") or "target failed"),
            str(msg.get("stage", "")),
            "target",
        )
    raise MigrationError(
        f"unexpected answer from the target (wanted {status!r}): {msg}",
        stage,
        "source",
    )


def _peer_trouble(exc: BaseException) -> bool:
    """Whether a failure came from the connection (the target may know why).

    Socket and stream errors, also as the cause of a multifd sender's
    error; not device errors, not a cancel, not what the target said.
    """
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None or isinstance(seen, TransportCancelled | DeviceError):
            return False
        if isinstance(seen, OSError | TransportError | StreamError | MultifdError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _target_reason(chans: Channels, exc: BaseException) -> BaseException:
    """After a send failure, the target may have said why (it closes after)."""
    deadline = time.monotonic() + 0.5
    for _ in range(3):  # an ack or "loaded" may come before the failure
        try:
            msg = _read_answer(chans.main, max(0.01, deadline - time.monotonic()), None)
        except Exception:  # noqa: BLE001 - best effort: keep the original error
            return exc
        if msg.get("status") == "failed":
            return MigrationError(
                str(msg.get("error")), str(msg.get("stage", "")), "target"
            )
    return exc


def _precopy(
    machine: Machine,
    w: StreamWriter,
    writer: _Writer,
    p: MigrationParams,
    info: MigrationInfo,
    cancel: Cancel,
    say: Callable[[str], None],
    lock: MachineLock | None,
    live: LiveStats,
) -> None:
    """PART sections while the VM runs, until convergence (R8.3-R8.6).

    Each pass starts at a safe point (``lock``): a user's ``stop`` may run
    there, and only devices still in PRE_COPY iterate (R8.5: after a stop
    in pre-copy they are in STOP_COPY, their data goes at the switchover).
    """
    t0 = time.monotonic()
    sent0 = writer.bytes
    bandwidth = 0.0
    while True:
        _pause(lock, p.timeout, "precopy")
        devs = [d for d in machine.devices if d.state == MigState.PRE_COPY]
        if not devs:
            break
        cancel.check()
        empty = 0
        for d in devs:
            data = d.call("read_chunk", DATA_BUFFER_SIZE)
            if not data:  # None: ENOMSG, nothing more for now
                empty += 1
                w.section_part(d.name, None)
                continue
            w.section_part(d.name, data)
            info.precopy_bytes += len(data)
            live.precopy_bytes = info.precopy_bytes
        info.precopy_iterations += 1
        live.iterations = info.precopy_iterations
        elapsed = time.monotonic() - t0
        if elapsed > 0:
            bandwidth = (writer.bytes - sent0) / elapsed
        if empty == len(devs):
            break  # every device has nothing more to pre-copy
        pending = sum(int(d.call("data_size")) for d in machine.devices)
        if bandwidth:
            live.expected_downtime_ms = pending / bandwidth * 1000.0
        limit = bandwidth * p.downtime_limit_ms / 1000.0
        if bandwidth and pending <= limit:
            info.notes.append(
                f"converged: {pending} bytes pending <= {limit:.0f} "
                f"({bandwidth / 1e6:.0f} MB/s x {p.downtime_limit_ms} ms)"
            )
            break
        if elapsed > p.max_precopy_s:
            info.notes.append(
                f"switched over after {p.max_precopy_s} s of pre-copy "
                f"with {pending} bytes still pending"
            )
            break
        if info.precopy_iterations % 64 == 0:
            say(
                f"pre-copy: {info.precopy_bytes >> 20} MiB sent, "
                f"{pending >> 20} MiB pending, {bandwidth / 1e6:.0f} MB/s"
            )
    w.flush()
    info.precopy_ms = (time.monotonic() - t0) * 1000.0


def _stopcopy_chunks(
    d: VFIODevice, info: MigrationInfo, live: LiveStats
) -> Iterator[bytes]:
    """R8.7: -> STOP_COPY (recover STOP), then the data to the end."""
    if d.call("save_complete") < 0:
        raise DeviceError("could not enter STOP_COPY", d.name)
    while True:
        data = d.call("read_chunk", DATA_BUFFER_SIZE)
        if data is None:
            raise DeviceError("read returned ENOMSG in STOP_COPY", d.name)
        if not data:
            return
        info.stopcopy_bytes += len(data)
        yield data
        # the writer has taken the chunk: count it after the stream bytes
        live.stopcopy_bytes = info.stopcopy_bytes


class _ThreadFrameLock:
    """A channel's frame lock for senders that are threads of this process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def acquire(self, timeout: float | None = None) -> bool:
        return self._lock.acquire(timeout=-1 if timeout is None else timeout)

    def release(self) -> None:
        self._lock.release()


def _send_multifd(
    machine: Machine,
    chans: Channels,
    w: StreamWriter,
    p: MigrationParams,
    info: MigrationInfo,
    live: LiveStats,
) -> None:
    """R10.4: one sender per device, in parallel; END sections carry EOS.

    The senders are the devices' workers: their bytes are counted (in
    ``live``) when they finish.
    """
    devs = machine.devices
    n = len(chans.extra)
    results: dict[str, Any] = {}
    errors: list[BaseException] = []
    thread_locks = [_ThreadFrameLock() for _ in range(n)]
    reg = machine.registry
    workers = machine.mode == Mode.WORKERS
    # WORKERS: one named semaphore per channel, which the workers open by name
    created: list[tuple[str, posixobj.Semaphore]] = []
    threads: list[threading.Thread] = []

    def run(i: int, d: VFIODevice) -> None:
        ch = i % n
        payload = encode_config_state(d.config)
        try:
            if workers:
                results[d.name] = d.call_fds(
                    "mig_send",
                    [chans.extra[ch].fileno()],
                    created[ch][0],
                    vfio_idstr(d.name),
                    payload,
                    p.timeout,
                    timeout=p.timeout + 5,
                )
            else:
                dup = socket.socket(fileno=chans.extra[ch].dup().detach())
                try:
                    assert d.mig is not None
                    results[d.name] = send_device_state(
                        d.mig,
                        dup,
                        thread_locks[ch],
                        vfio_idstr(d.name),
                        payload,
                        p.timeout,
                    )
                    d._collect_local()
                finally:
                    dup.close()
        except BaseException as exc:  # noqa: BLE001 - joined and re-raised below
            errors.append(exc)

    try:
        if workers:
            assert reg is not None
            for i in range(n):
                name = reg.name(f"mfd{i}-{time.monotonic_ns() & 0xFFFFFF:x}")
                created.append((name, posixobj.create_semaphore(name, 1)))
                reg.add(name, "sem")
        for i, d in enumerate(devs):
            t = threading.Thread(target=run, args=(i, d), name=f"mfd-send-{d.name}")
            t.start()
            threads.append(t)
        for d in devs:  # R8.7: the main thread's save_complete writes EOS only
            w.section_end(d.name)
    except BaseException:
        # The main channel failed: stop the senders (a shut down channel
        # fails their next send) before the rollback touches the devices.
        for ch in chans.extra:
            with contextlib.suppress(OSError):
                ch.shutdown(socket.SHUT_RDWR)
        raise
    finally:
        deadline = time.monotonic() + p.timeout + 10
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        # the workers opened the semaphores by name: they keep their own
        for lock_name, sem in created:
            posixobj.close_semaphore(sem)
            assert reg is not None
            reg.unlink(lock_name)
    if any(t.is_alive() for t in threads):
        raise MigrationError("a multifd sender did not finish in time", "data")
    if errors:
        raise MigrationError(f"multifd send failed: {errors[0]}", "data") from errors[0]
    for d in devs:
        r = results[d.name]
        n = int(r["bytes"])
        info.stopcopy_bytes += n
        live.multifd_bytes += n  # the channel bytes first (see LiveStats)
        live.stopcopy_bytes = info.stopcopy_bytes
        info.timeline.append(Span(d.name, "data", int(r["start_ns"]), int(r["end_ns"])))
    for ch in chans.extra:  # the target reads each channel to its end
        with contextlib.suppress(OSError):
            ch.shutdown(socket.SHUT_WR)


def _rollback(
    machine: Machine, info: MigrationInfo, old_runstate: RunState | None
) -> None:
    """QEMU's failed path (R7.2): restart, save_cleanup, FAILED -> RUNNING.

    ``migration_iteration_finish``: the VM is restarted if the switchover
    stopped a live VM (``old_runstate``, QEMU's vm_old_state; also when the
    stop raised half way).  If a user's ``stop`` had paused it, only the run
    state goes back (finish-migrate -> paused) and it stays paused; before
    the switchover nothing is restored.  The FAILED notifier then puts every
    device in RUNNING all the same (R7.1; QEMU's quirk for a paused VM).
    """
    restart = old_runstate is not None and runstate_is_live(old_runstate)
    try:
        if restart and machine.vm.runstate != RunState.RUNNING:
            machine.vm_start()
        elif (
            old_runstate is not None and machine.vm.runstate == RunState.FINISH_MIGRATE
        ):
            machine.vm.runstate_set(old_runstate)
    except MpvfioError as exc:
        info.notes.append(f"rollback trouble: {exc}")
        _log.error("rollback after a failed migration: vm_start: %s", exc)
    for d in machine.devices:
        with contextlib.suppress(MpvfioError):
            d.call("save_cleanup")
    for d in machine.devices:  # the migration notifier on FAILED (R7.1)
        try:
            d.call("set_state", int(MigState.RUNNING))
        except MpvfioError as exc:
            info.notes.append(f"rollback trouble: {d.name}: {exc}")
            _log.error("rollback: %s: %s", d.name, exc)
    if restart and machine.vm.runstate != RunState.RUNNING:
        machine.vm.runstate_set(RunState.RUNNING)


def _abandon(machine: Machine, info: MigrationInfo) -> None:
    """After the commit: save_cleanup (STOP_COPY -> STOP), stay postmigrate."""
    for d in machine.devices:
        try:
            d.call("save_cleanup")
        except MpvfioError as exc:
            info.notes.append(f"save_cleanup: {d.name}: {exc}")
    machine.vm.runstate_set(RunState.POSTMIGRATE)


# ------------------------------------------------------------------ target
def incoming(
    machine: Machine,
    listen_on: str | Listener,
    params: MigrationParams | None = None,
    *,
    cancel: Cancel | None = None,
    progress: Callable[[str], None] | None = None,
    on_stage: Callable[[str], None] | None = None,
    autostart: bool | Callable[[], bool] = True,
) -> IncomingInfo:
    """Receive one migration into a started, not running machine.

    The machine is started with ``start(run=False, runstate=INMIGRATE)``;
    its devices are matched to the source's by name.

    :param on_stage: called with each stage name as it begins: ``accept``,
        ``load``, ``check``, ``start`` (a test hook).
    :param autostart: QEMU's ``autostart`` (off with ``-S``; ``stop`` and
        ``cont`` in inmigrate change it): a callable is read once the source
        committed.  As in QEMU's ``process_incoming_migration_bh`` (R9.6
        step 6) the VM starts only if it is on and the source's VM was
        running when it stopped (QEMU's global state); otherwise the run
        state becomes ``paused`` (or the source's), no handler runs and the
        devices stay RESUMING until ``cont`` (RESUMING -> RUNNING_P2P ->
        RUNNING); ``IncomingInfo.started`` is then ``False``.
    :raise MigrationError: the incoming migration failed; the devices are
        reset and the VM was not started (``IncomingInfo.started``; only
        device errors during the start itself leave it running, as in QEMU).
    """
    p = params or MigrationParams()
    cancel = cancel or Cancel()
    say = progress or (lambda _m: None)
    info = IncomingInfo()
    if machine.vm.runstate == RunState.RUNNING:
        raise StateError("incoming migration needs a VM that is not running")
    own = isinstance(listen_on, str)
    listener = listen(listen_on) if isinstance(listen_on, str) else listen_on
    chans: Channels | None = None
    rf: Any = None
    threads: list[threading.Thread] = []
    loaders: list[threading.Thread] = []
    table: ReassemblyTable | None = None
    failures: list[BaseException] = []
    abort = threading.Event()
    lock = threading.Lock()
    devs = {d.name: d for d in machine.devices}

    def stage(name: str) -> None:
        info.stage = name
        cancel.check()
        if on_stage is not None:
            on_stage(name)
        cancel.check()

    def fail(exc: BaseException) -> None:
        """A receive or load thread failed: stop everything promptly."""
        with lock:
            failures.append(exc)
        abort.set()
        if table is not None:
            table.cancel(f"migration failed: {exc}")
        if chans is not None:  # the main thread's read returns at once
            with contextlib.suppress(OSError):
                chans.main.shutdown(socket.SHUT_RD)

    committed = threading.Event()
    commit_lock = threading.Lock()

    def watch_cancel() -> None:
        """A cancel from another thread interrupts a blocked read at once."""
        while not committed.is_set():
            if cancel.wait(0.02):
                with commit_lock:  # a cancel after the "go" changes nothing
                    if not committed.is_set():
                        fail(TransportCancelled(f"cancelled: {cancel.reason}"))
                return

    watcher = threading.Thread(target=watch_cancel, name="incoming-cancel")
    try:
        stage("accept")
        chans = accept_channels(listener, p.multifd_channels, p.timeout, cancel)
        watcher.start()
        chans.main.settimeout(p.timeout)
        rf = chans.main.makefile("rb", buffering=1 << 20)
        reader = StreamReader(
            rf,
            max_chunk=DATA_BUFFER_SIZE,  # R11.4: the source never sends more
            expect_devices=list(devs),
            expect_session=chans.session.hex(),
            check_trailing=False,
        )
        hello = reader.read_header()
        if hello.multifd_channels != p.multifd_channels:
            raise MigrationError(
                f"multifd channels differ: source {hello.multifd_channels}, target "
                f"{p.multifd_channels}",
                "accept",
                "target",
            )
        # x-migration-load-config-after-iter only matters with multifd (R10.7)
        cai = (
            resolve_config_after_iter(p.config_after_iter, machine.arch)
            and p.multifd_channels > 0
        )
        info.config_after_iter = cai
        if hello.config_after_iter != cai:
            raise MigrationError(
                f"x-migration-load-config-after-iter differs: source "
                f"{'on' if hello.config_after_iter else 'off'} (arch "
                f"{hello.arch}), target {'on' if cai else 'off'} (arch "
                f"{machine.arch}, property {p.config_after_iter}); set it the "
                "same on both sides",
                "accept",
                "target",
            )
        stage("load")
        t_load = time.monotonic_ns()
        for d in devs.values():
            if d.call("load_setup") < 0:
                raise DeviceError("load_setup (-> RESUMING) failed", d.name)
        _answer(chans.main, {"status": "switchover-ack"}, p.timeout)
        ready = {n: threading.Event() for n in devs}
        if p.multifd_channels:
            table = ReassemblyTable(list(devs), max_queued=p.max_queued_buffers_size)
            info.channel_bytes = [0] * len(chans.extra)
            for i, ch in enumerate(chans.extra):
                ch.settimeout(p.timeout)
                t = threading.Thread(
                    target=_receive_channel,
                    args=(ch, i, table, fail, info, lock),
                    name=f"mfd-recv-{i}",
                    daemon=True,
                )
                t.start()
                threads.append(t)
        for rec in reader:
            cancel.check()
            if abort.is_set():
                break
            if isinstance(rec, DataChunk):
                devs[rec.device].call("write_all", bytes(rec.data))
                with lock:
                    info.received_bytes += len(rec.data)
            elif isinstance(rec, SwitchoverStart) and table is not None:
                for d in devs.values():  # R9.4: the load threads start here
                    t = threading.Thread(
                        target=_load_device,
                        args=(d, table, ready[d.name], cai, p, abort, fail, info),
                        name=f"mfd-load-{d.name}",
                        daemon=True,
                    )
                    t.start()
                    loaders.append(t)
            elif isinstance(rec, Config):
                devs[rec.device].load_config(bytes(rec.config))
            elif isinstance(rec, ConfigLoadReady):
                ready[rec.device].set()
            elif isinstance(rec, Eof):
                break
        # qemu_loadvm_state waits for the load threads (R9.6 step 4).  The
        # channels end first (the source shuts them after the last packet):
        # a packet still missing then will never come.
        deadline = time.monotonic() + p.timeout
        _wait_for(threads, deadline, abort, p.timeout)
        if table is not None and not abort.is_set():
            missing = [
                f"{n} (from packet idx {table[n].next_idx})" for n in table.pending()
            ]
            if missing:
                raise MigrationError(
                    "the multifd channels ended before every packet arrived: "
                    + ", ".join(missing),
                    "load",
                    "target",
                )
        _wait_for(loaders, deadline, abort, p.timeout)
        if abort.is_set():
            raise failures[0]
        info.load_ms = (time.monotonic_ns() - t_load) / 1e6
        stage("check")
        # Reject bad device data before the VM starts; every device checks
        # its own data where it lives, in parallel.
        _parallel(list(devs.values()), "check_resume", p.timeout)
        # The commit: the source may still fail or be cancelled until it
        # says "go"; starting before that could run the VM on both sides.
        _answer(chans.main, {"status": "loaded"}, p.timeout)
        go = _read_file_msg(rf, "its go (the switchover commit)")
        if go.get("status") != "go":
            raise MigrationError(
                f"the source did not commit the switchover: {go}", "check", "target"
            )
        with commit_lock:
            committed.set()
            if abort.is_set():  # a cancel came before the "go" did
                raise failures[0]
        stage("start")
        n_err = len(machine.errors)
        src_rs = _source_runstate(go.get("runstate"))
        run = _autostart(autostart) and runstate_is_live(src_rs)
        if run:
            info.started = True
            machine.vm_start()
            info.resumed_ns = time.monotonic_ns()
            start = machine.last_report
            info.start_ms = start.ms
            info.timeline += _arc_spans(start, devs.values(), "start")
        else:
            # not live: no handler runs, the devices stay RESUMING (R9.6).
            # (QEMU restores the source's state; a source here can only
            # have been running or paused.)
            machine.vm.runstate_set(RunState.PAUSED)
            info.resumed_ns = time.monotonic_ns()
        errs = _device_errors(machine, n_err)
        if run:  # a RESUMING device's state is not applied until it starts
            for d in devs.values():
                info.checksums[d.name] = d.checksum()
        info.status = "completed" if not errs else "failed"
        answer: dict[str, Any] = {
            "status": info.status,
            "stage": "start",
            "started": run,
            "error": "; ".join(errs) or None,
            "resumed_ns": info.resumed_ns,
            "start_ms": info.start_ms,
            "boot_id": _boot_id(),
            "checksums": info.checksums,
            "timeline": [asdict(s) for s in info.timeline],
        }
        with contextlib.suppress(MpvfioError):  # the source decides alone now
            _answer(chans.main, answer, p.timeout)
        for d in devs.values():  # R9.6: load_cleanup after the start
            try:
                d.call("load_cleanup")
            except MpvfioError as exc:  # the VM runs: report, do not fail
                _log.error("%s: load_cleanup: %s", d.name, exc)
        if errs:
            raise MigrationError(
                "the VM started with device errors: " + "; ".join(errs),
                "start",
                "target",
            )
        say(f"incoming migration completed: {len(devs)} devices running")
        return info
    except BaseException as exc:
        # a thread's failure shut the main channel: report that, not the EOF
        primary = failures[0] if abort.is_set() and failures else exc
        info.status = "failed"
        info.error = str(primary)
        abort.set()
        if table is not None:
            table.cancel(f"migration failed: {primary}")
        if chans is not None:
            with contextlib.suppress(Exception):
                _answer(
                    chans.main,
                    {
                        "status": "failed",
                        "stage": getattr(primary, "stage", "") or info.stage,
                        "started": info.started,
                        # the bare reason: the source adds side and stage
                        "error": (
                            str(primary.args[0])
                            if isinstance(primary, MigrationError)
                            else str(primary)
                        ),
                    },
                    1.0,
                )
            chans.close()
        # No device call may race with the reset below.
        _join_all(loaders + threads, p.timeout)
        if not info.started:
            for d in devs.values():  # the target VM never runs this state
                with contextlib.suppress(MpvfioError):
                    d.call("reset")
        if isinstance(primary, MigrationError):
            raise primary from (exc if primary is not exc else None)
        if isinstance(primary, Exception):
            raise MigrationError(str(primary), info.stage, "target") from primary
        raise
    finally:
        committed.set()
        if watcher.is_alive():
            watcher.join(1.0)  # it polls ``committed`` every 20 ms
        _join_all(threads, 1.0)
        if rf is not None:
            with contextlib.suppress(OSError):
                rf.close()
        if chans is not None:
            chans.close()
        if own:
            listener.close()


def _autostart(autostart: bool | Callable[[], bool]) -> bool:
    return bool(autostart()) if callable(autostart) else bool(autostart)


def _source_runstate(value: Any) -> RunState:
    """The run state the source's switchover stopped (QEMU's global state).

    A source that does not say (an older one) ran; anything unknown counts
    as paused: a target must never start a VM that was not running.
    """
    if value is None:
        return RunState.RUNNING
    try:
        return RunState(str(value))
    except ValueError:
        return RunState.PAUSED


def _read_file_msg(f: Any, what: str) -> dict[str, Any]:
    """One length-prefixed JSON message from the main channel's reader."""
    try:
        head = f.read(4)
        if len(head) < 4:
            raise MigrationError(
                f"the source closed the main channel before {what}", "check", "target"
            )
        (n,) = _LEN.unpack(head)
        if n > _MAX_ANSWER:
            raise MigrationError(
                f"source message of {n} bytes is too large", "check", "target"
            )
        blob = f.read(n)
    except OSError as exc:
        raise MigrationError(
            f"reading {what} from the source failed: {exc}", "check", "target"
        ) from exc
    if len(blob) < n:
        raise MigrationError(
            f"the source closed the main channel before {what}", "check", "target"
        )
    try:
        msg = json.loads(blob)
    except ValueError as exc:
        raise MigrationError(f"{what}: not JSON: {exc}", "check", "target") from exc
    if not isinstance(msg, dict):
        raise MigrationError(f"{what}: not a JSON object", "check", "target")
    return msg


def _wait_for(
    threads: list[threading.Thread],
    deadline: float,
    abort: threading.Event,
    timeout: float,
) -> None:
    """Join ``threads`` by ``deadline``; return early once ``abort`` is set."""
    for t in threads:
        while t.is_alive() and time.monotonic() < deadline and not abort.is_set():
            t.join(0.05)
        if t.is_alive() and not abort.is_set():
            raise MigrationError(
                f"{t.name} did not finish within {timeout} s", "load", "target"
            )


def _join_all(threads: list[threading.Thread], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
        if t.is_alive():
            _log.error("%s still running after %.1f s", t.name, timeout)


def _parallel(devs: list[VFIODevice], method: str, timeout: float) -> None:
    """Run one device operation on every device at once; raise the first error."""
    errors: list[BaseException] = []

    def run(d: VFIODevice) -> None:
        try:
            d.call(method, timeout=timeout)
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)

    threads = [
        threading.Thread(target=run, args=(d,), name=f"{method}-{d.name}") for d in devs
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 5)
    if any(t.is_alive() for t in threads):
        raise MigrationError(
            f"{method} did not finish within {timeout} s", "check", "target"
        )
    if errors:
        raise errors[0]


def _receive_channel(
    ch: Any,
    index: int,
    table: ReassemblyTable,
    fail: Callable[[BaseException], None],
    info: IncomingInfo,
    lock: threading.Lock,
) -> None:
    """One multifd channel: frames into the per-device reassembly (R10.5)."""
    f = ch.makefile("rb", buffering=1 << 20)
    try:
        while True:
            frame = read_frame(f, max_size=_MAX_PACKET)
            if frame is None:
                return
            table.add_frame(*frame)
            n = len(frame[1].data)
            with lock:
                info.received_bytes += n
                info.channel_bytes[index] += n
    except BaseException as exc:  # noqa: BLE001 - handed to the main thread
        fail(exc)
    finally:
        with contextlib.suppress(OSError):
            f.close()


def _load_device(
    d: VFIODevice,
    table: ReassemblyTable,
    ready: threading.Event,
    cai: bool,
    p: MigrationParams,
    abort: threading.Event,
    fail: Callable[[BaseException], None],
    info: IncomingInfo,
) -> None:
    """R10.6: write the device's data in idx order, then its config."""
    start = time.monotonic_ns()
    try:
        r = table[d.name]
        while True:
            chunk = r.next_chunk(timeout=p.timeout)
            if chunk is None:
                break
            if abort.is_set():
                return
            d.call("write_all", chunk)
        if cai:  # R10.7: wait for DEV_CONFIG_LOAD_READY, honour cancellation
            deadline = time.monotonic() + p.timeout
            while not ready.wait(0.05):
                if abort.is_set():
                    return
                if time.monotonic() > deadline:
                    raise MigrationError(
                        f"{d.name}: no DEV_CONFIG_LOAD_READY within {p.timeout} s",
                        "load",
                        "target",
                    )
        if abort.is_set():
            return
        d.load_config(decode_config_state(r.config(), d.name))
        info.timeline.append(Span(d.name, "load", start, time.monotonic_ns()))
    except BaseException as exc:  # noqa: BLE001 - handed to the main thread
        if not abort.is_set():
            fail(exc)
