"""The device worker: one process per VFIO device, holding the device's fd.

Layer 2 (imports mpvfio layers 0-1 only).  Data flow of a notification's
transition (PERF_LIMITS design P1; the slot words: :mod:`mpvfio.workers.slots`)::

    parent (handler list)                      worker (this module)
    ─────────────────────                      ────────────────────
    slot: CMD_* words, post go ─────────────▶  (blocked on go) phase 1: -> *_P2P
                                               events ──▶ event pipe ──▶ parent
                                               slot ARRIVED; barrier.wait()
    P2P interlock: wait for "crossed" ◀──────  last arriver, after releasing all
                                               phase 2: target chosen from the
                                                        post-phase-1 state
    join: done (alldone: the round's last) ◀── slot RES_* words (state, arcs);
          RES_PIPE: ("ok"/"err", status) on the command pipe (errors, notes)

Every other command (device calls, ``call_fds``, faults, serial ``phase``
steps, ``exit``) is a pickled message on the command pipe followed by a post
of ``go``; its reply comes back on the pipe.  The idle worker blocks on
``go`` alone, with a timeout to check that its parent lives.

The worker opens its own device from its spec (:func:`open_device`: the
emulated model lives here; a ``vfio-user:`` spec connects its socket here, a
``vfio:`` spec opens the kernel cdev here), so the device fd lives and dies
with this process.  The emulated device's state bytes live in a
shared mapping the parent created: like real hardware they survive the
worker, so a fresh worker can reset the device without losing its state.

Exit-code contract: 0 after an ``exit`` command, 3 when the parent is gone,
4 on a bad command stream; anything else (a signal, an injected fault) is a
crash the parent reports by name.
"""

from __future__ import annotations

import ctypes
import faulthandler
import mmap
import os
import pickle
import signal
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

from mpvfio.devices.base import ArcGate, ArcRecord, DeviceBackend
from mpvfio.devices.emulated import EmulatedDevice
from mpvfio.devices.profiles import Profile
from mpvfio.devices.registry import open_backend, parse_spec
from mpvfio.errors import (
    BarrierError,
    DeviceError,
    MpvfioError,
    TransitionError,
    UsageError,
)
from mpvfio.events import Event
from mpvfio.ipc import posixobj
from mpvfio.ipc.barrier import BarrierSpec, ProcessBarrier
from mpvfio.uapi.vfio import MigState
from mpvfio.vfiomig import MigrationProps, VFIOMigration
from mpvfio.vmstate import RunState
from mpvfio.workers import slots as sl
from mpvfio.workers.slots import SlotSpec, WorkerSlot

__all__ = [
    "CALLS",
    "EXIT_BAD_COMMAND",
    "EXIT_ORPHANED",
    "FAULT_KINDS",
    "FAULT_POINTS",
    "RUNSTATES",
    "Status",
    "WorkerSpec",
    "call_device",
    "open_device",
    "worker_main",
]

#: Run states by their index: how a transition command carries its run state.
RUNSTATES: tuple[RunState, ...] = tuple(RunState)
#: How long an idle worker blocks before it checks that its parent lives.
IDLE_CHECK_S = 1.0
EXIT_ORPHANED = 3
EXIT_BAD_COMMAND = 4
#: Where an injected worker fault fires during a transition (or phase) command.
FAULT_POINTS = ("before", "phase1", "barrier", "phase2", "join")
#: What it does: SIGKILL itself, exit(7), hang, or segfault.
FAULT_KINDS = ("kill", "exit", "hang", "segv")
_PR_SET_PDEATHSIG = 1
_PICKLE = pickle.HIGHEST_PROTOCOL


@dataclass
class WorkerSpec:
    """What a worker needs to open its device (inherited through fork)."""

    name: str
    qom_path: str
    profile: Profile
    key: str
    props: MigrationProps
    parent_pid: int
    seed: int = 0
    backing: mmap.mmap | None = None
    barrier: BarrierSpec | None = None
    gate_name: str | None = None
    slot: SlotSpec | None = None
    #: the CPU to run on (``None``: wherever the scheduler likes)
    cpu: int | None = None
    #: a ``vfio-user:``/``vfio:`` device spec; ``None``: emulated ``profile``
    device_spec: str | None = None


