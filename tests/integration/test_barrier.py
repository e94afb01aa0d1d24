"""ProcessBarrier with real worker processes forked by multiprocess.

Every worker is started with ``multiprocess.get_context("fork")``, attaches
to the barrier by its spec (never creates anything) and reports over a pipe.
No test asserts on speed: the only time bounds are generous hang guards.
"""

from __future__ import annotations

import math
import os
import pickle
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import multiprocess
import pytest

from mpvfio.errors import (
    BarrierError,
    BarrierTimeout,
    IPCError,
    MpvfioError,
    UsageError,
)
from mpvfio.ipc import (
    MAX_PARTIES,
    BarrierSpec,
    NameRegistry,
    ProcessBarrier,
    set_signal_hook,
    shm_entry,
    sweep_stale,
)

CTX = multiprocess.get_context("fork")
LONG = 60.0  # a party's timeout when it must never time out
GUARD = 30.0  # hang guard for anything that should happen promptly


# -- helpers ----------------------------------------------------------------------


def _outcome(exc: BaseException) -> tuple[str, str, str]:
    return ("err", type(exc).__name__, str(exc))


def _crossing_worker(
    spec: BarrierSpec, crossings: int, timeout: float, conn: Any
) -> None:
    """Cross ``crossings`` times; send [(t_before, idx, t_after), ...]."""
    try:
        with ProcessBarrier.attach(spec) as bar:
            out = []
            for _ in range(crossings):
                t0 = time.monotonic_ns()
                idx = bar.wait(timeout)
                t1 = time.monotonic_ns()
                out.append((t0, idx, t1))
        conn.send(("ok", out))
    except MpvfioError as exc:
        conn.send(_outcome(exc))
    finally:
        conn.close()


def _command_worker(spec: BarrierSpec, conn: Any) -> None:
    """A persistent worker: ("wait", timeout) -> ("ok", idx, t0, t1); ("exit",)."""
    with ProcessBarrier.attach(spec) as bar:
        while conn.poll(LONG):
            cmd = conn.recv()
            if cmd[0] == "exit":
                break
            t0 = time.monotonic_ns()
            try:
                idx = bar.wait(cmd[1])
            except MpvfioError as exc:
                conn.send(_outcome(exc))
                continue
            conn.send(("ok", idx, t0, time.monotonic_ns()))
    conn.close()


class Procs:
    """Started workers and their pipes; always killed (if needed) and reaped."""

    def __init__(self) -> None:
        self.procs: list[Any] = []
        self.conns: list[Any] = []

    def start(self, target: Callable[..., None], *args: Any) -> tuple[Any, Any]:
        parent_end, child_end = CTX.Pipe()
        proc = CTX.Process(target=target, args=(*args, child_end), daemon=True)
        proc.start()
        child_end.close()
        self.procs.append(proc)
        self.conns.append(parent_end)
        return proc, parent_end

    def close(self) -> None:
        for conn in self.conns:
            # Forked siblings hold copies of our pipe ends, so a worker would
            # not see EOF: tell command workers to exit explicitly.
            try:
                conn.send(("exit",))
            except OSError:
                pass
            conn.close()
        deadline = time.monotonic() + 10
        for proc in self.procs:
            proc.join(max(0.0, deadline - time.monotonic()))
        for proc in self.procs:
            if proc.is_alive():
                proc.kill()
            proc.join(10)


@pytest.fixture
def procs() -> Iterator[Procs]:
    p = Procs()
    try:
        yield p
    finally:
        p.close()


@pytest.fixture
def registry() -> Iterator[NameRegistry]:
    reg = NameRegistry()
    try:
        yield reg
    finally:
        reg.unlink_all()


def _barrier(registry: NameRegistry, max_parties: int) -> ProcessBarrier:
    return ProcessBarrier.create(registry.prefix, registry, max_parties)


def _recv(conn: Any, timeout: float = GUARD) -> Any:
    assert conn.poll(timeout), "worker did not answer in time (hang?)"
    return conn.recv()


def _poll_until(cond: Callable[[], bool], timeout: float = GUARD) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached (hang?)"
        time.sleep(0.005)


def _check_crossings(results: list[list[tuple[int, int, int]]], n: int) -> None:
    """Per crossing: indices are 0..n-1 and every 'after' > every 'before'."""
    crossings = len(results[0])
    assert all(len(r) == crossings for r in results)
    for c in range(crossings):
        row = [r[c] for r in results]
        assert sorted(idx for _, idx, _ in row) == list(range(n)), row
        assert max(t0 for t0, _, _ in row) < min(t1 for _, _, t1 in row), c


