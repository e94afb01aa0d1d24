"""Per-worker shared-memory slots and wake-up semaphores (layer 2).

The transition command of a notification (the hot path of a switchover)
does not go through the command pipe: PERF_LIMITS.md design P1 with one
**start semaphore per worker**, and a **done semaphore per worker** instead
of a reply message.  The command's arguments and the result (the device's
new state, its arc records) are fixed-layout int64 words in one shared
memory block, one slot per device.  Pipes stay for everything else: device
calls, errors, tracebacks, notes, events.

Objects (created mode 0600 by the parent's :class:`~mpvfio.ipc.names.NameRegistry`,
only *opened* by workers, unlinked with the registry)::

    /<prefix>-slots         shm: SLOT_WORDS int64 per device
    /<prefix>-w<i>-go       semaphore, 0 tokens: "a command is waiting"
    /<prefix>-w<i>-done     semaphore, 0 tokens: "the transition finished"

Data flow of one transition (slot ``i``, ``seq`` = the command's number)::

    parent                                   worker i
    write CMD_* words, CMD_SEQ = seq
    post go ───────────────────────────────▶ wakes (sem), reads CMD_*
                                             phase 1 ...
                                             ARRIVED = seq, barrier.wait()
                                             phase 2 ...
                                             RES_* words (state, arcs),
                                             DONE_SEQ = seq
    acquire done (join) ◀─────────────────── post done
    read RES_* (or, RES_KIND = PIPE: the full reply on the pipe)

Every other command is a pipe message followed by ``CMD_OP = OP_PIPE`` and a
post of ``go``: the idle worker blocks on one semaphore only (with a timeout
to check its parent), never on ``poll()`` of the pipe.  A sem post
happens-after the words written before it (``sem_post``/``sem_wait`` are
full barriers), and the sequence number makes a stray token harmless.

``EV_COUNT`` counts the events the worker wrote to its event pipe, so the
parent reads the event pipe only when there is something to read, and then
exactly that many messages (never a partial one, never a blocking read).
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass

from mpvfio.ipc import posixobj
from mpvfio.ipc.names import NameRegistry

__all__ = [
    "ARC_FIELDS",
    "MAX_ARCS",
    "OP_PIPE",
    "OP_TRANSITION",
    "RES_FAST",
    "RES_PIPE",
    "SLOT_WORDS",
    "SlotSpec",
    "SlotTable",
    "WorkerSlot",
]

# int64 word indices inside one slot
CMD_SEQ = 0  # parent: number of the latest command
CMD_OP = 1  # parent: OP_PIPE or OP_TRANSITION
CMD_RUNNING = 2  # transition: bool
CMD_RUNSTATE = 3  # transition: index into tuple(RunState)
CMD_BARRIER = 4  # transition: wait at the barrier after phase 1
CMD_TIMEOUT_US = 5  # transition: barrier timeout (µs)
ARRIVED = 6  # worker: CMD_SEQ of the command that arrived at the barrier
DONE_SEQ = 7  # worker: CMD_SEQ of the transition whose result is here
RES_KIND = 8  # worker: RES_FAST (words below) or RES_PIPE (reply on the pipe)
RES_STATE = 9  # worker: MigState value
RES_DATA_FD = 10  # worker: 0/1
RES_NARCS = 11  # worker: arc records below
EV_COUNT = 12  # worker: events written to the event pipe (ever)
PID = 13  # worker: its pid (diagnostics)
ARCS = 16  # first arc record
#: Words of one arc record: src, dst, start_ns, end_ns, ok, err.
ARC_FIELDS = 6
#: Arc records a fast result carries (more: the reply goes on the pipe).
MAX_ARCS = 8
#: int64 words per slot (a multiple of 8: 64-byte aligned slots).
SLOT_WORDS = 64

OP_PIPE = 1
OP_TRANSITION = 2
RES_FAST = 0
RES_PIPE = 1

assert ARCS + MAX_ARCS * ARC_FIELDS <= SLOT_WORDS


@dataclass(frozen=True)
class SlotSpec:
    """What a worker needs to open its slot (picklable; in the WorkerSpec)."""

    shm: str
    index: int
    go: str
    done: str
    outstanding: str
    alldone: str
    crossed: str


class WorkerSlot:
    """One device's slot and semaphores, on either side.

    :attr:`mv` is an int64 view of the slot's words (index with the
    constants of this module).
    """

    def __init__(
        self,
        spec: SlotSpec,
        mv: memoryview,
        sems: tuple[posixobj.Semaphore, ...],
        owned: bool,
    ) -> None:
        self.spec = spec
        self.mv = mv
        self.go, self.done, self.outstanding, self.alldone, self.crossed = sems
        self._owned = owned  # the table closes the parent's handles
        self._mm: mmap.mmap | None = None

    @classmethod
    def attach(cls, spec: SlotSpec) -> WorkerSlot:
        """Open an existing slot by name (the worker's side)."""
        mm = posixobj.open_shm(spec.shm)
        opened: list[posixobj.Semaphore] = []
        try:
            if len(mm) < (spec.index + 1) * SLOT_WORDS * 8:
                from mpvfio.errors import IPCError

                raise IPCError(f"{spec.shm!r} has no slot {spec.index}")
            for name in (
                spec.go,
                spec.done,
                spec.outstanding,
                spec.alldone,
                spec.crossed,
            ):
                opened.append(posixobj.open_semaphore(name))
        except BaseException:
            for sem in opened:
                posixobj.close_semaphore(sem)
            mm.close()
            raise
        start = spec.index * SLOT_WORDS
        mv = memoryview(mm).cast("q")[start : start + SLOT_WORDS]
        slot = cls(spec, mv, tuple(opened), owned=False)
        slot._mm = mm
        return slot

    def close(self) -> None:
        """Drop a worker's handles and mapping (idempotent)."""
        if self._owned or self._mm is None:
            return
        for sem in (self.go, self.done, self.outstanding, self.alldone, self.crossed):
            posixobj.close_semaphore(sem)
        self.mv.release()
        self._mm.close()
        self._mm = None


class SlotTable:
    """The parent's side: the shm block and every device's semaphores."""

    def __init__(self, registry: NameRegistry, n: int) -> None:
        self.registry = registry
        self._slots: list[WorkerSlot] = []
        self._sems: list[posixobj.Semaphore] = []
        name = registry.name("slots")
        self._mm: mmap.mmap | None = posixobj.create_shm(
            name, max(1, n) * SLOT_WORDS * 8
        )
        registry.add(name, "shm")
        self._shm = name
        self._mv = memoryview(self._mm).cast("q")
        try:
            self.outstanding = self._sem("outstanding")
            self.alldone = self._sem("alldone")
            self.crossed = self._sem("crossed")
            for i in range(n):
                go = self._sem(f"w{i}-go")
                done = self._sem(f"w{i}-done")
                spec = SlotSpec(
                    self._shm,
                    i,
                    go.name,
                    done.name,
                    self.outstanding.name,
                    self.alldone.name,
                    self.crossed.name,
                )
                mv = self._mv[i * SLOT_WORDS : (i + 1) * SLOT_WORDS]
                sems = (go, done, self.outstanding, self.alldone, self.crossed)
                self._slots.append(WorkerSlot(spec, mv, sems, owned=True))
        except BaseException:
            self.close()
            raise

    def _sem(self, suffix: str) -> posixobj.Semaphore:
        name = self.registry.name(suffix)
        sem = posixobj.create_semaphore(name, 0)
        self.registry.add(name, "sem")
        self._sems.append(sem)
        return sem

    def begin_round(self) -> None:
        """Forget the previous notification's counts (no transition runs)."""
        for sem in (self.outstanding, self.alldone, self.crossed):
            if sem.value:  # (a failing sem_trywait costs an exception)
                posixobj.drain(sem)

    def __getitem__(self, i: int) -> WorkerSlot:
        return self._slots[i]

    def __len__(self) -> int:
        return len(self._slots)

    def close(self) -> None:
        """Drop the parent's handles and mapping (names: the registry's)."""
        for sem in self._sems:
            posixobj.close_semaphore(sem)
        self._sems.clear()
        for slot in self._slots:
            slot.mv.release()
        self._slots.clear()
        if self._mm is not None:
            self._mv.release()
            self._mm.close()
            self._mm = None
