"""The QMP command table of a :class:`~mpvfio.machine.Machine` (layer 5).

:class:`MachineService` turns QMP commands into Machine and migration-engine
calls and the Machine's events into QMP events.  The wire protocol is
:mod:`mpvfio.qmp.protocol`'s.

Commands (QAPI shapes of ../shared/spec/QMP.md §8):

========================  ==================================================
``qmp_capabilities``      (protocol) leave negotiation mode
``query-version``         ``{"qemu": {major, minor, micro}, "package"}``
``query-commands``        ``[{"name": ...}]``
``query-name``            ``{"name": the machine's name}``
``query-status``          ``{"status": RunState, "running": bool}``
``stop`` / ``cont``       ``vm_stop(paused)`` / ``vm_start()``, also while
                          an outgoing migration runs; in ``inmigrate``
                          they only choose whether the VM runs once the
                          incoming migration completes; ``cont`` is
                          refused in ``finish-migrate`` ("Migration is not
                          finalized yet") and when a reset is needed
``migrate``               ``uri`` (or one ``main`` socket channel): starts
                          :func:`~mpvfio.migration.engine.migrate` in a
                          worker thread and returns at once
``migrate-incoming``      ``uri`` / channels; needs ``mpvfio run
                          --incoming defer`` (QEMU's ``-incoming defer``)
``migrate_cancel``        cancels the running migration (either side)
``query-migrate``         ``status``; while active (``active``, ``device``,
                          ``cancelling``) ``total-time``, ``setup-time``,
                          ``expected-downtime`` and live ``ram``/``vfio``
                          byte counters; once completed the totals and
                          ``downtime``; ``error-desc`` after a failure
``migrate-set-capabilities`` / ``query-migrate-capabilities``
                          ``events`` (MIGRATION events) and ``multifd``
``migrate-set-parameters`` / ``query-migrate-parameters``
                          ``downtime-limit`` (ms), ``multifd-channels``
``__org.mpvfio_query-vfio-devices``
                          per VFIO device: name, qom-path, device-state,
                          flags, backend, profile, mode, event properties
``quit``                  shut down cleanly (SHUTDOWN event, exit 0)
========================  ==================================================

Events: ``STOP``, ``RESUME`` (from the VM), ``VFIO_MIGRATION`` (devices
created with migration events on; includes the 11.0 state
``pre-copy-p2p-prepare``), ``MIGRATION`` (with the ``events`` capability),
``SHUTDOWN``, and seed 003's opt-in per-transition prepare event under the
downstream name ``__org.mpvfio_VFIO_MIGRATION_PREPARE``: QEMU has no
``VFIO_MIGRATION_PREPARE`` and the QMP spec reserves new downstream names
for the ``__RFQDN_`` prefix (QMP.md §8, §10 item 10).  Each event keeps the
timestamp taken where it happened (a worker's, for device events), in
QEMU's ``{"seconds", "microseconds"}`` form.

Concurrency: the Machine is not thread-safe, so every call into it holds
one :class:`~mpvfio.migration.engine.MachineLock` (this engine's BQL):
``stop``/``cont`` run in a worker thread under it, and a migration's thread
holds it for the whole migration but hands it over, in arrival order, at
its safe points (between pre-copy passes, while it waits on the network).
So, as in QEMU, ``stop`` during an outgoing migration pauses the VM and the
migration goes on (the devices wait in STOP_COPY, R6.2; the switchover then
stops a VM that is not live, O9; the source ends ``postmigrate`` and the
target, told the source's run state, stays ``paused``); ``cont`` restarts
it.  The queries never take the lock.

The event order of a failed outgoing migration is QEMU's (R7.2):
``MIGRATION failed``, then ``RESUME`` as the source VM restarts (a cancel:
``cancelling``, ``RESUME``, ``cancelled``).  A target without autostart
(``-S``, or ``stop`` in inmigrate) stays ``paused`` after the migration
with its devices in RESUMING, and ``cont`` starts it (R9.6).

Known differences from QEMU:

* ``migrate`` keeps retrying for ``connect_retry_s`` while nothing listens
  on the URI (QEMU fails at once);
* only a running VM can start a migration;
* with multifd the device data is counted when each device's sender
  finishes, not packet by packet.
"""

from __future__ import annotations

