"""The public Python API of mpvfio, in one place (top layer).

Embed mpvfio by importing from here; every name below is documented and
typed, and ``tests/unit/test_api.py`` pins the list.  ``import mpvfio``
itself stays minimal (version only), so importing a low layer never pulls in
the orchestrator.

Example::

    from mpvfio.api import Machine, MigrationProps, RunState, run_switchover

    with Machine("workers") as vm:
        for _ in range(4):
            vm.add_vfio_device(profile="fixed50",
                               props=MigrationProps(migration_events=True))
        vm.events.subscribe(print, ["VFIO_MIGRATION"])
        vm.start()
        result = run_switchover(vm)
        print(result.median("stop_ms"), result.ok)
"""

from __future__ import annotations

from mpvfio.devices.base import ArcRecord as ArcRecord
from mpvfio.devices.base import DeviceBackend as DeviceBackend
from mpvfio.devices.emulated import EmulatedDevice as EmulatedDevice
from mpvfio.devices.profiles import BUILTIN_PROFILES as BUILTIN_PROFILES
from mpvfio.devices.profiles import Fault as Fault
from mpvfio.devices.profiles import Profile as Profile
from mpvfio.devices.profiles import get_profile as get_profile
from mpvfio.devices.profiles import load_profile as load_profile
from mpvfio.errors import BarrierError as BarrierError
from mpvfio.errors import DeviceError as DeviceError
from mpvfio.errors import MigrationBlockedError as MigrationBlockedError
from mpvfio.errors import MpvfioError as MpvfioError
from mpvfio.errors import ProfileError as ProfileError
from mpvfio.errors import StateError as StateError
from mpvfio.errors import TransitionError as TransitionError
from mpvfio.errors import UsageError as UsageError
from mpvfio.errors import WorkerCrashed as WorkerCrashed
from mpvfio.errors import WorkerError as WorkerError
from mpvfio.errors import WorkerTimeout as WorkerTimeout
from mpvfio.events import Event as Event
from mpvfio.events import EventBus as EventBus
from mpvfio.machine import Machine as Machine
from mpvfio.machine import Mode as Mode
from mpvfio.machine import NotifyReport as NotifyReport
from mpvfio.machine import VFIODevice as VFIODevice
from mpvfio.qdev import VM as VM
from mpvfio.qdev import QdevTree as QdevTree
from mpvfio.switchover import SwitchoverResult as SwitchoverResult
from mpvfio.switchover import event_order_violations as event_order_violations
from mpvfio.switchover import run_switchover as run_switchover
from mpvfio.uapi.fsm import walk as fsm_walk
from mpvfio.uapi.vfio import MigFlag as MigFlag
from mpvfio.uapi.vfio import MigState as MigState
from mpvfio.vfiomig import MigrationProps as MigrationProps
from mpvfio.vfiomig import VFIOMigration as VFIOMigration
from mpvfio.vmstate import RunState as RunState
from mpvfio.vmstate import VMChangeStateHandlers as VMChangeStateHandlers
from mpvfio.vmstate import qdev_priority as qdev_priority

__all__ = [
    "BUILTIN_PROFILES",
    "VM",
    "ArcRecord",
    "BarrierError",
    "DeviceBackend",
    "DeviceError",
    "EmulatedDevice",
    "Event",
    "EventBus",
    "Fault",
    "Machine",
    "MigFlag",
    "MigState",
    "MigrationBlockedError",
    "MigrationProps",
    "Mode",
    "MpvfioError",
    "NotifyReport",
    "Profile",
    "ProfileError",
    "QdevTree",
    "RunState",
    "StateError",
    "SwitchoverResult",
    "TransitionError",
    "UsageError",
    "VFIODevice",
    "VFIOMigration",
    "VMChangeStateHandlers",
    "WorkerCrashed",
    "WorkerError",
    "WorkerTimeout",
    "event_order_violations",
    "fsm_walk",
    "get_profile",
    "load_profile",
    "qdev_priority",
    "run_switchover",
]