def _entries(prefix: str) -> set[str]:
    return {e for e in os.listdir("/dev/shm") if prefix in e}


# -- in-process API checks ------------------------------------------------------


def test_create_validates_max_parties(registry: NameRegistry) -> None:
    for bad in (0, -1, MAX_PARTIES + 1, True, 2.0):
        with pytest.raises(UsageError):
            ProcessBarrier.create(registry.prefix, registry, bad)  # type: ignore[arg-type]
    assert len(registry) == 0


def test_reset_validates_parties(registry: NameRegistry) -> None:
    with _barrier(registry, 4) as bar:
        for bad in (0, 5, -1, True, "2"):
            with pytest.raises(UsageError):
                bar.reset(bad)  # type: ignore[arg-type]
        bar.reset(4)
        assert bar.parties == 4
        assert bar.max_parties == 4


def test_wait_before_reset_and_bad_timeouts(registry: NameRegistry) -> None:
    with _barrier(registry, 2) as bar:
        with pytest.raises(UsageError):
            bar.wait(0.1)
        with pytest.raises(UsageError):
            bar.wait_filled(0.1)
        bar.reset(1)
        for bad in (-1.0, math.nan, math.inf):
            with pytest.raises(UsageError):
                bar.wait(bad)
        assert bar.wait(1.0) == 0  # the lock survived the UsageError


def test_single_party_in_process(registry: NameRegistry) -> None:
    with _barrier(registry, 1) as bar:
        bar.reset(1)
        for i in range(5):
            assert bar.wait(1.0) == 0
            assert bar.generation == i + 1
        assert bar.wait_filled(0.0)
        assert bar.wait_filled(0.0)
        assert not bar.broken
        assert bar.diagnostics()["crossings"] == 5


def test_timeout_in_process_breaks(registry: NameRegistry) -> None:
    with _barrier(registry, 2) as bar:
        bar.reset(2)
        with pytest.raises(BarrierTimeout):
            bar.wait(0.05)
        assert bar.broken
        assert bar.diagnostics()["broken_reason"] == "party timeout"
        with pytest.raises(BarrierError) as info:
            bar.wait(1.0)
        assert type(info.value) is BarrierError
        with pytest.raises(BarrierError):
            bar.wait_filled(0.1)
        gen = bar.generation
        bar.reset(1)
        assert not bar.broken
        assert bar.generation == gen + 1  # the broken generation is abandoned
        assert bar.wait(1.0) == 0


def test_spec_pickles_and_party_handles_cannot_own(registry: NameRegistry) -> None:
    owner = _barrier(registry, 3)
    spec = pickle.loads(pickle.dumps(owner.spec))
    assert spec == owner.spec
    party = ProcessBarrier.attach(spec)
    try:
        assert owner.is_owner
        assert not party.is_owner
        with pytest.raises(UsageError):
            party.reset(2)
        with pytest.raises(UsageError):
            party.unlink()
        with pytest.raises(UsageError):
            party.wait_filled(0.1)
        owner.reset(2)
        assert party.parties == 2
        party.abort()
        assert owner.broken
        party.abort()  # idempotent
        assert owner.broken
    finally:
        party.close()
        party.close()
        owner.unlink()
        owner.unlink()
        owner.close()
    with pytest.raises(IPCError):
        ProcessBarrier.attach(spec)  # unlinked: attach never creates
    with pytest.raises(IPCError):
        _ = owner.generation  # closed


def test_context_manager_unlinks(registry: NameRegistry) -> None:
    with _barrier(registry, 2) as bar:
        names = [shm_entry(n, k) for n, k in bar.spec.objects()]
        assert set(names) <= set(os.listdir("/dev/shm"))
        assert len(registry) == 5
    assert not set(names) & set(os.listdir("/dev/shm"))
    assert len(registry) == 0


