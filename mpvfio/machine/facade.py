"""The machine: a VM with VFIO devices and the parallel switchover engine.

Layer 3 (orchestration).  A :class:`Machine` owns a qdev tree, the VM
run-state machine and its prioritized handler list (:mod:`mpvfio.qdev`,
:mod:`mpvfio.vmstate`), and one :class:`VFIODevice` per VF.  The **parent
process runs the handler list**; how a VFIO device's handlers act depends on
the mode:

``serial``   QEMU as it is (R4.4): one entry at the device's qdev depth,
             ``prepare_cb`` (P2P devices) and ``cb`` run the transitions
             synchronously.  The baseline every other mode is judged by.
``threads``  the seed series (seeds/000 PATCH 2/2): two entries at adj -1 and
             +1 with the first/second indirection; "first" launches a thread
             for the transition, "second" joins it, in the prepare walk and
             again in the main walk.
``workers``  the design card: one worker **process** per device holds the
             device fd.  Two entries at adj -1/+1 with the same indirection::

               prepare walk   first-stage entry  -> dispatch the worker
                              (phase 1, barrier, phase 2; no waiting)
               between walks  P2P interlock: wait for the barrier to fill,
                              flush every phase-1 event
               main walk      second-stage entry -> join the worker

             so every prepare step completes before any main callback (O1),
             other handlers of the same depth run while phase 2 is in flight,
             and every device is in its final state when notify returns (O4).
             A device without P2P dispatches in its first-stage main entry
             and never waits at the barrier.  ``relaxed_interlock=True`` skips
             the between-walks wait (the reviewer's proposal): non-VFIO main
             callbacks may then run while devices are still entering P2P.

             The hot path costs no pipe message: a dispatch writes the
             command into the device's shared-memory slot and posts its
             worker's start semaphore; the worker answers with result words
             in the slot and a done post (``mpvfio.workers.slots``).  The
             parent sleeps once for the barrier to fill and once for the
             round's last worker to finish; pipes carry device calls,
             errors, notes and events.  Workers are spread over the CPUs
             (``spread_workers``).  An event pump thread
             (:mod:`mpvfio.workers.pump`) delivers worker events as they
             are written, so a prepare event reaches a QMP client while
             its slow transition still runs; the interlock and the joins
             flush it, so a notification returns with its events out.

A device with ``x-migration-parallel-states`` off (``MigrationProps``) keeps
the serial registration in any mode (in workers mode a P2P one is still a
barrier party, so no parallel device leaves P2P before it entered P2P).
Failures follow QEMU (O6): a failed transition resets the device, the walk
goes on, the error is recorded on the device and in :attr:`Machine.errors`.
A worker that dies or hangs breaks the barrier for the others, is reported by
name with its exit code or signal, and its device is recovered by a fresh
worker (reset to RUNNING).
"""

from __future__ import annotations

import collections
import enum
import errno
import functools
import itertools
import logging
import mmap
import os
import platform
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

from mpvfio.devices.base import ArcRecord, DeviceBackend, ThreadGate
from mpvfio.devices.emulated import new_backing
from mpvfio.devices.profiles import Profile, get_profile
from mpvfio.devices.registry import device_identity, parse_spec
from mpvfio.errors import (
    DeviceError,
    MpvfioError,
    StateError,
    UsageError,
    WorkerCrashed,
    WorkerError,
    WorkerTimeout,
)
from mpvfio.events import Event, EventBus
from mpvfio.ipc import posixobj
from mpvfio.ipc.barrier import ProcessBarrier
from mpvfio.ipc.limits import check_limits
from mpvfio.ipc.names import NameRegistry, sweep_stale
from mpvfio.qdev import VM, Bus, Device
from mpvfio.uapi.vfio import MigFlag, MigState
from mpvfio.vfiomig import MigrationProps, VFIOMigration, check_multiple_devices
from mpvfio.vmstate import RunState, VMChangeStateEntry
from mpvfio.workers.device import (
    RUNSTATES,
    Status,
    WorkerSpec,
    call_device,
    open_device,
)
from mpvfio.workers.pool import (
    WATCH_SLICE_S,
    SentinelWatch,
    WorkerHandle,
    start_workers,
)
from mpvfio.workers.pump import EventPump
from mpvfio.workers.slots import SlotTable

__all__ = ["Machine", "Mode", "NotifyReport", "VFIODevice", "make_config"]

_MACHINE_IDS = itertools.count()
_RUNSTATE_INDEX = {rs: i for i, rs in enumerate(RUNSTATES)}
#: How many notification reports a machine keeps (Machine.reports).
REPORTS_KEPT = 64
#: PCI config space size the emulated VF's config state carries.
CONFIG_SIZE = 256


def make_config(key: str) -> bytes:
    """The emulated VF's PCI config space (QEMU saves its own copy, R8.8).

    Vendor 0x15b3 / device 0x101e (a ConnectX-7 VF) at offset 0, the rest
    deterministic per device key, so a target that loads it can tell.
    """
    import hashlib

    body = hashlib.shake_128(f"config:{key}".encode()).digest(CONFIG_SIZE - 4)
    return b"\xb3\x15\x1e\x10" + body


_log = logging.getLogger(__name__)


class Mode(enum.StrEnum):
    """How VFIO devices take their transitions (module docstring)."""

    SERIAL = "serial"
    THREADS = "threads"
    WORKERS = "workers"


