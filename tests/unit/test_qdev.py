"""Tests for mpvfio.qdev: tree depth (R3.1) and the VM run-state machine (R2.6)."""

from __future__ import annotations

import errno
from collections.abc import Callable

import pytest

from mpvfio.errors import UsageError
from mpvfio.events import Event
from mpvfio.qdev import VM, Bus, Device, QdevTree, RunStateTransition
from mpvfio.vmstate import RunState, qdev_priority

# -- tree and depth -------------------------------------------------------


def test_depth_examples() -> None:
    tree = QdevTree()
    sysdev = tree.add_device("sysdev", tree.main_system_bus)
    root = tree.add_pci_host()
    nic = tree.add_device("nic", root)
    rp_bus = tree.add_root_port("rp0", root)
    ep = tree.add_device("vf0", rp_bus)
    rp1_bus = tree.add_root_port("rp1", root)
    (dp_bus,) = tree.add_switch("sw0", rp1_bus, 1)
    deep = tree.add_device("vf1", dp_bus)

    assert sysdev.depth == 1  # sysbus device
    assert nic.depth == 2  # PCI device on a host bridge's root bus
    assert ep.depth == 3  # PCIe endpoint behind a root port
    assert deep.depth == 5  # root port -> switch up port -> down port
    assert tree.device("pcie.0-host").depth == 1
    assert root.name == "pcie.0"
    assert root.owner is tree.device("pcie.0-host")
    assert tree.device("sw0").depth == 3
    assert tree.device("sw0-dp0").depth == 4


def test_depth_of_detached_device_is_zero() -> None:
    assert Device("lonely", None).depth == 0


def test_depth_stops_at_device_without_parent_bus() -> None:
    top = Device("top", None)  # not on any bus
    tree = QdevTree()
    # a bus owned by a bus-less device: depth counts up to that device only
    bus = Bus("b", top)
    assert Device("child", bus).depth == 1
    assert tree.main_system_bus.owner is None


def test_tree_helpers() -> None:
    tree = QdevTree()
    root = tree.add_pci_host()
    a = tree.add_device("a", root)
    downs = tree.add_switch("sw", root, 3)
    assert [b.name for b in downs] == ["sw-dp0", "sw-dp1", "sw-dp2"]
    assert [b.owner.id for b in downs if b.owner] == ["sw-dp0", "sw-dp1", "sw-dp2"]
    assert [d.id for d in tree.devices] == [
        "pcie.0-host",
        "a",
        "sw",
        "sw-dp0",
        "sw-dp1",
        "sw-dp2",
    ]
    assert tree.qom_path(a) == "/machine/peripheral/a"
    assert root.children == [a, tree.device("sw")]
    assert a in tree
    assert tree.add_device("s").parent_bus is tree.main_system_bus
    second = tree.add_pci_host("pxb")
    assert second.name == "pxb.0"


def test_tree_rejects_bad_input() -> None:
    tree = QdevTree()
    root = tree.add_pci_host()
    tree.add_device("a", root)
    with pytest.raises(UsageError, match="duplicate device id 'a'"):
        tree.add_device("a", root)
    with pytest.raises(UsageError, match=r"duplicate bus name 'pcie\.0'"):
        tree.add_pci_host("other-host", bus_name="pcie.0")
    tree.add_device("sw-dp1", root)
    with pytest.raises(UsageError, match="duplicate device id 'sw-dp1'"):
        tree.add_switch("sw", root, 2)
    assert [d.id for d in tree.devices] == ["pcie.0-host", "a", "sw-dp1"]
    with pytest.raises(UsageError, match="non-empty"):
        tree.add_device("", root)
    other = QdevTree()
    with pytest.raises(UsageError, match="does not belong"):
        tree.add_device("b", other.main_system_bus)
    with pytest.raises(UsageError, match="does not belong"):
        tree.qom_path(Device("ghost", None))
    with pytest.raises(UsageError, match="no device"):
        tree.device("ghost")
    with pytest.raises(UsageError, match="n_downstream"):
        tree.add_switch("sw", root, 0)


# -- VM -------------------------------------------------------------------


