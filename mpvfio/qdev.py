"""A qdev-like device tree and the VM run-state machine (QEMU.md R2.6, R3).

This module owns:

* :class:`Bus`, :class:`Device` and :class:`QdevTree`: just enough of QEMU's
  qdev tree to compute a device's tree depth (R3.1), which is the priority of
  its VM change-state handlers;
* :class:`VM`: the run state, the handler list and the QMP-style event bus,
  with QEMU's stop/start sequences (``do_vm_stop``, ``vm_stop_force_state``,
  ``vm_shutdown``, ``vm_prepare_start``/``vm_start``) and the qdev handler
  registration helpers (``qdev_add_vm_change_state_handler[_full]``).

What is not modelled: CPU ticks, the block layer drain/flush (their result
would be OR-ed into ``vm_stop``'s; here it is always 0), vCPU-thread stop
requests, the suspended wake-up path of ``vm_start`` and QEMU's table of
allowed run-state transitions.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

from mpvfio.errors import UsageError
from mpvfio.events import Event, EventBus
from mpvfio.vmstate import (
    FailureCallback,
    RunState,
    VMChangeStateEntry,
    VMChangeStateHandler,
    VMChangeStateHandlers,
    VMChangeStateHandlerWithRet,
    qdev_priority,
    runstate_is_live,
)

__all__ = [
    "MAIN_SYSTEM_BUS_NAME",
    "VM",
    "Bus",
    "Device",
    "QdevTree",
    "RunStateTransition",
]

_log = logging.getLogger(__name__)

MAIN_SYSTEM_BUS_NAME = "main-system-bus"
"""Name of :attr:`QdevTree.main_system_bus` (as in QEMU)."""


class Bus:
    """A qdev bus.

    :param name: the bus name (unique in its tree).
    :param owner: the device that provides the bus; ``None`` only for the
        main system bus.
    """

    def __init__(self, name: str, owner: Device | None) -> None:
        self.name = name
        self.owner = owner
        #: Devices plugged into this bus, in realize order.
        self.children: list[Device] = []

    def __repr__(self) -> str:
        owner = self.owner.id if self.owner is not None else None
        return f"Bus({self.name!r}, owner={owner!r})"


class Device:
    """A qdev device.

    :param id: the device id (unique in its tree).
    :param parent_bus: the bus the device is plugged into, or ``None``.
    """

    def __init__(self, id: str, parent_bus: Bus | None) -> None:
        self.id = id
        self.parent_bus = parent_bus
        #: Buses this device provides (e.g. a bridge's secondary bus).
        self.buses: list[Bus] = []

    @property
    def depth(self) -> int:
        """The qdev tree depth (R3.1, ``qdev_get_dev_tree_depth``).

        Start at 0 on the device; while the current device has a parent bus,
        move to that bus's owner and add 1; stop at a bus without owner (the
        main system bus) or a device without parent bus.  A sysbus device is
        1, a device on a host bridge's root bus 2, behind a root port 3.
        """
        depth = 0
        dev: Device | None = self
        while dev is not None:
            bus = dev.parent_bus
            if bus is None:
                break
            dev = bus.owner
            depth += 1
        return depth

    def __repr__(self) -> str:
        bus = self.parent_bus.name if self.parent_bus is not None else None
        return f"Device({self.id!r}, bus={bus!r})"


class QdevTree:
    """A device tree rooted at the main system bus.

    Device ids and bus names are unique.  Bridges name their secondary bus
    after their own id, as QEMU's PCIe ports do.
    """

    def __init__(self) -> None:
        #: The root bus; it has no owner.
        self.main_system_bus = Bus(MAIN_SYSTEM_BUS_NAME, None)
        self._devices: dict[str, Device] = {}
        self._buses: dict[str, Bus] = {MAIN_SYSTEM_BUS_NAME: self.main_system_bus}

    @property
    def devices(self) -> tuple[Device, ...]:
        """Every device, in realize (insertion) order."""
        return tuple(self._devices.values())

    @property
    def buses(self) -> tuple[Bus, ...]:
        """Every bus, the main system bus first, then in creation order."""
        return tuple(self._buses.values())

    def device(self, id: str) -> Device:
        """Return the device called ``id``.

        :raises UsageError: no such device.
        """
        try:
            return self._devices[id]
        except KeyError:
            raise UsageError(f"no device with id {id!r}") from None

    def bus(self, name: str) -> Bus:
        """Return the bus called ``name``.

        :raises UsageError: no such bus.
        """
        try:
            return self._buses[name]
        except KeyError:
            raise UsageError(f"no bus named {name!r}") from None

    def __contains__(self, item: object) -> bool:
        if isinstance(item, Device):
            return self._devices.get(item.id) is item
        if isinstance(item, Bus):
            return self._buses.get(item.name) is item
        return False

    def _check_free(self, ids: list[str], bus_names: list[str]) -> None:
        """Raise :class:`UsageError` before a builder creates anything taken."""
        for i in ids:
            if i in self._devices:
                raise UsageError(f"duplicate device id {i!r}")
        for n in bus_names:
            if n in self._buses:
                raise UsageError(f"duplicate bus name {n!r}")

    def add_device(self, id: str, bus: Bus | None = None) -> Device:
        """Create and realize a device on ``bus`` (default: the system bus).

        :raises UsageError: empty or duplicate id, or a bus of another tree.
        """
        if not isinstance(id, str) or not id:
            raise UsageError(f"device id must be a non-empty str, got {id!r}")
        if id in self._devices:
            raise UsageError(f"duplicate device id {id!r}")
        if bus is None:
            bus = self.main_system_bus
        if bus not in self:
            raise UsageError(f"{bus!r} does not belong to this tree")
        dev = Device(id, bus)
        bus.children.append(dev)
        self._devices[id] = dev
        return dev

    def add_bus(self, name: str, owner: Device) -> Bus:
        """Create a bus provided by ``owner``.

        :raises UsageError: empty or duplicate name, or a foreign owner.
        """
        if not isinstance(name, str) or not name:
            raise UsageError(f"bus name must be a non-empty str, got {name!r}")
        if name in self._buses:
            raise UsageError(f"duplicate bus name {name!r}")
        if owner not in self:
            raise UsageError(f"{owner!r} does not belong to this tree")
        bus = Bus(name, owner)
        owner.buses.append(bus)
        self._buses[name] = bus
        return bus

    def add_pci_host(self, id: str = "pcie.0-host", bus_name: str | None = None) -> Bus:
        """Add a PCI host bridge on the system bus; return its root bus.

        :param id: the host bridge's id.
        :param bus_name: the root bus name; default ``id`` without a
            ``-host`` suffix (``"pcie.0"`` for the default id), else
            ``id + ".0"``.
        """
        if bus_name is None:
            bus_name = id.removesuffix("-host") if id.endswith("-host") else f"{id}.0"
        self._check_free([id], [bus_name])
        host = self.add_device(id, self.main_system_bus)
        return self.add_bus(bus_name, host)

    def add_root_port(self, id: str, root_bus: Bus) -> Bus:
        """Add a PCIe root port on ``root_bus``; return its secondary bus."""
        self._check_free([id], [id])
        port = self.add_device(id, root_bus)
        return self.add_bus(id, port)

    def add_switch(self, id: str, bus: Bus, n_downstream: int) -> list[Bus]:
        """Add a PCIe switch on ``bus``; return its downstream ports' buses.

        The upstream port is ``id``; its internal bus is named ``id``; the
        downstream ports are ``f"{id}-dp{i}"``, each with a secondary bus of
        the same name.  An endpoint on a returned bus is 2 deeper than the
        upstream port.

        :raises UsageError: ``n_downstream`` is not a positive int, or a
            name is taken (then nothing is created).
        """
        if isinstance(n_downstream, bool) or not isinstance(n_downstream, int):
            raise UsageError(f"n_downstream must be an int, got {n_downstream!r}")
        if n_downstream < 1:
            raise UsageError(f"n_downstream must be >= 1, got {n_downstream}")
        names = [id, *(f"{id}-dp{i}" for i in range(n_downstream))]
        self._check_free(names, names)
        internal = self.add_root_port(id, bus)
        return [
            self.add_root_port(f"{id}-dp{i}", internal) for i in range(n_downstream)
        ]

    def qom_path(self, device: Device) -> str:
        """Return ``"/machine/peripheral/<id>"`` for a device of this tree.

        :raises UsageError: a device of another tree.
        """
        if device not in self:
            raise UsageError(f"{device!r} does not belong to this tree")
        return f"/machine/peripheral/{device.id}"


class RunStateTransition(NamedTuple):
    """One entry of :attr:`VM.runstate_history`."""

    old: RunState
    new: RunState


class VM:
    """A VM: its qdev tree, run state, change-state handlers and events.

    All methods run on one thread, like QEMU's main loop under the BQL.

    :param tree: the device tree (default: a new empty one).
    :param runstate: the initial run state (default PRELAUNCH).
    :param events: the event bus (default: a new one).
    :param on_failure: passed to :class:`~mpvfio.vmstate.VMChangeStateHandlers`.
    """

    def __init__(
        self,
        tree: QdevTree | None = None,
        runstate: RunState = RunState.PRELAUNCH,
        events: EventBus | None = None,
        on_failure: FailureCallback | None = None,
    ) -> None:
        self.tree = tree if tree is not None else QdevTree()
        self.handlers = VMChangeStateHandlers(on_failure=on_failure)
        self.events = events if events is not None else EventBus()
        self.runstate = RunState(runstate)
        #: Every run-state change, oldest first.
        self.runstate_history: list[RunStateTransition] = []
        #: Whether the vCPUs run (paused before the stop notify, resumed
        #: after the start notify).
        self.vcpus_running = self.runstate == RunState.RUNNING

    # -- run state ---------------------------------------------------------

    def runstate_set(self, state: RunState) -> None:
        """Set the run state, log and record the change (no-op if equal)."""
        new = RunState(state)
        old = self.runstate
        if new == old:
            return
        _log.debug("runstate %s -> %s", old, new)
        self.runstate = new
        self.runstate_history.append(RunStateTransition(old, new))

    def is_running(self) -> bool:
        """``runstate_is_running()``: whether the run state is RUNNING."""
        return self.runstate == RunState.RUNNING

    def _do_vm_stop(self, state: RunState, send_stop: bool) -> int:
        new = RunState(state)
        if not runstate_is_live(self.runstate):
            # vm_stop_force_state on a non-live VM: no handler runs (O9).
            self.runstate_set(new)
            return 0
        self.runstate_set(new)  # handlers already see the new state
        self.vcpus_running = False
        ret = self.handlers.notify(False, new)
        if send_stop:
            self.events.emit(Event("STOP"))
        return ret

    def vm_stop(self, state: RunState) -> int:
        """Stop the VM (``vm_stop_force_state``; R2.6).

        If the run state is live: set ``state``, pause the vCPUs, run the
        stop notification, emit ``STOP``; return the notification's result.
        Otherwise only set ``state``, run no handler and return 0.
        """
        return self._do_vm_stop(state, send_stop=True)

    def vm_stop_force_state(self, state: RunState) -> int:
        """Same as :meth:`vm_stop` (QEMU's name for these semantics)."""
        return self._do_vm_stop(state, send_stop=True)

    def vm_shutdown(self) -> int:
        """Stop with SHUTDOWN like :meth:`vm_stop`, but emit no ``STOP``."""
        return self._do_vm_stop(RunState.SHUTDOWN, send_stop=False)

    def vm_start(self) -> None:
        """Start the VM (``vm_prepare_start`` + ``vm_start``; R2.6).

        No-op if already RUNNING.  Otherwise emit ``RESUME``, set RUNNING,
        run the start notification (its result is ignored), then resume the
        vCPUs.
        """
        if self.is_running():
            return
        self.events.emit(Event("RESUME"))
        self.runstate_set(RunState.RUNNING)
        self.handlers.notify(True, RunState.RUNNING)
        self.vcpus_running = True

    # -- handler registration ----------------------------------------------

    def qdev_add_vm_change_state_handler(
        self,
        device: Device,
        cb: VMChangeStateHandler | None = None,
        prepare_cb: VMChangeStateHandler | None = None,
        cb_ret: VMChangeStateHandlerWithRet | None = None,
        adj: int = 0,
        name: str | None = None,
    ) -> VMChangeStateEntry:
        """Register a handler at ``qdev_priority(device.depth, adj)``.

        ``qdev_add_vm_change_state_handler_full`` with the seed's ``adj``.

        :param name: default ``f"{device.id}:{qualname}"`` of the callback.
        :raises UsageError: both ``cb`` and ``cb_ret``, a device of another
            tree, or a bad ``adj``.
        """
        if cb is not None and cb_ret is not None:
            raise UsageError(
                f"qdev handler for {device.id!r}: give cb or cb_ret, not both"
            )
        if device not in self.tree:
            raise UsageError(f"{device!r} does not belong to this VM's tree")
        priority = qdev_priority(device.depth, adj)
        if name is None:
            fn = next((f for f in (cb, cb_ret, prepare_cb) if f is not None), None)
            qual = getattr(fn, "__qualname__", None) if fn is not None else None
            name = f"{device.id}:{qual}" if isinstance(qual, str) else device.id
        return self.handlers.add(
            cb=cb, prepare_cb=prepare_cb, cb_ret=cb_ret, priority=priority, name=name
        )

    def add_vm_change_state_handler(
        self,
        cb: VMChangeStateHandler | None = None,
        prepare_cb: VMChangeStateHandler | None = None,
        cb_ret: VMChangeStateHandlerWithRet | None = None,
        name: str | None = None,
    ) -> VMChangeStateEntry:
        """Register a non-qdev handler at priority 0.

        It runs before every qdev handler on start and after them on stop
        (R3.2).
        """
        return self.handlers.add(
            cb=cb, prepare_cb=prepare_cb, cb_ret=cb_ret, priority=0, name=name
        )

    def del_vm_change_state_handler(self, entry: VMChangeStateEntry) -> None:
        """Unregister ``entry`` (idempotent)."""
        self.handlers.remove(entry)
