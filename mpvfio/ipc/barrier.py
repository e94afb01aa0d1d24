"""A reusable barrier across processes, built from posix_ipc semaphores.

This module owns :class:`ProcessBarrier`: the phase barrier that the device
workers of one round cross together, and the "filled" interlock that lets the
parent (the owner, not a party) run its main callbacks only once every
worker of the round has arrived.

Objects (all named ``/<prefix>-barN-<part>``, mode 0600, created by the
owner, only *opened* by workers)::

    shm     int64 slots: magic, max_parties, generation, parties, broken,
            arrived, and diagnostics (who broke it, why, when, last arriver)
    mutex   semaphore, 1 token: guards generation/parties/arrived
    gate0   semaphore, 0 tokens: waiters of even generations
    gate1   semaphore, 0 tokens: waiters of odd generations
    filled  semaphore, 0 tokens: posted once per crossing for the owner

Data flow of one round (N = parties)::

    owner (parent)                    party k (worker, attach(spec))
    reset(N) --- shm: parties=N --->
    dispatch work (not ours) -------> phase 1 ...
                                      wait(timeout):
                                        mutex: idx = arrived++; gen = g
                                        not last: gate[g % 2].acquire(...)
                                        last (idx == N-1): arrived = 0,
                                          generation = g+1, then post
    wait_filled(timeout) <-- filled --  filled once and gate[g % 2] N-1 times
    main callbacks ...                -> every party returns its idx; phase 2
    abort() (watchdog) -- broken=1, tokens on mutex, both gates, filled -->
                                        every waiter raises BarrierError

Design: PERF_LIMITS "P1" (counter under a mutex semaphore, the last arriver
releases one of two alternating gates N-1 times), not the lock-free "P2".
Both measured equal within noise; P1 was chosen because

* it gives exact, unique arrival indices ``0 .. N-1`` in arrival order (the
  last arriver gets ``N-1``), the way :class:`threading.Barrier` numbers its
  parties; P2's ``acquire(0)`` counter can only tell "last" from "not last";
* the arrived count is exact, for diagnostics and tests.

Its risk, a party SIGKILLed inside the (tiny) critical section, is handled
(pitfall 5): every acquire has a timeout; a party that cannot get the mutex
by its deadline breaks the barrier; :meth:`ProcessBarrier.abort` posts a
mutex token, and every party that takes the mutex of a broken barrier passes
it on, so the holders' chain drains; :meth:`ProcessBarrier.reset` rebuilds
the mutex to exactly one token.  No lock is held while *waiting* on a gate.

Two alternating gates (by generation parity, pitfall 8) keep a fast party
that re-enters for crossing g+1 from taking a token meant for crossing g.
A token that arrives on a gate without the generation having moved and
without the barrier being broken is a stray (left by a party killed after
it arrived) and is discarded; :meth:`ProcessBarrier.reset` drains them all.

Timeouts follow :class:`threading.Barrier`: a party whose deadline passes
breaks the barrier (unless the crossing completed at that very moment) and
raises :class:`~mpvfio.errors.BarrierTimeout`; every other party is released
with :class:`~mpvfio.errors.BarrierError`.  A party that leaves a crossing
on any other exception (``KeyboardInterrupt``, or one raised by the hook of
:func:`mpvfio.ipc.set_signal_hook`) breaks it too.  The barrier stays broken until
the owner calls :meth:`ProcessBarrier.reset`.

One thread per process may use a barrier handle; handles are not thread-safe.
"""

from __future__ import annotations

import itertools
import math
import mmap
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType

from mpvfio.errors import BarrierError, BarrierTimeout, IPCError, UsageError
from mpvfio.ipc import posixobj
from mpvfio.ipc.names import Kind, NameRegistry, posix_name

__all__ = ["MAX_PARTIES", "BarrierSpec", "ProcessBarrier"]

#: Upper bound of ``max_parties`` (far above what 2 cores can usefully run).
MAX_PARTIES = 65536

