"""Tests of mpvfio.uapi.fsm against VFIO_FSM.md, transcribed independently.

The next-hop table, the required-flag masks, the arc lists and the summary
counts below are typed in from the spec, not imported from mpvfio, and a
small reference walk is rebuilt here from the spec's prose (§1, fixed per §5).
"""

from __future__ import annotations

import errno
import itertools
import pickle
from collections import Counter, deque

import pytest

from mpvfio.errors import TransitionError, UsageError
from mpvfio.uapi import fsm
from mpvfio.uapi.vfio import MigFlag, MigState

NAMES = [
    "ERROR",
    "STOP",
    "RUNNING",
    "STOP_COPY",
    "RESUMING",
    "RUNNING_P2P",
    "PRE_COPY",
    "PRE_COPY_P2P",
]

# VFIO_FSM.md §1 next-hop table; rows = current state, columns = target,
# both in NAMES order.
HOP_TEXT = """
ERROR        ERROR ERROR       ERROR       ERROR        ERROR       ERROR       ERROR        ERROR
STOP         ERROR STOP        RUNNING_P2P STOP_COPY    RESUMING    RUNNING_P2P RUNNING_P2P  RUNNING_P2P
RUNNING      ERROR RUNNING_P2P RUNNING     RUNNING_P2P  RUNNING_P2P RUNNING_P2P PRE_COPY     RUNNING_P2P
STOP_COPY    ERROR STOP        STOP        STOP_COPY    STOP        STOP        ERROR        ERROR
RESUMING     ERROR STOP        STOP        STOP         RESUMING    STOP        STOP         STOP
RUNNING_P2P  ERROR STOP        RUNNING     STOP         STOP        RUNNING_P2P RUNNING      PRE_COPY_P2P
PRE_COPY     ERROR RUNNING     RUNNING     PRE_COPY_P2P RUNNING     RUNNING     PRE_COPY     PRE_COPY_P2P
PRE_COPY_P2P ERROR RUNNING_P2P RUNNING_P2P STOP_COPY    RUNNING_P2P RUNNING_P2P PRE_COPY     PRE_COPY_P2P
"""  # noqa: E501

REF_HOP: dict[str, dict[str, str]] = {}
for _line in HOP_TEXT.strip().splitlines():
    _cur, *_cells = _line.split()
    REF_HOP[_cur] = dict(zip(NAMES, _cells, strict=True))

# VFIO_FSM.md §1 required-feature masks.
REF_NEEDS = {
    "ERROR": 0xFFFFFFFF,
    "STOP": 0x1,
    "RUNNING": 0x1,
    "STOP_COPY": 0x1,
    "RESUMING": 0x1,
    "RUNNING_P2P": 0x3,
    "PRE_COPY": 0x5,
    "PRE_COPY_P2P": 0x7,
}

FLAG_SETS = [0x1, 0x3, 0x5, 0x7]
OPENING = {
    ("STOP", "STOP_COPY"),
    ("STOP", "RESUMING"),
    ("RUNNING", "PRE_COPY"),
    ("RUNNING_P2P", "PRE_COPY_P2P"),
}
SAVING = {"STOP_COPY", "PRE_COPY", "PRE_COPY_P2P"}
BLOCKED = [
    (0x5, "STOP_COPY", "PRE_COPY"),
    (0x7, "STOP_COPY", "PRE_COPY"),
    (0x7, "STOP_COPY", "PRE_COPY_P2P"),
]


def ref_supported(flags: int, name: str) -> bool:
    return REF_NEEDS[name] & flags == REF_NEEDS[name]


def ref_walk(flags: int, cur: str, new: str) -> list[str] | None:
    """The spec's algorithm with the §5 fix; None means EINVAL."""
    if cur == new:
        return [cur]
    if not ref_supported(flags, cur) or not ref_supported(flags, new):
        return None
    path = [cur]
    while path[-1] != new:
        n = REF_HOP[path[-1]][new]
        while n != "ERROR" and not ref_supported(flags, n):
            n = REF_HOP[n][new]
        if n == "ERROR":
            return None
        path.append(n)
    return path


