"""The public API is explicit, importable, and its errors pickle."""

from __future__ import annotations

import pickle

import pytest

import mpvfio
from mpvfio import api, errors

EXPECTED = {
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
    "arc_report_json",
    "arc_report_text",
    "KernelVFIODevice",
    "open_backend",
    "parse_spec",
    "VFIOUserDevice",
    "DeviceServer",
    "ServerProcess",
    "IncomingInfo",
    "LiveStats",
    "MachineLock",
    "MigrationError",
    "MigrationInfo",
    "MigrationParams",
    "incoming",
    "migrate",
    "run_local",
    "Cancel",
    "listen",
}


def test_exports_are_pinned() -> None:
    assert set(api.__all__) == EXPECTED
    for name in api.__all__:
        assert getattr(api, name) is not None


def test_package_import_stays_minimal() -> None:
    assert isinstance(mpvfio.__version__, str)
    assert not hasattr(mpvfio, "Machine")


@pytest.mark.parametrize(
    "exc",
    [
        errors.UsageError("bad"),
        errors.DeviceError("arc failed", "vf0", 5),
        errors.TransitionError("nope", "vf1", 22, "STOP_COPY", "PRE_COPY"),
        errors.WorkerCrashed("died", "vf2", -9),
        errors.WorkerTimeout("hung", "vf3"),
        errors.BarrierTimeout("late"),
        errors.MigrationBlockedError("no P2P"),
    ],
)
def test_errors_pickle_and_say_whose_fault(exc: errors.MpvfioError) -> None:
    back = pickle.loads(pickle.dumps(exc))
    assert type(back) is type(exc)
    assert str(back) == str(exc)
    assert back.args == exc.args


def test_error_text_names_device_errno_and_signal() -> None:
    assert str(errors.TransitionError("x", "vf1", 22)) == "x (device vf1, EINVAL)"
    assert "SIGKILL(-9)" in str(errors.WorkerCrashed("died", "vf2", -9))
    assert "EXIT(7)" in str(errors.WorkerCrashed("died", "vf2", 7))
    assert errors.exitcode_name(None) == "RUNNING"