_MAGIC_VALUE = 0x6D70766669624152  # "mpvfibAR", layout version 1

# int64 slot indices in the shared-memory block
_MAGIC = 0
_MAX_PARTIES = 1
_GENERATION = 2
_PARTIES = 3
_BROKEN = 4
_ARRIVED = 5
_BROKEN_BY = 6  # diagnostics from here on
_BROKEN_REASON = 7
_BROKEN_GEN = 8
_BROKEN_NS = 9
_LAST_PID = 10
_CROSSINGS = 11
_OWNER_PID = 12
_NSLOTS = 16

_REASON_ABORT = 1
_REASON_TIMEOUT = 2
_REASON_LOCK_TIMEOUT = 3
_REASON_INTERRUPTED = 4
_REASONS = {
    0: "none",
    _REASON_ABORT: "abort",
    _REASON_TIMEOUT: "party timeout",
    _REASON_LOCK_TIMEOUT: "party timeout on the barrier lock",
    _REASON_INTERRUPTED: "party interrupted",
}

#: Extra time a timed-out party spends settling the race with the last
#: arriver (taking the mutex, or the token of a crossing that just completed).
_GRACE = 0.25

_counter = itertools.count()


@dataclass(frozen=True)
class BarrierSpec:
    """The POSIX names of one barrier's objects (picklable; sent to workers)."""

    shm: str
    mutex: str
    gate0: str
    gate1: str
    filled: str

    def objects(self) -> tuple[tuple[str, Kind], ...]:
        """Every ``(name, kind)`` pair of the barrier."""
        return (
            (self.shm, "shm"),
            (self.mutex, "sem"),
            (self.gate0, "sem"),
            (self.gate1, "sem"),
            (self.filled, "sem"),
        )


def _check_timeout(timeout: float) -> float:
    t = float(timeout)
    if math.isnan(t) or t < 0 or math.isinf(t):
        raise UsageError(f"timeout must be a finite number >= 0, got {timeout!r}")
    return t


