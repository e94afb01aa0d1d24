"""Parent-side handles of the device workers: start, talk, watch, reap.

Layer 2.  :class:`WorkerHandle` owns one worker process, its shared-memory
slot (:mod:`mpvfio.workers.slots`) and two pipes: the **command channel**
(duplex: commands down, replies up; also passes descriptors for
:meth:`WorkerHandle.call_fds`) and the **event channel** (worker -> parent,
one event per message, sent the moment the worker raises it; the slot
counts them, so the parent reads it only when something is there).

A notification's transition goes through the slot: :meth:`WorkerHandle.start_transition`
writes the command words and posts the worker's start semaphore;
:meth:`WorkerHandle.wait_transition` takes the worker's done semaphore
(sleeping on the round's *alldone* semaphore, which the last finisher posts,
so the parent wakes once for all the joins) and reads the result words.  A
semaphore cannot be waited on together with the process sentinel: the wait
is sliced (:data:`WATCH_SLICE_S`), and a dead worker is noticed within one
slice.  Every other reply goes through :meth:`WorkerHandle.wait_reply`, which
polls the reply pipe *and* the sentinel with a deadline (loky's pattern), so
a dead worker is noticed at once and a hung one when its deadline passes:
:class:`~mpvfio.errors.WorkerCrashed` names the exit code or signal,
:class:`~mpvfio.errors.WorkerTimeout` the deadline.  :class:`SentinelWatch`
tells in one ``poll()`` which of many workers died.

Start method: **fork**.  ../shared/spec/PERF_LIMITS.md measured 2 ms and
1.5 MiB USS per forked worker against 65 ms and 13 MiB for spawn (256 spawned
workers: 18 s to start, 5 s to join).  Fork needs care: a machine forks
its first workers before it starts its one thread (the event pump), later
forks (a replacement worker, another machine's workers) happen under
:data:`FORK_LOCK`, which every delivery of events to subscribers holds, and
the sockets the parent serves are closed in the child
(:mod:`mpvfio.ipc.inherit`).  The worker inherits the device's shared state
mapping and opens the named IPC objects itself.  Workers die with the
parent (PR_SET_PDEATHSIG) and every handle is reaped by
:meth:`WorkerHandle.close` (exit command, join with a timeout, SIGTERM,
SIGKILL, join).
"""

from __future__ import annotations

import logging
import os
import pickle
import select
import signal
import threading
import time
from collections.abc import Iterable
from typing import Any

import multiprocess as mp

from mpvfio.devices.base import ArcRecord
from mpvfio.errors import (
    MpvfioError,
    RemoteTraceback,
    UsageError,
    WorkerCrashed,
    WorkerError,
    WorkerTimeout,
)
from mpvfio.events import Event
from mpvfio.ipc import posixobj
from mpvfio.uapi.vfio import MigState
from mpvfio.workers import slots as sl
from mpvfio.workers.device import Status, WorkerSpec, worker_main
from mpvfio.workers.slots import WorkerSlot

__all__ = ["START_METHOD", "SentinelWatch", "WorkerHandle", "start_workers"]

_log = logging.getLogger(__name__)
START_METHOD = "fork"
_PICKLE = pickle.HIGHEST_PROTOCOL
#: Held around every fork of a worker and around every delivery of worker
#: events to subscribers (:mod:`mpvfio.workers.pump`): a worker is never
#: forked while another thread runs subscriber code, which may hold locks
#: (stdio buffers, a subscriber's own) the child would inherit held
#: (PERF_LIMITS pitfall 7).  Reentrant: a subscriber may cause a fork.
FORK_LOCK = threading.RLock()

#: Default deadline for a worker to open its device and say "ready".
HANDSHAKE_TIMEOUT_S = 30.0
#: A transition's join looks at the worker's sentinel at least this often
#: (the done semaphore cannot be waited on together with the sentinel).
WATCH_SLICE_S = 0.01
#: Extra time for a reply that follows a done post on the pipe.
_REPLY_GRACE_S = 5.0
_POLL_IN = select.POLLIN | select.POLLHUP | select.POLLERR
_MIGSTATES = {int(s): s for s in MigState}