def impl_path(flags: int, cur: str, new: str) -> list[str] | None:
    try:
        return [s.name for s in fsm.walk(flags, MigState[cur], MigState[new])]
    except TransitionError as exc:
        err = exc.errno
    assert err == errno.EINVAL
    return None


ALL_CASES = [(f, c, n) for f in FLAG_SETS for c in NAMES for n in NAMES]


def test_hop_table_matches_spec() -> None:
    got = {(c.name, n.name): h.name for (c, n), h in fsm.HOP.items()}
    want = {(c, n): REF_HOP[c][n] for c in NAMES for n in NAMES}
    assert got == want


@pytest.mark.timeout(5)
@pytest.mark.parametrize("flags", FLAG_SETS)
def test_all_cases_match_reference(flags: int) -> None:
    for cur in NAMES:
        for new in NAMES:
            assert impl_path(flags, cur, new) == ref_walk(flags, cur, new), (
                flags,
                cur,
                new,
            )


@pytest.mark.timeout(5)
def test_failures_happen_at_first_step() -> None:
    for flags, cur, new in ALL_CASES:
        if ref_walk(flags, cur, new) is None:
            with pytest.raises(TransitionError):
                fsm.next_state(flags, MigState[cur], MigState[new])


def test_supported() -> None:
    for flags in FLAG_SETS:
        for name in NAMES:
            assert fsm.supported(flags, MigState[name]) == ref_supported(flags, name)
    assert not fsm.supported(0xFFFFFFFF, MigState.ERROR)
    assert not fsm.supported(0x7, 8)
    assert not fsm.supported(0x7, -1)


# VFIO_FSM.md §3.
SUMMARY = {
    # flags: (supported, success, einval, valid pairs, supported pairs,
    #         unreachable-cur cases, data_fd cases, longest, unreachable self)
    0x1: (4, 20, 44, 16, 16, 24, 6, 2, 3),
    0x3: (5, 28, 36, 25, 25, 16, 8, 3, 2),
    0x5: (5, 27, 37, 24, 25, 16, 10, 3, 2),
    0x7: (7, 48, 16, 47, 49, 0, 18, 4, 0),
}
HISTOGRAM = {
    0x1: {0: 8, 1: 6, 2: 6},
    0x3: {0: 8, 1: 8, 2: 8, 3: 4},
    0x5: {0: 8, 1: 9, 2: 8, 3: 2},
    0x7: {0: 8, 1: 15, 2: 15, 3: 8, 4: 2},
}


def _paths(flags: int) -> dict[tuple[str, str], list[str] | None]:
    return {(c, n): impl_path(flags, c, n) for c in NAMES for n in NAMES}


@pytest.mark.timeout(5)
@pytest.mark.parametrize("flags", FLAG_SETS)
def test_summary_counts(flags: int) -> None:
    n_sup, success, einval, valid, pairs, unreach, fds, longest, self_ok = SUMMARY[
        flags
    ]
    paths = _paths(flags)
    sup = [s for s in NAMES if ref_supported(flags, s)]
    assert len(sup) == n_sup
    ok = {k: p for k, p in paths.items() if p is not None}
    assert len(ok) == success
    assert len(paths) - len(ok) == einval
    sup_pairs = [(c, n) for c in sup for n in sup]
    assert len(sup_pairs) == pairs
    assert sum(k in ok for k in sup_pairs) == valid
    blocked = sorted(k for k in sup_pairs if k not in ok)
    assert blocked == sorted((c, n) for f, c, n in BLOCKED if f == flags)
    unreachable = [s for s in NAMES if s != "ERROR" and s not in sup]
    assert len(unreachable) * 8 == unreach
    assert sum((s, s) in ok for s in unreachable) == self_ok
    assert success == valid + 1 + self_ok
    assert ("ERROR", "ERROR") in ok
    data_fd = [p for p in ok.values() if len(p) >= 2 and (p[-2], p[-1]) in OPENING]
    assert len(data_fd) == fds
    assert max(len(p) - 1 for p in ok.values()) == longest
    assert Counter(len(p) - 1 for p in ok.values()) == HISTOGRAM[flags]


