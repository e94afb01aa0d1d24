"""QEMU's VM change-state handler machinery (QEMU.md section 2, R2.1-R2.6).

This module owns:

* :class:`RunState`, QEMU's run state names, and :func:`runstate_is_live`;
* :func:`qdev_priority`, the seed series' priority encoding (depth in the 15
  most significant bits, ``adj - INT16_MIN`` in the 16 least significant
  bits; QEMU.md R3 and seed PATCH 1/2);
* :class:`VMChangeStateEntry` and :class:`VMChangeStateHandlers`, the ordered
  handler list and ``vm_state_notify`` (:meth:`VMChangeStateHandlers.notify`).

Ordering rules reproduced exactly (R2.2-R2.5, O1, O2):

* the list is kept in ascending priority; equal priorities keep registration
  (FIFO) order;
* start (``running=True``): every ``prepare_cb`` in ascending order, then
  every main callback (``cb``, else ``cb_ret`` with its result discarded) in
  ascending order; the result is 0;
* stop (``running=False``): the same two walks in descending order (ties in
  reverse registration order); ``cb_ret`` results are OR-ed and returned;
* ``cb`` wins over ``cb_ret``: an entry with both never has ``cb_ret`` called.

Python additions (QEMU callbacks cannot raise): a callback that raises does
not stop the walk.  The exception is logged, recorded as a
:class:`HandlerFailure` in :attr:`VMChangeStateHandlers.last_failures` and
passed to the optional ``on_failure`` callback; a ``cb_ret`` that raises (or
returns a non-int) while stopping contributes ``-EIO`` to the OR.
"""

from __future__ import annotations

import enum
import errno
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol

from mpvfio.errors import UsageError

__all__ = [
    "INT16_MAX",
    "INT16_MIN",
    "INT32_MAX",
    "INT32_MIN",
    "LIVE_RUNSTATES",
    "FailureCallback",
    "HandlerFailure",
    "NotifyHook",
    "Phase",
    "RunState",
    "VMChangeStateEntry",
    "VMChangeStateHandler",
    "VMChangeStateHandlerWithRet",
    "VMChangeStateHandlers",
    "qdev_priority",
    "runstate_is_live",
]

_log = logging.getLogger(__name__)

INT16_MIN = -(1 << 15)
"""Smallest priority adjustment accepted by :func:`qdev_priority` (-32768)."""
INT16_MAX = (1 << 15) - 1
"""Largest depth and adjustment accepted by :func:`qdev_priority` (32767)."""
INT32_MIN = -(1 << 31)
"""Smallest priority an entry may have (a C ``int``)."""
INT32_MAX = (1 << 31) - 1
"""Largest priority an entry may have (a C ``int``)."""


class RunState(enum.StrEnum):
    """QEMU's run states (``qapi/run-state.json``), valued by their QAPI names."""

    DEBUG = "debug"
    INMIGRATE = "inmigrate"
    INTERNAL_ERROR = "internal-error"
    IO_ERROR = "io-error"
    PAUSED = "paused"
    POSTMIGRATE = "postmigrate"
    PRELAUNCH = "prelaunch"
    FINISH_MIGRATE = "finish-migrate"
    RESTORE_VM = "restore-vm"
    RUNNING = "running"
    SAVE_VM = "save-vm"
    SHUTDOWN = "shutdown"
    SUSPENDED = "suspended"
    WATCHDOG = "watchdog"
    GUEST_PANICKED = "guest-panicked"
    COLO = "colo"


LIVE_RUNSTATES: frozenset[RunState] = frozenset({RunState.RUNNING, RunState.SUSPENDED})
"""Run states in which ``vm_stop`` notifies handlers (R2.6, O9)."""


def runstate_is_live(state: RunState) -> bool:
    """Return whether ``state`` is live (RUNNING or SUSPENDED), as QEMU does.

    :param state: a run state.
    :returns: ``True`` for :data:`LIVE_RUNSTATES`.
    """
    return state in LIVE_RUNSTATES