class SentinelWatch:
    """One persistent ``poll()`` over many workers' sentinels.

    :meth:`exited` tells in one syscall which workers may have exited
    (their sentinel is readable), instead of one ``waitpid`` per worker.
    Handles register themselves when they launch and leave when they close.
    """

    def __init__(self) -> None:
        self._poll = select.poll()
        self._by_fd: dict[int, WorkerHandle] = {}

    def add(self, handle: WorkerHandle) -> None:
        """Watch a launched handle's sentinel."""
        fd = handle.sentinel
        if fd is None:
            return
        self._poll.register(fd, _POLL_IN)
        self._by_fd[fd] = handle

    def discard(self, handle: WorkerHandle) -> None:
        """Stop watching (before the sentinel fd is closed)."""
        fd = handle.sentinel
        if fd is not None and self._by_fd.get(fd) is handle:
            del self._by_fd[fd]
            try:
                self._poll.unregister(fd)
            except KeyError:
                pass

    def exited(self) -> list[WorkerHandle]:
        """Watched handles whose process has exited (confirmed by waitpid)."""
        try:
            ready = self._poll.poll(0)
        except RuntimeError:  # concurrent poll() from another thread
            return [h for h in list(self._by_fd.values()) if not h.alive()]
        out = []
        for fd, _ in ready:
            h = self._by_fd.get(fd)
            if h is not None and not h.alive():
                out.append(h)
        return out