import asyncio
import logging
import select
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from mpvfio import __version__
from mpvfio.events import Event, Subscription
from mpvfio.machine import Machine
from mpvfio.migration.engine import (
    IncomingInfo,
    LiveStats,
    MachineLock,
    MigrationInfo,
    MigrationParams,
    incoming,
    migrate,
)
from mpvfio.net.transport import Cancel, Listener, listen, parse_uri
from mpvfio.qmp.protocol import (
    Arg,
    Command,
    Enum,
    ListOf,
    QMPError,
    QMPServer,
    Struct,
)
from mpvfio.uapi.vfio import MigFlag, qapi_name
from mpvfio.vmstate import RunState, runstate_is_live

__all__ = [
    "EVENT_NAMES",
    "FORWARDED_EVENTS",
    "MIGRATION_CAPABILITIES",
    "MONO_MEMBER",
    "PREFIX",
    "PREPARE_EVENT",
    "QEMU_VERSION",
    "QUERY_VFIO_DEVICES",
    "SUPPORTED_CAPABILITIES",
    "MachineService",
]

_log = logging.getLogger(__name__)
T = TypeVar("T")

#: Reverse domain name of this downstream (QMP's ``__RFQDN_`` prefix).
VENDOR = "org.mpvfio"
PREFIX = f"__{VENDOR}_"
QUERY_VFIO_DEVICES = f"{PREFIX}query-vfio-devices"
PREPARE_EVENT = f"{PREFIX}VFIO_MIGRATION_PREPARE"
#: Optional top-level member of every event: the ``CLOCK_MONOTONIC`` time
#: (ns) it happened at (``mpvfio run --event-mono-ns``; latency tools).
MONO_MEMBER = f"{PREFIX}mono-ns"

#: The QEMU whose QAPI the commands and events follow (VFIO_MIGRATION with
#: ``pre-copy-p2p-prepare`` is 11.0's); ``package`` names the engine.
QEMU_VERSION = {"major": 11, "minor": 0, "micro": 0}

#: Machine events forwarded to QMP clients; anything else stays in-process.
FORWARDED_EVENTS = frozenset(
    {
        "STOP",
        "RESUME",
        "SHUTDOWN",
        "MIGRATION",
        "VFIO_MIGRATION",
        "VFIO_MIGRATION_PREPARE",
    }
)
#: Wire names of events whose in-process name is not upstream QEMU's.
EVENT_NAMES = {"VFIO_MIGRATION_PREPARE": PREPARE_EVENT}

#: QEMU's MigrationCapability values (9.1 era): accepted as names.
MIGRATION_CAPABILITIES = (
    "xbzrle",
    "rdma-pin-all",
    "auto-converge",
    "zero-blocks",
    "events",
    "postcopy-ram",
    "x-colo",
    "release-ram",
    "return-path",
    "pause-before-switchover",
    "multifd",
    "dirty-bitmaps",
    "postcopy-blocktime",
    "late-block-activate",
    "x-ignore-shared",
    "validate-uuid",
    "background-snapshot",
    "zero-copy-send",
    "postcopy-preempt",
    "switchover-ack",
    "dirty-limit",
    "mapped-ram",
)
#: The capabilities that may be switched on here.
SUPPORTED_CAPABILITIES = ("events", "multifd")

_ACTIVE = frozenset({"setup", "active", "device", "cancelling"})
#: statuses whose query-migrate has time and byte counters (QEMU's
#: fill_source_migration_info populates them for these and for completed)
_COUNTING = frozenset({"active", "device", "cancelling"})
_TERMINAL = frozenset({"completed", "failed", "cancelled"})
_NEEDS_RESET = frozenset(
    {RunState.INTERNAL_ERROR, RunState.SHUTDOWN, RunState.GUEST_PANICKED}
)
_MIGRATION_IN_PROGRESS = "There's a migration process in progress"
_NOT_FINALIZED = "Migration is not finalized yet"  # QEMU's qmp_cont
_POLL_S = 0.2
#: seconds a command waits for the machine lock (a migration hands it over
#: at its next safe point; a stop/cont holds it for one notification)
_LOCK_WAIT_S = 120.0