def _check_int(what: str, value: object, lo: int, hi: int) -> int:
    """Return ``value`` if it is an ``int`` (not a ``bool``) in ``[lo, hi]``.

    :raises UsageError: otherwise, naming the value and the range.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise UsageError(
            f"{what} must be an int in {lo}..{hi}, got {type(value).__name__} {value!r}"
        )
    if not lo <= value <= hi:
        raise UsageError(f"{what} {value} is out of range {lo}..{hi}")
    return value


def qdev_priority(depth: int, adj: int = 0) -> int:
    """Encode a qdev tree depth and a priority adjustment as one priority.

    Seed PATCH 1/2: ``(depth << 16) + (adj - INT16_MIN)``.  The result is
    strictly monotonic in ``depth`` whatever ``adj`` is, and for one depth
    monotonic in ``adj``.  ``adj = 0`` is the plain qdev handler.

    :param depth: the device's tree depth, ``0..INT16_MAX``.
    :param adj: the adjustment, ``INT16_MIN..INT16_MAX``.
    :returns: the priority, in ``0..INT32_MAX``.
    :raises UsageError: (a :class:`ValueError`) if either argument is not an
        ``int`` (``bool`` included) or is out of range.
    """
    _check_int("qdev tree depth", depth, 0, INT16_MAX)
    _check_int("priority adjustment", adj, INT16_MIN, INT16_MAX)
    return (depth << 16) + (adj - INT16_MIN)


VMChangeStateHandler = Callable[[bool, RunState], None]
"""A main or prepare callback: ``cb(running, state)``; its result is ignored."""
VMChangeStateHandlerWithRet = Callable[[bool, RunState], int]
"""A ``cb_ret`` callback: ``cb_ret(running, state) -> int`` (0 or -errno)."""

Phase = Literal["prepare", "main"]
"""Which walk of a notification a callback belongs to."""


def _callable_name(fn: object) -> str:
    name = getattr(fn, "__qualname__", None)
    if isinstance(name, str):
        return name
    return repr(fn)


@dataclass(eq=False)
class VMChangeStateEntry:
    """One registered handler (R2.1).

    Entries compare by identity.  Create them with
    :meth:`VMChangeStateHandlers.add`, not directly.

    :param cb: main callback, ``cb(running, state)``.
    :param prepare_cb: prepare callback, ``prepare_cb(running, state)``.
    :param cb_ret: main callback with a result (used only when ``cb`` is
        ``None``).
    :param priority: sort key (ascending on start, descending on stop).
    :param name: the name used in logs and :class:`HandlerFailure` reports.
    :param removed: set once the entry has been removed; a removed entry is
        never called again, even by a walk already in progress.
    """

    cb: VMChangeStateHandler | None
    prepare_cb: VMChangeStateHandler | None
    cb_ret: VMChangeStateHandlerWithRet | None
    priority: int
    name: str
    removed: bool = field(default=False)

    def __repr__(self) -> str:
        parts = [f"{self.name!r}", f"priority={self.priority}"]
        if self.prepare_cb is not None:
            parts.append("prepare")
        if self.cb is not None:
            parts.append("cb")
        elif self.cb_ret is not None:
            parts.append("cb_ret")
        if self.removed:
            parts.append("removed")
        return f"VMChangeStateEntry({', '.join(parts)})"


@dataclass(frozen=True)
class HandlerFailure:
    """A callback raised during a notification (the walk went on).

    :param entry_name: :attr:`VMChangeStateEntry.name` of the failing entry.
    :param phase: ``"prepare"`` or ``"main"``.
    :param running: the ``running`` argument of the notification.
    :param state: the ``state`` argument of the notification.
    :param exception: what the callback raised (for a ``cb_ret`` that returned
        a non-int while stopping: a :class:`~mpvfio.errors.UsageError`).
    """

    entry_name: str
    phase: Phase
    running: bool
    state: RunState
    exception: BaseException


FailureCallback = Callable[[HandlerFailure], None]
"""Called once for each :class:`HandlerFailure`, while the walk goes on."""


class NotifyHook(Protocol):
    """Hooks a parallel engine places around and inside :meth:`notify`.

    ``begin`` runs before the prepare walk, ``interlock`` between the prepare
    walk and the main walk (the P2P interlock of seed 000: "some kind of
    interlocking in vm_state_notify() between calling prepare_cb() and
    cb()"), ``end`` after the main walk, also when a walk failed.  A hook
    that raises is reported like a failing handler; the walk goes on.
    """

    name: str

    def begin(self, running: bool, state: RunState) -> None: ...

    def interlock(self, running: bool, state: RunState) -> None: ...

    def end(self, running: bool, state: RunState) -> None: ...


class VMChangeStateHandlers:
    """The ordered list of VM change-state handlers and ``vm_state_notify``.

    Mutations are thread-safe; notifications are meant to run on one thread
    at a time (QEMU holds the BQL), and no lock is held while a callback
    runs, so a callback may add or remove entries.

    :param on_failure: optional; called with each :class:`HandlerFailure`.
        If it raises, that is logged and ignored.
    """

    def __init__(self, on_failure: FailureCallback | None = None) -> None:
        self._entries: list[VMChangeStateEntry] = []
        self._lock = threading.RLock()
        self.on_failure = on_failure
        #: Failures of the latest :meth:`notify` (reset when it starts).
        self.last_failures: list[HandlerFailure] = []
        self._hooks: list[NotifyHook] = []

    def add_notify_hook(self, hook: NotifyHook) -> None:
        """Install a :class:`NotifyHook` (called in installation order)."""
        with self._lock:
            self._hooks.append(hook)

    def remove_notify_hook(self, hook: NotifyHook) -> None:
        """Remove a hook installed with :meth:`add_notify_hook` (idempotent)."""
        with self._lock:
            if hook in self._hooks:
                self._hooks.remove(hook)

    def _run_hooks(self, stage: str, running: bool, state: RunState) -> None:
        with self._lock:
            hooks = list(self._hooks)
        for hook in hooks:
            try:
                getattr(hook, stage)(running, state)
            except Exception as exc:  # noqa: BLE001 - the walk goes on
                phase: Phase = "main" if stage == "end" else "prepare"
                self._failed(f"{hook.name}.{stage}", phase, running, state, exc)

    # -- registration ------------------------------------------------------

    def add(
        self,
        cb: VMChangeStateHandler | None = None,
        prepare_cb: VMChangeStateHandler | None = None,
        cb_ret: VMChangeStateHandlerWithRet | None = None,
        priority: int = 0,
        name: str | None = None,
    ) -> VMChangeStateEntry:
        """Register a handler (``qemu_add_vm_change_state_handler_prio_full``).

        The entry goes immediately before the first entry whose priority is
        strictly greater, else at the tail, so equal priorities keep
        registration order (R2.2).

        :param cb: main callback; wins over ``cb_ret`` if both are given.
        :param prepare_cb: prepare callback.
        :param cb_ret: main callback whose int result is OR-ed on stop.
        :param priority: an int in ``INT32_MIN..INT32_MAX``.
        :param name: report name; default: the ``__qualname__`` of ``cb``,
            else of ``cb_ret``, else of ``prepare_cb``.
        :returns: the new entry (pass it to :meth:`remove`).
        :raises UsageError: bad priority, name or callback.
        """
        _check_int("priority", priority, INT32_MIN, INT32_MAX)
        for what, fn in (("cb", cb), ("prepare_cb", prepare_cb), ("cb_ret", cb_ret)):
            if fn is not None and not callable(fn):
                raise UsageError(f"{what} must be callable or None, got {fn!r}")
        if name is None:
            named = next((f for f in (cb, cb_ret, prepare_cb) if f is not None), None)
            name = "<no callback>" if named is None else _callable_name(named)
        elif not isinstance(name, str):
            raise UsageError(f"name must be a str, got {name!r}")
        entry = VMChangeStateEntry(
            cb=cb, prepare_cb=prepare_cb, cb_ret=cb_ret, priority=priority, name=name
        )
        with self._lock:
            idx = len(self._entries)
            for i, other in enumerate(self._entries):
                if other.priority > priority:
                    idx = i
                    break
            self._entries.insert(idx, entry)
        return entry

    def remove(self, entry: VMChangeStateEntry) -> None:
        """Unregister ``entry`` (``qemu_del_vm_change_state_handler``).

        Idempotent.  Safe from inside a callback: a walk in progress does not
        call ``entry`` afterwards.

        :raises UsageError: ``entry`` was never registered here.
        """
        with self._lock:
            if entry.removed:
                return
            for i, other in enumerate(self._entries):
                if other is entry:
                    del self._entries[i]
                    entry.removed = True
                    return
        raise UsageError(f"{entry!r} is not registered with this handler list")

    @property
    def entries(self) -> tuple[VMChangeStateEntry, ...]:
        """The registered entries in ascending (start) order."""
        with self._lock:
            return tuple(self._entries)

    def walk_order(self, running: bool) -> tuple[VMChangeStateEntry, ...]:
        """The entries in the order :meth:`notify` visits them.

        :param running: ``True`` for start (ascending), ``False`` for stop
            (descending, ties reversed).
        """
        entries = self.entries
        return entries if running else entries[::-1]

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    # -- notification ------------------------------------------------------

    def notify(self, running: bool, state: RunState) -> int:
        """Run every handler, QEMU's ``vm_state_notify`` (R2.3, R2.4).

        Each of the two walks iterates over a snapshot taken when that walk
        begins; an entry removed meanwhile (by itself or another callback) is
        skipped, an entry added meanwhile is not called by that walk.

        :param running: ``True`` on start, ``False`` on stop.
        :param state: the new run state (already set by the caller).
        :returns: 0 on start; on stop the bitwise OR of every called
            ``cb_ret`` result (a raising ``cb_ret`` counts as ``-EIO``).
        """
        self.last_failures = []
        _log.debug("vm_state_notify running=%s state=%s", running, state)
        self._run_hooks("begin", running, state)
        try:
            return self._walks(running, state)
        finally:
            self._run_hooks("end", running, state)

    def _walks(self, running: bool, state: RunState) -> int:
        for entry in self.walk_order(running):
            if entry.removed or entry.prepare_cb is None:
                continue
            try:
                entry.prepare_cb(running, state)
            except Exception as exc:  # noqa: BLE001 - every handler runs (R2.4)
                self._failed(entry.name, "prepare", running, state, exc)

        self._run_hooks("interlock", running, state)
        ret = 0
        for entry in self.walk_order(running):
            if entry.removed:
                continue
            if entry.cb is not None:
                try:
                    entry.cb(running, state)
                except Exception as exc:  # noqa: BLE001 - every handler runs (R2.4)
                    self._failed(entry.name, "main", running, state, exc)
            elif entry.cb_ret is not None:
                try:
                    result = entry.cb_ret(running, state)
                except Exception as exc:  # noqa: BLE001 - every handler runs (R2.4)
                    self._failed(entry.name, "main", running, state, exc)
                    if not running:
                        ret |= -errno.EIO
                    continue
                if running:
                    continue  # start: the result is discarded (R2.3)
                if isinstance(result, bool) or not isinstance(result, int):
                    bad = UsageError(
                        f"cb_ret of {entry.name!r} returned {result!r}, not an int"
                    )
                    self._failed(entry.name, "main", running, state, bad)
                    ret |= -errno.EIO
                else:
                    ret |= result
        return 0 if running else ret

    def _failed(
        self,
        name: str,
        phase: Phase,
        running: bool,
        state: RunState,
        exc: BaseException,
    ) -> None:
        """Log, record and forward one failure; never raises."""
        _log.error(
            "VM change-state handler %r (%s, running=%s, state=%s) failed: %r",
            name,
            phase,
            running,
            state,
            exc,
            exc_info=exc,
        )
        failure = HandlerFailure(name, phase, running, state, exc)
        self.last_failures.append(failure)
        if self.on_failure is not None:
            try:
                self.on_failure(failure)
            except Exception:  # noqa: BLE001 - must not break the walk
                _log.exception("on_failure callback failed for %r", name)