def make_vm(runstate: RunState = RunState.RUNNING) -> tuple[VM, list[str]]:
    """A VM whose event names are appended to the returned log as 'event:X'."""
    vm = VM(runstate=runstate)
    log: list[str] = []

    def on_event(ev: Event) -> None:
        assert ev.data == {}
        log.append(f"event:{ev.name}")

    vm.events.subscribe(on_event)
    return vm, log


def test_vm_defaults() -> None:
    vm = VM()
    assert vm.runstate is RunState.PRELAUNCH
    assert vm.runstate_history == []
    assert not vm.vcpus_running


def test_vm_stop_from_running() -> None:
    vm, log = make_vm()
    seen: list[tuple[str, RunState]] = []

    def cb(running: bool, state: RunState) -> None:
        assert running is False
        assert state is RunState.FINISH_MIGRATE
        seen.append(("cb", vm.runstate))
        log.append("cb")
        assert not vm.vcpus_running

    def prep(running: bool, state: RunState) -> None:
        seen.append(("prepare", vm.runstate))
        log.append("prepare")

    dev = vm.tree.add_device("dev")
    vm.qdev_add_vm_change_state_handler(dev, cb=cb, prepare_cb=prep)
    assert vm.vm_stop(RunState.FINISH_MIGRATE) == 0
    assert seen == [
        ("prepare", RunState.FINISH_MIGRATE),
        ("cb", RunState.FINISH_MIGRATE),
    ]
    assert log == ["prepare", "cb", "event:STOP"]
    assert vm.runstate is RunState.FINISH_MIGRATE
    assert vm.runstate_history == [
        RunStateTransition(RunState.RUNNING, RunState.FINISH_MIGRATE)
    ]


def test_vm_stop_returns_cb_ret_or() -> None:
    vm, _ = make_vm()
    dev = vm.tree.add_device("dev")
    vm.qdev_add_vm_change_state_handler(dev, cb_ret=lambda r, s: -errno.EIO)
    vm.add_vm_change_state_handler(cb_ret=lambda r, s: -errno.EINVAL)
    assert vm.vm_stop(RunState.PAUSED) == (-errno.EIO) | (-errno.EINVAL)


def test_vm_stop_when_suspended_notifies() -> None:
    vm, log = make_vm(RunState.SUSPENDED)
    vm.add_vm_change_state_handler(cb=lambda r, s: log.append(f"cb:{s}"))
    vm.vm_stop(RunState.FINISH_MIGRATE)
    assert log == ["cb:finish-migrate", "event:STOP"]


def test_vm_stop_when_paused_runs_no_handler() -> None:
    vm, log = make_vm(RunState.PAUSED)
    vm.add_vm_change_state_handler(
        cb=lambda r, s: log.append("cb"), prepare_cb=lambda r, s: log.append("p")
    )
    assert vm.vm_stop(RunState.FINISH_MIGRATE) == 0
    assert log == []  # no handler, no STOP event
    assert vm.runstate is RunState.FINISH_MIGRATE
    assert vm.runstate_history == [
        RunStateTransition(RunState.PAUSED, RunState.FINISH_MIGRATE)
    ]
    assert vm.vm_stop_force_state(RunState.POSTMIGRATE) == 0
    assert log == []
    assert vm.runstate_history[-1].new is RunState.POSTMIGRATE


def test_vm_shutdown_sends_no_stop() -> None:
    vm, log = make_vm()
    vm.add_vm_change_state_handler(cb=lambda r, s: log.append(f"cb:{r}:{s}"))
    assert vm.vm_shutdown() == 0
    assert log == ["cb:False:shutdown"]
    assert vm.runstate is RunState.SHUTDOWN


def test_vm_start_order() -> None:
    vm, log = make_vm(RunState.INMIGRATE)

    def prep(running: bool, state: RunState) -> None:
        assert vm.runstate is RunState.RUNNING  # set before notify
        assert not vm.vcpus_running  # vCPUs resume only after notify
        log.append(f"prepare:{running}:{state}")

    def cb(running: bool, state: RunState) -> None:
        assert vm.runstate is RunState.RUNNING
        log.append(f"cb:{running}:{state}")

    dev = vm.tree.add_device("dev")
    vm.qdev_add_vm_change_state_handler(dev, cb=cb, prepare_cb=prep)
    vm.vm_start()
    assert log == ["event:RESUME", "prepare:True:running", "cb:True:running"]
    assert vm.runstate is RunState.RUNNING
    assert vm.vcpus_running
    # already running: no-op
    vm.vm_start()
    assert log == ["event:RESUME", "prepare:True:running", "cb:True:running"]