# -- with worker processes --------------------------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize("n", [1, 2, 4, 16])
def test_many_crossings(n: int, registry: NameRegistry, procs: Procs) -> None:
    crossings = 40 if n <= 4 else 15
    with _barrier(registry, n) as bar:
        bar.reset(n)
        conns = [
            procs.start(_crossing_worker, bar.spec, crossings, LONG)[1]
            for _ in range(n)
        ]
        assert bar.wait_filled(GUARD)
        assert bar.wait_filled(0.0)  # cheap and still True in the same round
        replies = [_recv(c) for c in conns]
        assert all(r[0] == "ok" for r in replies), replies
        _check_crossings([r[1] for r in replies], n)
        assert bar.generation == crossings
        assert not bar.broken
        assert bar.arrived == 0
    for p in procs.procs:
        p.join(GUARD)
        assert p.exitcode == 0


@pytest.mark.timeout(120)
def test_parties_change_between_rounds(registry: NameRegistry, procs: Procs) -> None:
    with _barrier(registry, 4) as bar:
        conns = [procs.start(_command_worker, bar.spec)[1] for _ in range(4)]
        for rnd, k in enumerate([4, 2, 3, 1, 4, 3, 2, 2, 4]):
            bar.reset(k)
            gen = bar.generation
            chosen = [conns[(rnd + i) % 4] for i in range(k)]
            for c in chosen[:-1]:
                c.send(("wait", LONG))
            if k > 1:
                # One party is missing, so the round cannot have filled.
                assert not bar.wait_filled(0.2)
            chosen[-1].send(("wait", LONG))
            assert bar.wait_filled(GUARD)
            t_filled = time.monotonic_ns()
            assert bar.wait_filled(0.0)
            replies = [_recv(c) for c in chosen]
            assert all(r[0] == "ok" for r in replies), replies
            assert sorted(r[1] for r in replies) == list(range(k))
            assert max(r[2] for r in replies) < t_filled  # all arrived first
            assert max(r[2] for r in replies) < min(r[3] for r in replies)
            assert bar.generation == gen + 1
            assert bar.parties == k


@pytest.mark.timeout(120)
def test_abort_releases_blocked_workers(registry: NameRegistry, procs: Procs) -> None:
    with _barrier(registry, 3) as bar:
        bar.reset(3)
        conns = [procs.start(_crossing_worker, bar.spec, 1, LONG)[1] for _ in range(2)]
        _poll_until(lambda: bar.arrived == 2)
        t0 = time.monotonic()
        bar.abort()
        replies = [_recv(c) for c in conns]
        assert time.monotonic() - t0 < GUARD
        assert [r[:2] for r in replies] == [("err", "BarrierError")] * 2, replies
        assert bar.broken
        with pytest.raises(BarrierError):
            bar.wait_filled(1.0)
        bar.abort()  # idempotent
        # usable again after reset
        bar.reset(2)
        assert not bar.broken
        conns = [procs.start(_crossing_worker, bar.spec, 3, LONG)[1] for _ in range(2)]
        assert bar.wait_filled(GUARD)
        replies = [_recv(c) for c in conns]
        assert all(r[0] == "ok" for r in replies), replies
        _check_crossings([r[1] for r in replies], 2)


@pytest.mark.timeout(120)
def test_worker_timeout_breaks_barrier(registry: NameRegistry, procs: Procs) -> None:
    with _barrier(registry, 3) as bar:
        bar.reset(3)
        _, patient = procs.start(_crossing_worker, bar.spec, 1, LONG)
        _poll_until(lambda: bar.arrived == 1)
        _, hasty = procs.start(_crossing_worker, bar.spec, 1, 0.3)
        t0 = time.monotonic()
        assert _recv(hasty)[:2] == ("err", "BarrierTimeout")
        assert _recv(patient)[:2] == ("err", "BarrierError")
        assert time.monotonic() - t0 < GUARD
        assert bar.broken
        assert bar.diagnostics()["broken_reason"] == "party timeout"
        with pytest.raises(BarrierError):
            bar.wait_filled(1.0)
        bar.reset(3)
        conns = [procs.start(_crossing_worker, bar.spec, 2, LONG)[1] for _ in range(3)]
        assert bar.wait_filled(GUARD)
        replies = [_recv(c) for c in conns]
        assert all(r[0] == "ok" for r in replies), replies
        _check_crossings([r[1] for r in replies], 3)


