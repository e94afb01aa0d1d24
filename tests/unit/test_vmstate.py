"""Tests for mpvfio.vmstate: handler order, cb/cb_ret, failures, priorities."""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mpvfio.errors import UsageError
from mpvfio.vmstate import (
    INT16_MAX,
    INT16_MIN,
    LIVE_RUNSTATES,
    HandlerFailure,
    RunState,
    VMChangeStateEntry,
    VMChangeStateHandlers,
    qdev_priority,
    runstate_is_live,
)

Calls = list[str]
Handler = Callable[[bool, RunState], None]
RetHandler = Callable[[bool, RunState], int]


def rec(calls: Calls, label: str) -> Handler:
    """A cb/prepare_cb that appends ``label`` to ``calls``."""

    def cb(running: bool, state: RunState) -> None:
        calls.append(label)

    return cb


def rec_ret(calls: Calls, label: str, ret: int) -> RetHandler:
    """A cb_ret that appends ``label`` and returns ``ret``."""

    def cb_ret(running: bool, state: RunState) -> int:
        calls.append(label)
        return ret

    return cb_ret


def boom(calls: Calls, label: str) -> Handler:
    """A cb that appends ``label`` then raises RuntimeError."""

    def cb(running: bool, state: RunState) -> None:
        calls.append(label)
        raise RuntimeError(f"{label} exploded")

    return cb


# -- RunState -------------------------------------------------------------


def test_runstate_values() -> None:
    assert isinstance(RunState.FINISH_MIGRATE, str)
    assert str(RunState.FINISH_MIGRATE) == "finish-migrate"
    assert RunState.INTERNAL_ERROR.value == "internal-error"
    assert f"{RunState.GUEST_PANICKED}" == "guest-panicked"
    assert RunState("io-error") is RunState.IO_ERROR
    assert {s.value for s in RunState} == {
        "debug",
        "inmigrate",
        "internal-error",
        "io-error",
        "paused",
        "postmigrate",
        "prelaunch",
        "finish-migrate",
        "restore-vm",
        "running",
        "save-vm",
        "shutdown",
        "suspended",
        "watchdog",
        "guest-panicked",
        "colo",
    }


def test_live_runstates() -> None:
    assert frozenset({RunState.RUNNING, RunState.SUSPENDED}) == LIVE_RUNSTATES
    assert runstate_is_live(RunState.RUNNING)
    assert runstate_is_live(RunState.SUSPENDED)
    for s in RunState:
        if s not in (RunState.RUNNING, RunState.SUSPENDED):
            assert not runstate_is_live(s)


# -- qdev_priority --------------------------------------------------------


def test_qdev_priority_examples() -> None:
    assert INT16_MIN == -32768
    assert INT16_MAX == 32767
    assert qdev_priority(0) == 32768
    assert qdev_priority(1) == 65536 + 32768
    assert qdev_priority(1, -1) == 65536 + 32767
    assert qdev_priority(1, 1) == 65536 + 32769
    assert qdev_priority(3, -1) == 3 * 65536 + 32767
    assert qdev_priority(0, INT16_MIN) == 0
    assert qdev_priority(0, INT16_MAX) == 65535
    assert qdev_priority(INT16_MAX, INT16_MIN) == 32767 << 16
    assert qdev_priority(INT16_MAX, INT16_MAX) == 2**31 - 1


@pytest.mark.parametrize(
    ("depth", "adj", "match"),
    [
        (-1, 0, r"depth -1 is out of range 0\.\.32767"),
        (32768, 0, r"depth 32768 is out of range 0\.\.32767"),
        (1, -32769, r"adjustment -32769 is out of range -32768\.\.32767"),
        (1, 32768, r"adjustment 32768 is out of range -32768\.\.32767"),
    ],
)
def test_qdev_priority_bounds(depth: int, adj: int, match: str) -> None:
    with pytest.raises(UsageError, match=match):
        qdev_priority(depth, adj)
    with pytest.raises(ValueError, match=match):
        qdev_priority(depth, adj)


@pytest.mark.parametrize(
    ("depth", "adj"),
    [(True, 0), (1, False), (1.0, 0), (1, 0.0), ("1", 0), (None, 0)],
)
def test_qdev_priority_rejects_non_int(depth: object, adj: object) -> None:
    with pytest.raises(UsageError, match="must be an int"):
        qdev_priority(depth, adj)  # type: ignore[arg-type]