@dataclass
class NotifyReport:
    """What one vm_stop / vm_start did: wall time and per-device arcs."""

    running: bool
    state: RunState
    start_ns: int
    end_ns: int
    arcs: dict[str, list[ArcRecord]] = field(default_factory=dict)
    errors: list[MpvfioError] = field(default_factory=list)

    @property
    def ms(self) -> float:
        """Wall time of the notification (the handlers' share of downtime)."""
        return (self.end_ns - self.start_ns) / 1e6

    def ideal_ms(self) -> float:
        """The slowest device's summed arc time (perfect parallelism)."""
        return max(
            (sum(a.ms for a in arcs) for arcs in self.arcs.values()), default=0.0
        )


class VFIODevice:
    """The parent's handle of one VFIO device of a :class:`Machine`."""

    def __init__(
        self,
        machine: Machine,
        qdev: Device,
        profile: Profile,
        props: MigrationProps,
        pf: str,
        key: str,
        spec: str | None = None,
    ) -> None:
        self.machine = machine
        self.qdev = qdev
        self.name = qdev.id
        self.qom_path = machine.vm.tree.qom_path(qdev)
        self.profile = profile
        self.props = props
        self.pf = pf
        self.key = key
        #: ``vfio-user:PATH`` / ``vfio:PATH``; ``None`` for the emulated VF
        self.spec = spec
        #: which backend drives it: ``emulated``, ``vfio-user`` or ``vfio``
        self.backend = parse_spec(spec)[0] if spec else "emulated"
        #: The device's config state (PCI config space), owned by the VM
        #: side like QEMU's vfio-pci model; migrated after the data (R8.8).
        self.config = make_config(key)
        # an emulated VF's flags are its profile's; a real device's are read
        # from it when it is opened (start())
        self.flags = MigFlag(profile.flags)
        self._p2p = bool(self.flags & MigFlag.P2P)
        self.index = len(machine.devices)  # its slot in workers mode
        self.errors: list[MpvfioError] = []
        self.arcs: list[ArcRecord] = []
        self.entries: list[VMChangeStateEntry] = []
        # in-process (serial / threads)
        self.mig: VFIOMigration | None = None
        self.device: DeviceBackend | None = None
        self._thread: threading.Thread | None = None
        # workers
        self.worker: WorkerHandle | None = None
        self.backing: mmap.mmap | None = None
        self._state = MigState.RUNNING
        self._has_data_fd = False

    def __repr__(self) -> str:
        return f"<VFIODevice {self.name} {self.state.name} ({self.mode})>"

    @property
    def mode(self) -> Mode:
        """This device's effective mode (serial when parallel states are off)."""
        if not self.props.parallel_states:
            return Mode.SERIAL if self.machine.mode != Mode.WORKERS else Mode.WORKERS
        return self.machine.mode

    @property
    def parallel(self) -> bool:
        """Whether the device takes part in parallel transitions."""
        return self.props.parallel_states and self.machine.mode != Mode.SERIAL

    @property
    def has_p2p(self) -> bool:
        """Whether the device has a prepare (P2P) step."""
        return self._p2p

    @property
    def state(self) -> MigState:
        """QEMU's cached migration state of the device."""
        if self.mig is not None:
            return self.mig.device_state
        return self._state

    def _opened(self, flags: MigFlag) -> None:
        """The device is open: its migration flags are now known."""
        self.flags = MigFlag(flags)
        self._p2p = bool(self.flags & MigFlag.P2P)

    # -------------------------------------------------------------- status
    def _apply(self, status: Status | None) -> None:
        if status is None:
            return
        self._state = status.state
        self._has_data_fd = status.has_data_fd
        for err in status.errors:
            self._error(err)
        self.arcs.extend(status.arcs)
        for note in status.notes:
            _log.info("%s: %s", self.name, note)

    def _error(self, err: MpvfioError) -> None:
        self.errors.append(err)
        self.machine.errors.append(err)

    def _collect_local(self) -> None:
        if self.device is not None:
            self.arcs.extend(self.device.take_arcs())

    # ------------------------------------------------------ device calls
    def call(self, method: str, *args: Any, timeout: float | None = None) -> Any:
        """Run one device operation where the device lives.

        Operations (see ``mpvfio.workers.device.CALLS``): ``save_setup``,
        ``precopy_info``, ``drain`` (bool until_end), ``save_complete``,
        ``save_cleanup``, ``load_setup``, ``write_all`` (bytes),
        ``load_cleanup``, ``set_state``, ``checksum``, ``device_state``,
        ``data_size``, ``reset``.
        """
        if self.worker is None:
            if self.mig is None or self.device is None:
                raise StateError(f"device {self.name} is not realized (start())")
            value = call_device(self.mig, self.device, method, args)
            self._collect_local()
            return value
        w = self.worker
        deadline = time.monotonic() + (timeout or self.machine.call_timeout)
        try:
            w.send("call", method, args)
            value, status = w.wait_reply(deadline)
        except (WorkerCrashed, WorkerTimeout) as exc:
            self._error(exc)
            self.machine._recover(self, exc)
            raise
        except MpvfioError as exc:
            self._apply(getattr(exc, "status", None))
            raise
        finally:
            self.machine._flush_events(w)
        self._apply(status)
        return value

    def call_fds(
        self, method: str, fds: list[int], *args: Any, timeout: float | None = None
    ) -> Any:
        """Run one worker operation that needs file descriptors (workers mode).

        The worker gets its own copies of ``fds`` (``SCM_RIGHTS``; the
        caller's stay open) and runs
        ``mpvfio.workers.migration.worker_call(worker, method, args, fds)``;
        its return value comes back like :meth:`call`'s.

        :raise UsageError: not in workers mode (no worker to pass them to).
        """
        w = self.worker
        if w is None:
            raise UsageError(
                f"call_fds({method!r}) needs workers mode; device {self.name} "
                f"runs in {self.mode} mode"
            )
        deadline = time.monotonic() + (timeout or self.machine.call_timeout)
        try:
            w.send_fds(method, fds, args)
            value, status = w.wait_reply(deadline)
        except (WorkerCrashed, WorkerTimeout) as exc:
            self._error(exc)
            self.machine._recover(self, exc)
            raise
        except MpvfioError as exc:
            self._apply(getattr(exc, "status", None))
            raise
        finally:
            self.machine._flush_events(w)
        self._apply(status)
        return value

    def checksum(self) -> str:
        """SHA-256 of the device's state bytes."""
        return str(self.call("checksum"))

    def load_config(self, config: bytes) -> None:
        """Install a migrated config state (the target's config load).

        :raise DeviceError: the config is not this device model's (wrong
            size or vendor/device id): the stream came from another device.
        """
        if len(config) != len(self.config) or config[:4] != self.config[:4]:
            raise DeviceError(
                f"config state rejected: {len(config)} bytes, id "
                f"{config[:4].hex()} (this VF: {len(self.config)} bytes, id "
                f"{self.config[:4].hex()})",
                self.name,
                errno.EINVAL,
            )
        self.config = bytes(config)


