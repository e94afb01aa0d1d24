"""The VFIO migration FSM: the kernel's step function and the driver's walk.

This module owns the pure model of ``vfio_mig_get_next_state()``
(drivers/vfio/vfio_main.c) with the *fixed* behaviour: a blocked arc such as
STOP_COPY -> PRE_COPY fails with EINVAL instead of spinning forever, as
shipped kernels from v6.2 do.  It also owns the parsing and naming of flag
sets and states used by the command line, and the 64-row outcome table.

No I/O happens here; every failure is a :class:`TransitionError` with
``errno == EINVAL`` raised before any arc would run.
"""

from __future__ import annotations

import errno
import functools
import re
from typing import TypedDict

from mpvfio.errors import InternalError, TransitionError, UsageError, errno_name
from mpvfio.uapi.vfio import (
    SESSION_OPENING_ARCS,
    STATE_NEEDS,
    MigFlag,
    MigState,
)

__all__ = [
    "HOP",
    "Row",
    "explain",
    "flags_name",
    "next_state",
    "parse_flags",
    "parse_state",
    "returns_data_fd",
    "row",
    "supported",
    "table",
    "walk",
]

_S = MigState
_ORDER = tuple(MigState)  # 0..7
# A plain int: ``~`` of an IntFlag complements within its defined bits only.
_ALL_FLAGS = int(MigFlag.STOP_COPY | MigFlag.P2P | MigFlag.PRE_COPY)

# The kernel's vfio_from_fsm_table, row = current state, column = target.
# Column order: ERROR STOP RUNNING STOP_COPY RESUMING RUNNING_P2P PRE_COPY
# PRE_COPY_P2P.  ERROR marks a blocked or impossible step.
_HOP_ROWS: tuple[tuple[MigState, ...], ...] = (
    # from ERROR
    (_S.ERROR,) * 8,
    # from STOP
    (_S.ERROR, _S.STOP, _S.RUNNING_P2P, _S.STOP_COPY,
     _S.RESUMING, _S.RUNNING_P2P, _S.RUNNING_P2P, _S.RUNNING_P2P),
    # from RUNNING
    (_S.ERROR, _S.RUNNING_P2P, _S.RUNNING, _S.RUNNING_P2P,
     _S.RUNNING_P2P, _S.RUNNING_P2P, _S.PRE_COPY, _S.RUNNING_P2P),
    # from STOP_COPY
    (_S.ERROR, _S.STOP, _S.STOP, _S.STOP_COPY,
     _S.STOP, _S.STOP, _S.ERROR, _S.ERROR),
    # from RESUMING
    (_S.ERROR, _S.STOP, _S.STOP, _S.STOP,
     _S.RESUMING, _S.STOP, _S.STOP, _S.STOP),
    # from RUNNING_P2P
    (_S.ERROR, _S.STOP, _S.RUNNING, _S.STOP,
     _S.STOP, _S.RUNNING_P2P, _S.RUNNING, _S.PRE_COPY_P2P),
    # from PRE_COPY
    (_S.ERROR, _S.RUNNING, _S.RUNNING, _S.PRE_COPY_P2P,
     _S.RUNNING, _S.RUNNING, _S.PRE_COPY, _S.PRE_COPY_P2P),
    # from PRE_COPY_P2P
    (_S.ERROR, _S.RUNNING_P2P, _S.RUNNING_P2P, _S.STOP_COPY,
     _S.RUNNING_P2P, _S.RUNNING_P2P, _S.PRE_COPY, _S.PRE_COPY_P2P),
)  # fmt: skip

#: ``HOP[(cur, target)]`` is the next state the kernel steps to (ERROR: none).
HOP: dict[tuple[MigState, MigState], MigState] = {
    (cur, new): _HOP_ROWS[cur][new] for cur in _ORDER for new in _ORDER
}


class Row(TypedDict):
    """One outcome: names of cur/new, the path (or None) and the errno name."""

    cur: str
    new: str
    path: list[str] | None
    error: str | None


def _name(state: int) -> str:
    """``MigState`` name of ``state``, or its number when out of range."""
    return _S(state).name if 0 <= state < len(_ORDER) else str(state)


def flags_name(flags: int) -> str:
    """Name a flag set: ``"STOP_COPY,P2P,PRE_COPY"``; unknown bits in hex."""
    parts = [f.name for f in MigFlag if flags & f and f.name]
    rest = flags & ~_ALL_FLAGS
    if rest:
        parts.append(hex(rest))
    return ",".join(parts) if parts else "0"


def supported(flags: int, state: int) -> bool:
    """True when ``state`` is a state a device with ``flags`` can be in.

    ERROR is never supported (its mask needs all 32 bits), nor is a value
    outside 0..7.
    """
    if not 0 < state < len(_ORDER):
        return False
    needs = STATE_NEEDS[_S(state)]
    return flags & needs == needs


def _fail(message: str, cur: int, new: int) -> TransitionError:
    return TransitionError(
        message, device="", err=errno.EINVAL, cur=_name(cur), new=_name(new)
    )