@pytest.mark.timeout(120)
def test_killed_worker_owner_times_out_and_aborts(
    registry: NameRegistry, procs: Procs
) -> None:
    with _barrier(registry, 3) as bar:
        started = [procs.start(_command_worker, bar.spec) for _ in range(3)]
        (_, c0), (_, c1), (victim, _) = started
        bar.reset(3)
        c0.send(("wait", LONG))
        c1.send(("wait", LONG))
        _poll_until(lambda: bar.arrived == 2)
        victim.kill()  # SIGKILL before it arrived
        victim.join(GUARD)
        assert victim.exitcode == -signal.SIGKILL
        assert not bar.wait_filled(0.5)  # the round can never fill
        t0 = time.monotonic()
        bar.abort()  # what the parent's watchdog does
        assert _recv(c0)[:2] == ("err", "BarrierError")
        assert _recv(c1)[:2] == ("err", "BarrierError")
        assert time.monotonic() - t0 < GUARD
        # the survivors go on in a new round
        bar.reset(2)
        c0.send(("wait", LONG))
        c1.send(("wait", LONG))
        assert bar.wait_filled(GUARD)
        assert sorted([_recv(c0)[1], _recv(c1)[1]]) == [0, 1]


@pytest.mark.timeout(120)
def test_leave_crosses_without_a_party_that_never_arrived(
    registry: NameRegistry, procs: Procs
) -> None:
    """The parent removes a dead party; the others still wait for the rest."""
    with _barrier(registry, 4) as bar:
        started = [procs.start(_command_worker, bar.spec) for _ in range(4)]
        (_, c0), (_, c1), (_, slow), (victim, _) = started
        bar.reset(4)
        c0.send(("wait", LONG))
        c1.send(("wait", LONG))
        _poll_until(lambda: bar.arrived == 2)
        victim.kill()  # SIGKILL before it arrived
        victim.join(GUARD)
        assert bar.leave(lambda: False, GUARD)
        assert not bar.broken
        # the slow party has not arrived yet: nobody may cross
        assert not c0.poll(0.3) and not c1.poll(0.0)
        assert bar.parties == 3
        slow.send(("wait", LONG))
        replies = [_recv(c) for c in (c0, c1, slow)]
        assert all(r[0] == "ok" for r in replies), replies
        assert sorted(r[1] for r in replies) == [0, 1, 2]
        # a slow party's phase 2 cannot start before the slow one arrived
        assert max(r[2] for r in replies) < min(r[3] for r in replies)


def test_leave_completes_the_crossing_when_the_rest_arrived(
    registry: NameRegistry, procs: Procs
) -> None:
    with _barrier(registry, 3) as bar:
        bar.reset(3)
        conns = [procs.start(_crossing_worker, bar.spec, 1, LONG)[1] for _ in range(2)]
        _poll_until(lambda: bar.arrived == 2)
        gen = bar.generation
        assert bar.leave(lambda: False, GUARD)  # the third died before arriving
        assert bar.generation == gen + 1
        assert bar.wait_filled(GUARD)
        replies = [_recv(c) for c in conns]
        assert all(r[0] == "ok" for r in replies), replies


def test_leave_of_a_counted_party_changes_nothing(registry: NameRegistry) -> None:
    with _barrier(registry, 2) as bar:
        bar.reset(2)
        assert bar.leave(lambda: True, GUARD)  # it arrived before it died
        assert bar.parties == 2 and bar.arrived == 0 and not bar.broken
        with ProcessBarrier.attach(bar.spec) as party, pytest.raises(UsageError):
            party.leave(lambda: False, 1.0)  # only the owner removes parties


def _leaving_worker(spec: BarrierSpec, conn: Any) -> None:
    """Arrive, then get SIGKILLed by the test while waiting."""
    with ProcessBarrier.attach(spec) as bar:
        conn.send("arriving")
        bar.wait(LONG)


@pytest.mark.timeout(120)
def test_stray_token_of_killed_waiter_is_harmless(
    registry: NameRegistry, procs: Procs
) -> None:
    """A party killed after arriving leaves a token behind; nobody passes early."""
    with _barrier(registry, 2) as bar:
        bar.reset(2)
        victim, vconn = procs.start(_leaving_worker, bar.spec)
        assert _recv(vconn) == "arriving"
        _poll_until(lambda: bar.arrived == 1)
        victim.kill()  # SIGKILL while it waits on gate0
        victim.join(GUARD)
        a, b = (procs.start(_command_worker, bar.spec)[1] for _ in range(2))
        a.send(("wait", LONG))
        assert bar.wait_filled(GUARD)  # the victim counted as arrived
        assert _recv(a)[:2] == ("ok", 1)
        # Generation 0 crossed and its token for the victim is a stray on
        # gate0.  Cross generation 1 (gate1) and 2 (gate0, with the stray)
        # without a reset: a lone party must never pass.
        for _ in range(2):
            a.send(("wait", LONG))
            assert not a.poll(0.3), "a lone party passed the barrier"
            b.send(("wait", LONG))
            ra, rb = _recv(a), _recv(b)
            assert (ra[:2], rb[:2]) == (("ok", 0), ("ok", 1))
            assert ra[2] < rb[3]
            assert rb[2] < ra[3]
        assert bar.generation == 3
        assert not bar.broken