@dataclass(eq=False)
class _Migration:
    """One migration, outgoing or incoming, as ``query-migrate`` sees it."""

    direction: str  # "outgoing" | "incoming"
    uri: str
    params: MigrationParams
    cancel: Cancel = field(default_factory=Cancel)
    status: str = "none"
    start_ns: int = field(default_factory=time.monotonic_ns)
    setup_end_ns: int = 0
    end_ns: int = 0
    error: str | None = None
    info: MigrationInfo | None = None
    incoming: IncomingInfo | None = None
    thread: threading.Thread | None = None
    live: LiveStats = field(default_factory=LiveStats)

    @property
    def active(self) -> bool:
        return self.status in _ACTIVE

    @property
    def running(self) -> bool:
        """Active, or its thread still finishing (a failed migration's
        rollback restarts the VM after the status went ``failed``)."""
        return self.active or (self.thread is not None and self.thread.is_alive())


def _ms(ns: int) -> int:
    return round(ns / 1e6)


class MachineService:
    """QMP commands and events for one started :class:`Machine`.

    :param machine: a started machine (running, paused or ``inmigrate``).
    :param params: migration parameters (``multifd_channels`` is replaced
        by the ``multifd`` capability and ``multifd-channels`` parameter).
    :param incoming_allowed: the VM was started for an incoming migration
        (``--incoming``): ``migrate-incoming`` is accepted once.
    :param event_mono_ns: add :data:`MONO_MEMBER` to every event.
    :param multifd_channels: the ``multifd-channels`` parameter (QEMU's
        default is 2); with ``multifd_on`` the ``multifd`` capability
        starts on.
    """

    def __init__(
        self,
        machine: Machine,
        *,
        params: MigrationParams | None = None,
        incoming_allowed: bool = False,
        event_mono_ns: bool = False,
        multifd_channels: int = 2,
        multifd_on: bool = False,
    ) -> None:
        self.machine = machine
        self.params = params or MigrationParams()
        self.incoming_allowed = incoming_allowed
        self.event_mono_ns = event_mono_ns
        self.multifd_channels = multifd_channels
        self.capabilities: dict[str, bool] = dict.fromkeys(
            SUPPORTED_CAPABILITIES, False
        )
        self.capabilities["multifd"] = multifd_on
        #: ``cont``/``stop`` in ``inmigrate`` set it (QEMU's ``autostart``).
        self.autostart = True
        self.server: QMPServer | None = None
        self.exit_code = 0
        self.shutdown_reason: str | None = None
        self._mlock = MachineLock()  # held by every call into the machine
        self._slock = threading.Lock()  # migration status changes
        self._mig: _Migration | None = None
        self._sub: Subscription | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._shutdown: asyncio.Event | None = None
        self._closing = False

    # ------------------------------------------------------------ wiring
    def version(self) -> dict[str, Any]:
        """VersionInfo for the greeting and ``query-version``."""
        return {"qemu": dict(QEMU_VERSION), "package": f"mpvfio {__version__}"}

    def make_server(self, **kwargs: Any) -> QMPServer:
        """Build the :class:`QMPServer` and subscribe to the machine's events.

        Call it from the event loop's thread.
        """
        self._loop = asyncio.get_running_loop()
        self._shutdown = asyncio.Event()
        self.server = QMPServer(self.commands(), self.version(), **kwargs)
        self._sub = self.machine.events.subscribe(self._on_event)
        return self.server

    def _on_event(self, ev: Event) -> None:
        """Any thread: forward one machine event to the clients, at once."""
        if ev.name not in FORWARDED_EVENTS or self.server is None:
            return
        msg: dict[str, Any] = {"event": EVENT_NAMES.get(ev.name, ev.name)}
        if ev.data:
            msg["data"] = ev.data
        msg["timestamp"] = ev.timestamp()
        if self.event_mono_ns:
            msg[MONO_MEMBER] = ev.mono_ns
        self.server.emit_threadsafe(msg)

    # ---------------------------------------------------------- shutdown
    def request_shutdown(self, reason: str, code: int = 0) -> None:
        """Loop thread: ask :meth:`wait_shutdown` to return (first wins)."""
        if self.shutdown_reason is None:
            self.shutdown_reason = reason
            self.exit_code = code
        if self._shutdown is not None:
            self._shutdown.set()

    def request_shutdown_threadsafe(self, reason: str, code: int = 0) -> None:
        """Any thread: :meth:`request_shutdown`."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(self.request_shutdown, reason, code)
            except RuntimeError:
                pass

    async def wait_shutdown(self) -> str:
        """Wait for ``quit``, a signal or a fatal error; return the reason."""
        assert self._shutdown is not None, "make_server() first"
        await self._shutdown.wait()
        return self.shutdown_reason or "host-qmp-quit"

    async def shutdown(self, timeout: float = 60.0) -> None:
        """Cancel a running migration, send SHUTDOWN, close the server.

        Then close the machine (after any command still inside it): every
        worker reaped, its IPC objects unlinked.
        """
        self._closing = True
        mig = self._mig
        if mig is not None and mig.active:
            mig.cancel.cancel("the VM is shutting down")
            self._set_status(mig, "cancelling")
        if mig is not None and mig.thread is not None:
            await asyncio.to_thread(mig.thread.join, timeout)
            if mig.thread.is_alive():
                _log.error("the %s migration did not stop in time", mig.direction)
        self._on_event(
            Event(
                "SHUTDOWN",
                {"guest": False, "reason": self.shutdown_reason or "host-qmp-quit"},
            )
        )
        await asyncio.sleep(0)  # the SHUTDOWN callback runs first
        if self.server is not None:
            await self.server.aclose()
        if self._sub is not None:
            self._sub.cancel()
        await asyncio.to_thread(self.close_machine)

    def close_machine(self) -> None:
        """Close the machine once no command is inside it (idempotent)."""
        if not self._mlock.acquire(_LOCK_WAIT_S):
            _log.error("closing the machine while a command is still inside it")
            self.machine.close()
            return
        try:
            self.machine.close()
        finally:
            self._mlock.release()

    # ---------------------------------------------------------- commands
    def commands(self) -> dict[str, Command]:
        """The command-mode command table."""
        caps = ListOf(
            Struct(
                (
                    Arg("capability", Enum(MIGRATION_CAPABILITIES)),
                    Arg("state", "bool"),
                )
            )
        )
        addr = (
            Arg("uri", "str", True),
            Arg("channels", ListOf("any"), True),
        )
        table = [
            Command("query-version", self._query_version),
            Command("query-commands", self._query_commands),
            Command("query-name", self._query_name),
            Command("query-status", self._query_status),
            Command("stop", self._stop),
            Command("cont", self._cont),
            Command(
                "migrate",
                self._migrate,
                (*addr, Arg("detach", "bool", True), Arg("resume", "bool", True)),
            ),
            Command(
                "migrate-incoming",
                self._migrate_incoming,
                (*addr, Arg("exit-on-error", "bool", True)),
            ),
            Command("migrate_cancel", self._migrate_cancel),
            Command("query-migrate", self._query_migrate),
            Command(
                "migrate-set-capabilities",
                self._set_capabilities,
                (Arg("capabilities", caps),),
            ),
            Command("query-migrate-capabilities", self._query_capabilities),
            Command(
                "migrate-set-parameters",
                self._set_parameters,
                (
                    Arg("downtime-limit", "int", True),
                    Arg("multifd-channels", "int", True),
                ),
            ),
            Command("query-migrate-parameters", self._query_parameters),
            Command(QUERY_VFIO_DEVICES, self._query_vfio_devices),
            Command("quit", self._quit),
        ]
        return {c.name: c for c in table}

    async def _locked(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` in a worker thread holding the machine lock.

        During an outgoing migration the lock comes at the migration's next
        safe point; ``fn`` must check the run state again (it may have
        changed meanwhile).
        """

        def run() -> T:
            if not self._mlock.acquire(_LOCK_WAIT_S):
                raise QMPError(
                    f"the VM stayed busy for {_LOCK_WAIT_S:g} s (a migration or "
                    "another command holds it); try again"
                )
            try:
                return fn()
            finally:
                self._mlock.release()

        return await asyncio.to_thread(run)

    def _refuse_when_closing(self) -> None:
        if self._closing:
            raise QMPError("the VM is shutting down")

    def _migration_running(self) -> bool:
        mig = self._mig
        return mig is not None and mig.running

    # ----------------------------------------------------------- queries
    async def _query_version(self, args: dict[str, Any]) -> Any:
        return self.version()

    async def _query_commands(self, args: dict[str, Any]) -> Any:
        names = self.server.command_names if self.server else list(self.commands())
        return [{"name": n} for n in names]

    async def _query_name(self, args: dict[str, Any]) -> Any:
        return {"name": self.machine.name}

    async def _query_status(self, args: dict[str, Any]) -> Any:
        rs = self.machine.vm.runstate
        return {"status": rs.value, "running": rs == RunState.RUNNING}

    async def _query_vfio_devices(self, args: dict[str, Any]) -> Any:
        out = []
        for d in self.machine.devices:
            state = d.state
            info: dict[str, Any] = {
                "name": d.name,
                "qom-path": d.qom_path,
                "device-state": qapi_name(state) or state.name.lower(),
                "flags": [
                    (f.name or "").lower().replace("_", "-")
                    for f in MigFlag
                    if d.flags & f
                ],
                "backend": d.backend,
                "profile": d.profile.name,
                "mode": d.mode.value,
                "migration-events": d.props.migration_events,
                "prepare-events": d.props.prepare_events,
                "parallel-states": d.props.parallel_states,
                "errors": len(d.errors),
            }
            if d.worker is not None and d.worker.proc is not None:
                info["worker-pid"] = d.worker.proc.pid
            out.append(info)
        return out

    # ---------------------------------------------------------- stop/cont
    async def _stop(self, args: dict[str, Any]) -> Any:
        """QEMU's qmp_stop: ``vm_stop(paused)``, a no-op unless the VM is live.

        Allowed during an outgoing migration: the VM pauses (its pre-copying
        devices go to STOP_COPY, R6.2) and the migration goes on.
        """
        self._refuse_when_closing()
        rs = self.machine.vm.runstate
        if rs == RunState.INMIGRATE:
            self.autostart = False
            return {}
        if not runstate_is_live(rs):
            return {}  # already stopped: QEMU's stop always succeeds

        def stop() -> None:
            rs = self.machine.vm.runstate
            if rs == RunState.INMIGRATE:
                self.autostart = False
            elif runstate_is_live(rs):
                self.machine.vm_stop(RunState.PAUSED)

        await self._locked(stop)
        return {}

    async def _cont(self, args: dict[str, Any]) -> Any:
        """QEMU's qmp_cont: refused when a reset is needed or in
        finish-migrate (the switchover owns the stopped VM); in inmigrate it
        sets autostart; otherwise ``vm_start`` (after a failed or completed
        migration too, and during an outgoing migration)."""
        self._refuse_when_closing()
        rs = self.machine.vm.runstate
        _check_cont(rs)
        if rs == RunState.INMIGRATE:
            self.autostart = True
            return {}
        if rs == RunState.RUNNING:
            return {}

        def cont() -> None:
            rs = self.machine.vm.runstate
            _check_cont(rs)
            if rs == RunState.INMIGRATE:
                self.autostart = True
            elif rs != RunState.RUNNING:
                self.machine.vm_start()

        await self._locked(cont)
        return {}

    # ----------------------------------------------------------- migrate
    def _params(self) -> MigrationParams:
        channels = self.multifd_channels if self.capabilities["multifd"] else 0
        return replace(self.params, multifd_channels=channels)

    async def _migrate(self, args: dict[str, Any]) -> Any:
        self._refuse_when_closing()
        if args.get("resume"):
            raise QMPError("mpvfio has no postcopy: 'resume' is not supported")
        uri = _address(args, "migrate")
        if self._migration_running():
            raise QMPError(_MIGRATION_IN_PROGRESS)
        rs = self.machine.vm.runstate
        if rs == RunState.INMIGRATE:
            raise QMPError("Guest is waiting for an incoming migration")
        blockers = self.machine.migration_blockers()
        if blockers:
            raise QMPError("; ".join(blockers))
        if rs != RunState.RUNNING:
            raise QMPError(f"mpvfio migrates a running VM only; the VM is {rs.value}")
        parse_uri(uri)  # UsageError -> GenericError naming the problem
        mig = _Migration("outgoing", uri, self._params())
        self._mig = mig
        self._set_status(mig, "setup")
        self._spawn(mig, self._outgoing_thread)
        return {}

    async def _migrate_incoming(self, args: dict[str, Any]) -> Any:
        self._refuse_when_closing()
        uri = _address(args, "migrate-incoming")
        mig = self._mig
        if (
            mig is not None
            and mig.direction == "incoming"
            and (mig.active or mig.status == "completed")
        ):
            raise QMPError("The incoming migration has already been started")
        if not self.incoming_allowed or self.machine.vm.runstate != RunState.INMIGRATE:
            raise QMPError("'-incoming' was not specified on the command line")
        parse_uri(uri)
        listener = await asyncio.to_thread(listen, uri)
        self.start_incoming(listener, exit_on_error=args.get("exit-on-error", True))
        return {}

    def start_incoming(self, listener: Listener, exit_on_error: bool = True) -> None:
        """Receive one migration on ``listener`` (owned and closed here).

        :param exit_on_error: on failure shut the process down with exit
            status 1, as QEMU's ``exit-on-error`` (default on) does.
        """
        mig = _Migration("incoming", str(listener.uri), self._params())
        self._mig = mig
        self._set_status(mig, "setup")
        self._spawn(mig, lambda m: self._incoming_thread(m, listener, exit_on_error))

    async def _migrate_cancel(self, args: dict[str, Any]) -> Any:
        mig = self._mig
        if mig is None or not mig.active:
            return {}
        mig.cancel.cancel("migrate_cancel")
        self._set_status(mig, "cancelling")
        return {}

    def _spawn(self, mig: _Migration, target: Callable[[_Migration], None]) -> None:
        # A plain daemon thread, not the loop's executor: a migration can
        # outlive a hung peer, and must never block the process's exit.
        t = threading.Thread(
            target=target, args=(mig,), name=f"qmp-{mig.direction}", daemon=True
        )
        mig.thread = t
        t.start()

    def _set_status(self, mig: _Migration, status: str) -> None:
        """Any thread: move ``mig`` to ``status``; MIGRATION event if enabled."""
        with self._slock:
            if mig.status == status or mig.status in _TERMINAL:
                return
            if mig.status == "cancelling" and status not in _TERMINAL:
                return
            mig.status = status
            if status in _TERMINAL:
                mig.end_ns = time.monotonic_ns()
            _log.info("%s migration: %s", mig.direction, status)
            if self.capabilities["events"]:
                self.machine.events.emit(Event("MIGRATION", {"status": status}))

    def _outgoing_thread(self, mig: _Migration) -> None:
        def on_stage(stage: str) -> None:
            if stage == "precopy":
                mig.setup_end_ns = time.monotonic_ns()
                self._set_status(mig, "active")
            elif stage == "data":
                self._set_status(mig, "device")

        def on_failed(error: str) -> None:
            # before the engine restarts the VM: MIGRATION failed, then
            # RESUME, QEMU's order (R7.2)
            mig.error = error
            self._set_status(mig, "failed")

        if not self._mlock.acquire(_LOCK_WAIT_S):
            mig.error = f"the VM stayed busy for {_LOCK_WAIT_S:g} s"
            self._set_status(mig, "failed")
            return
        try:
            info = migrate(
                self.machine,
                mig.uri,
                mig.params,
                cancel=mig.cancel,
                on_stage=on_stage,
                lock=self._mlock,
                live=mig.live,
                on_failed=on_failed,
            )
        except Exception as exc:  # noqa: BLE001 - reported by query-migrate
            mig.error = mig.error or str(exc)
            _log.warning("outgoing migration to %s: %s", mig.uri, exc)
            self._set_status(mig, "cancelled" if mig.cancel.cancelled else "failed")
        else:
            mig.info = info
            self._set_status(mig, "completed")  # before a waiting command runs
        finally:
            if self._mlock.owned():
                self._mlock.release()

    def _incoming_thread(
        self, mig: _Migration, listener: Listener, exit_on_error: bool
    ) -> None:
        def on_stage(stage: str) -> None:
            if stage == "load":
                mig.setup_end_ns = time.monotonic_ns()
                self._set_status(mig, "active")

        try:
            # The VM is in inmigrate until the migration ends: stop/cont only
            # set autostart meanwhile, so the lock may be held throughout.
            if not self._mlock.acquire(_LOCK_WAIT_S):
                mig.error = f"the VM stayed busy for {_LOCK_WAIT_S:g} s"
                self._set_status(mig, "failed")
                return
            try:
                _wait_for_peer(listener, mig.cancel)
                mig.params = self._params()  # as set while waiting
                info = incoming(
                    self.machine,
                    listener,
                    mig.params,
                    cancel=mig.cancel,
                    on_stage=on_stage,
                    autostart=lambda: self.autostart,
                )
            except Exception as exc:  # noqa: BLE001 - reported, maybe fatal
                mig.error = str(exc)
                _log.warning("incoming migration on %s: %s", mig.uri, exc)
                self._set_status(mig, "cancelled" if mig.cancel.cancelled else "failed")
                if exit_on_error and not self._closing:
                    _log.error("incoming migration failed; exiting (exit-on-error)")
                    self.request_shutdown_threadsafe("host-error", 1)
                return
            else:
                mig.incoming = info
                # before a waiting `cont` gets the VM (QEMU sets COMPLETED
                # in the same bottom half that starts or pauses the VM)
                self._set_status(mig, "completed")
            finally:
                self._mlock.release()
        finally:
            listener.close()

    async def _query_migrate(self, args: dict[str, Any]) -> Any:
        """QEMU's fill_source_migration_info: what each status shows.

        ``setup``: the status only; ``active``/``device``/``cancelling``:
        ``total-time``, ``setup-time``, ``expected-downtime`` and the live
        ``ram``/``vfio`` counters; ``completed``: the totals and
        ``downtime``; ``failed``/``cancelled``: ``error-desc``.
        """
        mig = self._mig
        if mig is None:
            return {}
        status = mig.status  # one read: the thread may move it on
        out: dict[str, Any] = {"status": status}
        if status in ("failed", "cancelled") and mig.error:
            out["error-desc"] = mig.error
        if mig.direction == "incoming":
            inc = mig.incoming
            if status == "completed" and inc is not None:
                out[f"{PREFIX}incoming"] = {
                    "load-ms": round(inc.load_ms, 3),
                    "start-ms": round(inc.start_ms, 3),
                    "received-bytes": inc.received_bytes,
                    "started": inc.started,
                }
            return out
        info = mig.info
        done = status == "completed" and info is not None
        if not done and status not in _COUNTING:
            return out  # setup, failed, cancelled: no times
        if mig.setup_end_ns:
            out["setup-time"] = _ms(mig.setup_end_ns - mig.start_ns)
        if info is not None and done:
            out["total-time"] = round(info.total_ms)
            out["downtime"] = round(info.downtime_ms)
            out["ram"] = _ram_stats(
                info.transferred_bytes,
                info.precopy_bytes,
                info.stopcopy_bytes,
                info.stopcopy_bytes if info.multifd_channels else 0,
                info.precopy_iterations,
                info.total_ms,
            )
            out["vfio"] = {"transferred": info.precopy_bytes + info.stopcopy_bytes}
            switchover: dict[str, Any] = {
                "downtime-ms": round(info.downtime_ms, 3),
                "stop-ms": round(info.stop_ms, 3),
                "transfer-ms": round(info.transfer_ms, 3),
                "config-ms": round(info.config_ms, 3),
                "start-ms": round(info.start_ms, 3),
                "precopy-iterations": info.precopy_iterations,
                "multifd-channels": info.multifd_channels,
                "target-started": info.target_started,
            }
            if info.target_started:  # a paused target checks when it starts
                switchover["checksums-equal"] = info.checksums_equal
            out[f"{PREFIX}switchover"] = switchover
        else:
            snap = mig.live.snapshot()
            total_ms = (time.monotonic_ns() - mig.start_ns) / 1e6
            out["total-time"] = round(total_ms)
            expected = snap["expected_downtime_ms"] or mig.params.downtime_limit_ms
            out["expected-downtime"] = round(expected)
            out["ram"] = _ram_stats(
                snap["transferred"],
                snap["precopy"],
                snap["stopcopy"],
                snap["multifd"],
                snap["iterations"],
                total_ms,
            )
            out["vfio"] = {"transferred": snap["vfio"]}
        return out

    # ----------------------------------------------- capabilities/params
    async def _set_capabilities(self, args: dict[str, Any]) -> Any:
        mig = self._mig
        # a target still waiting for its source may change them: its
        # parameters are read when the source connects
        waiting = mig is not None and mig.direction == "incoming"
        waiting = waiting and mig is not None and mig.status == "setup"
        if mig is not None and mig.active and not waiting:
            raise QMPError(_MIGRATION_IN_PROGRESS)
        wanted = [(c["capability"], c["state"]) for c in args["capabilities"]]
        for cap, state in wanted:
            if state and cap not in SUPPORTED_CAPABILITIES:
                raise QMPError(
                    f"Migration capability '{cap}' is not supported by mpvfio"
                )
        for cap, state in wanted:
            if cap in SUPPORTED_CAPABILITIES:
                self.capabilities[cap] = state
        return {}

    async def _query_capabilities(self, args: dict[str, Any]) -> Any:
        return [
            {"capability": cap, "state": self.capabilities[cap]}
            for cap in SUPPORTED_CAPABILITIES
        ]

    async def _set_parameters(self, args: dict[str, Any]) -> Any:
        limit = args.get("downtime-limit")
        channels = args.get("multifd-channels")
        if limit is not None and not 1 <= limit <= 2_000_000:
            raise QMPError(
                "Parameter 'downtime_limit' expects an integer in the range of "
                "1 to 2000000 milliseconds"
            )
        if channels is not None and not 1 <= channels <= 255:
            raise QMPError("Parameter 'multifd-channels' expects a value of 1..255")
        if limit is not None:
            self.params = replace(self.params, downtime_limit_ms=float(limit))
        if channels is not None:
            self.multifd_channels = channels
        return {}

    async def _query_parameters(self, args: dict[str, Any]) -> Any:
        return {
            "downtime-limit": round(self.params.downtime_limit_ms),
            "multifd-channels": self.multifd_channels,
        }

    async def _quit(self, args: dict[str, Any]) -> Any:
        self.request_shutdown("host-qmp-quit")
        return {}