class WorkerHandle:
    """One device worker process (see the module docstring).

    :param slot: the device's shared-memory slot and semaphores (the
        parent's handles, owned by a :class:`~mpvfio.workers.slots.SlotTable`);
        its :attr:`~mpvfio.workers.slots.WorkerSlot.spec` goes to the worker.
    :param watch: a :class:`SentinelWatch` to register with.
    """

    def __init__(
        self,
        spec: WorkerSpec,
        ctx: Any | None = None,
        *,
        slot: WorkerSlot | None = None,
        watch: SentinelWatch | None = None,
    ) -> None:
        if slot is None:
            raise UsageError("a WorkerHandle needs its shared-memory slot")
        if spec.slot != slot.spec:
            from dataclasses import replace

            spec = replace(spec, slot=slot.spec)
        self.spec = spec
        self.name = spec.name
        self.slot = slot
        self.watch = watch
        self._ctx = ctx or mp.get_context(START_METHOD)
        self.cmd: Any = None
        self.ev: Any = None
        self.proc: Any = None
        self.pid: int | None = None
        self.sentinel: int | None = None
        self.flags = 0
        self.pending: str | None = None  # the command awaiting its reply
        self.closed = False
        self._seq = int(slot.mv[sl.CMD_SEQ])
        self._ev_seen = 0
        self._poll: Any = None

    # --------------------------------------------------------------- start
    def launch(self) -> None:
        """Fork the worker (does not wait for its handshake)."""
        slot = self.slot
        # A previous worker of this slot is gone: no stray wake-up or done
        # token may reach the new one, and its events start from zero.
        posixobj.drain(slot.go)
        posixobj.drain(slot.done)
        slot.mv[sl.EV_COUNT] = 0
        self._ev_seen = 0
        self._seq = int(slot.mv[sl.CMD_SEQ])
        parent_cmd, child_cmd = self._ctx.Pipe(duplex=True)
        ev_read, ev_write = self._ctx.Pipe(duplex=False)
        proc = self._ctx.Process(
            target=worker_main,
            args=(self.spec, child_cmd, ev_write),
            name=f"mpvfio-worker-{self.name}",
            daemon=True,
        )
        with FORK_LOCK:  # no event pump is inside a subscriber right now
            proc.start()
        child_cmd.close()
        ev_write.close()
        self.cmd, self.ev, self.proc = parent_cmd, ev_read, proc
        self.pid = proc.pid
        self.sentinel = proc.sentinel
        self.pending = "handshake"
        self._poll = select.poll()
        self._poll.register(self.cmd.fileno(), _POLL_IN)
        self._poll.register(self.sentinel, _POLL_IN)
        if self.watch is not None:
            self.watch.add(self)

    def handshake(self, timeout: float = HANDSHAKE_TIMEOUT_S) -> None:
        """Wait for the worker's ``ready`` (its device is open)."""
        value, _ = self.wait_reply(time.monotonic() + timeout)
        if not (isinstance(value, tuple) and value and value[0] == "ready"):
            raise WorkerError(f"bad handshake {value!r}", self.name)
        self.flags = int(value[2])

    # ------------------------------------------------------------- talking
    def _kick(self, op: int) -> None:
        """Publish command ``op`` in the slot and wake the worker."""
        mv = self.slot.mv
        self._seq += 1
        mv[sl.CMD_OP] = op
        mv[sl.CMD_SEQ] = self._seq
        posixobj.release(self.slot.go)

    def _write(self, msg: tuple[Any, ...]) -> None:
        """Wake the worker for a pipe command, then write the command.

        The post comes first: a message bigger than the socket buffer (a
        ``write_all`` chunk) blocks until the worker reads it, and the
        worker reads only once woken.
        """
        if self.pending is not None:
            raise WorkerError(
                f"command {msg[0]!r} sent while {self.pending!r} awaits its reply",
                self.name,
            )
        if self.closed and self._poll is None:
            raise self._dead_error(f"cannot send {msg[0]!r}: closed")
        data = pickle.dumps(msg, _PICKLE)
        self._kick(sl.OP_PIPE)
        try:
            self.cmd.send_bytes(data)
        except (OSError, ValueError) as exc:
            raise self._dead_error(f"cannot send {msg[0]!r}") from exc
        self.pending = str(msg[0])

    def send(self, *msg: Any) -> None:
        """Send one command (the reply comes through :meth:`wait_reply`)."""
        self._write(msg)

    def send_fds(self, method: str, fds: list[int], args: tuple[Any, ...]) -> None:
        """Send a ``call_fds`` command and pass ``fds`` (SCM_RIGHTS) with it.

        The worker receives its own copies of the descriptors; the caller's
        stay open (close them when no longer needed).
        """
        from multiprocess.reduction import send_handle

        self._write(("call_fds", method, tuple(args), len(fds)))
        try:
            for fd in fds:
                send_handle(self.cmd, fd, self.pid)
        except (OSError, ValueError) as exc:
            raise self._dead_error("cannot pass descriptors") from exc

    def start_transition(
        self, running: bool, runstate: int, use_barrier: bool, barrier_timeout: float
    ) -> None:
        """The notification's transition, through the slot (no pipe message).

        ``runstate`` is the index of the run state in
        :data:`mpvfio.workers.device.RUNSTATES`.  Join with
        :meth:`wait_transition`.
        """
        if self.pending is not None:
            raise WorkerError(
                f"transition sent while {self.pending!r} awaits its reply", self.name
            )
        if self.closed and self._poll is None:
            raise self._dead_error("cannot start a transition: closed")
        mv = self.slot.mv
        mv[sl.CMD_RUNNING] = running
        mv[sl.CMD_RUNSTATE] = runstate
        mv[sl.CMD_BARRIER] = use_barrier
        mv[sl.CMD_TIMEOUT_US] = int(barrier_timeout * 1e6)
        self.pending = "transition"
        posixobj.release(self.slot.outstanding)
        self._kick(sl.OP_TRANSITION)

    def arrived(self) -> bool:
        """Whether the latest command reached the barrier (phase 1 done)."""
        return bool(self.slot.mv[sl.ARRIVED] == self._seq)

    def wait_transition(self, deadline: float) -> Status:
        """The result of :meth:`start_transition`, watching the sentinel.

        :raise WorkerCrashed: the process died first (exit code named).
        :raise WorkerTimeout: ``deadline`` (monotonic) passed.
        :raise MpvfioError: the worker's own error (its traceback as
            ``__cause__``, its :class:`Status` as ``status``).
        """
        slot = self.slot
        mv = slot.mv
        seq = self._seq
        done = slot.done
        while True:
            if done.value and posixobj.try_acquire(done):
                if mv[sl.DONE_SEQ] == seq:
                    break
                continue  # a stray token of an abandoned transition
            # Not done yet: sleep until the round's last transition finishes
            # (one wake-up for all the joins), or a slice passes.
            remaining = deadline - time.monotonic()
            if remaining > 0 and posixobj.acquire(
                slot.alldone, min(remaining, WATCH_SLICE_S)
            ):
                continue
            if posixobj.try_acquire(done):
                if mv[sl.DONE_SEQ] == seq:
                    break
                continue
            if not self.alive():
                if posixobj.try_acquire(done) and mv[sl.DONE_SEQ] == seq:
                    break  # done just before it died
                self.proc.join(1.0)
                raise self._dead_error("died during 'transition'")
            if time.monotonic() >= deadline:
                raise WorkerTimeout(
                    "no answer to 'transition' within the deadline", self.name
                )
        if mv[sl.RES_KIND] != sl.RES_FAST:
            _, status = self.wait_reply(
                max(deadline, time.monotonic() + _REPLY_GRACE_S)
            )
            assert status is not None
            return status
        self.pending = None
        name = self.name
        ms = _MIGSTATES
        arcs = []
        i = sl.ARCS
        for _ in range(mv[sl.RES_NARCS]):
            arcs.append(
                ArcRecord(
                    name,
                    ms[mv[i]],
                    ms[mv[i + 1]],
                    mv[i + 2],
                    mv[i + 3],
                    bool(mv[i + 4]),
                    mv[i + 5],
                )
            )
            i += sl.ARC_FIELDS
        return Status(ms[mv[sl.RES_STATE]], bool(mv[sl.RES_DATA_FD]), [], arcs, [])

    def wait_reply(self, deadline: float) -> tuple[Any, Status | None]:
        """The reply to the pending command, watching the sentinel.

        :raise WorkerCrashed: the process died first (exit code named).
        :raise WorkerTimeout: ``deadline`` (monotonic) passed.
        :raise MpvfioError: the worker's own error, with its traceback as
            ``__cause__``.
        """
        what = self.pending or "reply"
        cmd_fd = self.cmd.fileno()
        while True:
            # A deadline that already passed still gets one non-blocking
            # look: a reply that is waiting in the pipe is not a timeout
            # (joins of one round share a deadline, a slow one uses it up).
            remaining = max(0.0, deadline - time.monotonic())
            try:
                ready = [fd for fd, _ in self._poll.poll(remaining * 1000.0)]
            except InterruptedError:  # pragma: no cover - PEP 475 retries
                continue
            if not ready:
                if time.monotonic() < deadline:
                    continue
                raise WorkerTimeout(
                    f"no answer to {what!r} within the deadline", self.name
                )
            if cmd_fd in ready:
                try:
                    msg = pickle.loads(self.cmd.recv_bytes())
                except (EOFError, OSError):
                    self.proc.join(1.0)
                    raise self._dead_error(f"channel closed during {what!r}") from None
                break
            if self.sentinel in ready:
                if self.cmd.poll(0):  # a last reply written before it died
                    continue
                self.proc.join(1.0)
                raise self._dead_error(f"died during {what!r}")
        self.pending = None
        if msg[0] == "ok":
            return msg[1], msg[2]
        exc, tb, status = msg[1], msg[2], msg[3]
        if not isinstance(exc, BaseException):
            exc = MpvfioError(f"worker error: {exc!r}")
        if tb:
            exc.__cause__ = RemoteTraceback(f"in worker {self.name}:\n{tb}")
        if status is not None:
            exc.status = status
        raise exc

    def call(self, method: str, *args: Any, timeout: float = 600.0) -> Any:
        """Run one synchronous operation in the worker and return its value."""
        self.send("call", method, args)
        value, _ = self.wait_reply(time.monotonic() + timeout)
        return value

    def call_status(
        self, method: str, *args: Any, timeout: float = 600.0
    ) -> tuple[Any, Status | None]:
        """Like :meth:`call`, also returning the worker's :class:`Status`."""
        self.send("call", method, args)
        return self.wait_reply(time.monotonic() + timeout)

    def call_fds(
        self, method: str, fds: list[int], *args: Any, timeout: float = 600.0
    ) -> Any:
        """Like :meth:`call`, passing ``fds`` to the worker (SCM_RIGHTS).

        The worker runs ``mpvfio.workers.migration.worker_call(worker,
        method, args, fds)`` and owns its copies of the descriptors.
        """
        self.send_fds(method, fds, args)
        value, _ = self.wait_reply(time.monotonic() + timeout)
        return value

    def events_pending(self) -> bool:
        """Whether the worker wrote events not drained yet (no syscall)."""
        return bool(self.slot.mv[sl.EV_COUNT] != self._ev_seen)

    def drain_events(self) -> list[Event]:
        """Every event already written by the worker (never blocks).

        Reads exactly as many messages as the slot's event counter says were
        written completely.
        """
        n = self.slot.mv[sl.EV_COUNT] - self._ev_seen
        if n <= 0 or self.closed or self.ev is None:
            return []
        out: list[Event] = []
        try:
            for _ in range(n):
                out.append(pickle.loads(self.ev.recv_bytes()))
                self._ev_seen += 1
        except (EOFError, OSError):
            self._ev_seen = self.slot.mv[sl.EV_COUNT]
        return out

    # -------------------------------------------------------------- health
    def alive(self) -> bool:
        """Whether the process is still running."""
        return self.proc is not None and self.proc.is_alive()

    @property
    def exitcode(self) -> int | None:
        """The process exit code (``None`` while it runs)."""
        return None if self.proc is None else self.proc.exitcode

    def _dead_error(self, what: str) -> WorkerCrashed:
        code = self.exitcode
        return WorkerCrashed(f"worker {what}", self.name, code)

    # ------------------------------------------------------------- closing
    def kill(self) -> None:
        """SIGKILL the worker (its IPC state may be dirty) and reap it."""
        if self.proc is not None and self.proc.is_alive():
            try:
                os.kill(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.proc is not None:
            self.proc.join(5.0)
        self.pending = None

    def close(self, timeout: float = 5.0) -> None:
        """Ask the worker to exit, then force it; always reap (idempotent)."""
        if self.closed or self.proc is None:
            self.closed = True
            return
        self.closed = True
        try:
            if self.proc.is_alive():
                if self.pending is None:
                    try:
                        self.send("exit")
                        self.wait_reply(time.monotonic() + timeout)
                    except MpvfioError:
                        pass
                self.proc.join(timeout)
            if self.proc.is_alive():
                _log.warning("worker %s ignored exit; terminating", self.name)
                self.proc.terminate()
                self.proc.join(timeout)
            if self.proc.is_alive():
                self.kill()
        finally:
            if self.watch is not None:
                self.watch.discard(self)
            self._poll = None
            for conn in (self.cmd, self.ev):
                try:
                    conn.close()
                except OSError:
                    pass
            self.proc.join(timeout)
            try:
                self.proc.close()
            except ValueError:  # still running after SIGKILL + join: give up
                _log.error(
                    "worker %s (pid %s) could not be reaped", self.name, self.pid
                )


def start_workers(
    handles: Iterable[WorkerHandle], timeout: float = HANDSHAKE_TIMEOUT_S
) -> None:
    """Fork every worker first, then collect the handshakes (parallel start).

    On any failure every handle is closed before the error propagates.
    """
    handles = list(handles)
    try:
        for h in handles:
            h.launch()
        deadline = time.monotonic() + timeout
        for h in handles:
            h.handshake(max(0.0, deadline - time.monotonic()))
    except BaseException:
        for h in handles:
            h.close(timeout=1.0)
        raise