def test_summary_totals() -> None:
    totals = Counter[str]()
    for flags in FLAG_SETS:
        paths = _paths(flags)
        ok = [p for p in paths.values() if p is not None]
        totals["success"] += len(ok)
        totals["einval"] += len(paths) - len(ok)
        totals["fd"] += sum(fsm.returns_data_fd([MigState[s] for s in p]) for p in ok)
    assert totals == {"success": 123, "einval": 133, "fd": 42}


# VFIO_FSM.md §4.1 arc lists.
_BASE = {
    ("RESUMING", "STOP"),
    ("STOP", "RESUMING"),
    ("STOP", "STOP_COPY"),
    ("STOP_COPY", "STOP"),
}
_P2P = _BASE | {
    ("RUNNING", "RUNNING_P2P"),
    ("RUNNING_P2P", "RUNNING"),
    ("RUNNING_P2P", "STOP"),
    ("STOP", "RUNNING_P2P"),
}
ARCS = {
    0x1: _BASE | {("RUNNING", "STOP"), ("STOP", "RUNNING")},
    0x3: _P2P,
    0x5: _BASE
    | {
        ("RUNNING", "STOP"),
        ("STOP", "RUNNING"),
        ("RUNNING", "PRE_COPY"),
        ("PRE_COPY", "RUNNING"),
        ("PRE_COPY", "STOP_COPY"),
    },
    0x7: _P2P
    | {
        ("RUNNING", "PRE_COPY"),
        ("PRE_COPY", "RUNNING"),
        ("PRE_COPY", "PRE_COPY_P2P"),
        ("PRE_COPY_P2P", "PRE_COPY"),
        ("PRE_COPY_P2P", "RUNNING_P2P"),
        ("PRE_COPY_P2P", "STOP_COPY"),
        ("RUNNING_P2P", "PRE_COPY_P2P"),
    },
}


def test_arc_list_sizes() -> None:
    assert {f: len(a) for f, a in ARCS.items()} == {0x1: 6, 0x3: 8, 0x5: 9, 0x7: 15}


@pytest.mark.parametrize("flags", FLAG_SETS)
def test_arcs_used_are_exactly_the_listed_ones(flags: int) -> None:
    used = {
        arc
        for p in _paths(flags).values()
        if p is not None
        for arc in itertools.pairwise(p)
    }
    assert used == ARCS[flags]


def bfs_distance(flags: int, cur: str, new: str) -> int | None:
    """Shortest arc count from cur to new over ARCS[flags] (§4.2 rule).

    Interior states may not be RESUMING; saving-group states may be interior
    only while every state so far was in the saving group.
    """
    start = (cur, cur in SAVING)
    seen = {start}
    queue = deque([(start, 0)])
    while queue:
        (node, pure), dist = queue.popleft()
        for a, b in ARCS[flags]:
            if a != node:
                continue
            if b == new:
                return dist + 1
            if b == "RESUMING" or (b in SAVING and not pure):
                continue
            nxt = (b, pure and b in SAVING)
            if nxt not in seen:
                seen.add(nxt)
                queue.append((nxt, dist + 1))
    return None


@pytest.mark.parametrize("flags", FLAG_SETS)
def test_paths_are_shortest(flags: int) -> None:
    for (cur, new), p in _paths(flags).items():
        if p is None or cur == new or not ref_supported(flags, cur):
            continue
        assert len(p) - 1 == bfs_distance(flags, cur, new), (cur, new, p)


def test_combination_transitions_count() -> None:
    long_paths = [p for p in _paths(0x7).values() if p is not None and len(p) >= 3]
    assert len(long_paths) == 25


@pytest.mark.parametrize("flags", FLAG_SETS)
def test_session_opening_arcs_only_last(flags: int) -> None:
    for p in _paths(flags).values():
        if p is None:
            continue
        for arc in itertools.pairwise(p[:-1]):
            assert arc not in OPENING, p


