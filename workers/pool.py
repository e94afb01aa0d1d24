"""Parent-side handles of the device workers: start, talk, watch, reap.

Layer 2.  :class:`WorkerHandle` owns one worker process and its two pipes:
the **command channel** (duplex: commands down, replies up) and the **event
channel** (worker -> parent, one event per message, sent the moment the
worker raises it).  Every wait goes through :meth:`WorkerHandle.wait_reply`,
which waits on the reply pipe *and* the process sentinel with a deadline
(loky's pattern), so a dead worker is noticed at once and a hung one when its
deadline passes: :class:`~mpvfio.errors.WorkerCrashed` names the exit code or
signal, :class:`~mpvfio.errors.WorkerTimeout` the deadline.

Start method: **fork**.  ../shared/spec/PERF_LIMITS.md measured 2 ms and
1.5 MiB USS per forked worker against 65 ms and 13 MiB for spawn (256 spawned
workers: 18 s to start, 5 s to join).  Fork needs care: the parent forks
before it starts threads of its own (workers mode starts none), and the
worker inherits the device's shared state mapping and opens the named IPC
objects itself.  Workers die with the parent (PR_SET_PDEATHSIG) and every
handle is reaped by :meth:`WorkerHandle.close` (exit command, join with a
timeout, SIGTERM, SIGKILL, join).
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import time
from collections.abc import Iterable
from typing import Any

import multiprocess as mp
from multiprocess.connection import wait as mp_wait

from mpvfio.errors import (
    MpvfioError,
    RemoteTraceback,
    WorkerCrashed,
    WorkerError,
    WorkerTimeout,
)
from mpvfio.events import Event
from mpvfio.workers.device import Status, WorkerSpec, worker_main

__all__ = ["START_METHOD", "WorkerHandle", "start_workers"]

_log = logging.getLogger(__name__)
START_METHOD = "fork"
_PICKLE = pickle.HIGHEST_PROTOCOL
#: Default deadline for a worker to open its device and say "ready".
HANDSHAKE_TIMEOUT_S = 30.0


class WorkerHandle:
    """One device worker process (see the module docstring)."""

    def __init__(self, spec: WorkerSpec, ctx: Any | None = None) -> None:
        self.spec = spec
        self.name = spec.name
        self._ctx = ctx or mp.get_context(START_METHOD)
        self.cmd: Any = None
        self.ev: Any = None
        self.proc: Any = None
        self.pid: int | None = None
        self.flags = 0
        self.pending: str | None = None  # the command awaiting its reply
        self.closed = False

    # --------------------------------------------------------------- start
    def launch(self) -> None:
        """Fork the worker (does not wait for its handshake)."""
        parent_cmd, child_cmd = self._ctx.Pipe(duplex=True)
        ev_read, ev_write = self._ctx.Pipe(duplex=False)
        proc = self._ctx.Process(
            target=worker_main,
            args=(self.spec, child_cmd, ev_write),
            name=f"mpvfio-worker-{self.name}",
            daemon=True,
        )
        proc.start()
        child_cmd.close()
        ev_write.close()
        self.cmd, self.ev, self.proc = parent_cmd, ev_read, proc
        self.pid = proc.pid
        self.pending = "handshake"

    def handshake(self, timeout: float = HANDSHAKE_TIMEOUT_S) -> None:
        """Wait for the worker's ``ready`` (its device is open)."""
        value, _ = self.wait_reply(time.monotonic() + timeout)
        if not (isinstance(value, tuple) and value and value[0] == "ready"):
            raise WorkerError(f"bad handshake {value!r}", self.name)
        self.flags = int(value[2])

    # ------------------------------------------------------------- talking
    def send(self, *msg: Any) -> None:
        """Send one command (the reply comes through :meth:`wait_reply`)."""
        if self.pending is not None:
            raise WorkerError(
                f"command {msg[0]!r} sent while {self.pending!r} awaits its reply",
                self.name,
            )
        try:
            self.cmd.send_bytes(pickle.dumps(msg, _PICKLE))
        except (OSError, ValueError) as exc:
            raise self._dead_error(f"cannot send {msg[0]!r}") from exc
        self.pending = str(msg[0])

    def wait_reply(self, deadline: float) -> tuple[Any, Status | None]:
        """The reply to the pending command, watching the sentinel.

        :raise WorkerCrashed: the process died first (exit code named).
        :raise WorkerTimeout: ``deadline`` (monotonic) passed.
        :raise MpvfioError: the worker's own error, with its traceback as
            ``__cause__``.
        """
        what = self.pending or "reply"
        while True:
            # A deadline that already passed still gets one non-blocking
            # look: a reply that is waiting in the pipe is not a timeout
            # (joins of one round share a deadline, a slow one uses it up).
            remaining = max(0.0, deadline - time.monotonic())
            ready = mp_wait([self.cmd, self.proc.sentinel], remaining)
            if not ready:
                if time.monotonic() < deadline:
                    continue
                raise WorkerTimeout(
                    f"no answer to {what!r} within the deadline", self.name
                )
            if self.cmd in ready:
                try:
                    msg = pickle.loads(self.cmd.recv_bytes())
                except (EOFError, OSError):
                    self.proc.join(1.0)
                    raise self._dead_error(f"channel closed during {what!r}") from None
                break
            if self.proc.sentinel in ready:
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

    def drain_events(self) -> list[Event]:
        """Every event already written by the worker (non-blocking)."""
        out: list[Event] = []
        try:
            while self.ev.poll(0):
                out.append(pickle.loads(self.ev.recv_bytes()))
        except (EOFError, OSError):
            pass
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