def _check_cont(rs: RunState) -> None:
    """QEMU's qmp_cont refusals, in its order and with its words."""
    if rs in _NEEDS_RESET:
        raise QMPError("Resetting the Virtual Machine is required")
    if rs == RunState.FINISH_MIGRATE:
        raise QMPError(_NOT_FINALIZED)


def _ram_stats(
    transferred: int,
    precopy: int,
    downtime: int,
    multifd: int,
    iterations: int,
    total_ms: float,
) -> dict[str, Any]:
    """QEMU's MigrationStats for the stream (there is no guest RAM here).

    QEMU's ``ram.transferred``, ``precopy-bytes`` and ``downtime-bytes``
    count the whole stream, device state included; the page counters are 0.
    The same numbers while active (live) and once completed (totals).
    """
    secs = total_ms / 1000.0
    mbps = transferred * 8 / 1e6 / secs if secs > 0 else 0.0
    return {
        "transferred": transferred,
        "remaining": 0,
        "total": 0,
        "duplicate": 0,
        "normal": 0,
        "normal-bytes": 0,
        "dirty-pages-rate": 0,
        "mbps": round(mbps, 3),
        "dirty-sync-count": iterations,
        "postcopy-requests": 0,
        "page-size": 4096,
        "multifd-bytes": multifd,
        "pages-per-second": 0,
        "precopy-bytes": precopy,
        "downtime-bytes": downtime,
        "postcopy-bytes": 0,
        "dirty-sync-missed-zero-copy": 0,
    }