@pytest.mark.parametrize(
    ("flags", "cur", "new", "path"),
    [
        (0x3, "RUNNING", "STOP_COPY", ["RUNNING", "RUNNING_P2P", "STOP", "STOP_COPY"]),
        (0x7, "PRE_COPY", "STOP", ["PRE_COPY", "RUNNING", "RUNNING_P2P", "STOP"]),
        (0x7, "PRE_COPY", "RUNNING_P2P", ["PRE_COPY", "RUNNING", "RUNNING_P2P"]),
        (0x7, "PRE_COPY", "STOP_COPY", ["PRE_COPY", "PRE_COPY_P2P", "STOP_COPY"]),
        (0x5, "PRE_COPY", "STOP_COPY", ["PRE_COPY", "STOP_COPY"]),
        (0x1, "RUNNING", "STOP", ["RUNNING", "STOP"]),
    ],
)
def test_spec_examples(flags: int, cur: str, new: str, path: list[str]) -> None:
    assert impl_path(flags, cur, new) == path


def test_returns_data_fd() -> None:
    s = MigState
    assert fsm.returns_data_fd([s.RUNNING, s.STOP, s.STOP_COPY])
    assert fsm.returns_data_fd([s.RUNNING_P2P, s.PRE_COPY_P2P])
    assert not fsm.returns_data_fd([s.PRE_COPY, s.PRE_COPY_P2P, s.STOP_COPY])
    assert not fsm.returns_data_fd([s.STOP_COPY, s.STOP])
    assert not fsm.returns_data_fd([s.STOP])


# VFIO_FSM.md §5 decisions.


@pytest.mark.timeout(5)
@pytest.mark.parametrize(("flags", "cur", "new"), BLOCKED)
def test_blocked_arcs_fail_with_einval(flags: int, cur: str, new: str) -> None:
    with pytest.raises(TransitionError, match="blocked arc") as info:
        fsm.walk(flags, MigState[cur], MigState[new])
    assert info.value.errno == errno.EINVAL
    assert (info.value.cur, info.value.new) == (cur, new)
    with pytest.raises(TransitionError):
        fsm.next_state(flags, MigState[cur], MigState[new])


@pytest.mark.timeout(5)
@pytest.mark.parametrize("flags", range(16))
def test_walk_always_terminates(flags: int) -> None:
    """Even undefined flag sets and out-of-range states never hang."""
    for cur in range(-1, 10):
        for new in range(-1, 10):
            try:
                path = fsm.walk(flags, cur, new)
            except TransitionError as exc:
                path, err = [], exc.errno
            if path:
                assert (path[0], path[-1]) == (cur, new)
            else:
                assert err == errno.EINVAL


@pytest.mark.parametrize("flags", FLAG_SETS)
def test_error_state(flags: int) -> None:
    assert fsm.walk(flags, MigState.ERROR, MigState.ERROR) == [MigState.ERROR]
    for state in MigState:
        if state is MigState.ERROR:
            continue
        with pytest.raises(TransitionError) as info:
            fsm.walk(flags, MigState.ERROR, state)
        assert info.value.errno == errno.EINVAL
        with pytest.raises(TransitionError) as info:
            fsm.walk(flags, state, MigState.ERROR)
        assert info.value.errno == errno.EINVAL
        if fsm.supported(flags, state):
            assert "target ERROR cannot be requested" in str(info.value)
        assert info.value.new == "ERROR"


@pytest.mark.parametrize("flags", FLAG_SETS)
def test_out_of_range_states(flags: int) -> None:
    for cur, new in [(1, 8), (8, 1), (8, 8), (2, 255), (-1, 1)]:
        with pytest.raises(TransitionError, match="out of range") as info:
            fsm.walk(flags, cur, new)
        assert info.value.errno == errno.EINVAL
    with pytest.raises(TransitionError) as info:
        fsm.walk(flags, 1, 9)
    assert (info.value.cur, info.value.new) == ("STOP", "9")