class ProcessBarrier:
    """A reusable barrier for processes; see the module docstring.

    Make one with :meth:`create` (owner) or :meth:`attach` (party).
    """

    def __init__(
        self,
        spec: BarrierSpec,
        mm: mmap.mmap,
        mutex: posixobj.Semaphore,
        gates: tuple[posixobj.Semaphore, posixobj.Semaphore],
        filled: posixobj.Semaphore,
        registry: NameRegistry | None,
    ) -> None:
        """Wrap opened objects; use :meth:`create` or :meth:`attach` instead."""
        self._spec = spec
        self._mm: mmap.mmap | None = mm
        self._mv = memoryview(mm).cast("q")
        self._mutex = mutex
        self._gates = gates
        self._filled = filled
        self._registry = registry
        self._owner_pid = os.getpid() if registry is not None else -1
        self._max_parties = int(self._mv[_MAX_PARTIES])
        self._round_gen = -1  # owner: generation whose crossing fills the round
        self._filled_gen = -2  # owner: round already seen filled
        self._closed = False

    # -- construction ---------------------------------------------------

    @classmethod
    def create(
        cls, prefix: str, registry: NameRegistry, max_parties: int
    ) -> ProcessBarrier:
        """Create the barrier's objects (owner side) and record their names.

        The barrier starts with no parties: call :meth:`reset` before the
        first round.

        :param prefix: the run prefix (usually ``registry.prefix``).
        :param registry: records the names for unlinking.
        :param max_parties: the most parties any round will have.
        :raises UsageError: ``max_parties`` is out of range or the prefix bad.
        :raises IPCError: an object cannot be created.
        """
        if (
            isinstance(max_parties, bool)
            or not isinstance(max_parties, int)
            or not 1 <= max_parties <= MAX_PARTIES
        ):
            raise UsageError(
                f"max_parties must be an int in 1..{MAX_PARTIES}, got {max_parties!r}"
            )
        tag = f"bar{next(_counter)}"
        spec = BarrierSpec(
            shm=posix_name(prefix, f"{tag}-shm"),
            mutex=posix_name(prefix, f"{tag}-mutex"),
            gate0=posix_name(prefix, f"{tag}-gate0"),
            gate1=posix_name(prefix, f"{tag}-gate1"),
            filled=posix_name(prefix, f"{tag}-filled"),
        )
        mm: mmap.mmap | None = None
        sems: list[posixobj.Semaphore] = []
        try:
            mm = posixobj.create_shm(spec.shm, _NSLOTS * 8)
            registry.add(spec.shm, "shm")
            mv = memoryview(mm).cast("q")
            try:
                mv[_MAX_PARTIES] = max_parties
                mv[_OWNER_PID] = os.getpid()
                mv[_MAGIC] = _MAGIC_VALUE
            finally:
                mv.release()
            for name, initial in (
                (spec.mutex, 1),
                (spec.gate0, 0),
                (spec.gate1, 0),
                (spec.filled, 0),
            ):
                sems.append(posixobj.create_semaphore(name, initial))
                registry.add(name, "sem")
        except BaseException:
            for sem in sems:
                posixobj.close_semaphore(sem)
            if mm is not None:
                mm.close()
            for name, _kind in spec.objects():
                if name in registry:
                    registry.unlink(name)
            raise
        mutex, gate0, gate1, filled = sems
        return cls(spec, mm, mutex, (gate0, gate1), filled, registry)

    @classmethod
    def attach(cls, spec: BarrierSpec) -> ProcessBarrier:
        """Open an existing barrier (party side); never creates or unlinks.

        :raises IPCError: an object is missing (unlinked too early?) or is
            not a barrier of this layout.
        """
        opened: list[posixobj.Semaphore] = []
        mm = posixobj.open_shm(spec.shm)
        try:
            if len(mm) < _NSLOTS * 8:
                raise IPCError(f"{spec.shm!r} is too small for a barrier")
            mv = memoryview(mm).cast("q")
            try:
                magic = mv[_MAGIC]
            finally:
                mv.release()
            if magic != _MAGIC_VALUE:
                raise IPCError(f"{spec.shm!r} is not an mpvfio barrier")
            for name in (spec.mutex, spec.gate0, spec.gate1, spec.filled):
                opened.append(posixobj.open_semaphore(name))
        except BaseException:
            for sem in opened:
                posixobj.close_semaphore(sem)
            mm.close()
            raise
        mutex, gate0, gate1, filled = opened
        return cls(spec, mm, mutex, (gate0, gate1), filled, None)

    # -- state -------------------------------------------------------------

    @property
    def spec(self) -> BarrierSpec:
        """The names to :meth:`attach` to from a worker."""
        return self._spec

    @property
    def max_parties(self) -> int:
        """The largest ``parties`` that :meth:`reset` accepts."""
        return self._max_parties

    @property
    def broken(self) -> bool:
        """``True`` once aborted or timed out, until the next :meth:`reset`."""
        self._check_open()
        return bool(self._mv[_BROKEN])

    @property
    def generation(self) -> int:
        """Completed crossings (plus rounds abandoned by :meth:`reset`)."""
        self._check_open()
        return int(self._mv[_GENERATION])

    @property
    def parties(self) -> int:
        """The parties of the current round (0 before the first reset)."""
        self._check_open()
        return int(self._mv[_PARTIES])

    @property
    def arrived(self) -> int:
        """Parties waiting in the current crossing (a diagnostic snapshot)."""
        self._check_open()
        return int(self._mv[_ARRIVED])

    @property
    def is_owner(self) -> bool:
        """``True`` in the process that created the barrier."""
        return self._owner_pid == os.getpid()

    def diagnostics(self) -> dict[str, int | str]:
        """A snapshot of the shared state, for error messages and logs."""
        self._check_open()
        mv = self._mv
        return {
            "generation": int(mv[_GENERATION]),
            "parties": int(mv[_PARTIES]),
            "arrived": int(mv[_ARRIVED]),
            "broken": int(mv[_BROKEN]),
            "broken_by": int(mv[_BROKEN_BY]),
            "broken_reason": _REASONS.get(int(mv[_BROKEN_REASON]), "?"),
            "broken_generation": int(mv[_BROKEN_GEN]),
            "broken_at_ns": int(mv[_BROKEN_NS]),
            "last_arriver": int(mv[_LAST_PID]),
            "crossings": int(mv[_CROSSINGS]),
            "owner": int(mv[_OWNER_PID]),
            "max_parties": self._max_parties,
        }

    def _check_open(self) -> None:
        if self._closed:
            raise IPCError(f"barrier {self._spec.shm!r} is closed")

    def _check_owner(self, what: str) -> None:
        self._check_open()
        if not self.is_owner:
            raise UsageError(
                f"{what}() is for the barrier's owner (pid {self._owner_pid}), "
                f"not pid {os.getpid()}"
            )

    def _broken_error(self, cls: type[BarrierError] = BarrierError) -> BarrierError:
        mv = self._mv
        return cls(
            f"barrier {self._spec.shm!r} is broken "
            f"({_REASONS.get(int(mv[_BROKEN_REASON]), '?')} by pid "
            f"{int(mv[_BROKEN_BY])} in generation {int(mv[_BROKEN_GEN])})"
        )

    # -- owner ---------------------------------------------------------

    def reset(self, parties: int) -> None:
        """Arm the next round with ``parties`` parties (owner, between rounds).

        Call it only when no party is inside :meth:`wait` (every party of the
        previous round has returned).  Clears ``broken``, abandons an
        unfinished or broken generation (the generation moves on, so nothing
        of it can count in the new round), drains stray tokens and rebuilds
        the mutex to exactly one token, which also recovers a mutex lost by
        a party that was killed while holding it.

        :raises UsageError: not the owner, or ``parties`` not in
            ``1..max_parties``.
        """
        self._check_owner("reset")
        if (
            isinstance(parties, bool)
            or not isinstance(parties, int)
            or not 1 <= parties <= self._max_parties
        ):
            raise UsageError(
                f"parties must be an int in 1..{self._max_parties}, got {parties!r}"
            )
        mv = self._mv
        posixobj.drain(self._mutex)  # take the lock, and any extra abort tokens
        try:
            if mv[_BROKEN] or mv[_ARRIVED]:
                mv[_GENERATION] = mv[_GENERATION] + 1
            posixobj.drain(self._gates[0])
            posixobj.drain(self._gates[1])
            posixobj.drain(self._filled)
            mv[_PARTIES] = parties
            mv[_ARRIVED] = 0
            mv[_BROKEN_BY] = 0
            mv[_BROKEN_REASON] = 0
            mv[_BROKEN_GEN] = 0
            mv[_BROKEN_NS] = 0
            mv[_BROKEN] = 0
            self._round_gen = int(mv[_GENERATION])
            self._filled_gen = -2
        finally:
            posixobj.release(self._mutex)

    def wait_filled(self, timeout: float) -> bool:
        """Block until every party of this round has arrived (owner only).

        "This round" is the first crossing after :meth:`reset`.  Returns
        ``True`` once it filled (again at once, and cheaply, on later calls
        in the same round), ``False`` when ``timeout`` passes first.  The
        owner is not a party: a timeout here does not break the barrier.

        :raises BarrierError: the barrier is broken and the round did not fill.
        :raises UsageError: not the owner, or no :meth:`reset` yet.
        """
        if self._filled_gen == self._round_gen and not self._closed:
            return True  # already seen filled in this round: no syscall
        self._check_owner("wait_filled")
        if self._round_gen < 0:
            raise UsageError("wait_filled() before the first reset()")
        timeout = _check_timeout(timeout)
        mv = self._mv
        deadline = time.monotonic() + timeout
        while True:
            if mv[_GENERATION] > self._round_gen:
                self._filled_gen = self._round_gen
                return True
            if mv[_BROKEN]:
                raise self._broken_error()
            if not posixobj.acquire(self._filled, deadline - time.monotonic()):
                if mv[_GENERATION] > self._round_gen:
                    self._filled_gen = self._round_gen
                    return True
                return False

    # -- anyone ----------------------------------------------------------

    def abort(self) -> None:
        """Break the barrier and release every waiter (idempotent; anyone).

        Parties blocked in :meth:`wait` raise :class:`BarrierError`, so do
        later calls until :meth:`reset`; the owner's :meth:`wait_filled`
        raises too.  Takes no lock, so it works while a killed party holds
        the mutex (the parent's watchdog calls it when a worker dies).
        """
        self._check_open()
        self._mark_broken(_REASON_ABORT)
        self._release_all()

    def _mark_broken(self, reason: int) -> None:
        mv = self._mv
        if mv[_BROKEN]:
            return
        mv[_BROKEN_BY] = os.getpid()
        mv[_BROKEN_REASON] = reason
        mv[_BROKEN_GEN] = mv[_GENERATION]
        mv[_BROKEN_NS] = time.monotonic_ns()
        mv[_BROKEN] = 1  # last: readers that see it see the diagnostics too

    def _release_all(self) -> None:
        """Wake everyone who may wait: both gates, the mutex chain, the owner."""
        n = min(max(int(self._mv[_PARTIES]), 1), self._max_parties)
        posixobj.release(self._gates[0], n)
        posixobj.release(self._gates[1], n)
        posixobj.release(self._mutex)
        posixobj.release(self._filled)

    def leave(self, counted: Callable[[], bool], timeout: float) -> bool:
        """Owner: a party of this round is gone (killed); cross without it.

        Under the barrier's lock: if ``counted()`` (the party arrived before
        it died, see :meth:`wait`'s ``mark``) nothing changes, the crossing
        still completes when the others arrive; otherwise the round needs
        one party less, and if every remaining party has already arrived
        the owner completes the crossing for them.  The others never pass
        before every live party arrived, so P2P-first holds without
        breaking the barrier.

        :returns: ``False`` if the lock was not taken within ``timeout`` (a
            party died inside it): the caller should :meth:`abort`.
        """
        self._check_open()
        self._check_owner("leave")
        if not posixobj.acquire(self._mutex, timeout):
            return False
        release = 0
        gate = self._gates[0]
        mv = self._mv
        try:
            if mv[_BROKEN] or counted():
                return True
            parties = int(mv[_PARTIES]) - 1
            mv[_PARTIES] = max(parties, 0)
            arrived = int(mv[_ARRIVED])
            if parties >= 1 and arrived >= parties:
                gen = int(mv[_GENERATION])
                mv[_ARRIVED] = 0
                mv[_CROSSINGS] = mv[_CROSSINGS] + 1
                mv[_GENERATION] = gen + 1
                gate = self._gates[gen & 1]
                release = arrived
        finally:
            posixobj.release(self._mutex)
        if release:
            posixobj.release(self._filled)
            posixobj.release(gate, release)
        return True

    # -- party -------------------------------------------------------------

    def wait(self, timeout: float, mark: Callable[[], None] | None = None) -> int:
        """Arrive and block until all parties of the round have arrived.

        Returns this party's arrival index in ``0 .. parties-1`` (order of
        arrival, like :class:`threading.Barrier`): the last arriver, which
        releases the others, gets ``parties - 1``.

        ``mark`` is called under the barrier's lock right as this party is
        counted, so "marked" means "counted" (what :meth:`leave` asks).

        :raises BarrierError: the barrier is or becomes broken.
        :raises BarrierTimeout: ``timeout`` seconds passed first; the barrier
            is now broken and every other party gets :class:`BarrierError`.
        :raises UsageError: no :meth:`reset` yet, or a bad timeout.
        """
        self._check_open()
        timeout = _check_timeout(timeout)
        deadline = time.monotonic() + timeout
        mv = self._mv
        if mv[_BROKEN]:
            raise self._broken_error()
        if not posixobj.acquire(self._mutex, timeout):
            self._mark_broken(_REASON_LOCK_TIMEOUT)
            self._release_all()
            raise BarrierTimeout(
                f"barrier {self._spec.shm!r}: lock not taken within {timeout} s"
            )
        try:
            if mv[_BROKEN]:
                raise self._broken_error()
            parties = int(mv[_PARTIES])
            if parties < 1:
                raise UsageError("ProcessBarrier.wait() before the owner's reset()")
            gen = int(mv[_GENERATION])
            idx = int(mv[_ARRIVED])
            last = idx + 1 >= parties
            if last:
                mv[_ARRIVED] = 0
                mv[_LAST_PID] = os.getpid()
                mv[_CROSSINGS] = mv[_CROSSINGS] + 1
                mv[_GENERATION] = gen + 1
            else:
                mv[_ARRIVED] = idx + 1
            if mark is not None:
                mark()
        finally:
            posixobj.release(self._mutex)  # also passes an abort token on
        gate = self._gates[gen & 1]
        if last:
            posixobj.release(self._filled)
            posixobj.release(gate, parties - 1)
            return idx
        try:
            while posixobj.acquire(gate, deadline - time.monotonic()):
                if mv[_GENERATION] != gen:
                    return idx
                if mv[_BROKEN]:
                    raise self._broken_error()
                # A stray token (a party was killed after arriving in an
                # earlier crossing of this parity): discard it, keep waiting.
        except BarrierError:
            raise
        except BaseException:
            # KeyboardInterrupt, or the signal hook raised: this party leaves
            # an unfinished crossing, so nobody may cross it without it.
            if mv[_GENERATION] == gen:
                self._mark_broken(_REASON_INTERRUPTED)
                self._release_all()
            raise
        return self._timed_out(gen, idx, gate, timeout)

    def _timed_out(
        self, gen: int, idx: int, gate: posixobj.Semaphore, timeout: float
    ) -> int:
        """Settle a party's timeout: break the barrier, or return if it filled."""
        mv = self._mv
        locked = posixobj.acquire(self._mutex, _GRACE)
        try:
            completed = mv[_GENERATION] != gen
            already_broken = bool(mv[_BROKEN])
            if not completed and not already_broken:
                self._mark_broken(_REASON_TIMEOUT)
        finally:
            if locked:
                posixobj.release(self._mutex)
        if completed:
            # The last arriver came at the deadline: its token is on the way.
            if posixobj.acquire(gate, _GRACE):
                return idx
            raise BarrierTimeout(
                f"barrier {self._spec.shm!r}: crossing {gen} completed but its "
                f"release did not arrive (the last arriver died?)"
            )
        self._release_all()
        if already_broken:
            raise self._broken_error()
        raise BarrierTimeout(
            f"barrier {self._spec.shm!r}: timed out after {timeout} s in "
            f"generation {gen} with {int(mv[_ARRIVED])}/{int(mv[_PARTIES])} "
            f"arrived; the barrier is now broken"
        )

    # -- lifetime --------------------------------------------------------

    def close(self) -> None:
        """Drop this process's handles and mapping (both sides; idempotent)."""
        if self._closed:
            return
        self._closed = True
        for sem in (self._mutex, *self._gates, self._filled):
            posixobj.close_semaphore(sem)
        self._mv.release()
        if self._mm is not None:
            self._mm.close()
            self._mm = None

    def unlink(self) -> None:
        """Remove the objects' names (owner only; idempotent).

        Parties that attached keep working; later :meth:`attach` calls fail.
        """
        if not self.is_owner or self._registry is None:
            raise UsageError("unlink() is for the barrier's owner")
        for name, _kind in self._spec.objects():
            self._registry.unlink(name)

    def __enter__(self) -> ProcessBarrier:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close; the owner also unlinks."""
        try:
            if self.is_owner:
                self.unlink()
        finally:
            self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"gen={self.generation}"
        role = "owner" if self.is_owner else "party"
        return f"<ProcessBarrier {self._spec.shm} {role} {state}>"