def _no_result(
    fn: Callable[[bool, RunState], int], d: VFIODevice
) -> Callable[[bool, RunState], None]:
    """A VFIO handler as QEMU registers it: a ``cb``, not a ``cb_ret`` (R2.5).

    A device error it raises (a reset that failed after a failed arc: QEMU's
    hw_error) is recorded on the device, as a worker reports it at the join.
    """

    def cb(running: bool, state: RunState) -> None:
        try:
            fn(running, state)
        except MpvfioError as exc:
            d._error(exc)

    return cb


class _Round:
    """One notification in workers mode: who was dispatched, the barrier."""

    def __init__(self, running: bool, state: RunState, deadline: float) -> None:
        self.running = running
        self.state = state
        self.runstate = _RUNSTATE_INDEX[state]
        self.deadline = deadline
        self.parties: list[VFIODevice] = []
        self.dispatched: set[str] = set()
        self.failed: dict[str, MpvfioError] = {}
        self.left: set[str] = set()  # parties the barrier crosses without
        self.filled = False
        self.barrier_ready = False
        self.barrier_gen = 0  # the barrier's generation when armed


class Machine:
    """A VM with VFIO devices (see the module docstring).

    :param mode: ``workers`` (default), ``threads`` or ``serial``.
    :param relaxed_interlock: workers mode: let main callbacks run before the
        barrier fills (VFIO joins still wait for it).
    :param transition_timeout: seconds a notification's worker transitions
        may take before a worker counts as hung (killed, device recovered).
    :param call_timeout: deadline of one device operation in a worker.
    :param seed: seeds the devices' latency jitter.
    :param events: an event bus to publish on (default: a new one).
    :param name: the machine's name; device state keys are
        ``"<name>/<device>"``, so a target's VFs do not start out holding the
        source's bytes (default: unique per machine).
    :param arch: the guest architecture (``x-migration-load-config-after-iter``
        AUTO is on for aarch64); default: this host's.
    :param spread_workers: workers mode: pin worker ``i`` to CPU ``i mod n`` of
        the CPUs this process may run on, so a notification's workers run on
        every core.  Left alone, the scheduler tends to queue the workers the
        parent wakes behind each other on one core while the other one idles
        (measured on 2 cores: the instant profile's stop + start took 1.4x
        as long).  ``False``: no pinning.
    """

    def __init__(
        self,
        mode: Mode | str = Mode.WORKERS,
        *,
        name: str | None = None,
        arch: str | None = None,
        relaxed_interlock: bool = False,
        transition_timeout: float = 30.0,
        call_timeout: float = 600.0,
        seed: int = 0,
        events: EventBus | None = None,
        spread_workers: bool = True,
    ) -> None:
        try:
            self.mode = Mode(mode)
        except ValueError:
            raise UsageError(
                f"unknown mode {mode!r}; valid: {', '.join(m.value for m in Mode)}"
            ) from None
        if transition_timeout <= 0 or call_timeout <= 0:
            raise UsageError("timeouts must be > 0 seconds")
        self.relaxed_interlock = relaxed_interlock
        self.transition_timeout = transition_timeout
        self.call_timeout = call_timeout
        self.seed = seed
        self.spread_workers = spread_workers
        self._cpus: list[int] = []
        self.name = name or f"vm-{_getpid()}-{next(_MACHINE_IDS)}"
        self.arch = arch or platform.machine()
        self.vm = VM(events=events)
        self.events: EventBus = self.vm.events
        self.root_bus: Bus = self.vm.tree.add_pci_host()
        self.devices: list[VFIODevice] = []
        self.errors: list[MpvfioError] = []
        #: the latest notifications' reports (bounded: a VM that runs for
        #: days must not keep every one)
        self.reports: collections.deque[NotifyReport] = collections.deque(
            maxlen=REPORTS_KEPT
        )
        self.registry: NameRegistry | None = None
        self.barrier: ProcessBarrier | None = None
        self.slots: SlotTable | None = None
        self._watch = SentinelWatch()
        self._gates: dict[str, Any] = {}
        self._pump: EventPump | None = None
        self._round: _Round | None = None
        self._started = False
        self._closed = False
        self._hook = _WorkersHook(self)

    # -------------------------------------------------------------- build
    def add_vfio_device(
        self,
        name: str | None = None,
        profile: Profile | str | None = None,
        *,
        spec: str | None = None,
        props: MigrationProps | None = None,
        pf: str = "pf0",
        bus: Bus | None = None,
        key: str | None = None,
    ) -> VFIODevice:
        """Add a VF (before :meth:`start`): emulated, or a real device's spec.

        :param name: qdev id (default ``vfN``).
        :param profile: an emulated VF's :class:`Profile` or profile name /
            JSON path (default ``instant``).  With a ``vfio-user:``/``vfio:``
            ``spec`` it only says what the device is expected to behave
            like (the benchmarks' ideal); default: a profile named after
            the backend.
        :param spec: a device spec (:mod:`mpvfio.devices.registry`):
            ``emulated:PROFILE`` (same as ``profile=``),
            ``vfio-user:SOCKET_PATH`` or ``vfio:/dev/vfio/devices/vfioN``.
            The device is opened where it is driven: in its worker in
            workers mode, in this process otherwise; its migration flags
            are read from it then.
        :param props: migration properties (events, parallel states).
        :param pf: the PF it belongs to (shares its concurrency limit).
        :param bus: where to plug it (default: behind its own root port,
            qdev depth 3, as the seed's VFs are).
        :param key: what makes its state unique (default: the name).
        """
        if self._started:
            raise StateError("devices are added before Machine.start()")
        backend_spec: str | None = None
        if spec is not None:
            scheme, rest = parse_spec(spec)
            if scheme == "emulated":
                if profile is not None:
                    raise UsageError(
                        f"device spec {spec!r} names its profile: do not pass "
                        "profile= as well"
                    )
                profile = rest
            else:
                ident = device_identity(spec)
                for other in self.devices:
                    if other.spec is not None and device_identity(other.spec) == ident:
                        raise UsageError(
                            f"{spec} is already {other.name} of this VM: one "
                            "device cannot be two VFs"
                        )
                backend_spec = spec
                if profile is None:
                    profile = Profile(name=scheme)
        if profile is None:
            profile = "instant"
        prof = get_profile(profile) if isinstance(profile, str) else profile
        name = name or f"vf{len(self.devices)}"
        if bus is None:
            bus = self.vm.tree.add_root_port(f"rp-{name}", self.root_bus)
        qdev = self.vm.tree.add_device(name, bus)
        dev = VFIODevice(
            self,
            qdev,
            prof,
            props or MigrationProps(),
            pf,
            key or f"{self.name}/{name}",
            backend_spec,
        )
        self.devices.append(dev)
        return dev

    def device(self, name: str) -> VFIODevice:
        """The VFIO device called ``name``."""
        for d in self.devices:
            if d.name == name:
                return d
        raise UsageError(f"no VFIO device {name!r}")

    def migration_blockers(self) -> list[str]:
        """Why this VM cannot migrate (QEMU.md R4.6); empty when it can."""
        try:
            check_multiple_devices(
                [d.flags for d in self.devices], [d.name for d in self.devices]
            )
        except MpvfioError as exc:
            return [str(exc)]
        return []

    # -------------------------------------------------------------- start
    def start(self, *, run: bool = True, runstate: RunState | None = None) -> None:
        """Realize the devices (fork the workers), register the handlers.

        :param run: then ``vm_start()`` (the devices take their start arcs,
            as QEMU's first vm_start does).
        :param runstate: with ``run=False``, the run state to stay in (e.g.
            ``inmigrate`` for a target; default ``prelaunch``).
        """
        if self._started:
            raise StateError("Machine.start() was already called")
        if not self.devices:
            raise UsageError("a machine needs at least one VFIO device")
        self._started = True
        try:
            if self.mode == Mode.WORKERS:
                self._start_workers()
            else:
                self._start_local()
            for d in self.devices:
                self._register(d)
            self.vm.handlers.add_notify_hook(self._hook)
        except BaseException:
            self.close()
            raise
        if run:
            self.vm_start()
        elif runstate is not None:
            self.vm.runstate_set(runstate)

    def _start_local(self) -> None:
        gates: dict[str, ThreadGate] = {}
        for d in self.devices:
            gate = None
            if d.spec is None and d.profile.pf_concurrency:
                gate = gates.setdefault(d.pf, ThreadGate(d.profile.pf_concurrency))
            d.device = open_device(
                d.name, d.profile, d.spec, key=d.key, gate=gate, seed=self.seed
            )
            d._opened(d.device.migration_flags())
            d.mig = VFIOMigration(
                d.device,
                d.name,
                d.qom_path,
                emit=self.events.emit,
                props=d.props,
                on_error=d._error,
            )

    def _start_workers(self) -> None:
        sweep_stale()
        # a start and a done semaphore per worker, a PF gate each at most, and
        # the slot table's three shared ones (outstanding, alldone, crossed)
        check_limits(len(self.devices), sems_per_worker=4, fds_per_worker=4)
        self.registry = NameRegistry()
        # Serial (parallel-states off) P2P devices are parties too (_sync_phase);
        # a real device may turn out to have P2P once its worker opened it.
        n_p2p = sum(1 for d in self.devices if d.has_p2p or d.spec is not None)
        self.barrier = ProcessBarrier.create(
            self.registry.prefix, self.registry, max(1, n_p2p)
        )
        limits: dict[str, int] = {}
        for d in self.devices:
            if d.spec is None and d.profile.pf_concurrency:
                limits[d.pf] = min(limits.get(d.pf, 1 << 30), d.profile.pf_concurrency)
        for pf, limit in limits.items():
            name = self.registry.name(f"pf-{pf}")
            self._gates[pf] = posixobj.create_semaphore(name, limit)
            self.registry.add(name, "sem")
        self.slots = SlotTable(self.registry, len(self.devices))
        if self.spread_workers:
            cpus = sorted(os.sched_getaffinity(0))
            self._cpus = cpus if len(cpus) > 1 else []
        for d in self.devices:
            if d.spec is None:  # the emulated state outlives its worker
                d.backing = new_backing(d.profile.state_size, d.key)
            d.worker = self._handle(d)
        start_workers([d.worker for d in self.devices if d.worker is not None])
        for d in self.devices:
            if d.worker is not None:
                d._opened(MigFlag(d.worker.flags))
        self._pump = EventPump(self._worker_handles, self._deliver)
        self._pump.start()

    def _worker_handles(self) -> list[WorkerHandle]:
        return [d.worker for d in self.devices if d.worker is not None]

    def _handle(self, d: VFIODevice) -> WorkerHandle:
        assert self.slots is not None
        return WorkerHandle(self._spec(d), slot=self.slots[d.index], watch=self._watch)

    def _spec(self, d: VFIODevice) -> WorkerSpec:
        assert self.barrier is not None
        assert self.registry is not None
        assert self.slots is not None
        gate = None
        if d.pf in self._gates:
            gate = self.registry.name(f"pf-{d.pf}")
        return WorkerSpec(
            name=d.name,
            qom_path=d.qom_path,
            profile=d.profile,
            key=d.key,
            props=d.props,
            parent_pid=_getpid(),
            seed=self.seed,
            backing=d.backing,
            barrier=self.barrier.spec,
            gate_name=gate,
            slot=self.slots[d.index].spec,
            cpu=self._cpus[d.index % len(self._cpus)] if self._cpus else None,
            device_spec=d.spec,
        )

    # ------------------------------------------------------ registration
    def _register(self, d: VFIODevice) -> None:
        add = self.vm.qdev_add_vm_change_state_handler
        if not d.parallel:
            if d.mig is not None:
                mig = d.mig
                d.entries.append(
                    add(
                        d.qdev,
                        cb=_no_result(mig.vmstate_change, d),
                        prepare_cb=(
                            _no_result(mig.vmstate_change_prepare, d)
                            if d.has_p2p
                            else None
                        ),
                        name=f"{d.name}:vfio",
                    )
                )
            else:

                def sync(which: str) -> Callable[[bool, RunState], None]:
                    return lambda r, s: self._sync_phase(d, which, r, s)

                d.entries.append(
                    add(
                        d.qdev,
                        cb=sync("main"),
                        prepare_cb=sync("prepare") if d.has_p2p else None,
                        name=f"{d.name}:vfio",
                    )
                )
            return
        # The seed's first/second indirection: at every depth the adj -1
        # entry runs first on start and last on stop, so each entry checks
        # ``running`` to act as "first" or "second" in both directions.
        if self.mode == Mode.THREADS:
            first: Callable[..., None] | None = self._thread_first
            second: Callable[..., None] = self._thread_second
            pfirst: Callable[..., None] | None = self._thread_first
            psecond: Callable[..., None] | None = self._thread_second
        else:
            # a P2P device's first main stage has nothing to do (it was
            # dispatched in the prepare walk): no call at all
            first = None if d.has_p2p else self._worker_main_first
            second = self._worker_main_second
            pfirst, psecond = self._worker_dispatch, None
        if not d.has_p2p:
            pfirst = psecond = None

        def staged(
            stage_first: Callable[..., None] | None,
            stage_second: Callable[..., None] | None,
            prepare: bool,
            first_on_start: bool,
        ) -> Callable[[bool, RunState], None] | None:
            """One entry of the pair: "first" or "second" by direction.

            The adj -1 entry is reached first on start and last on stop; the
            adj +1 entry the other way round (``first_on_start=False``).
            """
            if stage_first is None and stage_second is None:
                return None

            def cb(running: bool, state: RunState) -> None:
                fn = stage_first if running == first_on_start else stage_second
                if fn is not None:
                    fn(d, prepare, running, state)

            return cb

        d.entries.append(
            add(
                d.qdev,
                cb=staged(first, second, False, True),
                prepare_cb=staged(pfirst, psecond, True, True),
                adj=-1,
                name=f"{d.name}:vfio-lower",
            )
        )
        d.entries.append(
            add(
                d.qdev,
                cb=staged(first, second, False, False),
                prepare_cb=staged(pfirst, psecond, True, False),
                adj=1,
                name=f"{d.name}:vfio-higher",
            )
        )

    # ------------------------------------------------------- threads mode
    def _thread_first(
        self, d: VFIODevice, prepare: bool, running: bool, state: RunState
    ) -> None:
        mig = d.mig
        assert mig is not None
        fn = mig.vmstate_change_prepare if prepare else mig.vmstate_change
        if d._thread is not None:
            raise WorkerError("a transition thread is still running", d.name)
        d._thread = threading.Thread(
            target=_no_result(fn, d),
            args=(running, state),
            daemon=True,
            name=f"vfio-{'prepare' if prepare else 'change'}-{d.name}",
        )
        d._thread.start()

    def _thread_second(
        self, d: VFIODevice, prepare: bool, running: bool, state: RunState
    ) -> None:
        t, d._thread = d._thread, None
        if t is None:
            return
        t.join(self.transition_timeout)
        if t.is_alive():
            err = WorkerTimeout(
                f"transition thread still running after {self.transition_timeout} s",
                d.name,
            )
            d._error(err)
            raise err
        d._collect_local()

    # ------------------------------------------------------- workers mode
    def _current_round(self, what: str) -> _Round:
        """The notification in progress (handlers run only inside one)."""
        rnd = self._round
        if rnd is None:
            raise StateError(f"{what} outside a notification")
        return rnd

    def _worker_dispatch(
        self, d: VFIODevice, prepare: bool, running: bool, state: RunState
    ) -> None:
        """First-stage prepare entry: start phase 1 + barrier + phase 2."""
        rnd = self._current_round("dispatch")
        if not rnd.barrier_ready:
            self._arm_barrier(rnd)
        self._dispatch(d, rnd, use_barrier=True)

    def _worker_main_first(
        self, d: VFIODevice, prepare: bool, running: bool, state: RunState
    ) -> None:
        """First-stage main entry: only devices without P2P dispatch here."""
        rnd = self._current_round("dispatch")
        if not d.has_p2p:
            self._revive(d)
            self._dispatch(d, rnd, use_barrier=False)

    def _worker_main_second(
        self, d: VFIODevice, prepare: bool, running: bool, state: RunState
    ) -> None:
        """Second-stage main entry: join the device's worker."""
        rnd = self._current_round("join")
        if d._p2p and not rnd.filled:
            self._fill(rnd)  # relaxed interlock: wait here instead
        self._join(d, rnd)

    def _arm_barrier(self, rnd: _Round) -> None:
        """Parties = exactly the P2P devices this notification dispatches.

        A P2P device with parallel states off is a party too: its worker
        arrives after its synchronous prepare step, so no parallel worker
        starts phase 2 while it is still entering P2P (O1).  Workers that
        died while idle are found with one ``poll()`` over every sentinel.
        """
        rnd.barrier_ready = True
        rnd.parties = [
            d for d in self.devices if d._p2p and any(not e.removed for e in d.entries)
        ]
        dead = {id(h) for h in self._watch.exited()}
        if dead:
            for d in rnd.parties:
                if d.worker is not None and id(d.worker) in dead:
                    self._revive(d)
        assert self.barrier is not None
        self.barrier.reset(max(1, len(rnd.parties)))
        rnd.barrier_gen = self.barrier.generation

    def _revive(self, d: VFIODevice) -> None:
        """A worker that died since its last command: report it, a fresh one."""
        if d.worker is not None and not d.worker.alive():
            err = WorkerCrashed(
                "worker found dead before dispatch", d.name, d.worker.exitcode
            )
            d._error(err)
            self._recover(d, err)

    def _dispatch(self, d: VFIODevice, rnd: _Round, use_barrier: bool) -> None:
        w = d.worker
        assert w is not None
        try:
            w.start_transition(
                rnd.running,
                rnd.runstate,
                use_barrier,
                self.transition_timeout * 2 + 5.0,
            )
        except MpvfioError as exc:
            rnd.failed[d.name] = exc
            d._error(exc)
        rnd.dispatched.add(d.name)

    def _fill(self, rnd: _Round) -> None:
        """Wait until every party finished phase 1 (or remove the failed).

        Watches the parties' sentinels (one ``poll()``) while it waits.  A
        party that died, failed before it could arrive, or has not arrived
        by the deadline (killed then) is *left*: the crossing goes on with
        one party less (``ProcessBarrier.leave``), so the others still wait
        for every live party and P2P-first holds.  Only if the barrier's
        lock cannot be taken (a party died inside it) is the barrier broken.
        """
        rnd.filled = True
        if not rnd.parties:
            return
        barrier = self.barrier
        assert barrier is not None
        broken = False
        parties = {id(d.worker): d for d in rnd.parties if d.worker is not None}
        slots = self.slots
        assert slots is not None
        while True:
            # Filled: the crossing moved the generation on.  The last arriver
            # posts ``crossed`` after it released the others (the barrier's
            # own ``filled`` post comes first, and waking the parent then
            # could take the CPU from the release loop).
            if barrier.generation > rnd.barrier_gen:
                break
            if barrier.broken:
                # a party's own wait timed out: whoever never arrived is
                # removed now, as the parent's own deadline would have done
                broken = True
                for d in rnd.parties:
                    if d.name not in rnd.failed and not self._arrived(d):
                        self._fail_in_round(d, rnd)
                break
            if posixobj.acquire(slots.crossed, WATCH_SLICE_S):
                continue
            dead = [
                parties[id(h)]
                for h in self._watch.exited()
                if id(h) in parties and parties[id(h)].name not in rnd.failed
            ]
            # a party that failed before it could arrive (dispatch or its
            # synchronous prepare step failed) will never arrive
            lost = (
                [
                    d
                    for d in rnd.parties
                    if d.name in rnd.failed and not self._arrived(d)
                ]
                if rnd.failed
                else []
            )
            late = time.monotonic() > rnd.deadline
            if dead or late or lost:
                culprits = dead + [
                    d
                    for d in rnd.parties
                    if late
                    and not self._arrived(d)
                    and d not in dead
                    and d.name not in rnd.failed
                ]
                for d in culprits:
                    self._fail_in_round(d, rnd)
                for d in culprits + lost:
                    if d.name in rnd.left:
                        continue
                    rnd.left.add(d.name)
                    if not barrier.leave(
                        functools.partial(self._arrived, d), WATCH_SLICE_S * 10
                    ):
                        barrier.abort()
                        broken = True
                if broken:
                    break
                if len(rnd.left) >= len(rnd.parties):
                    break  # no live party left to cross
                continue
        if broken:
            reason = barrier.diagnostics().get("broken_reason", "?")
            _log.warning(
                "P2P barrier broken (%s); failed: %s",
                reason,
                ", ".join(rnd.failed)
                or "none yet (a party that arrived and then hung is named at its join)",
            )
        self._flush_events()  # every phase-1 event is out before main callbacks

    @staticmethod
    def _arrived(d: VFIODevice) -> bool:
        return d.worker is not None and d.worker.arrived()

    def _fail_in_round(self, d: VFIODevice, rnd: _Round) -> None:
        w = d.worker
        assert w is not None
        if w.alive():
            w.kill()
            err: MpvfioError = WorkerTimeout(
                f"worker did not finish phase 1 within {self.transition_timeout} s; "
                "killed",
                d.name,
            )
        else:
            w.proc.join(1.0)
            err = WorkerCrashed("worker died during the transition", d.name, w.exitcode)
        rnd.failed[d.name] = err
        d._error(err)

    def _join(self, d: VFIODevice, rnd: _Round) -> None:
        w = d.worker
        assert w is not None
        if d.name not in rnd.dispatched:
            return
        rnd.dispatched.discard(d.name)
        failed = rnd.failed.get(d.name)
        if failed is None:
            try:
                d._apply(w.wait_transition(rnd.deadline + self.transition_timeout))
            except (WorkerCrashed, WorkerTimeout) as exc:
                failed = exc
                d._error(exc)
            except MpvfioError as exc:  # the worker's own error, reported
                d._apply(getattr(exc, "status", None))
                d._error(exc)
        self._flush_events(w)
        if failed is not None:
            self._recover(d, failed)

    def _sync_phase(
        self, d: VFIODevice, which: str, running: bool, state: RunState
    ) -> None:
        """Workers mode, parallel states off: one step, synchronously.

        A P2P device is a barrier party (:meth:`_arm_barrier`): after its
        prepare step the worker replies, then waits at the barrier; its main
        step first waits for the barrier to fill (as a join does).
        """
        rnd = self._round
        if rnd is not None and d.has_p2p:
            if which == "prepare":
                if not rnd.barrier_ready:
                    self._arm_barrier(rnd)
            else:
                if rnd.barrier_ready and not rnd.filled:
                    self._fill(rnd)
                failed = rnd.failed.get(d.name)
                if failed is not None:  # its round failed: no main step
                    w = d.worker
                    if w is not None and not w.alive():  # killed by _fill
                        self._flush_events()
                        self._recover(d, failed)
                    return  # (else: recovered when its prepare step failed)
        self._revive(d)
        w = d.worker
        assert w is not None
        at_barrier = rnd is not None and d.has_p2p and which == "prepare"
        try:
            w.send(
                "phase",
                which,
                running,
                str(state),
                at_barrier,
                self.transition_timeout * 2 + 5.0,
            )
            _, status = w.wait_reply(time.monotonic() + self.transition_timeout)
            d._apply(status)
        except (WorkerCrashed, WorkerTimeout) as exc:
            d._error(exc)
            if rnd is not None and at_barrier:
                rnd.failed[d.name] = exc  # it never arrives: _fill breaks
            self._flush_events()
            self._recover(d, exc)
            return
        except MpvfioError as exc:  # the worker's own error, reported
            d._apply(getattr(exc, "status", None))
            d._error(exc)
        self._flush_events(w)

    def _recover(self, d: VFIODevice, cause: MpvfioError) -> None:
        """Replace a dead or hung worker; the fresh one resets the device."""
        old = d.worker
        if old is None:
            return
        old.kill()
        self._flush_events()  # what the old worker counted is not lost
        # The handle swap happens with no event batch in progress: a drain
        # never meets a closed pipe or a fresh handle not launched yet.
        with self._pump.paused() if self._pump is not None else nullcontext():
            old.close(timeout=1.0)
            fresh = self._handle(d)
            try:
                fresh.launch()
            finally:
                d.worker = fresh
        if self._pump is not None:
            self._pump.changed()
        try:
            try:
                fresh.handshake()
            except BaseException:
                fresh.close(timeout=1.0)
                raise
            _, status = fresh.call_status("reset")
            d._apply(status)
        except MpvfioError as exc:
            d._error(exc)
            _log.error("%s: recovery after %s failed: %s", d.name, cause, exc)
            return
        finally:
            self._flush_events()
        d._state = MigState.RUNNING
        _log.warning("%s: recovered by a fresh worker after: %s", d.name, cause)

    # ------------------------------------------------------------- events
    def _deliver(self, events: list[Event]) -> None:
        for ev in sorted(events, key=lambda e: e.mono_ns):
            self.events.emit(ev)

    def _flush_events(self, w: WorkerHandle | None = None) -> None:
        """Deliver every worker event counted so far (workers mode).

        The event pump delivers them as they are written; this makes sure
        none is still on its way when a notification or a call returns.
        With ``w`` (a join, a call): nothing to do unless ``w`` counted an
        event not drained yet or the pump holds some (no lock, no syscall:
        the hot path of a notification without events).
        """
        pump = self._pump
        if pump is None:
            return
        # the counter first, then the pump (see EventPump.flush)
        if w is not None and not w.events_pending() and pump.settled:
            return
        pump.flush()

    # ------------------------------------------------------ stop / start
    def vm_stop(self, state: RunState | str = RunState.FINISH_MIGRATE) -> int:
        """Stop the VM (handlers run only if it is live), QEMU's order."""
        return self._notify(False, RunState(state))

    def vm_start(self) -> None:
        """Start the VM (handlers run unless it is already running)."""
        self._notify(True, RunState.RUNNING)

    def _notify(self, running: bool, state: RunState) -> int:
        if not self._started or self._closed:
            raise StateError("the machine is not started (or already closed)")
        n_errors = len(self.errors)
        for d in self.devices:
            d.arcs = []
        start = time.monotonic_ns()
        if running:
            self.vm.vm_start()
            ret = 0
        else:
            ret = self.vm.vm_stop(state)
        end = time.monotonic_ns()
        for d in self.devices:
            d._collect_local()
        report = NotifyReport(
            running,
            state,
            start,
            end,
            {d.name: list(d.arcs) for d in self.devices},
            self.errors[n_errors:],
        )
        self.reports.append(report)
        return ret

    @property
    def last_report(self) -> NotifyReport:
        """The report of the latest vm_stop / vm_start."""
        if not self.reports:
            raise StateError("no vm_stop / vm_start has run yet")
        return self.reports[-1]

    # ------------------------------------------------------------- faults
    def inject_worker_fault(self, device: str, point: str, kind: str) -> None:
        """Arm a worker fault for the device's next transition (tests).

        :param point: ``before``, ``phase1``, ``barrier``, ``phase2``, ``join``.
        :param kind: ``kill``, ``exit``, ``hang``, ``segv``.
        """
        from mpvfio.workers.device import FAULT_KINDS, FAULT_POINTS

        if point not in FAULT_POINTS or kind not in FAULT_KINDS:
            raise UsageError(
                f"bad fault {point}/{kind}; points {FAULT_POINTS}, kinds {FAULT_KINDS}"
            )
        d = self.device(device)
        if d.worker is None:
            raise UsageError("worker faults need workers mode")
        d.worker.send("fault", point, kind)
        d.worker.wait_reply(time.monotonic() + self.call_timeout)

    # -------------------------------------------------------------- close
    def close(self) -> None:
        """Stop every worker, close every device, unlink every IPC object."""
        if self._closed:
            return
        self._closed = True
        self.vm.handlers.remove_notify_hook(self._hook)
        if self._pump is not None:
            self._pump.flush()
            self._pump.stop()
        for d in self.devices:
            if d.worker is not None:
                d.worker.close()
            if d.mig is not None:
                d.mig.close_data_fd()
            if d.device is not None:
                d.device.close()
            if d.backing is not None:
                d.backing.close()
                d.backing = None
        for gate in self._gates.values():
            posixobj.close_semaphore(gate)
        self._gates.clear()
        if self.barrier is not None:
            self.barrier.close()
        if self.slots is not None:
            self.slots.close()
        if self.registry is not None:
            self.registry.unlink_all()

    def __enter__(self) -> Machine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def subscribed(
        self, cb: Callable[[Event], None], names: list[str] | None = None
    ) -> Iterator[None]:
        """Subscribe ``cb`` to the machine's events for a ``with`` block."""
        sub = self.events.subscribe(cb, names)
        try:
            yield
        finally:
            sub.cancel()


class _WorkersHook:
    """The notify hooks of workers mode: round bookkeeping, P2P interlock."""

    name = "mpvfio-workers"

    def __init__(self, machine: Machine) -> None:
        self.m = machine

    def begin(self, running: bool, state: RunState) -> None:
        if self.m.mode == Mode.WORKERS:
            if self.m.slots is not None:
                self.m.slots.begin_round()
            self.m._round = _Round(
                running, state, time.monotonic() + self.m.transition_timeout
            )

    def interlock(self, running: bool, state: RunState) -> None:
        rnd = self.m._round
        if rnd is None or self.m.relaxed_interlock or not rnd.barrier_ready:
            return
        self.m._fill(rnd)

    def end(self, running: bool, state: RunState) -> None:
        rnd, self.m._round = self.m._round, None
        if rnd is None:
            return
        if rnd.barrier_ready and not rnd.filled:
            self.m._fill(rnd)
        for name in list(rnd.dispatched):  # an entry removed mid-walk
            self.m._join(self.m.device(name), rnd)
        self.m._flush_events()  # O4: the notification's events are all out


def _getpid() -> int:
    return os.getpid()
