"""The VFIO migration layer of one device: QEMU's hw/vfio/migration.c (layer 1).

:class:`VFIOMigration` keeps QEMU's cached ``device_state`` and ``data_fd``
for one device backend and implements, rule for rule
(../shared/spec/QEMU.md):

* R4.1/R4.2  probe the migration flags (STOP_COPY mandatory); start RUNNING.
* R5.1       ``set_state(new, recover)``: a request for the cached state is a
             no-op (no SET, no event); ``pre-copy-p2p-prepare`` before the
             PRE_COPY_P2P SET; on success cache + event, and a second data fd
             is closed with -EBADF; on failure SET(recover), else reset.
* R5.2       ``set_state_or_reset(new)`` = recover ERROR: reset -> RUNNING.
* R6.1/R6.2  the prepare target (exactly PRE_COPY -> PRE_COPY_P2P, else
             RUNNING_P2P) and the main target (RUNNING on start; STOP_COPY
             when pre-copying and the run state is finish-migrate or paused;
             else STOP), both read from the cached state at call time.
* R8/R9      the save and load steps the switchover uses.
* R12        VFIO_MIGRATION events (``migration-events``), and the opt-in
             VFIO_MIGRATION_PREPARE event of seed 003 before every SET.

Errors follow QEMU: ``set_state`` returns 0 or a negative errno and records
the :class:`TransitionError` in :attr:`errors`, so a failed device never
stops the handler walk.  The one exception is a failing reset: QEMU calls
``hw_error()`` and the VM aborts; here a :class:`DeviceError` escapes the
handler, which the handler list reports while the walk goes on.
The same class runs in the parent (serial and threads modes) and inside a
worker process (workers mode), where ``emit`` forwards events to the parent.
"""

from __future__ import annotations

import errno as _errno
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

from mpvfio.devices.base import DeviceBackend
from mpvfio.errors import DeviceError, MigrationBlockedError, TransitionError
from mpvfio.events import Event
from mpvfio.uapi.vfio import PRECOPY_STATES, MigFlag, MigState, qapi_name
from mpvfio.vmstate import RunState

__all__ = [
    "DATA_BUFFER_SIZE",
    "MigrationProps",
    "VFIOMigration",
    "check_multiple_devices",
    "main_target",
    "prepare_target",
]

_log = logging.getLogger(__name__)
S = MigState

#: VFIO_MIG_DEFAULT_DATA_BUFFER_SIZE (QEMU.md R11.4): chunk of one data read.
DATA_BUFFER_SIZE = 1024 * 1024


@dataclass(frozen=True)
class MigrationProps:
    """Per-device properties (QEMU.md R10.8 and seed 000/003).

    :param migration_events: emit VFIO_MIGRATION events.
    :param prepare_events: emit VFIO_MIGRATION_PREPARE before every SET
        (seed 003 v1; not upstream, hence opt-in).
    :param parallel_states: ``x-migration-parallel-states`` (seed 000): take
        part in parallel transitions; off = this device runs serially.
    """

    migration_events: bool = False
    prepare_events: bool = False
    parallel_states: bool = True


def prepare_target(cached: MigState) -> MigState:
    """R6.1: PRE_COPY_P2P if the cached state is exactly PRE_COPY."""
    return S.PRE_COPY_P2P if cached == S.PRE_COPY else S.RUNNING_P2P


def main_target(cached: MigState, running: bool, runstate: RunState) -> MigState:
    """R6.2/O5: RUNNING on start; STOP_COPY when pre-copying and finishing."""
    if running:
        return S.RUNNING
    if cached in PRECOPY_STATES and runstate in (
        RunState.FINISH_MIGRATE,
        RunState.PAUSED,
    ):
        return S.STOP_COPY
    return S.STOP


def check_multiple_devices(flags: list[MigFlag], names: list[str]) -> None:
    """R4.6: two or more migratable devices all need P2P.

    :raise MigrationBlockedError: naming the devices without P2P.
    """
    if len(flags) < 2:
        return
    lacking = [n for f, n in zip(flags, names, strict=True) if not f & MigFlag.P2P]
    if lacking:
        raise MigrationBlockedError(
            "Multiple VFIO devices migration is supported only if all of them "
            f"support P2P migration; without P2P: {', '.join(lacking)}"
        )