@given(st.integers(0, INT16_MAX - 1))
def test_qdev_priority_monotonic_in_depth(depth: int) -> None:
    assert qdev_priority(depth, INT16_MAX) < qdev_priority(depth + 1, INT16_MIN)


@given(
    st.integers(0, INT16_MAX),
    st.integers(INT16_MIN, INT16_MAX),
    st.integers(INT16_MIN, INT16_MAX),
)
def test_qdev_priority_monotonic_in_adj(depth: int, a: int, b: int) -> None:
    assert (a < b) == (qdev_priority(depth, a) < qdev_priority(depth, b))
    assert 0 <= qdev_priority(depth, a) <= 2**31 - 1


# -- registration ---------------------------------------------------------


def test_add_sorts_ascending_with_fifo_ties() -> None:
    h = VMChangeStateHandlers()
    e5 = h.add(priority=5, name="a5")
    e1 = h.add(priority=1, name="b1")
    e5b = h.add(priority=5, name="c5")
    e0 = h.add(priority=0, name="d0")
    e1b = h.add(priority=1, name="e1")
    assert h.entries == (e0, e1, e1b, e5, e5b)
    assert h.walk_order(True) == (e0, e1, e1b, e5, e5b)
    assert h.walk_order(False) == (e5b, e5, e1b, e1, e0)
    assert len(h) == 5


def test_default_names() -> None:
    h = VMChangeStateHandlers()
    calls: Calls = []
    e = h.add(cb=rec(calls, "x"))
    assert e.name == "rec.<locals>.cb"
    e2 = h.add(prepare_cb=rec(calls, "x"), cb_ret=rec_ret(calls, "y", 0))
    assert e2.name == "rec_ret.<locals>.cb_ret"
    e3 = h.add(prepare_cb=rec(calls, "x"))
    assert e3.name == "rec.<locals>.cb"
    assert h.add(name="given").name == "given"


@pytest.mark.parametrize("priority", [True, 1.5, "0", 2**31, -(2**31) - 1])
def test_add_rejects_bad_priority(priority: object) -> None:
    with pytest.raises(UsageError, match="priority"):
        VMChangeStateHandlers().add(priority=priority)  # type: ignore[arg-type]


def test_add_rejects_non_callable() -> None:
    with pytest.raises(UsageError, match="cb must be callable"):
        VMChangeStateHandlers().add(cb=42)  # type: ignore[arg-type]


def test_remove_is_idempotent_and_checks_owner() -> None:
    h = VMChangeStateHandlers()
    other = VMChangeStateHandlers()
    calls: Calls = []
    e = h.add(cb=rec(calls, "e"), name="e")
    foreign = other.add(cb=rec(calls, "f"), name="f")
    h.remove(e)
    assert e.removed
    h.remove(e)
    assert h.entries == ()
    with pytest.raises(UsageError, match="not registered"):
        h.remove(foreign)
    assert not foreign.removed
    assert h.notify(False, RunState.PAUSED) == 0
    assert calls == []


# -- the pinned mixed order -----------------------------------------------


def build_mixed(calls: Calls) -> VMChangeStateHandlers:
    """The mixed handler set whose order the next tests pin.

    Registration order (priority):

    1.  p0a   prio 0                 cb
    2.  d5    depth 5                prepare + cb
    3.  d3hi  depth 3 adj +1         prepare + cb       (seed "second")
    4.  d3a   depth 3                prepare + cb
    5.  d1    depth 1                cb_ret  (-EBUSY)
    6.  d3b   depth 3                cb only
    7.  d2    depth 2                prepare only
    8.  d3c   depth 3                cb + cb_ret (cb wins)
    9.  d2r   depth 2                cb_ret  (-EINVAL)
    10. d3lo  depth 3 adj -1         prepare + cb       (seed "first")
    11. p0b   prio 0 (after qdev)    prepare + cb
    """
    h = VMChangeStateHandlers()
    h.add(cb=rec(calls, "p0a:cb"), priority=0, name="p0a")
    h.add(
        cb=rec(calls, "d5:cb"),
        prepare_cb=rec(calls, "d5:prepare"),
        priority=qdev_priority(5),
        name="d5",
    )
    h.add(
        cb=rec(calls, "d3hi:cb"),
        prepare_cb=rec(calls, "d3hi:prepare"),
        priority=qdev_priority(3, 1),
        name="d3hi",
    )
    h.add(
        cb=rec(calls, "d3a:cb"),
        prepare_cb=rec(calls, "d3a:prepare"),
        priority=qdev_priority(3),
        name="d3a",
    )
    h.add(
        cb_ret=rec_ret(calls, "d1:cb_ret", -errno.EBUSY),
        priority=qdev_priority(1),
        name="d1",
    )
    h.add(cb=rec(calls, "d3b:cb"), priority=qdev_priority(3), name="d3b")
    h.add(prepare_cb=rec(calls, "d2:prepare"), priority=qdev_priority(2), name="d2")
    h.add(
        cb=rec(calls, "d3c:cb"),
        cb_ret=rec_ret(calls, "d3c:cb_ret", -errno.EPERM),
        priority=qdev_priority(3),
        name="d3c",
    )
    h.add(
        cb_ret=rec_ret(calls, "d2r:cb_ret", -errno.EINVAL),
        priority=qdev_priority(2),
        name="d2r",
    )
    h.add(
        cb=rec(calls, "d3lo:cb"),
        prepare_cb=rec(calls, "d3lo:prepare"),
        priority=qdev_priority(3, -1),
        name="d3lo",
    )
    h.add(
        cb=rec(calls, "p0b:cb"),
        prepare_cb=rec(calls, "p0b:prepare"),
        priority=0,
        name="p0b",
    )
    return h


