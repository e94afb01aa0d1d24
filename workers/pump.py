"""The parent's event pump: worker events delivered as they are written.

Layer 2.  A worker writes each event to its event pipe and then bumps its
slot's ``EV_COUNT`` word (:mod:`mpvfio.workers.slots`).  Without a reader,
events would wait in the pipes until the parent next looked (the P2P
interlock, a join): a VFIO_MIGRATION_PREPARE event, which exists to reach a
management application *before* the slow transition finishes, would arrive
after it.  :class:`EventPump` is one parent thread that ``poll()``\\ s every
worker's event pipe and delivers at once.

Order.  Reading the workers' counters one after the other is not an atomic
snapshot: a slow worker's phase-1 event can be counted just after its
counter was read, and a fast worker's phase-2 event (which needed the slow
one at the barrier) just before *its* counter is read.  So one delivery (a
*batch*) takes a cut in time instead:

1. ``t0 = monotonic_ns()``;
2. read every counter and drain exactly the counted events into a buffer;
3. deliver, sorted by ``mono_ns``, the buffered events stamped before ``t0``;
   keep the rest for the next batch.

An event E stamped before ``t0`` has all its causal predecessors (events of
other workers it waited for at the barrier) *counted* before E was stamped,
so before ``t0``, so before step 2 read their counters: they are in this
batch or an earlier one, and sort before E.  Every P2P event still comes
before any STOP / STOP_COPY event.  A held event was stamped during the
batch; the next batch (at once) releases it.

:meth:`EventPump.flush` is the same delivery run by the caller under the
same lock (the machine flushes before a notification returns, so every
event of the notification is out when ``vm_stop``/``vm_start`` return).

Subscribers are called on the pump's thread (or on the thread of a
flush), one batch at a time, in order: a subscriber must not call into the
machine (its devices' calls are not thread-safe); a flush reached from a
subscriber returns at once instead of deadlocking on the batch it is in.

A pipe that stays readable with nothing counted (its worker died between
the write and the count) is dropped from the poll set until the next
:meth:`changed` (the machine calls it when it replaces a worker), so the
pump never spins.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import threading
import time
from collections.abc import Callable, Iterator

from mpvfio.events import Event
from mpvfio.workers.pool import FORK_LOCK, WorkerHandle

__all__ = ["EventPump"]

_log = logging.getLogger(__name__)
_IN = select.POLLIN
_GONE = select.POLLHUP | select.POLLERR | select.POLLNVAL
#: How often the idle pump checks that it should still run (s).
IDLE_S = 1.0
#: A readable pipe with nothing counted this many times in a row is dropped.
STRIKES = 20
#: The longest a flush waits for a batch being delivered by another thread.
FLUSH_TIMEOUT_S = 30.0


class EventPump:
    """A parent thread delivering worker events (module docstring).

    :param handles: returns the current worker handles (called under the lock).
    :param deliver: called with each batch (sorted by the caller).
    """

    def __init__(
        self,
        handles: Callable[[], list[WorkerHandle]],
        deliver: Callable[[list[Event]], None],
    ) -> None:
        self._handles = handles
        self._deliver = deliver
        self.lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._stop = threading.Event()
        self._dirty = True
        self._held: list[Event] = []  # drained, stamped after the last cut
        self._busy = False  # a batch is being drained and delivered
        self._tls = threading.local()  # .delivering: inside a subscriber
        self._thread: threading.Thread | None = None
        #: batches delivered by the thread (not by :meth:`flush`): a test hook
        self.pumped = 0

    def start(self) -> None:
        """Start the thread (idempotent)."""
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name="mpvfio-event-pump", daemon=True
            )
            self._thread.start()

    def changed(self) -> None:
        """The worker set changed (a worker replaced): re-read the pipes."""
        self._dirty = True
        self._wake()

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):  # full: a wake-up is pending anyway
            pass

    @property
    def settled(self) -> bool:
        """No drained event waits for delivery (read it *after* a counter)."""
        return not self._busy and not self._held

    @contextlib.contextmanager
    def paused(self) -> Iterator[bool]:
        """Hold off every batch for a ``with`` block (a worker swap).

        Yields whether the pump lock was taken (``False`` after
        :data:`FLUSH_TIMEOUT_S`: a subscriber blocks; the block runs anyway).
        """
        got = self.lock.acquire(timeout=FLUSH_TIMEOUT_S)
        if not got:
            _log.error("event pump: a batch blocks; swapping a worker without it")
        try:
            yield got
        finally:
            if got:
                self.lock.release()

    def flush(self) -> int:
        """Deliver every event counted so far, here; how many."""
        if getattr(self._tls, "delivering", False):
            # a subscriber reached a flush (it called into the machine):
            # the batch it is part of is being delivered by this very thread
            return 0
        # Lock-free fast path.  Order matters: counters first, then the
        # pump's state.  A counter that reads as drained was drained before
        # this read; if the pump drained it, it is still marked busy (or
        # holding) until those events are delivered.
        pending = any(h.events_pending() for h in self._handles())
        if not pending and self.settled:
            return 0
        if not self.lock.acquire(timeout=FLUSH_TIMEOUT_S):
            _log.error(
                "event flush: a batch has been in delivery for %.0f s (a "
                "subscriber blocks?); going on without it",
                FLUSH_TIMEOUT_S,
            )
            return 0
        try:
            n = self._drain()
            while self._held:  # stamped during the cut: the next one frees them
                n += self._drain()
            return n
        finally:
            self.lock.release()

    def _drain(self) -> int:
        """One batch (module docstring); how many events it delivered."""
        self._busy = True  # before any counter is read (see flush)
        try:
            t0 = time.monotonic_ns()
            buf = self._held
            for h in self._handles():
                if h.events_pending():
                    buf.extend(h.drain_events())
            if not buf:
                return 0
            out = [e for e in buf if e.mono_ns < t0]
            self._held = [e for e in buf if e.mono_ns >= t0]
            if out:
                out.sort(key=lambda e: e.mono_ns)
                self._tls.delivering = True
                try:
                    with FORK_LOCK:
                        self._deliver(out)
                finally:
                    self._tls.delivering = False
            return len(out)
        finally:
            self._busy = False

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread and close the wake-up pipe (idempotent)."""
        self._stop.set()
        self._wake()
        t, self._thread = self._thread, None
        if t is not None:
            t.join(timeout)
            if t.is_alive():
                _log.warning("the event pump did not stop within %.1f s", timeout)
                return  # it still polls the pipe: leave it open
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
        self._wake_r = self._wake_w = -1

    # ----------------------------------------------------------- the thread
    def _rebuild(self) -> tuple[select.poll, dict[int, WorkerHandle]]:
        poll = select.poll()
        poll.register(self._wake_r, _IN)
        fds: dict[int, WorkerHandle] = {}
        with self.lock:
            self._dirty = False
            for h in self._handles():
                ev = h.ev
                if h.closed or ev is None:
                    continue
                try:
                    fd = ev.fileno()
                except (OSError, ValueError):
                    continue
                fds[fd] = h
                poll.register(fd, _IN)
        return poll, fds

    def _run(self) -> None:
        poll, fds = self._rebuild()
        strikes: dict[int, int] = {}
        while not self._stop.is_set():
            if self._dirty:
                poll, fds = self._rebuild()
                strikes.clear()
            try:
                ready = poll.poll(0 if self._held else IDLE_S * 1000.0)
            except InterruptedError:
                continue
            readable = []
            for fd in list(strikes):  # quiet now: its strikes are forgiven
                if all(fd != r for r, _ in ready):
                    del strikes[fd]
            for fd, mask in ready:
                if fd == self._wake_r:
                    try:
                        while os.read(self._wake_r, 4096):
                            pass
                    except (BlockingIOError, OSError):
                        pass
                    continue
                if mask & _IN:
                    readable.append(fd)
                elif mask & _GONE:  # closed, nothing left to read
                    poll.unregister(fd)
                    fds.pop(fd, None)
            if not readable and not self._held:
                continue
            try:
                with self.lock:
                    n = self._drain()
            except Exception:  # noqa: BLE001 - the pump must outlive a bad event
                _log.exception("event pump: delivering a batch failed")
                n = 0
            if n:
                self.pumped += 1
                strikes.clear()
                continue
            # readable, nothing counted: a write whose count is a moment
            # away, or a worker that died in between (then forever)
            for fd in readable:
                strikes[fd] = strikes.get(fd, 0) + 1
                if strikes[fd] >= STRIKES and fd in fds:
                    poll.unregister(fd)
                    fds.pop(fd)
            time.sleep(0.0002)