def next_state(flags: int, cur: int, new: int) -> MigState:
    """One call of ``vfio_mig_get_next_state()``: the next state to step to.

    Unsupported optional states are skipped, so the result is always a state
    the device supports.  Raises :class:`TransitionError` (EINVAL) for an
    unsupported or out-of-range ``cur`` or ``new``, for ``new == ERROR`` and
    for a blocked arc (where shipped kernels hang instead).
    """
    for state in (cur, new):
        if not 0 <= state < len(_ORDER):
            raise _fail(f"state {state} is out of range", cur, new)
    if cur == _S.ERROR:
        raise _fail(
            "current state ERROR is not supported (only VFIO_DEVICE_RESET "
            "leaves ERROR)",
            cur,
            new,
        )
    if not supported(flags, cur):
        raise _fail(
            f"current state {_name(cur)} is not supported by flags {flags_name(flags)}",
            cur,
            new,
        )
    if new == _S.ERROR:
        raise _fail("target ERROR cannot be requested", cur, new)
    if not supported(flags, new):
        raise _fail(
            f"target {_name(new)} is not supported by flags {flags_name(flags)}",
            cur,
            new,
        )
    target = _S(new)
    prev, hop = _S(cur), HOP[_S(cur), target]
    # Each skip moves to another state; more than 8 of them would be a cycle.
    for _ in _ORDER:
        if hop == _S.ERROR:
            raise _fail(f"{prev.name} -> {target.name} is a blocked arc", cur, new)
        if supported(flags, hop):
            return hop
        prev, hop = hop, HOP[hop, target]
    raise InternalError(f"next-hop table cycles for {_name(cur)} -> {target.name}")


def walk(flags: int, cur: int, new: int) -> list[MigState]:
    """The driver's set_state loop: the full path from ``cur`` to ``new``.

    The path starts with ``cur``; ``[cur]`` alone means "already there" and
    succeeds even for ERROR or an unsupported state.  A failure raises
    :class:`TransitionError` at the first step, before any arc.
    """
    return list(_walk(flags, cur, new))


# Pure in its arguments and called on every SET of the emulated device (the
# switchover path, in every worker): each (flags, cur, new) is walked once.
# Failures are not cached, so every caller gets its own exception.
@functools.lru_cache(maxsize=1024)
def _walk(flags: int, cur: int, new: int) -> tuple[MigState, ...]:
    if cur == new and 0 <= cur < len(_ORDER):
        return (_S(cur),)
    step = next_state(flags, cur, new)  # validates cur and new first
    path = [_S(cur), step]
    for _ in _ORDER:  # a path has at most 4 arcs; 8 would mean a cycle
        if path[-1] == new:
            return tuple(path)
        path.append(next_state(flags, path[-1], new))
    raise InternalError(f"walk {_name(cur)} -> {_name(new)} does not converge")


def returns_data_fd(path: list[MigState]) -> bool:
    """True when the path's last arc opens a session (SET returns a data_fd)."""
    return len(path) >= 2 and (path[-2], path[-1]) in SESSION_OPENING_ARCS


_SPLIT = re.compile(r"[,|]")


def parse_flags(text: str) -> MigFlag:
    """Parse ``"STOP_COPY,P2P"`` / ``"stop_copy|pre_copy"`` / ``"7"`` / ``"0x7"``.

    Raises :class:`UsageError` for an unknown name, undefined bits, or a set
    without the mandatory STOP_COPY.
    """
    text = text.strip()
    valid = ", ".join(f.name for f in MigFlag if f.name)
    if text[:1].isdigit():
        try:
            value = int(text, 0)
        except ValueError:
            raise UsageError(f"bad flags number {text!r}") from None
        if value & ~_ALL_FLAGS:
            raise UsageError(f"flags {text!r} set undefined bits (defined: 0x7)")
        flags = MigFlag(value)
    else:
        flags = MigFlag(0)
        for token in _SPLIT.split(text):
            name = token.strip().upper()
            if not name:
                raise UsageError(f"empty migration flag name in {text!r}")
            if name not in MigFlag.__members__:
                raise UsageError(
                    f"unknown migration flag {token.strip()!r} (valid: {valid})"
                )
            flags |= MigFlag[name]
    if not flags & MigFlag.STOP_COPY:
        raise UsageError(f"STOP_COPY is mandatory (got {text!r})")
    return flags


def parse_state(text: str) -> MigState:
    """Parse a state name (``running-p2p``, ``STOP_COPY``) or number 0..7."""
    token = text.strip()
    if token[:1].isdigit():
        try:
            value = int(token, 0)
        except ValueError:
            value = -1
        if 0 <= value < len(_ORDER):
            return _S(value)
        raise UsageError(f"state {token!r} is not a state number 0..7")
    name = token.upper().replace("-", "_")
    if name in MigState.__members__:
        return MigState[name]
    valid = ", ".join(s.name for s in _ORDER)
    raise UsageError(f"unknown migration state {token!r} (valid: {valid})")


def row(flags: int, cur: int, new: int) -> Row:
    """The outcome of one request as a JSON-ready :class:`Row`."""
    error: str | None = None
    try:
        path: list[str] | None = [s.name for s in walk(flags, cur, new)]
    except TransitionError as exc:
        path, error = None, errno_name(exc.errno)
    return Row(cur=_name(cur), new=_name(new), path=path, error=error)


def table(flags: int) -> list[Row]:
    """All 64 outcomes for ``flags``, cur 0..7 outer, new 0..7 inner."""
    return [row(flags, cur, new) for cur in _ORDER for new in _ORDER]


def explain(flags: int, cur: int, new: int) -> str:
    """One line for humans: the path with its arc count, or ``EINVAL: why``."""
    try:
        path = walk(flags, cur, new)
    except TransitionError as exc:
        return f"{errno_name(exc.errno)}: {exc.args[0]}"
    arcs = len(path) - 1
    note = f"{arcs} arc{'' if arcs == 1 else 's'}"
    if arcs == 0:
        note += ", already there"
    elif returns_data_fd(path):
        note += ", data_fd returned"
    return f"{' -> '.join(s.name for s in path)} ({note})"
