"""Events and in-process subscribers (layer 0).

An :class:`Event` is what QEMU would send as a QMP event: a name
(``STOP``, ``RESUME``, ``VFIO_MIGRATION``, ...), a data dict and a timestamp.
Events raised in a worker process carry the worker's ``CLOCK_MONOTONIC``
reading (``mono_ns``), which is comparable across processes, so the parent
can merge the streams of many workers into one causal order.

:class:`EventBus` fans events out to subscribers.  A subscriber that raises is
logged and skipped; it never breaks the emitter (the switchover must go on).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Event", "EventBus", "Subscription"]

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Event:
    """One event.

    :param name: QMP-style event name, e.g. ``"VFIO_MIGRATION"``.
    :param data: the event's ``data`` member (JSON-able).
    :param mono_ns: ``time.monotonic_ns()`` when it happened (orders events
        across processes on one host).
    :param wall_ns: ``time.time_ns()`` when it happened (QMP timestamp).
    """

    name: str
    data: dict[str, Any] = field(default_factory=dict)
    mono_ns: int = field(default_factory=time.monotonic_ns)
    wall_ns: int = field(default_factory=time.time_ns)

    def timestamp(self) -> dict[str, int]:
        """QEMU's QMP timestamp: ``{"seconds": s, "microseconds": us}``."""
        return {
            "seconds": self.wall_ns // 1_000_000_000,
            "microseconds": (self.wall_ns // 1000) % 1_000_000,
        }

    def to_qmp(self) -> dict[str, Any]:
        """The event as a QMP message (``event``, ``data``, ``timestamp``)."""
        return {"event": self.name, "data": self.data, "timestamp": self.timestamp()}


Callback = Callable[[Event], None]


class Subscription:
    """Handle returned by :meth:`EventBus.subscribe`; call :meth:`cancel`."""

    def __init__(self, bus: EventBus, cb: Callback, names: frozenset[str] | None):
        self._bus = bus
        self.cb = cb
        self.names = names

    def cancel(self) -> None:
        """Stop delivering events to this subscriber (idempotent)."""
        self._bus._remove(self)


class EventBus:
    """Delivers events to subscribers, in emission order, thread-safely."""

    def __init__(self) -> None:
        self._subs: list[Subscription] = []
        self._lock = threading.Lock()

    def subscribe(
        self, cb: Callback, names: Iterable[str] | None = None
    ) -> Subscription:
        """Call ``cb(event)`` for every event (or only those in ``names``)."""
        sub = Subscription(self, cb, frozenset(names) if names is not None else None)
        with self._lock:
            self._subs.append(sub)
        return sub

    def _remove(self, sub: Subscription) -> None:
        with self._lock:
            if sub in self._subs:
                self._subs.remove(sub)

    def emit(self, event: Event) -> None:
        """Deliver ``event`` to every matching subscriber."""
        with self._lock:
            subs = list(self._subs)
        for sub in subs:
            if sub.names is not None and event.name not in sub.names:
                continue
            try:
                sub.cb(event)
            except Exception:  # noqa: BLE001 - a subscriber never breaks the emitter
                _log.exception("event subscriber %r failed on %s", sub.cb, event.name)