def test_mixed_list_order() -> None:
    h = build_mixed([])
    assert [e.name for e in h.entries] == [
        "p0a",
        "p0b",
        "d1",
        "d2",
        "d2r",
        "d3lo",
        "d3a",
        "d3b",
        "d3c",
        "d3hi",
        "d5",
    ]


def test_mixed_start_order() -> None:
    calls: Calls = []
    h = build_mixed(calls)
    assert h.notify(True, RunState.RUNNING) == 0  # cb_ret results discarded
    assert calls == [
        # prepare phase, ascending
        "p0b:prepare",
        "d2:prepare",
        "d3lo:prepare",
        "d3a:prepare",
        "d3hi:prepare",
        "d5:prepare",
        # main phase, ascending
        "p0a:cb",
        "p0b:cb",
        "d1:cb_ret",
        "d2r:cb_ret",
        "d3lo:cb",
        "d3a:cb",
        "d3b:cb",
        "d3c:cb",
        "d3hi:cb",
        "d5:cb",
    ]
    assert h.last_failures == []


def test_mixed_stop_order() -> None:
    calls: Calls = []
    h = build_mixed(calls)
    ret = h.notify(False, RunState.FINISH_MIGRATE)
    assert calls == [
        # prepare phase, descending, ties reversed
        "d5:prepare",
        "d3hi:prepare",
        "d3a:prepare",
        "d3lo:prepare",
        "d2:prepare",
        "p0b:prepare",
        # main phase, descending, ties reversed
        "d5:cb",
        "d3hi:cb",
        "d3c:cb",
        "d3b:cb",
        "d3a:cb",
        "d3lo:cb",
        "d2r:cb_ret",
        "d1:cb_ret",
        "p0b:cb",
        "p0a:cb",
    ]
    assert "d3c:cb_ret" not in calls  # cb wins over cb_ret
    assert ret == (-errno.EINVAL) | (-errno.EBUSY)
    assert ret != 0


def test_callbacks_get_running_and_state() -> None:
    seen: list[tuple[str, bool, RunState]] = []

    def mk(label: str) -> Handler:
        def cb(running: bool, state: RunState) -> None:
            seen.append((label, running, state))

        return cb

    h = VMChangeStateHandlers()
    h.add(cb=mk("cb"), prepare_cb=mk("prep"))
    h.notify(False, RunState.PAUSED)
    h.notify(True, RunState.RUNNING)
    assert seen == [
        ("prep", False, RunState.PAUSED),
        ("cb", False, RunState.PAUSED),
        ("prep", True, RunState.RUNNING),
        ("cb", True, RunState.RUNNING),
    ]


# -- cb_ret and failures --------------------------------------------------


def test_cb_ret_or_on_stop_ignored_on_start() -> None:
    calls: Calls = []
    h = VMChangeStateHandlers()
    h.add(cb_ret=rec_ret(calls, "a", -1), name="a")
    h.add(cb_ret=rec_ret(calls, "b", -2), name="b")
    h.add(cb_ret=rec_ret(calls, "c", 0), name="c")
    h.add(cb=rec(calls, "d"), name="d")
    assert h.notify(False, RunState.PAUSED) == (-1) | (-2)
    assert calls == ["d", "c", "b", "a"]  # every handler ran after failures
    calls.clear()
    assert h.notify(True, RunState.RUNNING) == 0
    assert calls == ["a", "b", "c", "d"]