def test_transition_error_pickles() -> None:
    with pytest.raises(TransitionError) as info:
        fsm.walk(0x7, MigState.STOP_COPY, MigState.PRE_COPY)
    clone = pickle.loads(pickle.dumps(info.value))
    assert str(clone) == str(info.value)
    assert (clone.errno, clone.cur, clone.new) == (
        errno.EINVAL,
        "STOP_COPY",
        "PRE_COPY",
    )


def test_table_rows() -> None:
    for flags in FLAG_SETS:
        rows = fsm.table(flags)
        assert len(rows) == 64
        for r, (cur, new) in zip(
            rows, [(c, n) for c in NAMES for n in NAMES], strict=True
        ):
            path = ref_walk(flags, cur, new)
            assert r == {
                "cur": cur,
                "new": new,
                "path": path,
                "error": None if path else "EINVAL",
            }


def test_explain() -> None:
    s = MigState
    assert fsm.explain(0x7, s.RUNNING, s.STOP) == (
        "RUNNING -> RUNNING_P2P -> STOP (2 arcs)"
    )
    assert fsm.explain(0x1, s.RUNNING, s.STOP_COPY).endswith(
        "(2 arcs, data_fd returned)"
    )
    assert fsm.explain(0x7, s.STOP_COPY, s.PRE_COPY) == (
        "EINVAL: STOP_COPY -> PRE_COPY is a blocked arc"
    )
    assert fsm.explain(0x1, s.STOP, s.RUNNING_P2P) == (
        "EINVAL: target RUNNING_P2P is not supported by flags STOP_COPY"
    )


# Parsing and naming.


@pytest.mark.parametrize(
    ("text", "flags"),
    [
        ("STOP_COPY,P2P,PRE_COPY", 0x7),
        ("stop_copy|pre_copy", 0x5),
        (" STOP_COPY , P2P ", 0x3),
        ("Stop_Copy", 0x1),
        ("7", 0x7),
        ("0x5", 0x5),
        ("3", 0x3),
    ],
)
def test_parse_flags(text: str, flags: int) -> None:
    got = fsm.parse_flags(text)
    assert isinstance(got, MigFlag)
    assert got == flags


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("STOP_COPY,FOO", "'FOO'.*STOP_COPY, P2P, PRE_COPY"),
        ("P2P", "STOP_COPY is mandatory"),
        ("0x6", "STOP_COPY is mandatory"),
        ("0xf", "undefined bits"),
        ("0xzz", "0xzz"),
        ("", "empty"),
        ("STOP_COPY,", "empty"),
    ],
)
def test_parse_flags_errors(text: str, match: str) -> None:
    with pytest.raises(UsageError, match=match):
        fsm.parse_flags(text)


@pytest.mark.parametrize(
    ("text", "state"),
    [
        ("RUNNING", MigState.RUNNING),
        ("running-p2p", MigState.RUNNING_P2P),
        ("stop-copy", MigState.STOP_COPY),
        ("Pre_Copy_P2P", MigState.PRE_COPY_P2P),
        ("0", MigState.ERROR),
        ("6", MigState.PRE_COPY),
    ],
)
def test_parse_state(text: str, state: MigState) -> None:
    assert fsm.parse_state(text) is state


@pytest.mark.parametrize("text", ["RUNING", "8", "", "stop copy", "-1"])
def test_parse_state_errors(text: str) -> None:
    with pytest.raises(UsageError):
        fsm.parse_state(text)


def test_flags_name() -> None:
    assert fsm.flags_name(0x7) == "STOP_COPY,P2P,PRE_COPY"
    assert fsm.flags_name(0x5) == "STOP_COPY,PRE_COPY"
    assert fsm.flags_name(MigFlag.STOP_COPY) == "STOP_COPY"
    assert fsm.flags_name(0x9) == "STOP_COPY,0x8"
    assert fsm.flags_name(0) == "0"
    for flags in FLAG_SETS:
        assert fsm.parse_flags(fsm.flags_name(flags)) == flags