@pytest.mark.timeout(180)
def test_64_parties(registry: NameRegistry, procs: Procs) -> None:
    n = 64
    with _barrier(registry, n) as bar:
        bar.reset(n)
        conns = [procs.start(_crossing_worker, bar.spec, 5, LONG)[1] for _ in range(n)]
        assert bar.wait_filled(GUARD)
        replies = [_recv(c, 2 * GUARD) for c in conns]
        assert all(r[0] == "ok" for r in replies), [r for r in replies if r[0] != "ok"]
        _check_crossings([r[1] for r in replies], n)
        assert bar.generation == 5


# -- signals ----------------------------------------------------------------------


def _signalled_worker(spec: BarrierSpec, conn: Any) -> None:
    hits = []
    signal.signal(signal.SIGUSR1, lambda *_: hits.append(1))
    stop = []

    def on_term(*_: Any) -> None:
        stop.append(1)

    def hook() -> None:
        if stop:
            raise SystemExit(7)

    signal.signal(signal.SIGTERM, on_term)
    set_signal_hook(hook)
    with ProcessBarrier.attach(spec) as bar:
        try:
            idx = bar.wait(LONG)
        except BarrierError as exc:
            conn.send(_outcome(exc))
            return
        except SystemExit as exc:
            conn.send(("exit", exc.code, bar.broken))
            return
        conn.send(("ok", idx, len(hits)))


@pytest.mark.timeout(120)
def test_eintr_is_retried(registry: NameRegistry, procs: Procs) -> None:
    with _barrier(registry, 2) as bar:
        bar.reset(2)
        proc, conn = procs.start(_signalled_worker, bar.spec)
        _poll_until(lambda: bar.arrived == 1)
        for _ in range(5):
            os.kill(proc.pid, signal.SIGUSR1)
            time.sleep(0.02)
        assert not conn.poll(0.1)  # still waiting, despite the signals
        _, other = procs.start(_crossing_worker, bar.spec, 1, LONG)
        reply = _recv(conn)
        assert reply[0] == "ok", reply
        assert reply[1] == 0
        assert reply[2] >= 1  # the handler ran
        assert _recv(other)[0] == "ok"


@pytest.mark.timeout(120)
def test_signal_hook_ends_wait_and_breaks(registry: NameRegistry, procs: Procs) -> None:
    with _barrier(registry, 3) as bar:
        bar.reset(3)
        _, patient = procs.start(_crossing_worker, bar.spec, 1, LONG)
        proc, conn = procs.start(_signalled_worker, bar.spec)
        _poll_until(lambda: bar.arrived == 2)
        os.kill(proc.pid, signal.SIGTERM)
        assert _recv(conn) == ("exit", 7, True)
        assert _recv(patient)[:2] == ("err", "BarrierError")
        assert bar.diagnostics()["broken_reason"] == "party interrupted"


# -- owner killed --------------------------------------------------------------


def _owner_process(conn: Any) -> None:
    reg = NameRegistry()
    bar = ProcessBarrier.create(reg.prefix, reg, 4)
    bar.reset(2)
    conn.send((reg.prefix, bar.spec))
    signal.pause()  # until SIGKILLed


@pytest.mark.timeout(120)
def test_owner_sigkilled_then_swept(procs: Procs) -> None:
    owner, conn = procs.start(_owner_process)
    prefix, spec = _recv(conn)
    expected = {shm_entry(n, k) for n, k in spec.objects()}
    assert _entries(prefix) == expected
    owner.kill()
    owner.join(GUARD)
    assert owner.exitcode == -signal.SIGKILL
    assert _entries(prefix) == expected  # nothing removes them by itself
    removed = sweep_stale()
    assert expected <= set(removed)
    assert _entries(prefix) == set()