def test_raising_callbacks_do_not_stop_the_walk(
    caplog: pytest.LogCaptureFixture,
) -> None:
    calls: Calls = []
    reported: list[HandlerFailure] = []
    h = VMChangeStateHandlers(on_failure=reported.append)
    h.add(cb=rec(calls, "a:cb"), prepare_cb=boom(calls, "a:prepare"), name="a")
    h.add(cb=boom(calls, "b:cb"), name="b", priority=1)
    h.add(cb=rec(calls, "c:cb"), prepare_cb=rec(calls, "c:prepare"), name="c")
    with caplog.at_level(logging.ERROR, logger="mpvfio.vmstate"):
        assert h.notify(False, RunState.FINISH_MIGRATE) == 0
    assert calls == ["c:prepare", "a:prepare", "b:cb", "c:cb", "a:cb"]
    assert [(f.entry_name, f.phase) for f in h.last_failures] == [
        ("a", "prepare"),
        ("b", "main"),
    ]
    assert reported == h.last_failures
    first = h.last_failures[0]
    assert first.running is False
    assert first.state is RunState.FINISH_MIGRATE
    assert isinstance(first.exception, RuntimeError)
    assert str(first.exception) == "a:prepare exploded"
    assert "'a'" in caplog.text
    assert "'b'" in caplog.text

    calls.clear()
    assert h.notify(True, RunState.RUNNING) == 0
    assert calls == ["a:prepare", "c:prepare", "a:cb", "c:cb", "b:cb"]
    assert [(f.entry_name, f.phase, f.running) for f in h.last_failures] == [
        ("a", "prepare", True),
        ("b", "main", True),
    ]
    assert len(reported) == 4


def test_last_failures_reset_each_notify() -> None:
    calls: Calls = []
    h = VMChangeStateHandlers()
    e = h.add(cb=boom(calls, "x"), name="x")
    h.notify(False, RunState.PAUSED)
    assert len(h.last_failures) == 1
    h.remove(e)
    h.notify(True, RunState.RUNNING)
    assert h.last_failures == []


def test_raising_cb_ret_counts_as_eio_on_stop_only() -> None:
    calls: Calls = []

    def bad(running: bool, state: RunState) -> int:
        calls.append("bad")
        raise OSError(errno.ENODEV, "gone")

    h = VMChangeStateHandlers()
    h.add(cb_ret=rec_ret(calls, "ok", -errno.EAGAIN), name="ok")
    h.add(cb_ret=bad, name="bad")
    h.add(cb=rec(calls, "last"), name="last")
    assert h.notify(False, RunState.FINISH_MIGRATE) == (-errno.EIO) | (-errno.EAGAIN)
    assert calls == ["last", "bad", "ok"]
    assert [f.entry_name for f in h.last_failures] == ["bad"]
    calls.clear()
    assert h.notify(True, RunState.RUNNING) == 0
    assert calls == ["ok", "bad", "last"]
    assert [f.entry_name for f in h.last_failures] == ["bad"]


def test_cb_ret_non_int_result_is_a_failure_on_stop() -> None:
    h = VMChangeStateHandlers()
    h.add(cb_ret=lambda running, state: None, name="none")  # type: ignore[arg-type,return-value]
    assert h.notify(False, RunState.PAUSED) == -errno.EIO
    assert isinstance(h.last_failures[0].exception, UsageError)
    assert h.notify(True, RunState.RUNNING) == 0
    assert h.last_failures == []


def test_raising_on_failure_is_ignored(caplog: pytest.LogCaptureFixture) -> None:
    calls: Calls = []

    def bad_report(f: HandlerFailure) -> None:
        raise RuntimeError("reporter broke")

    h = VMChangeStateHandlers(on_failure=bad_report)
    h.add(cb=boom(calls, "a"), name="a")
    h.add(cb=rec(calls, "b"), name="b")
    with caplog.at_level(logging.ERROR, logger="mpvfio.vmstate"):
        h.notify(False, RunState.PAUSED)
    assert calls == ["b", "a"]
    assert "on_failure callback failed" in caplog.text


# -- removal during the walk ----------------------------------------------


def test_self_removal_during_main_walk() -> None:
    calls: Calls = []
    h = VMChangeStateHandlers()
    h.add(cb=rec(calls, "a"), name="a")
    entry: list[VMChangeStateEntry] = []

    def once(running: bool, state: RunState) -> None:
        calls.append("once")
        h.remove(entry[0])

    entry.append(h.add(cb=once, name="once"))
    h.add(cb=rec(calls, "c"), name="c")
    h.notify(True, RunState.RUNNING)
    assert calls == ["a", "once", "c"]
    assert entry[0].removed
    calls.clear()
    h.notify(False, RunState.PAUSED)
    assert calls == ["c", "a"]