@dataclass
class Status:
    """What every reply carries back: the device's mirror for the parent."""

    state: MigState
    has_data_fd: bool
    errors: list[TransitionError] = field(default_factory=list)
    arcs: list[ArcRecord] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def drain(mig: VFIOMigration, until_end: bool) -> bytes:
    """Read the saving fd: to ENOMSG (pre-copy) or to the end (STOP_COPY)."""
    out = bytearray()
    while True:
        chunk = mig.read_chunk()
        if chunk is None:
            if until_end:
                raise DeviceError("ENOMSG while reading STOP_COPY data", mig.name)
            break
        if not chunk:
            break
        out += chunk
    return bytes(out)


def open_device(
    name: str,
    profile: Profile,
    device_spec: str | None,
    *,
    key: str,
    gate: ArcGate | None = None,
    seed: int = 0,
    backing: mmap.mmap | None = None,
) -> DeviceBackend:
    """Open a device where it will be driven (a worker, or in-process).

    ``device_spec`` ``None`` (or ``emulated:...``, already resolved into
    ``profile`` by the caller) builds the emulated VF; anything else goes
    to :func:`mpvfio.devices.registry.open_backend`, and a real device not
    in RUNNING is reset, as QEMU resets devices when it creates a machine.
    """
    if device_spec is None or parse_spec(device_spec)[0] == "emulated":
        return EmulatedDevice(
            name, profile, key=key, gate=gate, seed=seed, backing=backing
        )
    backend = open_backend(device_spec, name=name)
    try:
        if backend.get_state() != MigState.RUNNING:
            # left elsewhere by its last user (a finished migration leaves a
            # source VF in STOP): QEMU resets a device when the machine is
            # created, so a fresh VM starts from RUNNING (R4.2)
            backend.reset()
    except BaseException:
        backend.close()
        raise
    return backend


def _hook(device: DeviceBackend, what: str) -> Any:
    """An emulated-only operation of ``device``, or a clear UsageError."""
    fn = getattr(device, what, None)
    if fn is None:
        raise UsageError(
            f"{what} needs a device that offers it (the emulated VF); "
            f"{type(device).__name__} {device.name!r} does not"
        )
    return fn


def reset_device(mig: VFIOMigration, device: DeviceBackend) -> None:
    """VFIO_DEVICE_RESET and the cached RUNNING (with its event, R5.1)."""
    mig.close_data_fd()
    device.reset()
    mig._set_cached(MigState.RUNNING)


#: The device operations the parent may run (in a worker or in-process).
CALLS = (
    "save_setup",
    "precopy_info",
    "save_complete",
    "save_cleanup",
    "load_setup",
    "load_cleanup",
    "write_all",
    "drain",
    "set_state",
    "checksum",
    "device_state",
    "data_size",
    "reset",
    "read_chunk",
    "arm_fault",
    "check_resume",
)


def call_device(
    mig: VFIOMigration, device: DeviceBackend, method: str, args: tuple[Any, ...]
) -> Any:
    """Run one named device operation (the same table in both places)."""
    if method == "save_setup":
        return mig.save_setup()
    if method == "precopy_info":
        return mig.precopy_info()
    if method == "save_complete":
        return mig.save_complete()
    if method == "save_cleanup":
        return mig.save_cleanup()
    if method == "load_setup":
        return mig.load_setup()
    if method == "load_cleanup":
        mig.close_data_fd()
        return None
    if method == "write_all":
        return mig.write_chunk(*args)
    if method == "drain":
        return drain(mig, *args)
    if method == "set_state":
        return mig.set_state_or_reset(MigState(args[0]))
    if method == "checksum":
        return _hook(device, "checksum")()
    if method == "device_state":
        return device.get_state()
    if method == "data_size":
        return device.data_size()
    if method == "reset":
        return reset_device(mig, device)
    if method == "read_chunk":
        return mig.read_chunk(*args)
    if method == "arm_fault":
        _hook(device, "arm_fault")(*args)
        return None
    if method == "check_resume":
        check = getattr(device, "check_resume", None)
        if check is None:  # a real device validates in RESUMING -> STOP
            return None
        return check(mig.data_fd)
    raise MpvfioError(f"unknown device operation {method!r}; valid: {', '.join(CALLS)}")