def test_runstate_history() -> None:
    vm, _ = make_vm(RunState.PRELAUNCH)
    vm.vm_start()
    vm.vm_stop(RunState.PAUSED)
    vm.vm_start()
    vm.vm_stop(RunState.FINISH_MIGRATE)
    vm.runstate_set(RunState.FINISH_MIGRATE)  # unchanged: not recorded
    vm.runstate_set(RunState.POSTMIGRATE)
    assert vm.runstate_history == [
        (RunState.PRELAUNCH, RunState.RUNNING),
        (RunState.RUNNING, RunState.PAUSED),
        (RunState.PAUSED, RunState.RUNNING),
        (RunState.RUNNING, RunState.FINISH_MIGRATE),
        (RunState.FINISH_MIGRATE, RunState.POSTMIGRATE),
    ]
    assert vm.runstate_history[0].old is RunState.PRELAUNCH
    assert vm.runstate_history[0].new is RunState.RUNNING


def test_qdev_handlers_ordered_by_depth() -> None:
    vm, log = make_vm()
    tree = vm.tree
    root = tree.add_pci_host()
    vf_a = tree.add_device("vfa", tree.add_root_port("rp0", root))
    vf_b = tree.add_device("vfb", tree.add_root_port("rp1", root))
    (dp,) = tree.add_switch("sw", tree.add_root_port("rp2", root), 1)
    vf_deep = tree.add_device("vfdeep", dp)
    nic = tree.add_device("nic", root)

    vm.add_vm_change_state_handler(cb=lambda r, s: log.append("clock"))

    def logger(label: str) -> Callable[[bool, RunState], None]:
        return lambda r, s: log.append(label)

    for dev in (vf_deep, vf_a, nic, vf_b):
        vm.qdev_add_vm_change_state_handler(dev, cb=logger(dev.id))
    vm.qdev_add_vm_change_state_handler(
        vf_a, cb=lambda r, s: log.append("vfa-first"), adj=-1
    )
    vm.qdev_add_vm_change_state_handler(
        vf_a, cb=lambda r, s: log.append("vfa-second"), adj=1
    )
    entry = vm.handlers.entries[-1]
    assert entry.priority == qdev_priority(5)
    assert entry.name.startswith("vfdeep:")

    vm.vm_stop(RunState.FINISH_MIGRATE)
    assert log == [
        "vfdeep",
        "vfa-second",
        "vfb",
        "vfa",
        "vfa-first",
        "nic",
        "clock",
        "event:STOP",
    ]
    log.clear()
    vm.vm_start()
    assert log == [
        "event:RESUME",
        "clock",
        "nic",
        "vfa-first",
        "vfa",
        "vfb",
        "vfa-second",
        "vfdeep",
    ]


def test_qdev_add_rejects_cb_and_cb_ret() -> None:
    vm = VM()
    dev = vm.tree.add_device("dev")
    with pytest.raises(UsageError, match="not both"):
        vm.qdev_add_vm_change_state_handler(
            dev, cb=lambda r, s: None, cb_ret=lambda r, s: 0
        )
    with pytest.raises(UsageError, match="does not belong"):
        vm.qdev_add_vm_change_state_handler(Device("ghost", None), cb=lambda r, s: None)
    with pytest.raises(UsageError, match="adjustment"):
        vm.qdev_add_vm_change_state_handler(dev, cb=lambda r, s: None, adj=1 << 15)
    assert vm.handlers.entries == ()


def test_del_vm_change_state_handler() -> None:
    vm, log = make_vm()
    e = vm.add_vm_change_state_handler(cb=lambda r, s: log.append("cb"), name="x")
    assert e.name == "x"
    vm.del_vm_change_state_handler(e)
    vm.del_vm_change_state_handler(e)
    vm.vm_stop(RunState.PAUSED)
    assert log == ["event:STOP"]
