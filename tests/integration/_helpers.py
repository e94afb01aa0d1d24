"""Harness shared by the integration tests: machine builders and child envs.

Only builders live here, no assertions of a test's own: each test module
keeps what it checks.  Imported as ``_helpers`` (pytest puts this directory
on ``sys.path``; it has no ``__init__.py``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from mpvfio.devices.profiles import Profile
from mpvfio.machine import Machine, VFIODevice
from mpvfio.net.transport import Cancel
from mpvfio.uapi.vfio import MigState
from mpvfio.vfiomig import MigrationProps
from mpvfio.vmstate import RunState

ROOT = Path(__file__).resolve().parents[2]
EVENTS = MigrationProps(migration_events=True)
HAS_CALL_FDS = hasattr(VFIODevice, "call_fds")

MachineFactory = Callable[..., Machine]


def child_env(**extra: str) -> dict[str, str]:
    """``os.environ`` with this checkout first on ``PYTHONPATH``, plus ``extra``."""
    env = dict(os.environ)
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{path}" if path else str(ROOT)
    env.update(extra)
    return env


@contextlib.contextmanager
def machine_factory(
    mode: str = "serial", vfs: int = 0, profile: Profile | str = "instant"
) -> Iterator[MachineFactory]:
    """``make(mode, vfs, profile, **kw)``: a new Machine with ``vfs`` VFs
    ``vf0..`` (migration events on), every one closed on exit.  The
    arguments given here are ``make``'s defaults."""
    made: list[Machine] = []
    default_mode, default_vfs, default_profile = mode, vfs, profile

    def make(
        mode: str = default_mode,
        vfs: int = default_vfs,
        profile: Profile | str | None = None,
        **kw: Any,
    ) -> Machine:
        m = Machine(mode, **kw)
        made.append(m)
        for i in range(vfs):
            m.add_vfio_device(f"vf{i}", profile or default_profile, props=EVENTS)
        return m

    try:
        yield make
    finally:
        for m in made:
            m.close()


def started_source(mode: str, vfs: int, profile: Profile) -> Machine:
    """A running source named ``src``; the caller closes it."""
    m = Machine(mode, name="src")
    try:
        for i in range(vfs):
            m.add_vfio_device(f"vf{i}", profile, props=EVENTS)
        m.start()
    except BaseException:
        m.close()
        raise
    return m


def pair(
    machine: MachineFactory,
    mode: str = "serial",
    vfs: int = 2,
    profile: Profile | str | None = None,
    target_profile: Profile | str | None = None,
    *,
    target_mode: str | None = None,
    arch: str | None = None,
    target_arch: str | None = None,
) -> tuple[Machine, Machine]:
    """A running source and a target waiting in inmigrate (profile: the
    factory's default unless given)."""
    src = machine(mode, vfs, profile, name="src", arch=arch)
    dst = machine(
        target_mode or mode,
        vfs,
        target_profile or profile,
        name="dst",
        arch=target_arch,
    )
    src.start()
    dst.start(run=False, runstate=RunState.INMIGRATE)
    return src, dst


def real_states(m: Machine) -> list[MigState]:
    """What the devices themselves say (GET MIG_DEVICE_STATE)."""
    return [MigState(d.call("device_state")) for d in m.devices]


def ran(m: Machine) -> bool:
    """Whether the machine's VM ever entered ``running``."""
    return any(t.new == RunState.RUNNING for t in m.vm.runstate_history)


def cancel_at(stage: str, reason: str) -> tuple[Cancel, Callable[[str], None]]:
    """A :class:`Cancel` and an ``on_stage`` hook that cancels it at ``stage``."""
    cancel = Cancel()

    def on_stage(name: str) -> None:
        if name == stage:
            cancel.cancel(reason)

    return cancel, on_stage