def _become_child(parent_pid: int) -> None:
    """Die with the parent (PR_SET_PDEATHSIG), leave Ctrl-C to the parent."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:  # the parent died before prctl
        os._exit(EXIT_ORPHANED)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        faulthandler.enable()
    except (OSError, ValueError):  # sys.stderr without a real fd (embedding)
        faulthandler.enable(file=2)


class _Worker:
    def __init__(self, spec: WorkerSpec, cmd: Any, ev: Any) -> None:
        if spec.slot is None:
            raise MpvfioError("a worker needs its shared-memory slot (WorkerSpec.slot)")
        self.spec = spec
        self.cmd = cmd
        self.ev = ev
        # the PF concurrency gate: a named semaphore the parent created
        self.gate = posixobj.NamedLock(spec.gate_name) if spec.gate_name else None
        self.barrier = ProcessBarrier.attach(spec.barrier) if spec.barrier else None
        self.slot: WorkerSlot = WorkerSlot.attach(spec.slot)
        self.device = open_device(
            spec.name,
            spec.profile,
            spec.device_spec,
            key=spec.key,
            gate=self.gate,
            seed=spec.seed,
            backing=spec.backing,
        )
        self.mig = VFIOMigration(
            self.device,
            spec.name,
            spec.qom_path,
            emit=self.emit,
            props=spec.props,
        )
        self.fault: tuple[str, str] | None = None
        self._after_reply: float | None = None  # barrier timeout (phase)
        self._errors_seen = 0
        self._notes: list[str] = []
        mv = self.slot.mv
        self.seq = int(mv[sl.CMD_SEQ])  # commands up to here are not ours
        mv[sl.PID] = os.getpid()
        if spec.cpu is not None:
            try:
                os.sched_setaffinity(0, {spec.cpu})
            except OSError:  # the CPU went away (hotplug, cpuset): anywhere
                pass

    def close(self) -> None:
        if self.barrier is not None:
            self.barrier.close()
        if self.gate is not None:
            self.gate.close()
        self.slot.close()

    # ------------------------------------------------------------- channel
    def emit(self, event: Event) -> None:
        self.ev.send_bytes(pickle.dumps(event, _PICKLE))
        mv = self.slot.mv
        mv[sl.EV_COUNT] += 1  # after the write: the parent reads only whole ones

    def _status(self) -> Status:
        new_errors = self.mig.errors[self._errors_seen :]
        self._errors_seen = len(self.mig.errors)
        status = Status(
            self.mig.device_state,
            self.mig.data_fd != -1,
            list(new_errors),
            self.device.take_arcs(),
            self._notes,
        )
        self._notes = []
        return status

    def reply(self, ok: bool, value: Any, tb: str = "") -> None:
        self._send_reply(ok, value, tb, self._status())

    def _send_reply(self, ok: bool, value: Any, tb: str, status: Status) -> None:
        msg = ("ok", value, status) if ok else ("err", value, tb, status)
        try:
            data = pickle.dumps(msg, _PICKLE)
        except Exception as exc:  # noqa: BLE001 - an unpicklable value must not kill us
            data = pickle.dumps(
                ("err", MpvfioError(f"unpicklable reply: {exc}"), "", status), _PICKLE
            )
        self.cmd.send_bytes(data)

    # -------------------------------------------------------------- faults
    def maybe_fault(self, point: str) -> None:
        if self.fault is None or self.fault[0] != point:
            return
        kind = self.fault[1]
        self.fault = None
        if kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif kind == "exit":
            os._exit(7)
        elif kind == "segv":
            faulthandler.disable()
            ctypes.string_at(0)
        elif kind == "hang":
            time.sleep(3600)

    # ------------------------------------------------------------ commands
    def transition(
        self,
        running: bool,
        runstate: str | RunState,
        use_barrier: bool,
        barrier_timeout: float,
    ) -> None:
        """Phase 1, barrier, phase 2 (or the main step alone without P2P)."""
        rs = runstate if isinstance(runstate, RunState) else RunState(runstate)
        if self.fault is not None:
            self.maybe_fault("before")
        if use_barrier:
            try:
                self.mig.vmstate_change_prepare(running, rs)
            except BaseException:
                # (a failed reset) still arrive: the others must not wait for us
                self._arrive(barrier_timeout)
                raise
            if self.fault is not None:
                self.maybe_fault("phase1")
            self._arrive(barrier_timeout)
        self.mig.vmstate_change(running, rs)
        if self.fault is not None:
            self.maybe_fault("phase2")
            self.maybe_fault("join")

    def _arrive(self, barrier_timeout: float) -> None:
        """Phase 1 is done: wait for the other parties.

        The slot's ``ARRIVED`` word is written under the barrier's lock as
        this party is counted, so the parent can tell a party that died
        after it arrived (the crossing still completes) from one that died
        before (the parent crosses without it, ``ProcessBarrier.leave``).
        """
        if self.fault is not None:
            self.maybe_fault("barrier")
        barrier = self.barrier
        assert barrier is not None
        mv, seq = self.slot.mv, self.seq

        def mark() -> None:
            mv[sl.ARRIVED] = seq

        try:
            idx = barrier.wait(barrier_timeout, mark)
        except BarrierError as exc:
            # Broken by a party's own timeout or an abort after a lock
            # timeout (the parent removes failed parties without breaking).
            self._notes.append(f"barrier broken ({exc}); went on to phase 2")
            posixobj.release(self.slot.crossed)  # the parent looks at once
        else:
            if idx == barrier.parties - 1:
                # the last arriver, after it released the others: now the
                # parent's P2P interlock may wake (and take this CPU)
                posixobj.release(self.slot.crossed)

    def fast_transition(self) -> None:
        """The slot's transition command; the result in the slot if it fits.

        Errors, notes, an exception or too many arcs: ``RES_PIPE``, and the
        full reply follows on the command pipe *after* the done post (a big
        reply must not fill the pipe while the parent waits for the post).
        """
        mv = self.slot.mv
        seq = self.seq
        ok = True
        value: Any = None
        tb = ""
        try:
            self.transition(
                bool(mv[sl.CMD_RUNNING]),
                RUNSTATES[mv[sl.CMD_RUNSTATE]],
                bool(mv[sl.CMD_BARRIER]),
                mv[sl.CMD_TIMEOUT_US] / 1e6,
            )
        except Exception as exc:  # noqa: BLE001 - sent back to the parent
            ok, value, tb = False, exc, traceback.format_exc()
        mig = self.mig
        arcs = self.device.take_arcs()
        if (
            ok
            and not self._notes
            and len(mig.errors) == self._errors_seen
            and len(arcs) <= sl.MAX_ARCS
        ):
            mv[sl.RES_KIND] = sl.RES_FAST
            mv[sl.RES_STATE] = int(mig.device_state)
            mv[sl.RES_DATA_FD] = mig.data_fd != -1
            mv[sl.RES_NARCS] = len(arcs)
            i = sl.ARCS
            for a in arcs:
                mv[i] = a.src
                mv[i + 1] = a.dst
                mv[i + 2] = a.start_ns
                mv[i + 3] = a.end_ns
                mv[i + 4] = a.ok
                mv[i + 5] = a.err
                i += sl.ARC_FIELDS
            mv[sl.DONE_SEQ] = seq
            self._done()
            return
        status = self._status()
        status.arcs[:0] = arcs
        mv[sl.RES_KIND] = sl.RES_PIPE
        mv[sl.DONE_SEQ] = seq
        self._done()
        self._send_reply(ok, value, tb, status)

    def _done(self) -> None:
        """Post this slot's done; the last of the round also posts alldone.

        ``outstanding`` holds one token per running transition (the parent
        posts it before ``go``).  Taking ours *before* the done post means a
        joined transition never takes a token of the next notification; a
        late alldone token only costs the parent a spurious wake-up.
        """
        slot = self.slot
        posixobj.try_acquire(slot.outstanding)
        last = slot.outstanding.value == 0
        posixobj.release(slot.done)
        if last:
            posixobj.release(slot.alldone)

    def phase(
        self,
        which: str,
        running: bool,
        runstate: str,
        use_barrier: bool = False,
        barrier_timeout: float = 0.0,
    ) -> None:
        """One handler step, synchronously (x-migration-parallel-states=off).

        With ``use_barrier`` (a P2P device's prepare step) the worker arrives
        at the barrier right after its reply, so the parent's walk goes on
        while the parallel workers wait for this device to be in P2P.
        """
        rs = RunState(runstate)
        if which == "prepare":
            self.maybe_fault("before")
            if use_barrier:
                self._after_reply = barrier_timeout
            self.mig.vmstate_change_prepare(running, rs)
            self.maybe_fault("phase1")
        else:
            self.mig.vmstate_change(running, rs)
            self.maybe_fault("phase2")
            self.maybe_fault("join")

    def call(self, method: str, args: tuple[Any, ...]) -> Any:
        if method == "ping":
            return os.getpid()
        return call_device(self.mig, self.device, method, args)

    def call_fds(self, method: str, args: tuple[Any, ...], nfds: int) -> Any:
        """Receive ``nfds`` descriptors (ours from now on), run the call."""
        from multiprocess.reduction import recv_handle

        fds: list[int] = []
        try:
            for _ in range(nfds):
                fds.append(recv_handle(self.cmd))
        except BaseException:
            for fd in fds:
                try:
                    os.close(fd)
                except OSError:
                    pass
            raise
        from mpvfio.workers.migration import worker_call

        return worker_call(self, method, args, fds)

    def _wait_command(self) -> int | None:
        """Block until the parent posts ``go``; the op, or ``None`` (stray)."""
        go = self.slot.go
        mv = self.slot.mv
        while not posixobj.acquire(go, IDLE_CHECK_S):
            if os.getppid() != self.spec.parent_pid:
                return -1
        seq = int(mv[sl.CMD_SEQ])
        if seq == self.seq:
            return None  # a stray token (drained by the parent normally)
        self.seq = seq
        return int(mv[sl.CMD_OP])

    def loop(self) -> int:
        self.reply(True, ("ready", os.getpid(), int(self.mig.flags)))
        while True:
            op = self._wait_command()
            if op is None:
                continue
            if op == -1:
                return EXIT_ORPHANED
            if op == sl.OP_TRANSITION:
                self.fast_transition()
                continue
            try:
                msg = pickle.loads(self.cmd.recv_bytes())
            except (EOFError, OSError):
                return EXIT_ORPHANED
            except Exception:  # noqa: BLE001 - any undecodable command
                return EXIT_BAD_COMMAND
            op_name = msg[0]
            if op_name == "exit":
                self.device.close()
                self.reply(True, None)
                return 0
            try:
                if op_name == "transition":
                    self.transition(*msg[1:])
                    value: Any = None
                elif op_name == "phase":
                    self.phase(*msg[1:])
                    value = None
                elif op_name == "fault":
                    self.fault = (msg[1], msg[2])
                    value = None
                elif op_name == "call":
                    value = self.call(msg[1], tuple(msg[2]))
                elif op_name == "call_fds":
                    value = self.call_fds(msg[1], tuple(msg[2]), int(msg[3]))
                else:
                    raise MpvfioError(f"unknown worker command {op_name!r}")
            except Exception as exc:  # noqa: BLE001 - sent back to the parent
                self.reply(False, exc, traceback.format_exc())
            else:
                self.reply(True, value)
            if self._after_reply is not None:
                timeout, self._after_reply = self._after_reply, None
                self._arrive(timeout)


def worker_main(spec: WorkerSpec, cmd: Any, ev: Any) -> None:
    """Entry point of a worker process (the target of the pool's Process)."""
    _become_child(spec.parent_pid)
    try:
        worker = _Worker(spec, cmd, ev)
    except Exception as exc:  # noqa: BLE001 - sent back to the parent
        cmd.send_bytes(pickle.dumps(("err", exc, traceback.format_exc(), None)))
        sys.exit(EXIT_BAD_COMMAND)
    code = worker.loop()
    worker.close()
    sys.exit(code)
