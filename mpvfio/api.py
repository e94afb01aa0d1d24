"""The public Python API of mpvfio, in one place (top layer).

Embed mpvfio by importing from here; every name below is documented and
typed, and ``tests/unit/test_api.py`` pins the list.  ``import mpvfio``
itself stays minimal (version only), so importing a low layer never pulls in
the orchestrator.

It covers the machine (modes, devices of every backend, the handler list),
the switchover and live migration (``migrate``, ``incoming``, ``run_local``),
the device transports (``open_backend``, ``VFIOUserDevice``,
``DeviceServer``, ``ServerProcess``) and the arc report.

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
from mpvfio.devices.kernel import KernelVFIODevice as KernelVFIODevice
from mpvfio.devices.profiles import BUILTIN_PROFILES as BUILTIN_PROFILES
from mpvfio.devices.profiles import Fault as Fault
from mpvfio.devices.profiles import Profile as Profile
from mpvfio.devices.profiles import get_profile as get_profile
from mpvfio.devices.profiles import load_profile as load_profile
from mpvfio.devices.registry import open_backend as open_backend
from mpvfio.devices.registry import parse_spec as parse_spec
from mpvfio.devices.vfio_user.client import VFIOUserDevice as VFIOUserDevice
from mpvfio.devices.vfio_user.server import DeviceServer as DeviceServer
from mpvfio.devices.vfio_user.server import ServerProcess as ServerProcess
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
from mpvfio.jobs.switchover import SwitchoverResult as SwitchoverResult
from mpvfio.jobs.switchover import event_order_violations as event_order_violations
from mpvfio.jobs.switchover import run_switchover as run_switchover
from mpvfio.machine import Machine as Machine
from mpvfio.machine import Mode as Mode
from mpvfio.machine import NotifyReport as NotifyReport
from mpvfio.machine import VFIODevice as VFIODevice
from mpvfio.migration.engine import IncomingInfo as IncomingInfo
from mpvfio.migration.engine import LiveStats as LiveStats
from mpvfio.migration.engine import MachineLock as MachineLock
from mpvfio.migration.engine import MigrationError as MigrationError
from mpvfio.migration.engine import MigrationInfo as MigrationInfo
from mpvfio.migration.engine import MigrationParams as MigrationParams
from mpvfio.migration.engine import incoming as incoming
from mpvfio.migration.engine import migrate as migrate
from mpvfio.migration.local import run_local as run_local
from mpvfio.net.transport import Cancel as Cancel
from mpvfio.net.transport import listen as listen
from mpvfio.qdev import VM as VM
from mpvfio.qdev import QdevTree as QdevTree
from mpvfio.report.arcreport import report_json as arc_report_json
from mpvfio.report.arcreport import text_report as arc_report_text
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
    "Cancel",
    "DeviceBackend",
    "DeviceError",
    "DeviceServer",
    "EmulatedDevice",
    "Event",
    "EventBus",
    "Fault",
    "IncomingInfo",
    "KernelVFIODevice",
    "LiveStats",
    "Machine",
    "MachineLock",
    "MigFlag",
    "MigState",
    "MigrationBlockedError",
    "MigrationError",
    "MigrationInfo",
    "MigrationParams",
    "MigrationProps",
    "Mode",
    "MpvfioError",
    "NotifyReport",
    "Profile",
    "ProfileError",
    "QdevTree",
    "RunState",
    "ServerProcess",
    "StateError",
    "SwitchoverResult",
    "TransitionError",
    "UsageError",
    "VFIODevice",
    "VFIOMigration",
    "VFIOUserDevice",
    "VMChangeStateHandlers",
    "WorkerCrashed",
    "WorkerError",
    "WorkerTimeout",
    "arc_report_json",
    "arc_report_text",
    "event_order_violations",
    "fsm_walk",
    "get_profile",
    "incoming",
    "listen",
    "load_profile",
    "migrate",
    "open_backend",
    "parse_spec",
    "qdev_priority",
    "run_local",
    "run_switchover",
]