def test_self_removal_in_prepare_skips_own_main() -> None:
    calls: Calls = []
    h = VMChangeStateHandlers()
    entry: list[VMChangeStateEntry] = []

    def prep(running: bool, state: RunState) -> None:
        calls.append("x:prepare")
        h.remove(entry[0])

    entry.append(h.add(cb=rec(calls, "x:cb"), prepare_cb=prep, name="x"))
    h.add(cb=rec(calls, "y:cb"), prepare_cb=rec(calls, "y:prepare"), name="y")
    h.notify(True, RunState.RUNNING)
    assert calls == ["x:prepare", "y:prepare", "y:cb"]


def test_entry_removed_by_another_is_not_called_afterwards() -> None:
    calls: Calls = []
    h = VMChangeStateHandlers()
    victim: list[VMChangeStateEntry] = []

    def killer(running: bool, state: RunState) -> None:
        calls.append("killer")
        h.remove(victim[0])

    h.add(cb=killer, name="killer")
    victim.append(h.add(cb=rec(calls, "victim"), name="victim"))
    h.add(cb=rec(calls, "after"), name="after")
    h.notify(True, RunState.RUNNING)
    assert calls == ["killer", "after"]


def test_entry_added_during_walk_waits_for_next_walk() -> None:
    calls: Calls = []
    h = VMChangeStateHandlers()

    def adder(running: bool, state: RunState) -> None:
        calls.append("adder")
        if len(h) == 1:
            h.add(cb=rec(calls, "new"), priority=10, name="new")

    h.add(cb=adder, name="adder")
    h.notify(True, RunState.RUNNING)
    assert calls == ["adder"]
    calls.clear()
    h.notify(False, RunState.PAUSED)
    assert calls == ["new", "adder"]
    assert [e.name for e in h.entries] == ["adder", "new"]


# -- property: stop order is the reverse of start order -------------------

_PRIORITIES = [0, *(qdev_priority(d, a) for d in (1, 2, 3, 5) for a in (-1, 0, 1))]

_spec = st.tuples(
    st.sampled_from(_PRIORITIES),
    st.booleans(),  # has prepare_cb
    st.sampled_from(["cb", "cb_ret", "both", "none"]),
)


@given(st.lists(_spec, max_size=25))
def test_stop_order_is_reverse_of_start_order(
    specs: list[tuple[int, bool, str]],
) -> None:
    calls: Calls = []
    h = VMChangeStateHandlers()
    for i, (prio, has_prep, kind) in enumerate(specs):
        h.add(
            cb=rec(calls, f"{i}:main") if kind in ("cb", "both") else None,
            prepare_cb=rec(calls, f"{i}:prepare") if has_prep else None,
            cb_ret=rec_ret(calls, f"{i}:main", -1)
            if kind in ("cb_ret", "both")
            else None,
            priority=prio,
            name=str(i),
        )
    expected_order = sorted(range(len(specs)), key=lambda i: (specs[i][0], i))
    assert [int(e.name) for e in h.entries] == expected_order

    h.notify(True, RunState.RUNNING)
    start = list(calls)
    calls.clear()
    ret = h.notify(False, RunState.FINISH_MIGRATE)
    stop = list(calls)

    def split(seq: Calls) -> tuple[list[int], list[int]]:
        prep = [int(c.split(":")[0]) for c in seq if c.endswith(":prepare")]
        main = [int(c.split(":")[0]) for c in seq if c.endswith(":main")]
        return prep, main

    start_prep, start_main = split(start)
    stop_prep, stop_main = split(stop)
    # every prepare runs before every main callback (O1)
    assert start == [f"{i}:prepare" for i in start_prep] + [
        f"{i}:main" for i in start_main
    ]
    assert stop == [f"{i}:prepare" for i in stop_prep] + [
        f"{i}:main" for i in stop_main
    ]
    # both phases follow the list order (O2)
    assert start_prep == [i for i in expected_order if specs[i][1]]
    assert start_main == [i for i in expected_order if specs[i][2] != "none"]
    # stop is the exact reverse of start
    assert stop_prep == start_prep[::-1]
    assert stop_main == start_main[::-1]
    # only cb_ret-only entries contribute to the result
    assert ret == (-1 if any(s[2] == "cb_ret" for s in specs) else 0)