class VFIOMigration:
    """QEMU's per-device VFIO migration state (module docstring).

    :param device: the backend (emulated, vfio-user, kernel).
    :param name: the device id (``device-id`` in events).
    :param qom_path: the QOM path (``qom-path`` in events).
    :param emit: where events go (``None``: dropped).
    :param props: per-device properties.
    :param on_error: called with every transition error the handlers hit
        (QEMU attaches it to the outgoing migration, else prints it).
    """

    def __init__(
        self,
        device: DeviceBackend,
        name: str,
        qom_path: str,
        emit: Callable[[Event], None] | None = None,
        props: MigrationProps | None = None,
        on_error: Callable[[TransitionError], None] | None = None,
    ) -> None:
        self.device = device
        self.name = name
        self.qom_path = qom_path
        self.props = props or MigrationProps()
        self._emit = emit
        self._on_error = on_error
        flags = device.migration_flags()
        if not flags & MigFlag.STOP_COPY:
            raise DeviceError(
                "device lacks the mandatory VFIO_MIGRATION_STOP_COPY",
                name,
                _errno.EOPNOTSUPP,
            )
        self.flags = MigFlag(flags)
        self.device_state = S.RUNNING  # R4.2: assumed, never set
        self.data_fd = -1
        self.errors: list[TransitionError] = []

    @property
    def has_p2p(self) -> bool:
        """Whether the device advertises P2P (and so gets a prepare step)."""
        return bool(self.flags & MigFlag.P2P)

    @property
    def has_precopy(self) -> bool:
        """Whether the device advertises PRE_COPY."""
        return bool(self.flags & MigFlag.PRE_COPY)

    # -------------------------------------------------------------- events
    def _event(self, name: str, state: str) -> None:
        if self._emit is not None:
            self._emit(
                Event(
                    name,
                    {
                        "device-id": self.name,
                        "qom-path": self.qom_path,
                        "device-state": state,
                    },
                )
            )

    def _set_cached(self, state: MigState) -> None:
        self.device_state = state
        if self.props.migration_events:
            name = qapi_name(state)
            if name is not None:
                self._event("VFIO_MIGRATION", name)

    # --------------------------------------------------------------- R5.1
    def set_state(self, new: MigState, recover: MigState) -> int:
        """Move to ``new``; on failure go to ``recover`` (ERROR: reset).

        :return: 0, or the negative errno of the first failure.
        """
        if new == self.device_state:
            return 0
        old = self.device_state
        if new == S.PRE_COPY_P2P and self.props.migration_events:
            self._event("VFIO_MIGRATION", "pre-copy-p2p-prepare")
        if self.props.prepare_events:
            self._event("VFIO_MIGRATION_PREPARE", qapi_name(new) or new.name.lower())
        try:
            fd = self.device.set_state(new)
        except TransitionError as exc:
            return self._recover(exc, new, recover)
        except DeviceError as exc:
            return self._recover(
                TransitionError(
                    str(exc.args[0]),
                    self.name,
                    exc.errno or _errno.EIO,
                    self.device_state.name,
                    new.name,
                ),
                new,
                recover,
            )
        self._set_cached(new)
        if fd is not None:
            if self.data_fd != -1:
                os.close(fd)
                err = TransitionError(
                    "the device returned a second data fd",
                    self.name,
                    _errno.EBADF,
                    old.name,
                    new.name,
                )
                self._record(err)
                return -_errno.EBADF
            self.data_fd = fd
        return 0

    def set_state_or_reset(self, new: MigState) -> int:
        """R5.2: ``set_state(new, recover=ERROR)``: on failure reset."""
        return self.set_state(new, S.ERROR)

    def _record(self, err: TransitionError) -> None:
        self.errors.append(err)
        _log.warning("%s", err)
        if self._on_error is not None:
            self._on_error(err)

    def _recover(self, first: TransitionError, new: MigState, recover: MigState) -> int:
        code = -(first.errno or _errno.EIO)
        if first.device != self.name:
            first = TransitionError(
                str(first.args[0]), self.name, first.errno, first.cur, first.new
            )
        if recover != S.ERROR:
            try:
                fd = self.device.set_state(recover)
            except DeviceError as exc:
                _log.warning(
                    "%s: recovery to %s failed too: %s", self.name, recover.name, exc
                )
            else:
                self._record(_annotate(first, new, f"recovered to {recover.name}"))
                self._set_cached(recover)
                if fd is not None:  # recovering opened a session: keep one fd
                    if self.data_fd == -1:
                        self.data_fd = fd
                    else:
                        os.close(fd)
                return code
        self._reset(first, new)
        return code

    def _reset(self, first: TransitionError, new: MigState) -> None:
        try:
            self.device.reset()
        except DeviceError as exc:  # QEMU: hw_error(), the VM aborts
            why = exc.args[0] if exc.device == self.name else exc
            raise DeviceError(
                f"reset after a failed transition to {new.name} failed too: {why}",
                self.name,
                exc.errno,
            ) from exc
        self._record(_annotate(first, new, "device reset to RUNNING"))
        self._set_cached(S.RUNNING)

    # ------------------------------------------------------ R6 handlers
    def vmstate_change_prepare(self, running: bool, runstate: RunState) -> int:
        """R6.1: the prepare callback (P2P devices only)."""
        return self.set_state_or_reset(prepare_target(self.device_state))

    def vmstate_change(self, running: bool, runstate: RunState) -> int:
        """R6.2: the main callback."""
        return self.set_state_or_reset(
            main_target(self.device_state, running, runstate)
        )

    # ------------------------------------------------------ R8/R9 steps
    def save_setup(self) -> int:
        """R8.2 step 4: RUNNING -> PRE_COPY (recover RUNNING) if supported."""
        if not self.has_precopy or self.device_state == S.STOP:
            return 0
        if self.device_state != S.RUNNING:
            err = TransitionError(
                f"save_setup needs RUNNING or STOP, device is {self.device_state.name}",
                self.name,
                _errno.EINVAL,
                self.device_state.name,
                "PRE_COPY",
            )
            self._record(err)
            return -_errno.EINVAL
        return self.set_state(S.PRE_COPY, S.RUNNING)

    def precopy_info(self) -> tuple[int, int]:
        """VFIO_MIG_GET_PRECOPY_INFO on the saving fd: (initial, dirty)."""
        return self.device.precopy_info(self.data_fd)

    def read_chunk(self, n: int = DATA_BUFFER_SIZE) -> bytes | None:
        """One read of the saving fd: data, ``b""`` at the end, ``None`` ENOMSG."""
        if self.data_fd == -1:
            raise DeviceError(
                "no saving session (data_fd is -1)", self.name, _errno.EBADF
            )
        return self.device.read_data(self.data_fd, n)

    def save_complete(self) -> int:
        """R8.7 step 1: -> STOP_COPY (recover STOP); a no-op when pre-copied."""
        return self.set_state(S.STOP_COPY, S.STOP)

    def save_cleanup(self) -> int:
        """R8.9: STOP_COPY -> STOP (outside downtime), close the data fd."""
        ret = 0
        if self.device_state == S.STOP_COPY:
            ret = self.set_state_or_reset(S.STOP)
        self.close_data_fd()
        return ret

    def load_setup(self) -> int:
        """R9.1: -> RESUMING, recover to the current state."""
        return self.set_state(S.RESUMING, self.device_state)

    def write_chunk(self, data: bytes | memoryview) -> int:
        """R9.2: copy stream bytes into the resuming fd."""
        if self.data_fd == -1:
            raise DeviceError(
                "no resuming session (data_fd is -1)", self.name, _errno.EBADF
            )
        return self.device.write_data(self.data_fd, data)

    def close_data_fd(self) -> None:
        """Close the data fd if one is held (load_cleanup, save_cleanup)."""
        if self.data_fd != -1:
            os.close(self.data_fd)
            self.data_fd = -1


def _annotate(err: TransitionError, new: MigState, outcome: str) -> TransitionError:
    msg = str(err.args[0])
    return TransitionError(
        f"transition to {new.name} failed: {msg}; {outcome}",
        err.device,
        err.errno,
        err.cur,
        err.new or new.name,
    )