def _address(args: dict[str, Any], command: str) -> str:
    """``uri``, or the one ``main`` channel's socket address, as a URI."""
    uri = args.get("uri")
    channels = args.get("channels")
    if uri is not None and channels is not None:
        raise QMPError(
            "'uri' and 'channels' arguments are mutually exclusive; exactly one "
            f"of the two should be present in '{command}' qmp command"
        )
    if uri is not None:
        return str(uri)
    if not channels:
        raise QMPError("Need either 'uri' or 'channels' argument")
    if len(channels) > 1:
        raise QMPError("Channel list has more than one entries")
    ch = channels[0]
    if not isinstance(ch, dict) or ch.get("channel-type") != "main":
        raise QMPError("Channel list has no main entry")
    addr = ch.get("addr")
    if not isinstance(addr, dict) or addr.get("transport") != "socket":
        raise QMPError("mpvfio supports socket migration addresses only")
    kind = addr.get("type")
    if kind == "unix" and isinstance(addr.get("path"), str):
        return f"unix:{addr['path']}"
    if kind == "inet" and isinstance(addr.get("host"), str):
        host = str(addr["host"])
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"tcp:{host}:{addr.get('port')}"
    raise QMPError("mpvfio supports socket addresses of type unix and inet only")


def _wait_for_peer(listener: Listener, cancel: Cancel) -> None:
    """Wait, however long, for the source's first connection (QEMU waits
    forever on ``-incoming``; the engine's accept has a deadline)."""
    poller = select.poll()
    poller.register(listener.fileno(), select.POLLIN)
    while True:
        cancel.check(str(listener.uri))
        if poller.poll(int(_POLL_S * 1000)):
            return
